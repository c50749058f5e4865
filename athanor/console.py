"""What athanor prints while it works, and how much of Ray's and MLflow's own logging comes with it.

athanor's lines go to stdout: each curation and tokenization stage prints one line as it ends (documents in and
kept, docs/s, time) and training one line per log interval (cluster/console.py). Where stdout is not a terminal
(logs, CI), a long stage also prints a line every PROGRESS_EVERY_S: its progress and ETA where it can count them,
else that it is still running; on a terminal Ray Data draws its own progress bars instead. Ray's INFO lines (Ray
Data's execution plans, "Started a local Ray instance", Ray Train's worker-group and checkpoint reports, autoscaler
events) and MLflow's are hidden unless `athanor --verbose` (or ATHANOR_VERBOSE=1); warnings and errors always show.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

VERBOSE_ENV = "ATHANOR_VERBOSE"
PROGRESS_EVERY_S = 15.0  # periodic plain lines of a long stage, when stdout is not a terminal


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose_flag: bool = False) -> None:
    """Set this process's verbosity before Ray or MLflow is imported: some of their settings are read at import, and
    a local Ray's workers inherit this environment. Settings the user exported already win."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if not verbose():
        os.environ.setdefault("RAY_LOG_TO_DRIVER_EVENT_LEVEL", "WARNING")  # autoscaler events below WARNING
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def ray_logging_level() -> int:
    """For ray.init(logging_level=...): the driver's `ray` logger ("Started a local Ray instance" is INFO)."""
    return logging.INFO if verbose() else logging.WARNING


def ray_train_log_level() -> str:
    """For Ray Train's LoggingConfig: its controller's and workers' `ray.train` console lines."""
    return "INFO" if verbose() else "WARNING"


def quiet_ray_data(quiet: bool | None = None) -> None:
    """Ray Data's console INFO lines (execution plans, "Starting execution", non-TTY progress dumps) off, unless
    verbose; its log files under the Ray session keep every level. Left alone when the user configured Ray Data's
    logging (RAY_DATA_LOGGING_CONFIG, RAY_DATA_LOG_LEVEL)."""
    if os.environ.get("RAY_DATA_LOGGING_CONFIG") or os.environ.get("RAY_DATA_LOG_LEVEL"):
        return
    import ray.data  # noqa: F401 - configures the `ray.data` logger's handlers

    quiet = not verbose() if quiet is None else quiet
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING if quiet else logging.INFO)


def interactive() -> bool:
    """Whether stdout is a terminal: Ray Data's bars there, plain periodic lines elsewhere."""
    return sys.stdout.isatty()


def say(line: str) -> None:
    print(line, flush=True)


def hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def stage_line(name: str, docs_in: int, kept: int, seconds: float | None) -> str:
    """`filter: 3,144 in, 1,232 kept (39.2%), 101 docs/s, 31.0 s`; seconds None: done by an earlier run."""
    share = f" ({kept / docs_in:.1%})" if docs_in else ""
    if seconds is None:
        return f"{name}: {docs_in:,} in, {kept:,} kept{share}, done earlier"
    rate = f", {docs_in / seconds:,.0f} docs/s" if seconds > 0 else ""
    return f"{name}: {docs_in:,} in, {kept:,} kept{share}{rate}, {seconds:.1f} s"


class Progress:
    """Periodic plain lines of one counted step (`name: 1,234/40,000 docs, 410 docs/s, ETA 0:01:34`), at most one
    every `every_s`, and none on a terminal (Ray Data's bars show progress there). `rate=False` leaves out the rate
    (`filter: 12/40 shards committed, ETA 0:00:30`)."""

    def __init__(self, name: str, total: int | None, what: str = "docs", rate: bool = True,
                 every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 out: Callable[[str], None] = say, enabled: bool | None = None):
        self.name, self.total, self.what, self.rate = name, total, what, rate
        self.every_s, self.clock, self.out = every_s, clock, out
        self.enabled = not interactive() if enabled is None else enabled
        self.t0 = self.last = clock()
        self.printed = 0

    def update(self, done: int) -> None:
        now = self.clock()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self.printed += 1
            self.out(self.line(done, now))

    def line(self, done: int, now: float) -> str:
        elapsed = now - self.t0
        per_s = done / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total:,}" if self.total else ""
        parts = [f"{self.name}: {done:,}{total} {self.what}"]
        if self.rate:
            parts.append(f"{per_s:,.0f} {self.what}/s")
        if self.total:
            parts.append(f"ETA {hms((self.total - done) / per_s if per_s > 0 else None)}")
        else:
            parts.append(f"{hms(elapsed)} elapsed")
        return ", ".join(parts)


@contextmanager
def heartbeat(name: str, detail: str = "", every_s: float = PROGRESS_EVERY_S, out: Callable[[str], None] = say,
              enabled: bool | None = None) -> Iterator[None]:
    """While a step that cannot count its progress runs (a Ray Data stage computing, SentencePiece training), a line
    every `every_s` that it still is: `dedup: running, 0:00:45 elapsed, 3,144 docs in`. Not on a terminal."""
    if not (not interactive() if enabled is None else enabled):
        yield
        return
    stop, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(every_s):
            out(f"{name}: running, {hms(time.monotonic() - t0)} elapsed{detail}")

    thread = threading.Thread(target=beat, name=f"athanor-heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
