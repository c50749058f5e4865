"""Stop a training run on SIGTERM after the current step, with a checkpoint, so that a relaunch resumes exactly there.

`kill`, Kubernetes, a machine's shutdown and `athanor jobs stop` (Ray's job supervisor) end a driver with SIGTERM.
Without this the workers die mid-step, and a relaunch replays everything since the last periodic checkpoint. With
it, the driver's first SIGTERM sets a `StopRequest` actor; rank 0 checks it after every step without blocking, and
its answer rides on the step's loss all-reduce, so every rank stops after the same step, writes a checkpoint and
returns. A second SIGTERM acts as before. Ctrl-C (SIGINT) stays Ray Train's own: it aborts the run without a new
checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("athanor")


class StopRequest:
    """Set once by the driver, awaited by rank 0 (an asyncio actor: `wait` parks without holding a thread)."""

    def __init__(self):
        self._event = asyncio.Event()
        self._reason = ""

    async def request(self, reason: str) -> None:
        self._reason = reason
        self._event.set()

    async def wait(self) -> str:
        await self._event.wait()
        return self._reason


def start_stop_request():
    """A StopRequest beside the driver; if it is lost, rank 0's pending `wait` is retried on its restart."""
    from athanor.cluster.driver import start_beside_driver

    return start_beside_driver(StopRequest)


class StopWatch:
    """Rank 0's side: `requested()` is a local look at one pending call, not a round trip, so it runs every step."""

    def __init__(self, stop_request):
        self._pending = stop_request.wait.remote() if stop_request is not None else None

    def requested(self) -> bool:
        import ray

        if self._pending is None or not ray.wait([self._pending], timeout=0)[0]:
            return False
        try:
            ray.get(self._pending)
            return True
        except ray.exceptions.RayError as err:  # the actor is gone for good: an error is not a request to stop
            log.warning("training can no longer be stopped by SIGTERM with a checkpoint: %s", err)
            self._pending = None
            return False


@contextlib.contextmanager
def stop_on_signals(stop_request) -> Iterator[list[str]]:
    """While the block runs, the first SIGTERM asks `stop_request` to stop training and puts the signal's name in the
    yielded list; the previous handler comes back at once, so the next SIGTERM acts as usual.

    Outside the main thread (where Python cannot install handlers) it yields the list and changes nothing.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum, _frame) -> None:
        signal.signal(signal.SIGTERM, previous)
        name = signal.Signals(signum).name
        received.append(name)
        log.warning("%s: training stops after the current step and writes a checkpoint; send it again to abort",
                    name)
        # Not from inside the handler: it may have interrupted the main thread in the middle of a Ray call.
        threading.Thread(target=stop_request.request.remote, args=(name,), daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainingStopped(Exception):
    """Training ended early on request; the message says where its checkpoint is and how to resume."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal.Signals[signal_name].value  # what a shell reports for the signal
