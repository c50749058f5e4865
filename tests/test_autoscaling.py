"""Autoscaling with Ray's fake multi-node autoscaler: worker nodes come for curation and training, and go when idle.

The head has 1 CPU and the autoscaler may add up to two 1-CPU worker nodes (extra raylets on this machine), removing
them after 15 idle seconds. Curation joins the cluster through `cluster.address` and needs more than the head's CPU,
so nodes come up, and go away once it is done. Training with `train.min_workers=1, num_workers=2` starts with one
worker on the head while the worker type is capped at zero nodes; after ten steps the test lifts the cap to one (as
capacity arriving would), the autoscaler brings the node, and Ray Train grows the group to two from the latest
checkpoint, which train_samples.jsonl records as world_size going from 1 to 2. How long that takes is Ray's (the
autoscaler's update, the node's start, Ray Data's 20 s autoscaling-coordinator tick), so training runs open-ended
and the test ends it with SIGTERM once two workers have trained past a checkpoint (athanor.cluster.stop).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from cli_runner import ROOT
from ray_head import ray_head

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_MINUTES = 0.25
WORKER_TYPES = {"cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        with ray_head(num_cpus=1, env=env, worker_node_types=WORKER_TYPES,
                      idle_timeout_minutes=IDLE_TIMEOUT_MINUTES) as head:
            yield head


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("autoscaling-run")


def alive_workers(head) -> list[str]:
    """Ids of the alive non-head nodes, from the head's state API."""
    req = urllib.request.Request(f"{head.dashboard_url}/api/v0/nodes?limit=100&detail=1",
                                 headers={"x-ray-authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    nodes = json.load(urllib.request.urlopen(req, timeout=30))["data"]["result"]["result"]
    return sorted(n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"])


def run_on_cluster(head, *args, timeout=600, on_tick=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`athanor ARGS --set cluster.address=HEAD`, watching the worker nodes (and calling on_tick(process)) while it
    runs; returns the ids of the worker nodes seen."""
    # Ray Data asks the autoscaler for a node once the cluster's CPUs have been over 75% busy for this many seconds
    # (10 by default): the smoke config's curation is over in about 15 s, before a node could come.
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DATA_CLUSTER_UTIL_AVG_WINDOW_S="2")
    env.pop("RAY_ADDRESS", None)
    # --verbose: Ray Train's INFO lines, where its resize decisions show
    cmd = [sys.executable, "-m", "athanor.cluster.cli", *args, "--set", f"cluster.address={head.gcs_address}",
           "--verbose"]
    seen: set[str] = set()
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True) as p:
            while p.poll() is None:
                seen.update(alive_workers(head))
                if on_tick is not None:
                    on_tick(p)
                if time.monotonic() - t0 > timeout:
                    p.kill()
                    p.wait()
                    log.write(f"\nKILLED after {timeout} s\n")
                time.sleep(2)
        log.seek(0)
        out = log.read()
    print(f"athanor {args[0]}: exit {p.returncode} after {time.monotonic() - t0:.0f} s, {len(seen)} worker node(s) seen")
    return subprocess.CompletedProcess(cmd, p.returncode, out, ""), seen


def wait_for_no_workers(head, timeout: float) -> float:
    t0 = time.monotonic()
    while alive_workers(head):
        assert time.monotonic() - t0 < timeout, f"worker nodes still alive after {timeout:.0f} s idle"
        time.sleep(2)
    return time.monotonic() - t0


def overrides(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
    assert (data_dir / "html" / "news").is_dir()  # the smoke config's inputs, read by every node from this disk
    sets = [f"run.workdir={workdir}", "run.name=autoscaling", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_curation_brings_up_cpu_nodes_that_go_away_when_idle(cluster, workdir, data_dir):
    assert alive_workers(cluster) == []
    proc, seen = run_on_cluster(cluster, "curate", "configs/smoke.yaml", *overrides(workdir, data_dir))
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert (workdir / "stats" / "curation.json").is_file()
    print(f"worker nodes that came up during curation: {len(seen)}")
    assert 1 <= len(seen) <= 2  # the head's one CPU was not enough, and the autoscaler kept to max_workers
    idle = wait_for_no_workers(cluster, timeout=IDLE_TIMEOUT_MINUTES * 60 + 90)
    print(f"all worker nodes gone {idle:.0f} s after curation ended")


def _world_sizes(samples: Path) -> dict[int, int]:
    """step -> world size; a step replayed after a resize appears again and its last record counts."""
    if not samples.is_file():
        return {}
    last = {}
    for line in samples.read_text().split("\n")[:-1]:  # read while rank 0 appends: a line without its \n waits
        r = json.loads(line)
        last[r["step"]] = r["world_size"]
    return last


def test_training_grows_from_one_to_two_workers_when_a_node_arrives(cluster, workdir, data_dir):
    # Tokenize on the cluster (curating first if the test above did not run).
    for stage in ("curate", "tokenize"):
        if stage == "curate" and (workdir / "stats" / "curation.json").is_file():
            continue
        proc, _ = run_on_cluster(cluster, stage, "configs/smoke.yaml", *overrides(workdir, data_dir))
        assert proc.returncode == 0, proc.stdout[-5000:]
    # No room for a worker node until training has taken steps with one worker on the head: then a node "arrives".
    cluster.set_max_workers("cpu", 0)
    wait_for_no_workers(cluster, timeout=IDLE_TIMEOUT_MINUTES * 60 + 90)
    samples = workdir / "train_samples.jsonl"
    samples.unlink(missing_ok=True)
    checkpoint_every = 10
    timeline = []  # (time, what happened at which step)

    def let_a_node_come_then_stop(proc):
        sizes = _world_sizes(samples)
        steps_on_two = sorted(s for s, w in sizes.items() if w == 2)
        if not timeline and len(sizes) >= 10:
            timeline.append((time.monotonic(), f"node let in after step {max(sizes)}"))
            cluster.set_max_workers("cpu", 1)
        elif len(timeline) == 1 and alive_workers(cluster):
            timeline.append((time.monotonic(), f"node alive at step {max(sizes)}"))
        elif len(timeline) == 2 and steps_on_two:
            timeline.append((time.monotonic(), f"world size 2 from step {steps_on_two[0]}"))
        elif len(timeline) == 3 and steps_on_two[-1] > steps_on_two[0] + checkpoint_every:
            timeline.append((time.monotonic(), f"SIGTERM at step {steps_on_two[-1]}"))
            proc.send_signal(signal.SIGTERM)

    proc, seen = run_on_cluster(cluster, "train", "configs/smoke.yaml", *overrides(
        workdir, data_dir, "train.min_workers=1", "train.num_workers=2", "train.max_steps=100000",
        "train.resize_interval_s=2", f"train.checkpoint_every={checkpoint_every}", "train.eval_every=1000",
        "train.log_sample_ids=true"), timeout=420, on_tick=let_a_node_come_then_stop)
    events = "; ".join(f"{t - timeline[0][0]:.0f} s: {what}" for t, what in timeline)
    print(f"timeline: {events}")
    assert len(timeline) == 4, f"two workers never passed a checkpoint ({events}):\n{proc.stdout[-5000:]}"
    assert len(seen) == 1  # the one node allowed in

    # Stopped on SIGTERM after the step it was at, with a checkpoint there to resume from, nothing skipped. The last
    # step written is where it stopped; steps past it were taken by one worker before the group restarted from an
    # earlier checkpoint to grow, and are undone (a resume takes them again).
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-5000:]
    stopped_at = json.loads(samples.read_text().splitlines()[-1])["step"]
    assert f"training stopped on SIGTERM after step {stopped_at} " in proc.stdout
    assert (workdir / "checkpoints" / "autoscaling" / f"checkpoint_{stopped_at:08d}").is_dir()
    last = {s: w for s, w in _world_sizes(samples).items() if s <= stopped_at}
    assert sorted(last) == list(range(1, stopped_at + 1))
    sizes = [last[s] for s in sorted(last)]
    grew_at = sizes.index(2)
    print(f"world size 1 for steps 1..{grew_at}, 2 from step {grew_at + 1} to {stopped_at}")
    assert sizes[0] == 1 and set(sizes[grew_at:]) == {2}
    assert "Deciding to resize the worker group from 1 -> 2 workers" in proc.stdout
