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


def test_langid_minimum_score_per_language_falls_back_to_min_score(data_dir, texts):
    """English held to the median English score, French to nothing, then French alone to a perfect score."""
    model = str(data_dir / "models" / "lid.176.ftz")
    french = ("Le gouvernement a annoncé mardi une série de mesures pour soutenir les agriculteurs "
              "touchés par la sécheresse.")
    batch = pa.table({"text": texts + [french]})
    plain = LanguageIdentifier(LangIdConfig(model_path=model))(batch)
    en_scores = sorted(s for s, lang in zip(plain["lang_score"].to_pylist(), plain["lang"].to_pylist()) if lang == "en")
    median = en_scores[len(en_scores) // 2]
    assert en_scores[0] < median  # some English pages fall below it
    lid = LanguageIdentifier(LangIdConfig(model_path=model, languages=["en", "fr"], min_score=0.0,
                                          min_score_per_language={"en": median}))
    out = lid(batch)
    for lang, score, reason in zip(out["lang"].to_pylist(), out["lang_score"].to_pylist(),
                                   out["drop_reason"].to_pylist()):
        if lang == "en":
            assert reason == ("lang_low_score" if score < median else None)
    assert out["lang"][-1].as_py() == "fr" and out["drop_reason"][-1].as_py() is None  # falls back to min_score 0
    strict_fr = LanguageIdentifier(LangIdConfig(model_path=model, languages=["en", "fr"], min_score=0.0,
                                                min_score_per_language={"fr": 1.0}))
    reasons = strict_fr(batch)["drop_reason"].to_pylist()
    assert reasons[-1] == "lang_low_score" and "lang_low_score" not in reasons[:-1]


def test_langid_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        LanguageIdentifier(LangIdConfig(model_path=str(tmp_path / "nope.ftz")))


def test_gopher_signals_on_real_text(texts):
    cfg = HeuristicsConfig()
    signals = [gopher_signals(t, cfg) for t in texts]
    long_enough = [s for s in signals if s["word_count"] >= cfg.min_words]
    assert long_enough and all(2.0 < s["mean_word_length"] < 8.0 for s in long_enough)
    assert all(s["stop_word_count"] >= 2 and s["alpha_word_fraction"] > 0.8 for s in long_enough)
    assert sum(gopher_reason(s, cfg) is None for s in signals) >= 0.8 * len(signals)

    out = heuristics_batch(pa.table({"text": texts}), cfg)  # the vectorized batch path gives the same signals
    for name in signals[0]:
        assert out[name].to_pylist() == pytest.approx([s[name] for s in signals]), name
    assert out["drop_reason"].to_pylist() == [gopher_reason(s, cfg) for s in signals]


def _reason(text: str, **overrides) -> str | None:
    cfg = HeuristicsConfig(**overrides)
    return gopher_reason(gopher_signals(text, cfg), cfg)


def test_each_gopher_quality_rule_has_its_own_reason(texts):
    article = max(texts, key=len)
    lines = [line.strip() for line in article.splitlines() if line.strip()]
    assert _reason(article) is None
    assert _reason(" ".join(article.split()[:20])) == "too_few_words"
    assert _reason(article, max_words=10) == "too_many_words"
    assert _reason(article, min_mean_word_length=9.0) == "mean_word_length"
    assert _reason(" ".join(f"#{w}" for w in article.split()[:200])) == "symbol_word_ratio"
    assert _reason("\n".join(f"\u2022 {line}" for line in lines)) == "bullet_lines"
    assert _reason("\n".join(f"{line} ..." for line in lines)) == "ellipsis_lines"
    assert _reason(article, min_alpha_word_fraction=0.999) == "alpha_words"  # dates and figures are not alphabetic
    assert _reason(article, min_stop_words=9) == "stop_words"  # only 8 stop words exist


def test_each_gopher_repetition_rule_has_its_own_reason(texts):
    article = max(texts, key=len)
    paragraphs = [p.strip() for p in article.split("\n\n") if p.strip()]
    lines = [line.strip() for line in article.splitlines() if line.strip()]
    assert _reason("\n\n".join(paragraphs * 2)) == "duplicate_paragraphs"
    longest = max(paragraphs, key=len)
    assert _reason("\n\n".join(paragraphs + [longest] * 6), max_duplicate_paragraph_fraction=1.0) == (
        "duplicate_paragraph_chars")
    repeated = "\n".join(sorted(lines, key=len)[-3:] * 20)
    assert gopher_signals(repeated)["duplicate_line_fraction"] > 0.9
    assert _reason(repeated, min_words=1, max_duplicate_paragraph_fraction=1.0,
                   max_duplicate_paragraph_char_fraction=1.0) == "duplicate_lines"
    assert _reason(article, max_top_ngram_char_fraction={2: 0.001}) == "top_2gram"
    body = list(dict.fromkeys(p for p in paragraphs if "\n" not in p and len(p.split()) >= 8))  # unique lines
    doubled = "\n\n".join(f"{p} {p}" for p in body)  # every paragraph says itself twice: lines stay unique
    signals = gopher_signals(doubled)
    assert signals["duplicate_line_fraction"] == 0.0 and signals["duplicate_5gram_char_fraction"] > 0.3
    assert _reason(doubled) == "duplicate_5gram"
    assert _reason(doubled, max_duplicate_ngram_char_fraction={7: 0.13}) == "duplicate_7gram"


def test_trafilatura_extracts_the_same_articles_without_markup(pages):
    cfg = ExtractConfig(extractor="trafilatura")
    pairs = [(html_to_text(p.read_bytes(), cfg)[0], html_to_text(p.read_bytes(), ExtractConfig(extractor="resiliparse"))[0])
             for p in pages[:10]]
    assert sum(t is not None for t, _ in pairs) >= 8
    for trafilatura_text, resiliparse_text in pairs:
        if trafilatura_text and resiliparse_text:
            assert "<div" not in trafilatura_text and "<script" not in trafilatura_text
            words = set(trafilatura_text.split())
            assert len(words & set(resiliparse_text.split())) >= 0.5 * len(words)  # the same article body
    assert html_to_text(b"<html><body><script>var x = 1;</script></body></html>", cfg) == (None, "empty_text")
