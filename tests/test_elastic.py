"""Elastic training on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and worker nodes as separate
raylets on this machine). The group grows when a node joins, shrinks when it leaves, a driver stopped by SIGTERM or
killed, then relaunched with the same run name, resumes, and so does a worker killed with SIGKILL; in each case every
step trains in effect once, on the samples and with the loss of an uninterrupted run, and MLflow holds one run with
one continuous step axis."""

from __future__ import annotations

import os
import signal

import pytest
from cli_runner import ROOT
from training_runs import (assert_same_training, checkpoint_registered, effective_steps, finish,
                           fresh_training_dir, records, running, start_train, train_workers, wait_for)

from athanor.config import load_config

SMOKE = load_config(ROOT / "configs" / "smoke.yaml")
CHECKPOINT_EVERY = 10  # denser than the smoke run's, so each phase of a test reaches a checkpoint quickly
# A node that joins is seen at the next tick of the autoscaling coordinator Ray Train's elastic policy asks (every
# 20 s), plus the restart: on a quiet machine the smoke run's 300 steps on one worker take about as long. Scoring
# the whole validation split after every step (it reads no training state and changes nothing) stretches the run
# so the growth is seen mid-run on any machine, while the training stays bit for bit the baseline's.
ELASTIC = ["train.min_workers=1", "train.num_workers=2", "train.resize_interval_s=2",
           f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.eval_every=1", "train.eval_batches=8"]


def _world_sizes(work) -> list[int]:
    """The world size of each stretch of training, in order: [1, 2, 1] for grow then shrink."""
    sizes = [r["world_size"] for r in records(work)]
    return [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]]


@pytest.fixture
def one_cpu_cluster():
    """A head node with room for one training worker (1 CPU); tests add and remove nodes."""
    from ray.cluster_utils import Cluster

    # A lost node is declared dead after 3 missed 1-second health checks (Ray's default waits far longer).
    fast_failure_detection = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": fast_failure_detection})
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_group_grows_when_a_node_joins_and_shrinks_when_it_leaves(smoke_run, one_cpu_cluster, tmp_path, monkeypatch):
    baseline, _ = smoke_run
    # After a node is lost, Ray Train's first restart may still ask for the old size and wait out the worker-group
    # start timeout (60 s by default) before it settles for what is left; Ray Train passes this on to its controller.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    work = fresh_training_dir(baseline, tmp_path / "run")
    with running(start_train(work, f"cluster.address={one_cpu_cluster.address}", *ELASTIC)) as proc:
        wait_for(lambda: max(effective_steps(work), default=0) > CHECKPOINT_EVERY, proc, 300,
                 "one worker to pass a checkpoint")
        assert _world_sizes(work) == [1], "the group did not start with the one worker that fits"
        node = one_cpu_cluster.add_node(num_cpus=1)
        grown = wait_for(lambda: [r for r in records(work) if r["world_size"] == 2], proc, 180, "the group to grow")
        wait_for(lambda: max(r["step"] for r in records(work) if r["world_size"] == 2)
                 > grown[0]["step"] + CHECKPOINT_EVERY, proc, 300, "two workers to pass a checkpoint")
        one_cpu_cluster.remove_node(node, allow_graceful=False)  # the node is lost, not drained
    finish(proc)

    assert _world_sizes(work) == [1, 2, 1]
    assert effective_steps(work)[SMOKE.train.max_steps]["world_size"] == 1
    assert_same_training(work, baseline)


@pytest.mark.slow
def test_stopped_or_killed_driver_relaunched_with_the_same_name_resumes_into_the_same_mlflow_run(smoke_run, tmp_path):
    from mlflow.tracking import MlflowClient

    baseline, _ = smoke_run
    work = fresh_training_dir(baseline, tmp_path / "run")
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    # SIGTERM (kill, `athanor jobs stop`): training stops after the step it is at, with a checkpoint of that step.
    with running(start_train(work)) as proc:
        wait_for(lambda: max(effective_steps(work), default=0) >= 5, proc, 400, "five steps")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    stopped_at = max(effective_steps(work))
    assert proc.returncode == 128 + signal.SIGTERM, out[-5000:]
    assert f"training stopped on SIGTERM after step {stopped_at} " in out
    assert stopped_at < SMOKE.train.checkpoint_every, "the first periodic checkpoint came before the stop"
    assert (work / "checkpoints" / SMOKE.run.name / f"checkpoint_{stopped_at:08d}").is_dir()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    # SIGKILL of the driver and the local Ray it started (the driver's machine is gone): the work since the last
    # checkpoint is lost, and a relaunch under the same name resumes from that checkpoint.
    with running(start_train(work)) as proc:
        wait_for(lambda: max(effective_steps(work), default=0) >= SMOKE.train.checkpoint_every + 5, proc, 400,
                 "a checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(effective_steps(work))
    # SIGKILL of one training worker: Ray Train replaces the worker group, which
    # resumes from the last checkpoint; the steps since are replayed, and count once.
    second = 2 * SMOKE.train.checkpoint_every
    with running(start_train(work)) as proc:
        wait_for(lambda: max(effective_steps(work), default=0) >= second + 5
                 and checkpoint_registered(work, SMOKE.run.name, second), proc, 400, "a second checkpoint")
        workers = wait_for(lambda: train_workers(proc.pid), proc, 60, "a training worker to kill")
        workers[-1].send_signal(signal.SIGKILL)
    finish(proc)

    starts = [r["step"] for r in records(work) if "started" in r]  # the first step of each (re)start
    assert starts == [1, stopped_at + 1, SMOKE.train.checkpoint_every + 1, second + 1], starts
    assert killed_at > starts[2], (starts, killed_at)
    assert len(records(work)) > len(effective_steps(work)), "no step was replayed: the kill did not interrupt training"
    assert_same_training(work, baseline)

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FINISHED"
    loss = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted({m.step for m in loss}) == list(range(1, SMOKE.train.max_steps + 1))
