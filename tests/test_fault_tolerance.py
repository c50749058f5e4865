"""Training survives a worker killed with SIGKILL: it resumes from the last checkpoint, and the samples it trains
on, step by step, and the loss curve equal those of an uninterrupted run (the session's smoke run)."""

import signal

import pytest
from cli_runner import ROOT
from training_runs import (assert_same_training, effective_steps, finish, fresh_training_dir, records, running,
                           start_train, train_workers, wait_for)

from athanor.config import load_config


@pytest.mark.slow
def test_sigkilled_worker_resumes_without_skipping_or_repeating_samples(smoke_run, tmp_path):
    baseline, _ = smoke_run
    work = fresh_training_dir(baseline, tmp_path / "run")
    checkpoint_every = load_config(ROOT / "configs" / "smoke.yaml").train.checkpoint_every
    with running(start_train(work)) as proc:
        wait_for(lambda: max(effective_steps(work), default=0) >= checkpoint_every + 5, proc, 400, "a checkpoint")
        workers = wait_for(lambda: train_workers(proc.pid), proc, 60, "a training worker to kill")
        workers[-1].send_signal(signal.SIGKILL)
    finish(proc)
    assert len(records(work)) > len(effective_steps(work)), "no step was replayed: the kill did not interrupt training"
    assert_same_training(work, baseline)
