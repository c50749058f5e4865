"""fastText quality classifier: train on curated "high" text vs "low" text, score documents by P(high).

Training examples are blank-line-separated paragraphs with whitespace collapsed; a file without blank lines (one
news article or one SMS per line) gives one example per line. The held-out split is seeded and stratified, and the
report (precision/recall/F1 per class from fastText's own `test_label`, example counts) is written beside the model.
Scoring is a class UDF (the model loads once per actor); signal `quality_score`, drop reason `low_quality`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import fasttext
import numpy as np
import pyarrow as pa

from athanor import storage
from athanor.config import AthanorConfig, QualityConfig
from athanor.layout import RunLayout
from athanor.pipelines.langid import one_line
from athanor.pipelines.stats import mark
from athanor.storage import Location

HIGH, LOW = "__label__hq", "__label__lq"
MODEL_FILE = "quality.bin"
REPORT_FILE = "report.json"


def model_path(layout: RunLayout) -> Location:
    return layout.quality_dir / MODEL_FILE


def training_fingerprint(cfg: AthanorConfig) -> str:
    """Hash of everything training reads (files, hyperparameters, seed); the threshold only affects scoring."""
    fields = cfg.curate.quality.model_dump(mode="json", exclude={"enabled", "threshold"})
    payload = json.dumps({"quality": fields, "seed": cfg.run.seed}, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def model_is_current(cfg: AthanorConfig, layout: RunLayout) -> bool:
    """A model exists and was trained from this config (a changed config must not reuse a stale model)."""
    report = storage.read_json(layout.quality_dir / REPORT_FILE)
    if report is None or not storage.is_file(model_path(layout)):
        return False
    return report.get("fingerprint") == training_fingerprint(cfg)


def split_examples(text: str, min_chars: int) -> list[str]:
    """Paragraphs (or lines, for a file without blank lines), whitespace collapsed, at least `min_chars` long."""
    blocks = re.split(r"\n\s*\n", text.strip())
    if len(blocks) == 1:
        blocks = text.splitlines()
    examples = (one_line(b) for b in blocks)
    return [e for e in examples if len(e) >= min_chars]


def _read_examples(paths: list[str], min_chars: int) -> list[str]:
    examples = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"curate.quality: no training file at {p}")
        examples.extend(split_examples(Path(p).read_text(encoding="utf-8", errors="replace"), min_chars))
    return examples


def _split(examples: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    n_valid = max(1, round(len(shuffled) * valid_fraction))
    return shuffled[n_valid:], shuffled[:n_valid]


def _write_labeled(path: Path, labeled: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{label} {text}\n" for label, text in labeled), encoding="utf-8")


def train_quality_classifier(cfg: AthanorConfig, layout: RunLayout) -> dict:
    """Train, evaluate on the held-out split, save `quality.bin` and `report.json`; returns the report."""
    q = cfg.curate.quality
    if not q.high or not q.low:
        raise ValueError("curate.quality.high and curate.quality.low must both list training files")
    splits = {}
    for label, paths in ((HIGH, q.high), (LOW, q.low)):
        examples = _read_examples(paths, q.min_chars)
        if len(examples) < 2:
            raise ValueError(f"curate.quality: {label} files give {len(examples)} examples of >= {q.min_chars} chars")
        splits[label] = _split(examples, q.valid_fraction, cfg.run.seed)
    rng = random.Random(cfg.run.seed)
    train = [(label, t) for label in splits for t in splits[label][0]]
    valid = [(label, t) for label in splits for t in splits[label][1]]
    rng.shuffle(train)  # fastText's SGD sees the classes interleaved

    local = storage.cached(layout.quality_dir)  # fastText reads and writes local files: the cache for a URI workdir
    local.mkdir(parents=True, exist_ok=True)
    train_file, valid_file, model_file = local / "train.txt", local / "valid.txt", local / MODEL_FILE
    _write_labeled(train_file, train)
    _write_labeled(valid_file, valid)
    model = fasttext.train_supervised(
        input=str(train_file), epoch=q.epochs, lr=q.lr, wordNgrams=q.word_ngrams, dim=q.dim, bucket=q.bucket,
        seed=cfg.run.seed, thread=1, verbose=0,  # one thread: the same data and seed give the same model
    )
    model.save_model(str(model_file))
    for f in (train_file, valid_file, model_file):
        storage.upload(f, layout.quality_dir / f.name)

    per_label = model.test_label(str(valid_file))
    report = {
        "model": str(model_path(layout)),
        "sha256": storage.file_sha256(model_file),
        "fingerprint": training_fingerprint(cfg),
        "examples": {
            "train": {label: len(splits[label][0]) for label in splits},
            "valid": {label: len(splits[label][1]) for label in splits},
        },
        "valid_metrics": {
            label: {k: float(per_label[label][k]) for k in ("precision", "recall", "f1score")} for label in splits
        },
    }
    storage.write_text(layout.quality_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


def local_model(model_file: str | Location) -> Path:
    """The model as a local file for fastText: itself when local, else its node-local copy, downloaded only when the
    copy lacks the sha256 the report beside the model records (so each node fetches a model once)."""
    where = storage.location(model_file)
    report = storage.read_json(where.parent / REPORT_FILE) or {}
    return storage.fetch(where, report.get("sha256"))


class QualityScorer:
    """Ray Data class UDF: `quality_score` = P(high) and `low_quality` below the threshold."""

    def __init__(self, model_file: str, cfg: QualityConfig):
        self.model = fasttext.load_model(str(local_model(model_file)))
        self.threshold = cfg.threshold

    def scores(self, texts: list[str]) -> np.ndarray:
        labels, probs = self.model.predict([one_line(t) for t in texts], k=2)
        p_high = np.array([dict(zip(lab, p)).get(HIGH, 0.0) for lab, p in zip(labels, probs)], dtype=np.float64)
        return np.clip(p_high, 0.0, 1.0)  # fastText's softmax can overshoot 1 by a few ulps

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = self.scores(batch["text"].to_pylist())
        out = batch.append_column("quality_score", pa.array(scores, type=pa.float64()))
        return mark(out, [None if s >= self.threshold else "low_quality" for s in scores])
