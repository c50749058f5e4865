"""The thin driver behind `athanor run|curate|tokenize|train`: start or join Ray, run stages, log to MLflow.

Stages communicate only through the run's working folder (`RunLayout`), so each can be re-run alone. A stage
that finds its completion marker with the same config hash skips itself; `--force` re-runs it. The folder may be
an s3:// or gs:// URI (see athanor.storage), so that on a multi-node cluster every node reads and writes one place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from athanor import storage
from athanor.config import AthanorConfig, ConfigError
from athanor.console import heartbeat, quiet_ray_data, ray_logging_level
from athanor.layout import RunLayout
from athanor.storage import Location

from . import tracking

log = logging.getLogger("athanor")

# Which config sections each stage's output depends on (for skip-if-done).
STAGE_INPUTS = {
    "curate": ("data", "curate"),
    "tokenize": ("data", "curate", "tokenize", "run"),
    "finetune_data": ("finetune", "run"),
    "dpo_data": ("dpo", "finetune", "run"),
}


def init_ray(cfg: AthanorConfig) -> None:
    """Embedded local Ray unless the config (or RAY_ADDRESS) names a cluster to join."""
    import ray

    storage.use_endpoint(cfg.data.s3_endpoint_override)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Every task and actor (commits, encoders, training workers) reaches a URI workdir with the driver's endpoint
    # and region, on whichever node it runs; credentials come from each node's own environment or cloud role, never
    # from the driver (a runtime_env is in every task's spec, which the dashboard shows).
    env = storage.ray_env() if storage.is_uri(cfg.run.workdir) else {}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.train.health_check_interval_s)  # read by the Train controller
    # Inside a Ray job (athanor submit --env ...) the job's runtime_env may carry them already, and Ray refuses to
    # merge a variable set twice, even to the same value.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    env = {k: v for k, v in env.items() if k not in (job.get("env_vars") or {})}
    runtime_env = {"env_vars": env} if env else {}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env, logging_level=ray_logging_level())
    else:
        runtime_env["worker_process_setup_hook"] = "athanor.cluster.driver.quiet_placement_group_cleaner"
        # Ray Train's preemption watcher polls for node drains, which the embedded Ray (one node, gone with the
        # driver) never has: one actor process less per training start. On a cluster it stays on (spot nodes).
        runtime_env.setdefault("env_vars", {})["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env=runtime_env, logging_level=ray_logging_level())
    from ray.data import DataContext

    # Ray Data's own bars on a terminal; elsewhere it logs progress at INFO, which quiet_ray_data hides unless
    # --verbose, and athanor prints its own plain lines (athanor/console.py).
    DataContext.get_current().enable_progress_bars = True
    quiet_ray_data()


def start_beside_driver(cls, *args):
    """An actor of `cls` on the driver's node (soft: elsewhere if it must), taking no CPU, restarted if lost and its
    pending calls retried: the helpers training talks to must not leave with a worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(cls)
    return actor.options(scheduling_strategy=here).remote(*args)


