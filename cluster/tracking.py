"""MLflow tracking bound to the athanor run name, so every stage, restart and training worker logs into one run.

The driver resolves the run once (looked up by name before it is created) and hands the run id to the training
workers; only rank 0 logs from there, its per-step metrics through a `StepMetricsLogger` actor. Without a tracking
server the store is SQLite inside the run's workdir; a URI workdir (s3://, gs://) cannot hold SQLite, so it needs
`mlflow.tracking_uri` (a server every node reaches).

What a user sees first is chosen here. MLflow's run page ("Model metrics") draws one section per key path before
its last "/" (`val/books/loss` is in `val/books`), the sections in code-point order and the keys without one last,
and sorts a section's charts by key. So the curves a run is opened for get the section that sorts first, `train/`, whose first keys are `loss`, `lr`
and `val_loss`; the trainer's own figures follow in `trainer/`, held-out sets in `val/`. Curation counts are not
metrics (forty bar charts of one value each): they are a table artifact, `curation/counts.json`, and the run's
description, which says what the run did (see `describe_run`). Not child runs per stage: the pipeline's stages, its
lineage and its training curves stay one run that `athanor.run_name` finds, resumes and compares.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS, MLFLOW_RUN_NOTE

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


TRAINER_STATS = frozenset({"grad_norm", "tokens_per_s", "mfu", "world_size", "dp_size", "grad_accum_steps",
                           "setup_s", "restore_s", "first_step_s"})
CURATION_TABLE = "curation/counts.json"


def mlflow_key(key: str) -> str:
    """The MLflow name of a training-loop metric (the loop and its console keep the short names): the curves under
    `train/` (loss, lr, val_loss; DPO's rewards/*), the trainer's figures and DPO's log-probs under `trainer/`,
    held-out sets under `val/`."""
    if key in TRAINER_STATS or key.startswith("logps/"):
        return f"trainer/{key}"
    if key == "val_bpb":
        return "val/bits_per_byte"
    if key.startswith("eval/"):
        return f"val/{key.removeprefix('eval/')}"
    return f"train/{key}"


def log_stage_stats(run_id: str, stages: list[dict]) -> None:
    """Curation counts as rows of the run's table `curation/counts.json` (stage, status in / kept / dropped, reason,
    documents), in MLflow's table format so that the run's artifact view shows it as a table.

    `mlflow.log_table` appends to a table already there; a re-run or a resumed run would count twice. So the rows of
    these stages replace theirs and the file is written whole.
    """
    import pandas as pd

    client = MlflowClient(mlflow.get_tracking_uri())
    rows = []
    for s in stages:
        rows += [(s["stage"], "in", "", s["in"]), (s["stage"], "kept", "", s["kept"])]
        rows += [(s["stage"], "dropped", reason, n) for reason, n in sorted(s.get("dropped", {}).items())]
    table = pd.DataFrame(rows, columns=["stage", "status", "reason", "documents"])
    old = curation_table(run_id, client)
    if old is not None:
        table = pd.concat([old[~old["stage"].isin(table["stage"])], table], ignore_index=True)
    folder, name = CURATION_TABLE.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_json(Path(tmp) / name, orient="split", index=False)
        client.log_artifact(run_id, str(Path(tmp) / name), artifact_path=folder)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": CURATION_TABLE, "type": "table"}  # what log_table records, and the UI reads, for a table
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def curation_table(run_id: str, client: MlflowClient | None = None):
    """The run's curation counts as a DataFrame (see `log_stage_stats`), or None before any stage logged them."""
    import pandas as pd

    client = client or MlflowClient(mlflow.get_tracking_uri())
    folder = CURATION_TABLE.rsplit("/", 1)[0]
    if CURATION_TABLE not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(Path(client.download_artifacts(run_id, CURATION_TABLE, tmp)).read_text())
    return pd.DataFrame(data["data"], columns=data["columns"])


def describe_run(run_id: str, text: str) -> None:
    """The run's description (MLflow's note, shown on top of the run's overview): what the run did, in Markdown."""
    MlflowClient(mlflow.get_tracking_uri()).set_tag(run_id, MLFLOW_RUN_NOTE, text)


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

    def start(self, params: dict[str, Any]) -> None:
        """A (re)start of training: the run is RUNNING again; `params` are what only the workers know (the model's
        parameter counts). The same values on every restart; a changed one is a warning, not a failure."""
        self.client.update_run(self.run_id, status="RUNNING")
        try:
            self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
        except Exception as e:  # noqa: BLE001 - MLflow params are immutable: keep the first values
            log.warning("MLflow params %s not logged: %s", sorted(params), e)

    def end(self, status: str) -> None:
        """Training returned: FINISHED, or KILLED when stopped on request (resumable)."""
        self.client.set_terminated(self.run_id, status)

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        try:  # the MLflow client has already retried an HTTP store with backoff
            self.client.log_batch(self.run_id, [Metric(mlflow_key(k), float(v), timestamp_ms, step)
                                                for k, v in metrics.items()])
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
