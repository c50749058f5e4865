"""The fastText quality classifier: example splitting, a held-out report, P(high) scoring of real pages."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from athanor.config import ExtractConfig, load_config
from athanor.layout import RunLayout
from athanor.pipelines.extract import html_to_text
from athanor.pipelines.quality import (
    HIGH,
    LOW,
    QualityScorer,
    model_is_current,
    model_path,
    split_examples,
    train_quality_classifier,
)

HIGH_FILES = ["lee_background.txt", "alice29.txt", "lcet10.txt", "plrabn12.txt"]


def quality_config(data_dir, tmp_path):
    high = ",".join(str(data_dir / "quality" / "high" / f) for f in HIGH_FILES)
    low = data_dir / "quality" / "low" / "sms.txt"
    overrides = [f"curate.quality.high=[{high}]", f"curate.quality.low=[{low}]", f"run.workdir={tmp_path}"]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    cfg = quality_config(data_dir, tmp)
    layout = RunLayout.from_workdir(tmp)
    return cfg, layout, train_quality_classifier(cfg, layout)


def test_examples_are_articles_paragraphs_or_lines(data_dir):
    news = split_examples((data_dir / "quality" / "high" / "lee_background.txt").read_text(), min_chars=40)
    assert len(news) == 300  # one article per line
    book = split_examples((data_dir / "quality" / "high" / "alice29.txt").read_text(), min_chars=40)
    assert 300 < len(book) < 900 and all("\n" not in p and "  " not in p for p in book)
    sms = split_examples((data_dir / "quality" / "low" / "sms.txt").read_text(), min_chars=40)
    assert 2000 < len(sms) < 4862 and all(len(s) >= 40 for s in sms)


def test_training_writes_model_and_a_held_out_report(trained):
    cfg, layout, report = trained
    assert model_path(layout).is_file()
    assert json.loads((layout.quality_dir / "report.json").read_text()) == report
    for label in (HIGH, LOW):
        n_train, n_valid = report["examples"]["train"][label], report["examples"]["valid"][label]
        assert n_valid == round((n_train + n_valid) * cfg.curate.quality.valid_fraction)
        assert report["valid_metrics"][label]["f1score"] > 0.85  # news+books vs SMS is an easy, real split


def test_a_model_is_current_only_for_the_config_it_was_trained_from(trained):
    cfg, layout, _ = trained
    assert model_is_current(cfg, layout)
    other = cfg.model_copy(deep=True)
    other.curate.quality.threshold = 0.99  # scoring only: the model still fits
    assert model_is_current(other, layout)
    other.curate.quality.epochs = 3
    assert not model_is_current(other, layout)


def test_training_split_is_deterministic(trained, data_dir, tmp_path):
    cfg, layout, report = trained
    again = train_quality_classifier(cfg, RunLayout.from_workdir(tmp_path))
    assert again["examples"] == report["examples"]
    assert (tmp_path / "quality" / "valid.txt").read_bytes() == (layout.quality_dir / "valid.txt").read_bytes()


def test_scorer_ranks_real_news_pages_above_sms(trained, data_dir):
    cfg, layout, _ = trained
    pages = sorted((data_dir / "html" / "news").iterdir())[:20]
    texts = [t for t in (html_to_text(p.read_bytes(), ExtractConfig())[0] for p in pages) if t]
    sms = (data_dir / "quality" / "low" / "sms.txt").read_text().splitlines()[:20]
    out = QualityScorer(str(model_path(layout)), cfg.curate.quality)(pa.table({"text": texts + sms}))
    scores = np.array(out["quality_score"].to_pylist())
    assert ((0.0 <= scores) & (scores <= 1.0 + 1e-6)).all()
    assert np.median(scores[: len(texts)]) > 0.9 > np.median(scores[len(texts) :])
    reasons = out["drop_reason"].to_pylist()
    assert reasons == [None if s >= cfg.curate.quality.threshold else "low_quality" for s in scores]
    assert reasons[len(texts) :].count("low_quality") >= 15


def test_missing_training_files_are_a_clear_error(data_dir, tmp_path):
    cfg = load_config(None, [f"curate.quality.high=[{tmp_path / 'nope.txt'}]",
                             f"curate.quality.low=[{data_dir / 'quality' / 'low' / 'sms.txt'}]"])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_quality_classifier(cfg, RunLayout.from_workdir(tmp_path))
