"""Extraction, language ID and the Gopher rules on real news pages."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pytest

from athanor.config import ExtractConfig, HeuristicsConfig, LangIdConfig
from athanor.pipelines.extract import extract_batch, html_to_text
from athanor.pipelines.heuristics import gopher_reason, gopher_signals, heuristics_batch
from athanor.pipelines.langid import LanguageIdentifier


@pytest.fixture(scope="module")
def pages(data_dir) -> list[Path]:
    return sorted((data_dir / "html" / "news").iterdir())[:40]


@pytest.fixture(scope="module")
def texts(pages) -> list[str]:
    return [t for t, _ in (html_to_text(p.read_bytes(), ExtractConfig()) for p in pages) if t]


def test_extract_real_pages_gives_main_text_without_markup(pages, texts):
    assert len(texts) >= 0.9 * len(pages)
    for text in texts:
        assert "<div" not in text and "<script" not in text
    full = [html_to_text(p.read_bytes(), ExtractConfig(main_content=False))[0] for p in pages[:10]]
    main = [html_to_text(p.read_bytes(), ExtractConfig(main_content=True))[0] for p in pages[:10]]
    assert sum(map(len, main)) < sum(map(len, full))  # boilerplate removal removes something


def test_extract_decodes_a_non_utf8_page_by_detection(data_dir):
    page = data_dir / "html" / "news" / "06ed0a833361190536a4f61888354e07dccaa501bd9a1c0f1c545533bde1650b.html"
    utf8_text, _ = html_to_text(page.read_bytes(), ExtractConfig())
    cp1252 = page.read_bytes().decode("utf-8").encode("cp1252", errors="xmlcharrefreplace")
    with pytest.raises(UnicodeDecodeError):
        cp1252.decode("utf-8")
    text, reason = html_to_text(cp1252, ExtractConfig())
    assert reason is None and text == utf8_text and any(c in text for c in "\u2019\u201c\u201d")


def test_extract_names_binary_and_empty_results(data_dir, pages):
    binary = gzip.compress(pages[0].read_bytes())  # a gzip body served as HTML
    assert html_to_text(binary, ExtractConfig()) == (None, "binary_content")
    script_only = b"<html><body><script>var x = 1;</script></body></html>"
    assert html_to_text(script_only, ExtractConfig()) == (None, "empty_text")

    batch = pa.table({"doc_id": ["a", "b"], "html": [pages[0].read_bytes(), binary]})
    out = extract_batch(batch, ExtractConfig())
    assert out.column_names == ["doc_id", "text", "drop_reason"]
    assert out["drop_reason"].to_pylist() == [None, "binary_content"]


def test_langid_keeps_english_pages_and_names_other_languages(data_dir, texts):
    lid = LanguageIdentifier(LangIdConfig(model_path=str(data_dir / "models" / "lid.176.ftz")))
    french = ("Le gouvernement a annoncé mardi une série de mesures pour soutenir les agriculteurs "
              "touchés par la sécheresse.")
    out = lid(pa.table({"text": texts + [french]}))
    langs = out["lang"].to_pylist()
    assert langs.count("en") >= 0.9 * len(texts)
    assert langs[-1] == "fr" and out["drop_reason"].to_pylist()[-1] == "lang_not_allowed"
    strict = LanguageIdentifier(LangIdConfig(model_path=str(data_dir / "models" / "lid.176.ftz"), min_score=1.0))
    assert set(strict(pa.table({"text": texts}))["drop_reason"].to_pylist()) <= {"lang_low_score"}


def test_langid_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        LanguageIdentifier(LangIdConfig(model_path=str(tmp_path / "nope.ftz")))


def test_gopher_signals_on_real_text(texts):
    cfg = HeuristicsConfig()
    signals = [gopher_signals(t) for t in texts]
    long_enough = [s for s in signals if s["word_count"] >= cfg.min_words]
    assert long_enough and all(2.0 < s["mean_word_length"] < 8.0 for s in long_enough)
    assert sum(gopher_reason(s, cfg) is None for s in signals) >= 0.8 * len(signals)

    out = heuristics_batch(pa.table({"text": texts}), cfg)
    assert out["word_count"].to_pylist() == [s["word_count"] for s in signals]
    assert out["drop_reason"].to_pylist() == [gopher_reason(s, cfg) for s in signals]


def test_each_gopher_rule_has_its_own_reason(texts):
    cfg = HeuristicsConfig()
    article = max(texts, key=len)
    assert gopher_reason(gopher_signals(article), cfg) is None
    assert gopher_reason(gopher_signals(" ".join(article.split()[:20])), cfg) == "too_few_words"
    assert gopher_reason(gopher_signals(article), HeuristicsConfig(max_words=10)) == "too_many_words"
    assert gopher_reason(gopher_signals(article), HeuristicsConfig(min_mean_word_length=9.0)) == "mean_word_length"
    hashtags = " ".join(f"#{w}" for w in article.split()[:200])
    assert gopher_reason(gopher_signals(hashtags), cfg) == "symbol_word_ratio"
    repeated = "\n".join([line for line in article.splitlines() if line.strip()][:3] * 20)
    signals = gopher_signals(repeated)
    assert signals["duplicate_line_fraction"] > 0.9
    assert gopher_reason(signals, HeuristicsConfig(min_words=1)) == "duplicate_lines"
