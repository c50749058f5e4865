"""Gopher quality and repetition rules (Rae et al. 2021, appendix A, table A1), one signal column per rule.

The quality signals are computed for a whole batch at once with Arrow kernels over the flattened words and lines
(no Python loop per word); the repetition signals need per-document hashing of lines, paragraphs and n-grams and
run per document. DataTrove's GopherQualityFilter / GopherRepetitionFilter are the reference for the definitions;
words here are whitespace tokens (punctuation stays attached), and n-grams are over `\\w+` tokens.

Drops, in this order (quality first, cheapest first): `too_few_words`, `too_many_words`, `mean_word_length`,
`symbol_word_ratio`, `bullet_lines`, `ellipsis_lines`, `alpha_words`, `stop_words`, `duplicate_paragraphs`,
`duplicate_paragraph_chars`, `duplicate_lines`, `duplicate_line_chars`, `top_{n}gram`, `duplicate_{n}gram`.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from athanor.config import HeuristicsConfig
from athanor.pipelines.stats import mark

QUALITY_SIGNALS = ("word_count", "mean_word_length", "symbol_word_ratio", "bullet_line_fraction",
                   "ellipsis_line_fraction", "alpha_word_fraction", "stop_word_count")
PARAGRAPH_BREAK = re.compile(r"\n{2,}")
LINE_BREAK = re.compile(r"\n+")
WORD = re.compile(r"\w+")
PUNCTUATION = "\"'()[]{}<>.,;:!?-\u2013\u2014\u2018\u2019\u201c\u201d\u2026*_/\\"


def _per_doc(parent: np.ndarray, weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.bincount(parent, weights=weights, minlength=n).astype(np.float64)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def quality_signals(texts: pa.Array, cfg: HeuristicsConfig) -> dict[str, np.ndarray]:
    """Gopher quality signals for a batch of texts, vectorized over flattened words and lines."""
    n = len(texts)
    tokens = pc.utf8_split_whitespace(texts)
    flat, parent = pc.list_flatten(tokens), pc.list_parent_indices(tokens).to_numpy()
    n_tokens = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.float64)
    is_word = pc.match_substring_regex(flat, r"\w").to_numpy(zero_copy_only=False)
    n_words = _per_doc(parent, is_word, n)  # tokens that are not bare punctuation
    word_chars = _per_doc(parent, np.where(is_word, pc.utf8_length(flat).to_numpy(), 0), n)
    has_alpha = pc.match_substring_regex(flat, r"[^\W\d_]").to_numpy(zero_copy_only=False)

    stops = pc.index_in(pc.utf8_trim(pc.utf8_lower(flat), PUNCTUATION), value_set=pa.array(cfg.stop_words))
    found = pc.is_valid(stops).to_numpy(zero_copy_only=False)
    k = max(len(cfg.stop_words), 1)
    distinct = np.unique(parent[found].astype(np.int64) * k + pc.fill_null(stops, 0).to_numpy()[found])
    stop_count = _per_doc(distinct // k, None, n)  # distinct (document, stop word) pairs per document

    hashes = pc.count_substring(texts, "#").to_numpy().astype(np.float64)
    ellipses = (pc.count_substring(texts, "...").to_numpy() + pc.count_substring(texts, "\u2026").to_numpy())
    lines = pc.split_pattern(texts, "\n")
    line_flat, line_parent = pc.list_flatten(lines), pc.list_parent_indices(lines).to_numpy()
    non_empty = pc.match_substring_regex(line_flat, r"\S").to_numpy(zero_copy_only=False)
    bullets = pc.match_substring_regex(line_flat, "^\\s*[\u2022\u2023\u25e6\u25aa\u25cf\\-*]").to_numpy(
        zero_copy_only=False)
    ellipsis_end = pc.match_substring_regex(line_flat, "(\\.\\.\\.|\u2026)\\s*$").to_numpy(zero_copy_only=False)
    n_lines = _per_doc(line_parent, non_empty, n)
    return {
        "word_count": n_words.astype(np.int64),
        "mean_word_length": _safe_div(word_chars, n_words),
        "symbol_word_ratio": np.maximum(_safe_div(hashes, n_tokens), _safe_div(ellipses.astype(float), n_tokens)),
        "bullet_line_fraction": _safe_div(_per_doc(line_parent, bullets & non_empty, n), n_lines),
        "ellipsis_line_fraction": _safe_div(_per_doc(line_parent, ellipsis_end & non_empty, n), n_lines),
        "alpha_word_fraction": _safe_div(_per_doc(parent, has_alpha, n), n_tokens),
        "stop_word_count": stop_count.astype(np.int64),
    }


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """(repeats, characters in repeats): every occurrence after the first counts."""
    seen: set[str] = set()
    count = chars = 0
    for part in parts:
        if part in seen:
            count, chars = count + 1, chars + len(part)
        else:
            seen.add(part)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram (counted with the spaces inside it, as DataTrove does)."""
    grams = Counter(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return (sum(map(len, gram)) + n - 1) * count


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of n-grams seen before, skipping past each repeat so overlapping repeats count once."""
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = tuple(words[i:i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def repetition_signals(text: str, cfg: HeuristicsConfig) -> dict[str, float]:
    """Gopher repetition signals of one document, each a fraction of its lines, paragraphs or characters."""
    chars = max(len(text), 1)
    paragraphs = PARAGRAPH_BREAK.split(text.strip())
    lines = [line for line in LINE_BREAK.split(text.strip()) if line.strip()]
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    words = WORD.findall(text)
    signals = {
        "duplicate_paragraph_fraction": para_dups / len(paragraphs) if paragraphs else 0.0,
        "duplicate_paragraph_char_fraction": para_chars / chars,
        "duplicate_line_fraction": line_dups / len(lines) if lines else 0.0,
        "duplicate_line_char_fraction": line_chars / chars,
    }
    for n in cfg.max_top_ngram_char_fraction:
        signals[f"top_{n}gram_char_fraction"] = _top_ngram_chars(words, n) / chars
    for n in cfg.max_duplicate_ngram_char_fraction:
        signals[f"duplicate_{n}gram_char_fraction"] = _duplicate_ngram_chars(words, n) / chars
    return signals


def gopher_signals(text: str, cfg: HeuristicsConfig | None = None) -> dict[str, float]:
    """All Gopher signals of one document (the batch path computes the same values)."""
    cfg = cfg or HeuristicsConfig()
    quality = {k: v[0].item() for k, v in quality_signals(pa.array([text], type=pa.string()), cfg).items()}
    return quality | repetition_signals(text, cfg)


def drop_reasons(cfg: HeuristicsConfig) -> tuple[str, ...]:
    """Every reason gopher_reason can give under `cfg`, in its order (the n-gram ones depend on the config)."""
    return ("too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio", "bullet_lines",
            "ellipsis_lines", "alpha_words", "stop_words", "duplicate_paragraphs", "duplicate_paragraph_chars",
            "duplicate_lines", "duplicate_line_chars", *(f"top_{n}gram" for n in cfg.max_top_ngram_char_fraction),
            *(f"duplicate_{n}gram" for n in cfg.max_duplicate_ngram_char_fraction))


def gopher_reason(s: dict[str, float], cfg: HeuristicsConfig) -> str | None:
    if s["word_count"] < cfg.min_words:
        return "too_few_words"
    if s["word_count"] > cfg.max_words:
        return "too_many_words"
    if not cfg.min_mean_word_length <= s["mean_word_length"] <= cfg.max_mean_word_length:
        return "mean_word_length"
    if s["symbol_word_ratio"] > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if s["bullet_line_fraction"] > cfg.max_bullet_line_fraction:
        return "bullet_lines"
    if s["ellipsis_line_fraction"] > cfg.max_ellipsis_line_fraction:
        return "ellipsis_lines"
    if s["alpha_word_fraction"] < cfg.min_alpha_word_fraction:
        return "alpha_words"
    if s["stop_word_count"] < cfg.min_stop_words:
        return "stop_words"
    if s["duplicate_paragraph_fraction"] > cfg.max_duplicate_paragraph_fraction:
        return "duplicate_paragraphs"
    if s["duplicate_paragraph_char_fraction"] > cfg.max_duplicate_paragraph_char_fraction:
        return "duplicate_paragraph_chars"
    if s["duplicate_line_fraction"] > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    if s["duplicate_line_char_fraction"] > cfg.max_duplicate_line_char_fraction:
        return "duplicate_line_chars"
    for n, limit in cfg.max_top_ngram_char_fraction.items():
        if s[f"top_{n}gram_char_fraction"] > limit:
            return f"top_{n}gram"
    for n, limit in cfg.max_duplicate_ngram_char_fraction.items():
        if s[f"duplicate_{n}gram_char_fraction"] > limit:
            return f"duplicate_{n}gram"
    return None


def heuristics_batch(batch: pa.Table, cfg: HeuristicsConfig) -> pa.Table:
    """Ray Data UDF: adds one column per Gopher signal and marks the first rule each document breaks."""
    texts = pc.fill_null(batch["text"].combine_chunks(), "")
    columns: dict[str, np.ndarray | list] = dict(quality_signals(texts, cfg))
    repetition = [repetition_signals(t, cfg) for t in texts.to_pylist()]
    for name in (repetition[0] if repetition else repetition_signals("", cfg)):
        columns[name] = np.array([r[name] for r in repetition], dtype=np.float64)
    out = batch
    for name, values in columns.items():
        out = out.append_column(name, pa.array(values))
    rows = [{name: values[i] for name, values in columns.items()} for i in range(batch.num_rows)]
    return mark(out, [gopher_reason(s, cfg) for s in rows])
