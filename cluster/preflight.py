"""What a command needs, checked before Ray or MLflow starts: a missing input is one line naming the field or file.

Without it, a typo in a path surfaced a minute later as a Ray task's traceback, and `train` before `tokenize` as a
bare `[Errno 2]`. Local paths are checked here; an s3:// or gs:// input is listed by the stage itself (the driver's
node may not hold the credentials its workers do).
"""

from __future__ import annotations

import glob
from pathlib import Path

from athanor import storage
from athanor.config import AthanorConfig, ConfigError
from athanor.layout import RunLayout

INPUT_FIELDS = ("html_dirs", "warc_files", "jsonl_files", "parquet_files", "text_files")
STAGES = {"run": ("curate", "tokenize", "train"), "curate": ("curate",), "tokenize": ("tokenize",),
          "train": ("train",), "finetune": ("finetune",), "dpo": ("dpo",), "quality": ("quality",)}


def check(cfg: AthanorConfig, command: str) -> None:
    """Raise ConfigError, naming the field or file, when `command` cannot start from what is on disk."""
    stages = STAGES.get(command, ())
    layout = RunLayout.from_workdir(cfg.run.workdir)
    if "curate" in stages:
        _inputs(cfg)
    if "curate" in stages or "quality" in stages:
        _quality_sets(cfg)
    if stages == ("tokenize",) and not storage.exists(layout.stats("curation")):
        raise ConfigError(f"no curated documents in {layout.root} ({layout.stats('curation')} is missing): run "
                          "`athanor curate` with this config first, or `athanor run` for every stage")
    if stages == ("train",) and not storage.exists(layout.manifest):
        raise ConfigError(f"no token shards in {layout.root} ({layout.manifest} is missing): run `athanor tokenize` "
                          "with this config first, or `athanor run` for every stage")
    if "finetune" in stages or "dpo" in stages:
        _fine_tuning(cfg, "dpo" if "dpo" in stages else "finetune")


def _local(path: str) -> bool:
    return not storage.is_uri(path)


def _inputs(cfg: AthanorConfig) -> None:
    data = cfg.data
    if not any(getattr(data, f) for f in INPUT_FIELDS):
        raise ConfigError("no input: set data.html_dirs, data.warc_files, data.jsonl_files, data.parquet_files "
                          "and/or data.text_files")
    for folder in filter(_local, data.html_dirs):
        if not Path(folder).is_dir():
            raise ConfigError(f"data.html_dirs: no such folder: {folder}")
    for field in INPUT_FIELDS[1:]:
        for pattern in filter(_local, getattr(data, field)):
            if not any(Path(p).is_file() for p in glob.glob(pattern)):
                raise ConfigError(f"data.{field}: no file matches {pattern}")


def _quality_sets(cfg: AthanorConfig) -> None:
    q = cfg.curate.quality
    if not q.enabled:
        return
    for name in ("high", "low"):
        files = getattr(q, name)
        if not files:
            raise ConfigError(f"curate.quality.{name} is empty: the quality classifier needs training files of both "
                              "classes (high and low), or set curate.quality.enabled=false")
        missing = [f for f in files if _local(f) and not Path(f).is_file()]
        if missing:
            raise ConfigError(f"curate.quality.{name}: no such file: {', '.join(missing)}")


def _fine_tuning(cfg: AthanorConfig, objective: str) -> None:
    if not cfg.finetune.base:
        raise ConfigError("finetune.base: name the model to start from (an athanor checkpoint, a run folder or an "
                          "HF Llama folder)")
    if _local(cfg.finetune.base) and not Path(cfg.finetune.base).exists():
        raise ConfigError(f"finetune.base: no such checkpoint or folder: {cfg.finetune.base}")
    section = cfg.dpo if objective == "dpo" else cfg.finetune
    if not section.train_files:
        raise ConfigError(f"{objective}.train_files is empty: name the {objective} data's files")
    for field in ("train_files", "val_files"):
        missing = [f for f in getattr(section, field) if _local(f) and not Path(f).is_file()]
        if missing:
            raise ConfigError(f"{objective}.{field}: no such file: {', '.join(missing)}")
