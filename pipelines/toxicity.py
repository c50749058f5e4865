"""Toxicity: C4's bad-words page filter (Raffel et al. 2020), per language, with the LDNOOBW lists.

Semantics follow DataTrove's C4BadWordsFilter: the document's language is langid's `lang` column (`default_language`
where it has none); the text is lowercased and searched for any word or phrase of that language's list, flanked by
non-word characters (or the text's ends) in space-separated languages and as a bare substring in ja, th and zh,
which do not separate words; DataTrove's allowlist (common ja/zh subwords that would each drop over 10% of their
language) is taken out of the lists. A page with a match is dropped as `toxic`, unless `keep_fraction` keeps it:
the keep draw is a hash of (seed, doc_id), so a re-run or a resumed run keeps the same pages (DataTrove draws from
an RNG, which depends on the order documents arrive in). Differences from DataTrove: list entries are lowercased
and stripped too (an entry in capitals could never match the lowercased text), and langid's `tl` reads LDNOOBW's
`fil` list.

Signal: `toxic_words`, the number of list matches in the document (0 on a clean one, null where the language has no
list or is not checked). The matched words are not stored: they are in the text of the dropped rows (kept under
curated/dropped/ for audit), and a column of slurs would travel into every stats file and report built from it.

The lists come from the npm package naughty-words@1.2.0 (LDNOOBW, CC-BY-4.0; scripts/fetch_data.py puts them in
data/toxicity/ldnoobw/<lang>.json). Disabled by default (see ToxicityConfig).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import xxhash

from athanor.config import ToxicityConfig
from athanor.pipelines.stats import mark

DROP_REASONS = ("toxic",)
NO_SPACE_LANGUAGES = frozenset({"ja", "th", "zh"})  # matched as substrings, as DataTrove does
LIST_ALIASES = {"tl": "fil"}  # lid.176's code -> LDNOOBW's file name, where they differ


def list_path(cfg: ToxicityConfig, lang: str) -> Path:
    return Path(cfg.wordlist_dir) / f"{LIST_ALIASES.get(lang, lang)}.json"


def load_words(cfg: ToxicityConfig, lang: str) -> list[str] | None:
    """The language's list, lowercased and stripped, minus its allowlist, longest first; None when there is none."""
    path = list_path(cfg, lang)
    if not path.is_file():
        return None
    allowed = {w.lower() for w in cfg.allowlist.get(lang, [])}
    words = {w.strip().lower() for w in json.loads(path.read_text(encoding="utf-8"))} - allowed - {""}
    return sorted(words, key=lambda w: (-len(w), w))


def compile_words(words: list[str], lang: str) -> re.Pattern:
    alternatives = "|".join(map(re.escape, words))
    if lang in NO_SPACE_LANGUAGES:
        return re.compile(alternatives)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")  # DataTrove's (?:\W|^)...(?:\W|$), without consuming


def keep_draw(doc_id: str, seed: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, doc_id)."""
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8"), seed=seed) / 2.0**64


class ToxicityFilter:
    """Row stage: needs `lang` (langid's signal) and `doc_id`; loads each language's pattern once, on first use."""

    def __init__(self, cfg: ToxicityConfig, allowed_languages: list[str] | None = None):
        self.cfg = cfg
        self.patterns: dict[str, re.Pattern | None] = {}
        if cfg.fail_on_missing_language:
            # The languages langid lets through (and that this filter checks): each needs a list, found now, not
            # on the first document of a language without one, hours into a run.
            checked = [lang for lang in (allowed_languages or []) if self.checks(lang)]
            missing = [lang for lang in checked if not list_path(cfg, lang).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"curate.toxicity: no word list for {missing} in {cfg.wordlist_dir} (run scripts/fetch_data.py; "
                    "or set curate.toxicity.languages, or fail_on_missing_language: false to pass those languages)")

    def checks(self, lang: str) -> bool:
        return self.cfg.languages is None or lang in self.cfg.languages

    def pattern(self, lang: str) -> re.Pattern | None:
        if lang not in self.patterns:
            words = load_words(self.cfg, lang)
            if words is None and self.cfg.fail_on_missing_language:
                raise FileNotFoundError(f"curate.toxicity: no word list for {lang!r} at {list_path(self.cfg, lang)}")
            self.patterns[lang] = None if words is None else compile_words(words, lang)
        return self.patterns[lang]

    def count(self, text: str, lang: str | None) -> int | None:
        """List matches in `text` for its language; None when that language is not checked or has no list."""
        lang = lang or self.cfg.default_language
        pattern = self.pattern(lang) if self.checks(lang) else None
        return None if pattern is None else len(pattern.findall(text.lower()))

    def decide(self, text: str, lang: str | None, doc_id: str) -> tuple[int | None, str | None]:
        n = self.count(text, lang)
        if not n or keep_draw(doc_id, self.cfg.seed) < self.cfg.keep_fraction:
            return n, None
        return n, "toxic"

    def __call__(self, batch: pa.Table) -> pa.Table:
        langs = batch["lang"].to_pylist() if "lang" in batch.column_names else [None] * batch.num_rows
        results = [self.decide(t or "", lang, d)
                   for t, lang, d in zip(batch["text"].to_pylist(), langs, batch["doc_id"].to_pylist())]
        out = batch.append_column("toxic_words", pa.array([n for n, _ in results], type=pa.int64()))
        return mark(out, [r for _, r in results])
