"""FineWeb's extra quality rules (Penedo et al. 2024; DataTrove's FineWebQualityFilter is the reference).

They catch what Gopher and C4 miss on extracted web text: pages that are mostly unpunctuated lines (menus, link
lists), mostly short lines, repeated lines (templates), or list-like (many newlines per word).
Signals: `fineweb_line_punctuation`, `fineweb_short_lines`, `fineweb_duplicate_chars`, `fineweb_newlines_per_word`.
Drops, in this order: `line_punctuation`, `short_lines`, `duplicate_chars`, `list_like`.
"""

from __future__ import annotations

import pyarrow as pa

from athanor.config import FineWebConfig
from athanor.pipelines.stats import mark

# Sentence terminals of the major scripts (Latin, CJK, Devanagari, Arabic, Urdu) and the doubled forms.
TERMINAL_PUNCTUATION = tuple(".!?\u3002\uff01\uff1f\u0964\u061f\u06d4\u203c\u203d\u2047\u2048\u2049")
DROP_REASONS = ("line_punctuation", "short_lines", "duplicate_chars", "list_like")
SIGNALS = ("fineweb_line_punctuation", "fineweb_short_lines", "fineweb_duplicate_chars", "fineweb_newlines_per_word")


def fineweb_signals(text: str, cfg: FineWebConfig) -> dict[str, float]:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return dict.fromkeys(SIGNALS, 0.0)
    seen: set[str] = set()
    duplicate_chars = 0
    for line in lines:
        if line in seen:
            duplicate_chars += len(line)
        seen.add(line)
    words = len(text.split())
    return {
        "fineweb_line_punctuation": sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines),
        "fineweb_short_lines": sum(len(line) <= cfg.short_line_chars for line in lines) / len(lines),
        "fineweb_duplicate_chars": duplicate_chars / max(len(text.replace("\n", "")), 1),
        "fineweb_newlines_per_word": text.count("\n") / max(words, 1),
    }


def fineweb_reason(s: dict[str, float], cfg: FineWebConfig) -> str | None:
    if s["fineweb_line_punctuation"] < cfg.min_line_punctuation_fraction:
        return "line_punctuation"
    if s["fineweb_short_lines"] > cfg.max_short_line_fraction:
        return "short_lines"
    if s["fineweb_duplicate_chars"] > cfg.max_duplicate_line_char_fraction:
        return "duplicate_chars"
    if s["fineweb_newlines_per_word"] > cfg.max_newlines_per_word:
        return "list_like"
    return None


def fineweb_batch(batch: pa.Table, cfg: FineWebConfig) -> pa.Table:
    """Ray Data UDF: adds the signal columns and marks the first rule each document breaks."""
    signals = [fineweb_signals(t or "", cfg) for t in batch["text"].to_pylist()]
    out = batch
    for name in SIGNALS:
        out = out.append_column(name, pa.array([s[name] for s in signals], type=pa.float64()))
    return mark(out, [fineweb_reason(s, cfg) for s in signals])
