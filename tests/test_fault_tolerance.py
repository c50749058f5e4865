"""Training survives a worker killed with SIGKILL: it resumes from the last checkpoint, and the samples it trains
on, step by step, and the loss curve equal those of an uninterrupted run (the session's smoke run)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from cli_runner import ROOT

from athanor.config import load_config


def _effective_steps(path):
    """step -> record; a step replayed after a failure appears twice and its last record is the one that counts."""
    steps = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec
    return steps


def _train_workers(root_pid):
    procs = psutil.Process(root_pid).children(recursive=True)
    return [p for p in procs if "RayTrainWorker" in " ".join(_cmdline(p))]


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.slow
def test_sigkilled_worker_resumes_without_skipping_or_repeating_samples(smoke_run, tmp_path):
    baseline_dir, _ = smoke_run
    baseline = _effective_steps(baseline_dir / "train_samples.jsonl")
    # Same data and tokenizer, fresh training state.
    work = tmp_path / "run"
    work.mkdir()
    for name in ("shards", "tokenizer", "manifest.json"):
        src = baseline_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "athanor.cluster.cli", "train", "configs/smoke.yaml", "--set", f"run.workdir={work}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    samples = work / "train_samples.jsonl"
    checkpoint_every = load_config("configs/smoke.yaml").train.checkpoint_every
    killed = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and killed is None:
            steps = _effective_steps(samples) if samples.exists() else {}
            if steps and max(steps) >= checkpoint_every + 5:
                workers = _train_workers(proc.pid)
                if workers:
                    killed = workers[-1].pid
                    workers[-1].send_signal(signal.SIGKILL)
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no training worker was found to kill"
    assert proc.returncode == 0, out[-5000:]

    resumed = _effective_steps(samples)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) > len(resumed), "no step was replayed: the kill did not interrupt training"
    assert sorted(resumed) == sorted(baseline) == list(range(1, len(baseline) + 1))
    for step in baseline:
        assert resumed[step]["sample_ids"] == baseline[step]["sample_ids"], step
        assert resumed[step]["loss"] == pytest.approx(baseline[step]["loss"], rel=1e-4, abs=1e-5), step