def quiet_placement_group_cleaner() -> None:
    """Ray worker set-up hook for the embedded local Ray, which runs without a dashboard and so without the state API.

    Ray Train's placement-group cleaner asks that API whether the controller is alive, every second, and warns each
    time it cannot: hundreds of lines in a demo. The local Ray ends with the driver, placement groups included, so
    the check has nothing to guard here. On a cluster the hook is not installed and the warning stays.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _marker(layout: RunLayout, stage: str) -> Location:
    return layout.root / "stages" / f"{stage}.json"


def _done(cfg: AthanorConfig, layout: RunLayout, stage: str) -> bool:
    m = storage.read_json(_marker(layout, stage))
    return m is not None and m.get("config_hash") == cfg.section_hash(*STAGE_INPUTS[stage])


def _mark_done(cfg: AthanorConfig, layout: RunLayout, stage: str, seconds: float) -> None:
    payload = {"config_hash": cfg.section_hash(*STAGE_INPUTS[stage]), "seconds": seconds}
    storage.write_text(_marker(layout, stage), json.dumps(payload))


def resolve_local_paths(cfg: AthanorConfig) -> AthanorConfig:
    """Fine-tuning's and DPO's base model and files as absolute paths: Ray Train runs workers in a folder of its own,
    and the checkpoint records where its base came from."""
    def absolute(p: str) -> str:
        return p if storage.is_uri(p) else str(Path(p).resolve())

    ft, dpo = cfg.finetune, cfg.dpo
    files = {"train_files": [absolute(p) for p in ft.train_files], "val_files": [absolute(p) for p in ft.val_files]}
    pairs = {"train_files": [absolute(p) for p in dpo.train_files], "val_files": [absolute(p) for p in dpo.val_files]}
    return cfg.model_copy(update={
        "finetune": ft.model_copy(update={"base": absolute(ft.base) if ft.base else None, **files}),
        "dpo": dpo.model_copy(update=pairs)})


@dataclass
class RunReport:
    run_id: str
    tracking_uri: str
    ui_command: str
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds (0 when skipped)
    curation: dict | None = None
    manifest: dict | None = None
    final_checkpoint: str | None = None
    training: dict | None = None  # objective, and the last step's metrics

    def markdown(self, run_name: str) -> str:
        """What the run did so far, for the MLflow run's description."""
        lines = [f"athanor run **{run_name}**"]
        if self.curation:
            c = self.curation
            drops = sorted(c["dropped"].items(), key=lambda kv: -kv[1])
            top = ", ".join(f"{reason} {n:,}" for reason, n in drops[:6]) + (", ..." if len(drops) > 6 else "")
            lines.append(f"- **Curation**: {c['in']:,} documents in, {c['kept']:,} kept; dropped: {top or 'none'}. "
                         f"Every stage's counts: the artifact `{tracking.CURATION_TABLE}`; the report: "
                         "`report/report.html`.")
        if self.manifest and "splits" in self.manifest:
            m = self.manifest
            tokens = ", ".join(f"{s['tokens']:,} {name}" for name, s in m["splits"].items())
            lines.append(f"- **Data**: {m['documents']['kept']:,} documents as {tokens} tokens "
                         f"(sequences of {m['seq_len']}, vocabulary {m.get('vocab_size', '?')}).")
        if self.training:
            t = self.training
            figures = ", ".join(f"{k} {t[k]:.4f}" for k in ("loss", "val_loss") if isinstance(t.get(k), float))
            lines.append(f"- **Training** ({t['objective']}): {t.get('step', '?')} steps; {figures or 'no loss yet'}."
                         + (f" Final checkpoint: `{self.final_checkpoint}`." if self.final_checkpoint else ""))
        return "\n".join(lines)


