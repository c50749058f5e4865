"""MLflow tracking bound to the athanor run name, so every stage, restart and training worker logs into one run.

The driver resolves the run once (looked up by name before it is created) and hands the run id to the training
workers; only rank 0 logs from there, its per-step metrics through a `StepMetricsLogger` actor. Without a tracking
server the store is SQLite inside the run's workdir; a URI workdir (s3://, gs://) cannot hold SQLite, so it needs
`mlflow.tracking_uri` (a server every node reaches).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from athanor import storage
from athanor.config import AthanorConfig, ConfigError
from athanor.layout import RunLayout
from athanor.storage import Location

RUN_NAME_TAG = "athanor.run_name"
log = logging.getLogger(__name__)


def tracking_uri(cfg: AthanorConfig, layout: RunLayout) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if layout.remote:  # a node-local SQLite would split one run across nodes: training's rank 0 may run elsewhere
        raise ConfigError(f"run.workdir is {layout.root}: set mlflow.tracking_uri (e.g. http://<mlflow-server>:5000) "
                         "to a store every node reaches; the default SQLite store lives only in a local workdir")
    return f"sqlite:///{layout.mlflow_db}"


def ui_command(cfg: AthanorConfig, layout: RunLayout) -> str:
    """The command that opens the MLflow UI on this run's store."""
    uri = tracking_uri(cfg, layout)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def _experiment_id(client: MlflowClient, cfg: AthanorConfig, layout: RunLayout) -> str:
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if cfg.mlflow.tracking_uri is None:  # local store: keep artifacts beside it, not in the current directory
        artifact_location = layout.mlflow_artifacts.as_uri()
    elif layout.remote:  # beside every other output of the run, in the shared bucket
        artifact_location = str(layout.mlflow_artifacts)
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_location)


def resolve_run(cfg: AthanorConfig, layout: RunLayout, name: str | None = None,
                tags: dict[str, str] | None = None) -> str:
    """Return the id of the MLflow run named `name` (default `cfg.run.name`), creating it the first time.

    Params are the resolved config. MLflow params are immutable, so a re-run with a changed value keeps the
    first value and records the new one as a `config_changed.<key>` tag instead of failing. Only the training run
    (no `name`) is written to the workdir's run-id file; a named run (an eval run) carries `tags` linking it.
    """
    storage.makedirs(layout.root)
    name = name or cfg.run.name
    uri = tracking_uri(cfg, layout)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, cfg, layout)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=2,
        order_by=["attributes.start_time ASC"],
    )
    if found:
        run = found[0]
    else:
        run = client.create_run(exp_id, run_name=name, tags={RUN_NAME_TAG: name, **(tags or {})})
    run_id = run.info.run_id
    old = run.data.params if found else {}
    new = {k: _param_value(v) for k, v in cfg.flat().items()}
    fresh = {k: v for k, v in new.items() if k not in old}
    if fresh:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_params(fresh)
    for k, v in new.items():
        if k in old and old[k] != v:
            client.set_tag(run_id, f"config_changed.{k}", v)
    if name == cfg.run.name:
        storage.write_text(layout.mlflow_run_file, run_id + "\n")
    return run_id


def _param_value(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s[:6000]


def log_stage_stats(run_id: str, stages: list[dict]) -> None:
    """Curation counts as metrics: curate.<stage>.in / kept / dropped.<reason>."""
    metrics: dict[str, float] = {}
    for s in stages:
        prefix = f"curate.{s['stage']}"
        metrics[f"{prefix}.in"] = s["in"]
        metrics[f"{prefix}.kept"] = s["kept"]
        for reason, n in s.get("dropped", {}).items():
            metrics[f"{prefix}.dropped.{reason}"] = n
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)


def log_artifacts(run_id: str, paths: dict[str, Location]) -> None:
    """Log files or folders under named artifact subdirectories (e.g. {"tokenizer": dir, "data": manifest}); files
    of a URI workdir are logged from their node-local cache copy."""
    with mlflow.start_run(run_id=run_id):
        for artifact_path, p in paths.items():
            p = storage.location(p)
            if not isinstance(p, Path):
                _log_remote(p, artifact_path)
            elif p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=artifact_path)
            elif p.exists():
                mlflow.log_artifact(str(p), artifact_path=artifact_path)
            else:
                log.warning("artifact %s not found, not logged", p)


def _log_remote(p: storage.Uri, artifact_path: str) -> None:
    """A file or folder of a URI workdir, logged from node-local cache copies."""
    if storage.is_file(p):
        mlflow.log_artifact(str(storage.fetch(p)), artifact_path=artifact_path)
        return
    files = storage.glob(p, "*", recursive=True)
    if not files:
        log.warning("artifact %s not found, not logged", p)
    for f in files:
        sub = f.removeprefix(f"{p}/").rpartition("/")[0]
        mlflow.log_artifact(str(storage.fetch(f)), artifact_path=f"{artifact_path}/{sub}" if sub else artifact_path)


def log_dataset(run_id: str, manifest_path: Location, manifest: dict) -> None:
    """The token shards as the run's training input (lineage): source = the manifest, digest = its fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = manifest_path.resolve().as_uri() if isinstance(manifest_path, Path) else str(manifest_path)
    source = resolve_dataset_source(uri)
    dataset = MetaDataset(source, name="token-shards", digest=manifest["fingerprint"][:36])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context="training")


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient(mlflow.get_tracking_uri())
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


class StepMetricsLogger:
    """Writes training metrics to MLflow from a process of its own: a Ray actor beside the driver.

    One MLflow write (SQLite or HTTP) costs ~5 ms. Made on rank 0, even from MLflow's asynchronous logging thread,
    which holds the GIL for its Python work, it slowed a small model's step by ~20%. Rank 0 sends each step's metrics
    here without waiting, and waits on `flush` before a checkpoint, so the steps a checkpoint covers are in MLflow
    before it exists and a restart continues the step axis without a gap. The actor outlives training workers that
    die; it is gone only with the driver, whose relaunch resumes from a checkpoint.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.failed: list[tuple[int, str]] = []  # (step, error) of writes that failed since the last flush

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        try:  # the MLflow client has already retried an HTTP store with backoff
            self.client.log_batch(self.run_id, [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()])
        except Exception as e:  # noqa: BLE001 - nobody waits on log(): the error is kept for flush() to raise
            self.failed.append((step, f"{type(e).__name__}: {e}"))

    def flush(self) -> None:
        """Returns after every call sent before it (an actor runs one caller's calls in the order they were sent);
        raises if any of them failed, so the checkpoint is not taken and the worker group restarts from the last."""
        failed, self.failed = self.failed, []
        if failed:
            steps = [s for s, _ in failed]
            raise RuntimeError(f"MLflow lost the metrics of {len(failed)} step(s) {steps[:5]}...: {failed[0][1]}")


def start_step_metrics_logger(tracking_uri: str, run_id: str):
    """A StepMetricsLogger actor on this (the driver's) node, where a local SQLite store lives; retried on failure."""
    from athanor.cluster.driver import start_beside_driver

    return start_beside_driver(StepMetricsLogger, tracking_uri, run_id)
