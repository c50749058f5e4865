"""Helpers for tests that train, kill and resume: a fresh training folder over the smoke run's data, the training
CLI as a child process, and the record of which samples each step trained on (train.log_sample_ids)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from cli_runner import ROOT


def fresh_training_dir(data_run: Path, work: Path) -> Path:
    """Same shards and tokenizer as `data_run`, no training state."""
    work.mkdir(parents=True)
    for name in ("shards", "tokenizer", "manifest.json"):
        src = data_run / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    return work


def start_train(work: Path, *overrides: str, config: str = "configs/smoke.yaml", command: str = "train"
                ) -> subprocess.Popen:
    """`athanor train` (or `finetune`) in its own session (process group), so a test can kill it with everything it
    started."""
    sets = [a for o in (f"run.workdir={work}", *overrides) for a in ("--set", o)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "athanor.cluster.cli", command, config, *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def records(work: Path) -> list[dict]:
    path = work / "train_samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def effective_steps(work: Path) -> dict[int, dict]:
    """step -> record; a step replayed after a failure appears twice and its last record is the one that counts."""
    return {rec["step"]: rec for rec in records(work)}


def checkpoint_registered(work: Path, run_name: str, step: int) -> bool:
    """Ray Train has registered the checkpoint of `step` (its checkpoint manager's snapshot names it): a worker group
    restarted from now on resumes there. The folder alone is not enough: with asynchronous checkpointing it is
    written before the controller registers it, and a kill in between resumes from the previous one."""
    snapshot = work / "checkpoints" / run_name / "checkpoint_manager_snapshot.json"
    try:
        return f"checkpoint_{step:08d}" in snapshot.read_text()
    except OSError:
        return False


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    """Poll until predicate() is truthy; fail with the training output if the process ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-5000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def running(proc: subprocess.Popen):
    """Kill the training process group if the test body fails, so no run outlives its test."""
    try:
        yield proc
    except BaseException:
        os.killpg(proc.pid, 9)
        raise


def stop_after(work: Path, proc: subprocess.Popen, step: int, what: str) -> int:
    """SIGTERM the run once it has trained `step` steps; it must exit as a stopped run does (128 + SIGTERM).
    Returns the last step it trained."""
    with running(proc):
        wait_for(lambda: max(effective_steps(work), default=0) >= step, proc, 400, what)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-5000:]
    return max(effective_steps(work))


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, out[-5000:]
    return out


def train_workers(root_pid: int) -> list[psutil.Process]:
    procs = psutil.Process(root_pid).children(recursive=True)
    return [p for p in procs if "RayTrainWorker" in " ".join(_cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def assert_same_training(work: Path, baseline: Path, rel: float = 1e-4, abs_: float = 1e-5) -> None:
    """Every step trained once in effect, on the samples and (within floating point) with the loss of the baseline."""
    resumed, want = effective_steps(work), effective_steps(baseline)
    assert sorted(resumed) == sorted(want) == list(range(1, len(want) + 1))
    for step in want:
        assert resumed[step]["sample_ids"] == want[step]["sample_ids"], step
        assert resumed[step]["loss"] == pytest.approx(want[step]["loss"], rel=rel, abs=abs_), step
