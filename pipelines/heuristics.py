"""Gopher-style quality rules (Rae et al. 2021, appendix A), each with its own signal column and drop reason.

Signals: `word_count`, `mean_word_length`, `symbol_word_ratio` ('#' and ellipses per word), `duplicate_line_fraction`
(share of non-empty lines that repeat an earlier line). Drops, checked in this order: `too_few_words`,
`too_many_words`, `mean_word_length`, `symbol_word_ratio`, `duplicate_lines`.
"""

from __future__ import annotations

import pyarrow as pa

from athanor.config import HeuristicsConfig
from athanor.pipelines.stats import mark

SIGNALS = ("word_count", "mean_word_length", "symbol_word_ratio", "duplicate_line_fraction")


def gopher_signals(text: str) -> dict[str, float]:
    words = text.split()
    n = len(words)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return {
        "word_count": n,
        "mean_word_length": sum(map(len, words)) / n if n else 0.0,
        "symbol_word_ratio": symbols / n if n else 0.0,
        "duplicate_line_fraction": 1.0 - len(set(lines)) / len(lines) if lines else 0.0,
    }


def gopher_reason(s: dict[str, float], cfg: HeuristicsConfig) -> str | None:
    if s["word_count"] < cfg.min_words:
        return "too_few_words"
    if s["word_count"] > cfg.max_words:
        return "too_many_words"
    if not cfg.min_mean_word_length <= s["mean_word_length"] <= cfg.max_mean_word_length:
        return "mean_word_length"
    if s["symbol_word_ratio"] > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if s["duplicate_line_fraction"] > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    return None


def heuristics_batch(batch: pa.Table, cfg: HeuristicsConfig) -> pa.Table:
    """Ray Data UDF: adds the signal columns and marks rule violations."""
    signals = [gopher_signals(t) for t in batch["text"].to_pylist()]
    out = batch
    for name in SIGNALS:
        kind = pa.int64() if name == "word_count" else pa.float64()
        out = out.append_column(name, pa.array([s[name] for s in signals], type=kind))
    return mark(out, [gopher_reason(s, cfg) for s in signals])
