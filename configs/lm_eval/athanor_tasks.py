"""Loads the local task files of athanor_cloze and athanor_choice (the YAMLs' `custom_dataset`).

The YAMLs name their file as `dataset_kwargs.data_files.test`, relative to the repository root (data/eval/..., which
scripts/build_eval_tasks.py writes). Hugging Face `datasets` would resolve such a path against the working directory
only; this resolves it against, in order: $ATHANOR_EVAL_DATA (a folder holding the .jsonl files), the working
directory, and the repository this folder belongs to, so `lm_eval --include_path configs/lm_eval` works from anywhere.
The rows are read straight into a `datasets.Dataset`: no hub, no cache directory, nothing downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = ([Path(os.environ["ATHANOR_EVAL_DATA"]) / p.name] if os.environ.get("ATHANOR_EVAL_DATA") else [])
        candidates += [Path.cwd() / p, REPO / p]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"task data {path} not found (looked at {', '.join(map(str, candidates))}); build it with "
        "`python scripts/build_eval_tasks.py` (after scripts/fetch_data.py), or set ATHANOR_EVAL_DATA")


def load_local(data_files: dict[str, str] | None = None, **_metadata):
    """A DatasetDict with one split per entry of data_files ({split: path to a .jsonl file})."""
    import datasets

    if not data_files:
        raise ValueError("athanor tasks need dataset_kwargs.data_files: {test: path/to/file.jsonl}")
    splits = {}
    for split, path in data_files.items():
        with resolve(path).open(encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)
