"""Training's console: rank 0's line every `train.log_every` steps, printed by the driver.

`train: step 40/200  loss 5.1230  lr 3.0e-04  12,345 tok/s  MFU 41.2%  elapsed 0:01:02  ETA 0:04:10`

Rank 0 formats the line (it has the step's numbers: the same loss, lr and throughput that go to MLflow) and hands it,
without waiting, to a ConsoleRelay actor beside the driver; a driver thread prints what the relay holds. Printed by
the worker itself, each line would reach the driver's stdout behind Ray's coloured `(RayTrainWorker pid=...)`
prefix. With `log_every` at 1 (MLflow gets every step) a line every step would flood the console, so lines keep at
least LINE_EVERY_S apart, except a (re)start's first step, evaluation steps and the last step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from athanor.console import hms, say

log = logging.getLogger("athanor")

LINE_EVERY_S = 5.0
LABELS = {"pretrain": "train", "finetune": "finetune", "dpo": "dpo"}


class StepConsole:
    """Rank 0's side: which steps get a line, and the line. Throughput and MFU are over the steps since the previous
    line (the steps' own time, as MLflow's tokens_per_s); ETA is from the wall-clock step rate since this (re)start,
    so evaluation and checkpoint time count. MFU only when `peak_flops` (the workers' summed peak: GPUs only)."""

    def __init__(self, objective: str, max_steps: int, log_every: int, tokens_per_step: int,
                 flops_per_step: float, peak_flops: float | None, started: float,
                 every_s: float = LINE_EVERY_S, clock: Callable[[], float] = time.time):
        self.label = LABELS.get(objective, objective)
        self.max_steps, self.log_every = max_steps, max(1, log_every)
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.started, self.every_s, self.clock = started, every_s, clock
        self.first: tuple[int, float] | None = None  # (steps done before, time) at the start of this run's first step
        self.last_line: float | None = None
        self.steps, self.step_s = 0, 0.0  # steps and their time since the last line

    def start_line(self, step: int, world: int, metrics: dict) -> str:
        """A (re)start's first line: the worker group, where it resumes, what setting up cost."""
        where = f"resumed at step {step - 1}" if step > 1 else "from step 0"
        setup = f"setup {metrics['setup_s']:.1f} s" + (f", restore {metrics['restore_s']:.1f} s"
                                                         if metrics.get("restore_s") else "")
        workers = f"{world} worker{'s' if world != 1 else ''}"
        return f"{self.label}: {workers}, {where} of {self.max_steps} ({setup})"

    def step(self, step: int, dt: float, metrics: dict, force: bool = False) -> str | None:
        """This step's line, if it gets one. `force`: an evaluation, the last step, a stop."""
        now = self.clock()
        if self.first is None:
            self.first = (step - 1, now - dt)
            force = True
        self.steps += 1
        self.step_s += dt
        due = step % self.log_every == 0 and (self.last_line is None or now - self.last_line >= self.every_s)
        if not (force or due or step >= self.max_steps):
            return None
        line = self.line(step, now, metrics)
        self.last_line, self.steps, self.step_s = now, 0, 0.0
        return line

    def line(self, step: int, now: float, metrics: dict) -> str:
        done, t0 = self.first
        rate = (step - done) / (now - t0) if now > t0 else 0.0
        eta = (self.max_steps - step) / rate if rate > 0 else None
        parts = [f"{self.label}: step {step}/{self.max_steps}"]
        if "rewards/accuracies" in metrics:  # DPO: its loss, and TRL's reward accuracy and margin
            parts += [f"dpo_loss {metrics['loss']:.4f}", f"acc {metrics['rewards/accuracies']:.2f}",
                      f"margin {metrics['rewards/margins']:.3f}"]
        else:
            parts.append(f"loss {metrics['loss']:.4f}")
        for key, name in (("val_loss", "val_loss"), ("val_reward_accuracy", "val_acc")):
            if key in metrics:
                parts.append(f"{name} {metrics[key]:.4f}")
        parts.append(f"lr {metrics['lr']:.1e}")
        if self.step_s > 0:
            parts.append(f"{self.tokens_per_step * self.steps / self.step_s:,.0f} tok/s")
            if self.peak_flops:
                parts.append(f"MFU {self.flops_per_step * self.steps / self.step_s / self.peak_flops:.1%}")
        parts += [f"elapsed {hms(now - self.started)}", f"ETA {hms(eta)}"]
        return "  ".join(parts)


def quiet_worker_logs() -> None:
    """On a training worker, unless --verbose: MLflow's INFO lines (the system metrics monitor) and Ray Train's
    "Reporting training result" line after each checkpoint, whose logger is named by its file's path, outside the
    `ray.train` loggers that LoggingConfig quiets."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: the line may stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class ConsoleRelay:
    """Lines from rank 0 held for the driver's printing thread. A plain actor runs one caller's calls in the order
    they were sent, so the lines keep their order (an asyncio actor's need not)."""

    def __init__(self):
        self._lines: list[str] = []

    def put(self, line: str) -> None:
        self._lines.append(line)

    def take(self) -> list[str]:
        """The lines put since the last take."""
        lines, self._lines = self._lines, []
        return lines


def post(relay, line: str, wait: bool = False) -> None:
    """Rank 0: the line to the driver (printed here when there is no relay); `wait` until the relay holds it."""
    if relay is None:
        say(line)
        return
    ref = relay.put.remote(line)
    if wait:
        import ray

        try:
            ray.get(ref, timeout=30)
        except Exception as err:  # noqa: BLE001 - a lost console must not fail training
            log.debug("console relay: %s", err)


def start_console_relay():
    from athanor.cluster.driver import start_beside_driver

    return start_beside_driver(ConsoleRelay)


@contextlib.contextmanager
def printed(relay, out: Callable[[str], None] = say, poll_s: float = 1.0) -> Iterator[None]:
    """While the block runs (training), a driver thread prints the relay's lines every poll_s; on leaving it prints
    the rest."""
    import ray

    stop = threading.Event()

    def pump() -> None:
        while True:
            last = stop.wait(poll_s)
            try:
                lines = ray.get(relay.take.remote(), timeout=60)
            except Exception as err:  # noqa: BLE001 - a lost console must not fail training
                log.debug("console relay: %s", err)
                lines = []
            for line in lines:
                out(line)
            if last:
                return

    thread = threading.Thread(target=pump, name="athanor-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=70)
