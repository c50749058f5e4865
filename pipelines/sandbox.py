"""Extraction in a child process that is killed when one page runs over its time budget.

resiliparse and trafilatura's parsers are C code: a SIGALRM cannot interrupt them (Python runs signal handlers
between bytecodes), and a thread cannot be stopped. So, as DataTrove's ExtractorSandbox does, the pages go to a
child process over a socket and a page that runs too long is dropped as `extract_timeout` with its process, which
a fresh one replaces; one that kills it (a crash in C, the OOM killer, which the child volunteers for) is dropped as
`extract_crashed`. The rest of the batch goes on in the new process, in order, so no other page is lost.

One persistent child per worker process and config (a process-level cache, as filters.py's _CHAINS), started with
subprocess, not fork (Ray workers are multi-threaded) nor multiprocessing's spawn (which would re-run the Ray
worker's main module): it imports only the extraction (extract.py), warms it up on a small page, and dies with its
parent (PR_SET_PDEATHSIG) or when the socket closes. Pages go over in chunks (CHUNK_DOCS, CHUNK_BYTES), results come
back one per page, so a chunk costs one round trip while each page keeps its own clock.

The clock is the child's CPU time (from /proc), not wall time, so a loaded machine does not push a normal page over
the budget; WALL_FACTOR times the budget in wall time also ends a page (a child stalled without computing). The
budget is timeout_s per started MiB of the page. Still, an `extract_timeout` depends on the machine's speed, unlike
every other drop: the default (1 s a MiB, config.py) is 5 times the CPU time of the slowest real page sampled (the
Python docs' 2.4 MiB table of contents: 0.47 s with the default extractor, under load) and over 10 times that of
every other, so normal pages stay far from it and reruns give the same output; only pages that would take seconds
or more are cut. The work budget
(budget.py) drops the known hostile shapes before extraction, deterministically, so the timeout is the last line.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from athanor.config import ExtractConfig

CHUNK_DOCS = 64  # pages per round trip
CHUNK_BYTES = 8 * 2**20  # and at most this much HTML (one page over it goes alone)
STARTUP_S = 120.0  # for the child to import and warm up (a cold start on a busy node takes seconds)
WALL_FACTOR = 10  # a page also ends after this many times the budget in wall time
POLL_S = 0.05  # how often a slow page's CPU time is read
WARMUP = b"<html><head><title>warm-up</title></head><body><main><p>A short page to load the extractor.</p></main>" \
         b"</body></html>"
_CHILD = "import sys; from athanor.pipelines.sandbox import serve; serve(int(sys.argv[1]), sys.argv[2])"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a page stuck in C never outlives the worker."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # under memory pressure, the OOM killer takes this first
            f.write("1000\n")
    except OSError:
        pass


def serve(fd: int, cfg_json: str) -> None:
    """The child: receive chunks of pages, send back (text, reason) per page, or (None, None, traceback)."""
    _die_with_parent()
    from athanor.pipelines.extract import html_to_text

    conn = Connection(fd)
    cfg = ExtractConfig.model_validate_json(cfg_json)
    html_to_text(WARMUP, cfg)
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        for html in chunk:
            try:
                conn.send(html_to_text(html, cfg))
            except Exception:  # noqa: BLE001 - an unexpected error goes back to the parent, which raises it
                conn.send((None, None, traceback.format_exc()))


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


class Sandbox:
    """One child process extracting with `cfg`, restarted after a page that kills it or runs out of time."""

    def __init__(self, cfg: ExtractConfig):
        assert cfg.timeout_s is not None
        self.cfg, self.timeout = cfg, cfg.timeout_s
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.lock = threading.Lock()
        self.restarts = 0  # children replaced after a page (timeout or crash)

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # the child imports what this process imports, from the same places
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        argv = [sys.executable, "-c", _CHILD, str(theirs.fileno()), self.cfg.model_dump_json()]
        with theirs:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        self.conn = Connection(ours.detach())
        try:
            ready = self.conn.poll(STARTUP_S) and self.conn.recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            code = self.proc.poll()
            self.close()
            raise RuntimeError(f"the extraction process did not start (exit code {code}); see its stderr above")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.conn.close()
        self.proc = self.conn = None

    def _result(self, size: int) -> tuple[str | None, str | None]:
        """The next page's result, or (None, reason) when it runs over budget or kills the child. The budget is
        timeout_s per started MiB of the page: normal extraction is about linear in the bytes, hostile pages are not."""
        budget = self.timeout * max(1.0, size / 2**20)
        cpu0, wall0 = _cpu_seconds(self.proc.pid), time.monotonic()
        while True:
            if self.conn.poll(min(POLL_S, budget)):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    return None, "extract_crashed"
                if len(msg) == 3:
                    raise RuntimeError(f"extraction failed in the sandbox:\n{msg[2]}")
                return msg
            if self.proc.poll() is not None:
                return None, "extract_crashed"
            cpu, wall = _cpu_seconds(self.proc.pid), time.monotonic() - wall0
            used = cpu - cpu0 if cpu is not None and cpu0 is not None else wall
            if used > budget or wall > WALL_FACTOR * budget:
                return None, "extract_timeout"

    def extract(self, pages: list[bytes]) -> list[tuple[str | None, str | None]]:
        """(text, None) or (None, drop_reason) per page, in order."""
        out: list[tuple[str | None, str | None]] = []
        with self.lock:
            for chunk in _chunks(pages):
                while chunk:
                    if self.proc is None or self.proc.poll() is not None:
                        self.close()
                        self._start()
                    self.conn.send(chunk)
                    for k in range(len(chunk)):
                        text, reason = self._result(len(chunk[k]))
                        out.append((text, reason))
                        if reason in ("extract_timeout", "extract_crashed"):
                            self.close()  # a fresh process takes the rest of the chunk
                            self.restarts += 1
                            chunk = chunk[k + 1:]
                            break
                    else:
                        chunk = []
        return out


def _chunks(pages: list[bytes]):
    chunk, size = [], 0
    for page in pages:
        if chunk and (len(chunk) == CHUNK_DOCS or size + len(page) > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(page)
        size += len(page)
    if chunk:
        yield chunk


_SANDBOXES: dict[str, Sandbox] = {}  # this worker process's child, by config
_SANDBOXES_LOCK = threading.Lock()


def sandbox(cfg: ExtractConfig) -> Sandbox:
    """This process's sandbox for `cfg`, started on first use and kept for the next batches."""
    key = cfg.model_dump_json()
    with _SANDBOXES_LOCK:
        if key not in _SANDBOXES:
            close_all()
            _SANDBOXES[key] = Sandbox(cfg)
        return _SANDBOXES[key]


def close_all() -> None:
    for box in _SANDBOXES.values():
        with box.lock:
            box.close()
    _SANDBOXES.clear()


atexit.register(close_all)
