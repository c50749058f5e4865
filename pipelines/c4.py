"""C4's cleaning rules (Raffel et al. 2020, section 2.2; DataTrove's C4QualityFilter is the reference).

Line cleaning rewrites `text`: lines are removed when they do not end in terminal punctuation (or end in an
ellipsis), have fewer than `min_words_per_line` words, hold a word longer than `max_word_length`, mention
javascript, or are cookie / terms-of-use / privacy-policy notices; Wikipedia-style citations are cut out.
Signals: `c4_lines_removed`, `c4_sentences`. Page drops: `lorem_ipsum`, `curly_bracket` (code, templates), and
`too_few_sentences` (which also covers a page with no line left).
"""

from __future__ import annotations

import re

import pyarrow as pa

from athanor.config import C4Config
from athanor.pipelines.stats import mark

CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
DROP_REASONS = ("lorem_ipsum", "curly_bracket", "too_few_sentences")
SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def _keep_line(line: str, words: list[str], cfg: C4Config) -> bool:
    if any(len(w) > cfg.max_word_length for w in words):
        return False
    if cfg.terminal_punctuation and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
        return False
    return len(words) >= cfg.min_words_per_line


def c4_clean(text: str, cfg: C4Config) -> tuple[str, dict[str, int], str | None]:
    """(cleaned text, signals, drop reason or None) for one document."""
    kept: list[str] = []
    removed = sentences = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        words = line.split()
        if cfg.remove_citations:
            line = CITATION.sub("", line)
        if not _keep_line(line, words, cfg):
            removed += 1
            continue
        lower = line.lower()
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
            return text, {"c4_lines_removed": removed, "c4_sentences": sentences}, "lorem_ipsum"
        if cfg.remove_javascript_lines and "javascript" in lower:  # before the bracket check, as in C4 and
            removed += 1                                             # DataTrove: such a line goes, not the page
            continue
        if cfg.drop_curly_bracket and "{" in line:
            return text, {"c4_lines_removed": removed, "c4_sentences": sentences}, "curly_bracket"
        if cfg.remove_policy_lines and any(p in lower for p in POLICY_PHRASES):
            removed += 1
            continue
        sentences += max(1, len(SENTENCE_END.findall(line)))
        kept.append(line)
    signals = {"c4_lines_removed": removed, "c4_sentences": sentences}
    if not kept or sentences < cfg.min_sentences:
        return text, signals, "too_few_sentences"
    return "\n".join(kept), signals, None


def c4_batch(batch: pa.Table, cfg: C4Config) -> pa.Table:
    """Ray Data UDF: rewrites `text` of kept documents, adds the signal columns and marks page drops."""
    results = [c4_clean(t or "", cfg) for t in batch["text"].to_pylist()]
    out = batch.set_column(batch.schema.get_field_index("text"), "text",
                           pa.array([t for t, _, _ in results], type=pa.string()))
    for name in ("c4_lines_removed", "c4_sentences"):
        out = out.append_column(name, pa.array([s[name] for _, s, _ in results], type=pa.int64()))
    return mark(out, [r for _, _, r in results])
