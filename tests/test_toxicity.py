"""The LDNOOBW bad-words filter on real text: SMS messages, news articles, books, and real news pages end to end.

Every decision is checked against the actual word list, through a plain scan written independently of the module's
regular expression (find each listed word, look at the characters on both sides), never against hard-coded words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from athanor.config import CurateConfig, DataConfig, ToxicityConfig
from athanor.pipelines.filters import filter_batch, row_stages
from athanor.pipelines.read import read_crawl
from athanor.pipelines.toxicity import ToxicityFilter, keep_draw, load_words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lists(data_dir) -> Path:
    """data/toxicity/ldnoobw, fetched (npm naughty-words@1.2.0) if this data/ predates it."""
    folder = data_dir / "toxicity" / "ldnoobw"
    if not (folder / "en.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_data.py"), "--dest", str(data_dir)], check=True)
    return folder


@pytest.fixture(scope="module")
def cfg(lists) -> ToxicityConfig:
    return ToxicityConfig(enabled=True, wordlist_dir=str(lists))


@pytest.fixture(scope="module")
def sms(data_dir) -> list[str]:
    return [line for line in (data_dir / "quality" / "low" / "sms.txt").read_text().splitlines()[1:] if line.strip()]


@pytest.fixture(scope="module")
def prose(data_dir) -> list[str]:
    """News articles (one per line) and book paragraphs."""
    high = data_dir / "quality" / "high"
    news = [t for t in (high / "lee_background.txt").read_text().splitlines() if t.strip()]
    books = [p for f in ("alice29.txt", "lcet10.txt") for p in (high / f).read_text(encoding="latin-1").split("\n\n")
             if len(p.split()) >= 20]
    return news + books


def _flanked(text: str, start: int, end: int) -> bool:
    def is_word(ch: str) -> bool:
        return ch.isalnum() or ch == "_"
    return (start == 0 or not is_word(text[start - 1])) and (end == len(text) or not is_word(text[end]))


def oracle(text: str, words: list[str], substring: bool = False) -> bool:
    """Does a listed word occur in the lowercased text, flanked by non-word characters (or anywhere, `substring`)?"""
    lower = text.lower()
    for w in words:
        i = lower.find(w)
        while i != -1:
            if substring or _flanked(lower, i, i + len(w)):
                return True
            i = lower.find(w, i + 1)
    return False


def _run(f: ToxicityFilter, texts: list[str], lang: str = "en", first: int = 0) -> pa.Table:
    ids = [f"{i:016x}" for i in range(first, first + len(texts))]
    return f(pa.table({"doc_id": ids, "text": texts, "lang": [lang] * len(texts)}))


def test_decisions_match_the_word_list_on_real_text(cfg, sms, prose):
    words = load_words(cfg, "en")
    raw = json.loads((Path(cfg.wordlist_dir) / "en.json").read_text())
    assert len(words) == len(set(raw)) > 300  # the whole English list, nothing allowlisted
    f = ToxicityFilter(cfg, ["en"])
    for texts in (sms, prose):
        out = _run(f, texts)
        expected = [oracle(t, words) for t in texts]
        assert [r == "toxic" for r in out["drop_reason"].to_pylist()] == expected
        assert [n > 0 for n in out["toxic_words"].to_pylist()] == expected
        assert 0 < sum(expected) < len(texts) / 2  # real matches, and most real text is clean
    # a listed word inside a longer word is no match: the same scan without the boundary check finds more
    assert sum(oracle(t, words, substring=True) for t in sms) > sum(oracle(t, words) for t in sms)


def test_each_language_reads_its_own_list(cfg, sms):
    f = ToxicityFilter(cfg, ["en", "fr", "de"])
    for lang in ("fr", "de"):
        words = load_words(cfg, lang)
        expected = [oracle(t, words) for t in sms]
        assert [r == "toxic" for r in _run(f, sms, lang)["drop_reason"].to_pylist()] == expected
    en, de = (_run(f, sms, lang)["drop_reason"].to_pylist() for lang in ("en", "de"))
    assert en != de


def test_languages_without_spaces_match_substrings(cfg):
    """ja/th/zh as DataTrove: a listed word counts inside a run of characters with no spaces between words."""
    f = ToxicityFilter(cfg, ["zh", "en"])
    zh = next(w for w in load_words(cfg, "zh") if len(w) >= 2 and w.isalpha())
    en = next(w for w in load_words(cfg, "en") if w.isalpha() and len(w) >= 4)
    assert _run(f, [f"\u4eca\u5929{zh}\u5f88\u597d"], "zh")["drop_reason"].to_pylist() == ["toxic"]
    assert _run(f, [f"pre{en}post"], "en")["drop_reason"].to_pylist() == [None]
    assert _run(f, [f"pre {en}, post"], "en")["drop_reason"].to_pylist() == ["toxic"]


def test_allowlist_and_missing_languages(cfg, lists, sms):
    zh_raw = set(json.loads((lists / "zh.json").read_text()))
    assert "\u6027" in zh_raw and "\u6027" not in load_words(cfg, "zh")  # DataTrove's allowlist, by default
    assert "\u6027" in load_words(cfg.model_copy(update={"allowlist": {}}), "zh")
    with pytest.raises(FileNotFoundError, match="'la'"):
        ToxicityFilter(cfg, ["en", "la"])  # langid lets Latin through, and there is no Latin list
    lenient = ToxicityFilter(cfg.model_copy(update={"fail_on_missing_language": False}), ["en", "la"])
    out = _run(lenient, sms[:50], "la")
    assert out["toxic_words"].null_count == 50 and out["drop_reason"].null_count == 50
    only_fr = ToxicityFilter(cfg.model_copy(update={"languages": ["fr"]}), ["en", "la"])  # la, en: not checked
    assert _run(only_fr, sms[:50], "en")["toxic_words"].null_count == 50


def test_keep_fraction_is_a_fixed_draw_per_document(cfg, sms):
    words = load_words(cfg, "en")
    f = ToxicityFilter(cfg.model_copy(update={"keep_fraction": 0.5, "seed": 7}), ["en"])
    out = _run(f, sms)
    ids = out["doc_id"].to_pylist()
    toxic = [i for i, t in zip(ids, sms) if oracle(t, words)]
    kept = {i for i, r, n in zip(ids, out["drop_reason"].to_pylist(), out["toxic_words"].to_pylist()) if n and not r}
    assert kept == {i for i in toxic if keep_draw(i, 7) < 0.5}
    assert 0.3 < len(kept) / len(toxic) < 0.7
    halves = [_run(f, sms[:100]), _run(f, sms[100:], first=100)]  # other batch boundaries, same decisions
    assert sum((h["drop_reason"].to_pylist() for h in halves), []) == out["drop_reason"].to_pylist()


def test_config_is_validated():
    with pytest.raises(ValidationError):
        ToxicityConfig(keep_fraction=1.5)
    with pytest.raises(ValidationError):
        ToxicityConfig(wordlists="x")
    assert not CurateConfig().toxicity.enabled and "toxicity" not in row_stages(CurateConfig())


def test_in_the_filter_chain_on_real_pages(data_dir, lists, ray_local):
    """The demo's news pages read and filtered in Ray Data as curation does: toxicity reads langid's `lang` and the
    text C4 cleaned; every page is accounted for."""
    import ray

    c = CurateConfig.model_validate({"toxicity": {"enabled": True, "wordlist_dir": str(lists)},
                                     "langid": {"model_path": str(data_dir / "models" / "lid.176.ftz")},
                                     "url_filter": {"blocklist_dir": str(data_dir / "blocklists")}})
    assert row_stages(c).index("toxicity") == row_stages(c).index("c4") + 1
    pages = sorted((data_dir / "html" / "news").iterdir())
    ds = read_crawl(DataConfig(html_dirs=[str(data_dir / "html" / "news")]))
    out = pa.concat_tables(ray.get(ds.map_batches(filter_batch, fn_kwargs={"cfg": c}, batch_format="pyarrow")
                                   .materialize().to_arrow_refs()), promote_options="default")
    assert out.num_rows == len(pages)
    words = load_words(c.toxicity, "en")
    reached = [r for r in out.to_pylist() if r["toxic_words"] is not None]
    assert reached and all(r["lang"] == "en" for r in reached)
    for r in reached:
        assert (r["drop_reason"] == "toxic") == oracle(r["text"], words)
    assert 0 < sum(r["drop_reason"] == "toxic" for r in reached) < len(reached)
    assert not any(r["drop_reason"] in {"lang_not_allowed", "lang_low_score"} for r in reached)
