"""The MLflow run is bound to the athanor run name: found again, never duplicated, on a local store and a server."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from athanor.cluster import tracking
from athanor.config import load_config
from athanor.layout import RunLayout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite backend and a local artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited at start")
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not become healthy in 90 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # the server forks workers: stop the whole group
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _bind_twice(tmp_path, uri):
    overrides = [f"run.workdir={tmp_path}", "run.name=bind-test"]
    if uri:
        overrides.append(f"mlflow.tracking_uri={uri}")
    cfg = load_config("configs/smoke.yaml", overrides)
    layout = RunLayout.from_workdir(cfg.run.workdir)
    first = tracking.resolve_run(cfg, layout)
    tracking.log_stage_stats(first, [{"stage": "read", "in": 12, "kept": 9, "dropped": {"warc_revisit": 3}}])
    changed = load_config("configs/smoke.yaml", overrides + [f"train.max_steps={cfg.train.max_steps + 1}"])
    second = tracking.resolve_run(changed, layout)
    tracking.log_stage_stats(second, [{"stage": "read", "in": 12, "kept": 9, "dropped": {"warc_revisit": 3}}])
    client = MlflowClient(tracking.tracking_uri(cfg, layout))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`athanor.run_name` = 'bind-test'")
    return first, second, runs, client, cfg.train.max_steps


@pytest.mark.parametrize("store", ["sqlite-file", "server"])
def test_run_is_found_again_not_duplicated(tmp_path, store, request):
    uri = request.getfixturevalue("mlflow_server") if store == "server" else None
    first, second, runs, client, steps = _bind_twice(tmp_path, uri)
    assert first == second
    assert [r.info.run_id for r in runs] == [first]
    run = client.get_run(first)
    assert run.data.params["train.max_steps"] == str(steps)  # params are immutable: the first value stays
    assert run.data.tags["config_changed.train.max_steps"] == str(steps + 1)  # and the change is recorded
    counts = tracking.curation_table(first, client)
    assert counts.duplicated(["stage", "status", "reason"]).sum() == 0  # bound twice, counted once
    assert counts.set_index(["stage", "status", "reason"])["documents"]["read", "dropped", "warc_revisit"] == 3
    assert not run.data.metrics  # the counts are a table, not forty one-point charts
    assert (tmp_path / "mlflow_run_id").read_text().strip() == first


def test_step_metrics_logger_writes_each_step_and_raises_lost_ones_at_flush(tmp_path):
    """The training metrics actor's class, in process: metrics land under their steps, and a write that fails is
    not dropped silently (nobody waits on log()): the next flush raises it, naming the step."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("metrics-logger")).info.run_id
    logger = tracking.StepMetricsLogger(uri, run_id)
    for step in (1, 2, 3):
        logger.log({"loss": 1.0 / step, "world_size": 2}, step, 1_000 * step)
    logger.flush()
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value, m.timestamp) for m in history] == [(1, 1.0, 1000), (2, 0.5, 2000), (3, 1 / 3, 3000)]

    client.delete_run(run_id)  # MLflow refuses writes to a deleted run
    logger.log({"loss": 0.25}, 4, 4_000)
    with pytest.raises(RuntimeError, match=r"lost the metrics of 1 step\(s\) \[4\]"):
        logger.flush()
    logger.flush()  # reported once; the restart that follows replays the step