class Driver:
    """Runs the stages of one config against its working folder and one MLflow run."""

    def __init__(self, cfg: AthanorConfig, force: bool = False):
        cfg = resolve_local_paths(cfg)
        self.cfg = cfg
        self.layout = RunLayout.from_workdir(cfg.run.workdir)
        self.force = force
        storage.use_endpoint(cfg.data.s3_endpoint_override)  # before the thread below writes to a URI workdir
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-run") as pool:
            run_id = pool.submit(tracking.resolve_run, cfg, self.layout)  # MLflow's store opens while Ray starts
            init_ray(cfg)
            self.run_id = run_id.result()
        self.report = RunReport(self.run_id, tracking.tracking_uri(cfg, self.layout),
                                tracking.ui_command(cfg, self.layout))
        tracking.log_artifacts(self.run_id, {"config": self._write_resolved_config()})

    def _write_resolved_config(self) -> Location:
        import yaml

        p = self.layout.root / "config.resolved.yaml"
        storage.write_text(p, yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        return p

    def _skip(self, stage: str) -> bool:
        if not self.force and _done(self.cfg, self.layout, stage):
            log.info("stage %s: output up to date, skipped (use --force to re-run)", stage)
            self.report.stages[stage] = 0.0
            return True
        return False

    def curate(self) -> dict:
        from athanor.pipelines.curate import run_curation

        summary_path = self.layout.stats("curation")
        if not self._skip("curate"):
            if self.force:  # curation resumes from its committed shards; forcing means starting from nothing
                for folder in (self.layout.root / "curated", self.layout.quality_dir):
                    storage.delete_tree(folder)
            t0 = time.perf_counter()
            run_curation(self.cfg, self.layout)
            self.report.stages["curate"] = time.perf_counter() - t0
            _mark_done(self.cfg, self.layout, "curate", self.report.stages["curate"])
        summary = json.loads(storage.read_bytes(summary_path))
        self.report.curation = summary
        tracking.log_stage_stats(self.run_id, summary["stages"])
        self._describe()
        tracking.log_artifacts(self.run_id, {"curation": self.layout.stats_dir,
                                             "quality": self.layout.quality_dir})
        tracking.log_artifacts(self.run_id, {"report": self.layout.stats_dir / "report.html"})  # the HTML report
        return summary

    def tokenize(self) -> dict:
        from athanor.pipelines.pack import pack_shards
        from athanor.pipelines.tokenizer import train_tokenizer

        if not self._skip("tokenize"):
            t0 = time.perf_counter()
            with heartbeat("tokenizer"):  # SentencePiece on a large sample trains for minutes, silently
                train_tokenizer(self.cfg, self.layout)
            pack_shards(self.cfg, self.layout)
            self.report.stages["tokenize"] = time.perf_counter() - t0
            _mark_done(self.cfg, self.layout, "tokenize", self.report.stages["tokenize"])
        manifest = json.loads(storage.read_bytes(self.layout.manifest))
        tracking.log_artifacts(self.run_id, {"tokenizer": self.layout.tokenizer_dir, "data": self.layout.manifest})
        self.report.manifest = manifest
        self._describe()
        return manifest

    def _describe(self) -> None:
        """The run's description, from what this command did and what earlier ones left in the workdir (`athanor
        train` alone still describes the curation and data it trains on)."""
        r = self.report
        whole = replace(r, curation=r.curation or storage.read_json(self.layout.stats("curation")),
                        manifest=r.manifest or storage.read_json(self.layout.manifest))
        tracking.describe_run(self.run_id, whole.markdown(self.cfg.run.name))

    def finetune(self):
        """Instruction data packed under <workdir>/sft (skipped when up to date), then the training loop with the
        fine-tuning objective: the base model's weights, LoRA or full, loss on responses only."""
        from athanor.pipelines.instructions import pack_instructions

        source = self._base()
        sft = RunLayout(self.layout.root / "sft")
        self._data_stage("finetune_data", sft, lambda: pack_instructions(self.cfg, sft.root, source.tokenizer_path))
        return self.train(objective="finetune", data=sft)

    def dpo(self):
        """Preference pairs packed under <workdir>/dpo, the reference model's log-probs of every answer computed
        once by Ray Data batch inference (unless dpo.reference is live), then the training loop with the DPO loss."""
        from athanor.pipelines.preferences import pack_pairs

        from .reference import compute_reference_logps

        source = self._base()
        root = RunLayout(self.layout.root / "dpo")
        self._data_stage("dpo_data", root, lambda: pack_pairs(self.cfg, root.root, source.tokenizer_path))
        if self.cfg.dpo.reference == "precomputed":
            e = self.cfg.eval
            t0 = time.perf_counter()
            compute_reference_logps(root.root, self.cfg.finetune.base, actors=e.actors, cpus=e.cpus_per_actor,
                                    batch_size=e.batch_size, use_gpu=e.use_gpu)
            self.report.stages["reference"] = time.perf_counter() - t0
        return self.train(objective="dpo", data=root)

    def _data_stage(self, stage: str, data: RunLayout, pack) -> dict:
        """`pack()` unless its output is up to date, then its counts to MLflow; returns the data's manifest."""
        if not self._skip(stage):
            t0 = time.perf_counter()
            pack()
            self.report.stages[stage] = time.perf_counter() - t0
            _mark_done(self.cfg, self.layout, stage, self.report.stages[stage])
        manifest = json.loads(storage.read_bytes(data.manifest))
        tracking.log_stage_stats(self.run_id, [{"stage": stage, **manifest["documents"]}])
        self.report.manifest = manifest
        self._describe()
        return manifest

    def _base(self):
        """The model fine-tuning and DPO start from, checked: named, and outside this run's workdir."""
        from .inference import describe

        base = self.cfg.finetune.base
        if not base:
            raise ConfigError("finetune.base: name the model to start from (an athanor checkpoint, a run folder or an "
                              "HF Llama folder)")
        inside = not storage.is_uri(base) and not self.layout.remote and Path(base).is_relative_to(
            self.layout.root.resolve())
        if inside:
            raise ConfigError(f"finetune.base ({base}) lies inside run.workdir ({self.layout.root}): train into a "
                              "workdir of its own, so its checkpoints never mix with the base run's")
        return describe(base)

    def train(self, objective: str = "pretrain", data: RunLayout | None = None):
        from .checkpoint import newest_trainer_state, resume_problem
        from .stop import TrainingStopped
        from .train import run_training

        data = data or self.layout
        manifest = json.loads(storage.read_bytes(data.manifest))
        previous = self.layout.checkpoints / self.cfg.run.name
        if self.force:  # as every stage: --force runs it again, so training starts over instead of resuming
            if storage.exists(previous):
                log.warning("--force: deleting this run's checkpoints in %s; training starts at step 0", previous)
                storage.delete_tree(previous)
        elif (state := newest_trainer_state(previous)) and (why := resume_problem(state, manifest)):
            raise ConfigError(f"run {self.cfg.run.name} cannot resume from its checkpoint of step {state['step']} in "
                              f"{previous}: {why}. Start over with --force, or train under a new run.name")
        tracking.log_dataset(self.run_id, data.manifest, manifest)
        t0 = time.perf_counter()
        result, stopped_by = run_training(self.cfg, self.layout, self.run_id, self.report.tracking_uri, objective)
        self.report.stages["train"] = time.perf_counter() - t0
        self.report.training = {"objective": objective, **(result.metrics or {})}
        if result.error is not None:
            raise result.error
        if stopped_by:
            raise TrainingStopped(stopped_by, f"training stopped on {stopped_by} after step {result.metrics['step']}"
                                              f" with a checkpoint in {self.layout.checkpoints}; run the same command"
                                              " again to resume from it")
        if result.checkpoint is not None:
            path = result.checkpoint.path  # inside the storage filesystem: a URI's path lacks its scheme
            final = f"{self.layout.root.scheme}://{path}" if self.layout.remote else path
            self.report.final_checkpoint = final
            with result.checkpoint.as_directory() as local:  # downloaded for MLflow when the workdir is a URI
                if objective in ("finetune", "dpo") and self.cfg.finetune.method == "lora":
                    self._log_adapter(Path(local))
                else:
                    self._log_model(Path(local))
            tracking.set_tags(self.run_id, {"checkpoint.final": final,
                                            "checkpoint.storage": str(self.layout.checkpoints)})
        self._describe()
        return result

    def _log_model(self, checkpoint: Path) -> None:
        """The final weights as an HF Llama folder, MLflow artifact `model/` (what `transformers` and `athanor
        generate|eval` load). Not the DCP checkpoint itself: its optimizer state triples it (about 15 GB at 1B), and
        the checkpoint stays where the run keeps it, named by the tag `checkpoint.final`."""
        import tempfile

        from athanor.model.hf_export import export_hf

        from .checkpoint import TOKENIZER_FILE, load_model

        model, mcfg, _ = load_model(checkpoint)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                export_hf(model, mcfg, checkpoint / TOKENIZER_FILE, tmp)
            except ValueError as err:  # a mixture-of-experts layout Mixtral cannot express: the tag names it
                log.warning("final weights not logged to MLflow (%s); the checkpoint is %s", err, checkpoint)
                return
            tracking.log_artifacts(self.run_id, {"model": Path(tmp)})

    def _log_adapter(self, checkpoint: Path) -> None:
        """The fine-tune's LoRA adapter as a PEFT folder, an MLflow artifact `adapter/`."""
        import tempfile

        from athanor.model.peft_export import export_peft_adapter

        from .checkpoint import load_model

        model, mcfg, _ = load_model(checkpoint, merge=False)
        with tempfile.TemporaryDirectory() as tmp:
            export_peft_adapter(model, mcfg, tmp, base_model_path=self.cfg.finetune.base)
            tracking.log_artifacts(self.run_id, {"adapter": Path(tmp)})

    def run_all(self) -> RunReport:
        self.curate()
        self.tokenize()
        self.train()
        return self.report
