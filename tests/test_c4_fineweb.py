"""C4 line cleaning and page rules, FineWeb rules, on real news pages and real SMS messages."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from athanor.config import C4Config, ExtractConfig, FineWebConfig
from athanor.pipelines.c4 import c4_batch, c4_clean
from athanor.pipelines.extract import html_to_text
from athanor.pipelines.fineweb import fineweb_batch, fineweb_reason, fineweb_signals


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    pages = sorted((data_dir / "html" / "news").iterdir())[:40]
    return [t for t, _ in (html_to_text(p.read_bytes(), ExtractConfig()) for p in pages) if t]


@pytest.fixture(scope="module")
def sms(data_dir) -> list[str]:
    return [line for line in Path(data_dir / "quality" / "low" / "sms.txt").read_text().splitlines() if line.strip()]


def test_c4_keeps_article_sentences_and_removes_the_rest(texts):
    cfg = C4Config()
    out = c4_batch(pa.table({"text": texts}), cfg)
    assert out["drop_reason"].to_pylist().count(None) >= 0.9 * len(texts)
    assert sum(out["c4_lines_removed"].to_pylist()) > len(texts)  # bylines, menus, captions go
    for before, after, reason in zip(texts, out["text"].to_pylist(), out["drop_reason"].to_pylist()):
        if reason is None:
            lines = after.splitlines()
            assert len(after) < len(before) and all(line.endswith((".", "?", "!", '"', "'")) for line in lines)
            assert all(len(line.split()) >= cfg.min_words_per_line for line in lines)
            assert set(lines) <= {line.strip() for line in before.splitlines()}  # lines removed, never rewritten


def test_c4_line_rules_and_page_drops(texts):
    cfg = C4Config()
    article = max(texts, key=len)
    cleaned, signals, reason = c4_clean(article, cfg)
    assert reason is None and signals["c4_sentences"] >= cfg.min_sentences
    for noise in ("Please enable JavaScript to view the comments.", "This site uses cookies to improve your visit."):
        assert c4_clean(f"{article}\n{noise}", cfg)[0] == cleaned  # removed as a line, page kept
    assert c4_clean(f"{article}\nLorem ipsum dolor sit amet, consectetur adipiscing.", cfg)[2] == "lorem_ipsum"
    assert c4_clean(f"{article}\nvar config = {{ page: 1 }};", cfg)[0] == cleaned  # unpunctuated: just a line
    assert c4_clean(f"{article}\nThe page calls render({{ page: 1 }}) on load.", cfg)[2] == "curly_bracket"
    # a line with both: C4 (and DataTrove's C4QualityFilter) checks javascript first, so the line goes, not the page
    assert c4_clean(f"{article}\nThe javascript call render({{ page: 1 }}) runs on load.", cfg)[0] == cleaned
    short = "\n".join(cleaned.splitlines()[:2])
    assert c4_clean(short, cfg)[2] == "too_few_sentences"
    assert c4_clean("", cfg)[2] == "too_few_sentences"
    assert c4_clean(article, C4Config(terminal_punctuation=False))[1]["c4_lines_removed"] < signals["c4_lines_removed"]


def test_fineweb_keeps_news_and_drops_message_lists(texts, sms):
    cfg = FineWebConfig()
    cleaned = [c4_clean(t, C4Config())[0] for t in texts]
    out = fineweb_batch(pa.table({"text": cleaned}), cfg)
    assert out["drop_reason"].to_pylist().count(None) >= 0.8 * len(texts)
    assert out["fineweb_line_punctuation"].to_pylist() == [fineweb_signals(t, cfg)["fineweb_line_punctuation"]
                                                          for t in cleaned]
    texting = "\n".join(m for m in sms[:400] if len(m) <= 30)  # a page of short, mostly unpunctuated messages
    assert fineweb_reason(fineweb_signals(texting, cfg), cfg) in {"line_punctuation", "short_lines"}
    assert fineweb_reason(fineweb_signals(texting, cfg), FineWebConfig(min_line_punctuation_fraction=0.0)) == (
        "short_lines")
    article = max(cleaned, key=len)
    assert fineweb_reason(fineweb_signals(article, cfg), cfg) is None
    lines = article.splitlines()
    templated = "\n".join(lines + lines[:2])
    assert fineweb_reason(fineweb_signals(templated, cfg), cfg) == "duplicate_chars"
    words = article.split()
    listing = "\n".join(dict.fromkeys(" ".join(words[i:i + 2]) for i in range(0, len(words), 2)))  # 2 words a line
    assert fineweb_reason(fineweb_signals(listing, cfg), FineWebConfig(min_line_punctuation_fraction=0.0,
                                                                       max_short_line_fraction=1.0)) == "list_like"
