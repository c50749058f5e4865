"""Exact deduplication on normalized text: one survivor per identical text, the smallest doc_id.

Normalization (lowercase, punctuation/symbols/digits removed, whitespace collapsed) makes copies that differ only in
formatting count as identical, as in CCNet and DataTrove. Groups are formed with a Ray Data groupby on the text hash,
so no single process has to see every hash. Signal columns `text_hash`, `exact_dup_of` (the survivor); drop reason
`exact_duplicate`.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash

from athanor.pipelines.stats import mark

_NOT_WORD = r"[\p{P}\p{S}\p{N}]+"
_SPACE = r"[\s\p{Z}\x{0b}\x{1c}-\x{1f}\x{85}]+"  # all that str.split() splits on (RE2's \s alone is ASCII)


def normalize_texts(texts: pa.Array) -> pa.Array:
    """Vectorized normalization of a string array (pyarrow's RE2 kernels, no per-row Python)."""
    lowered = pc.utf8_lower(texts)
    words_only = pc.replace_substring_regex(lowered, _NOT_WORD, " ")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(words_only, _SPACE, " "))


def add_text_hash(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: 128-bit hash of the normalized text, as hex (groupby-friendly and collision-safe)."""
    normalized = normalize_texts(batch["text"]).to_pylist()
    hashes = [xxhash.xxh3_128_hexdigest(t.encode("utf-8")) for t in normalized]
    return batch.append_column("text_hash", pa.array(hashes, type=pa.string()))


def keep_smallest_doc_id(group: pa.Table) -> pa.Table:
    """One group of identical texts: the smallest doc_id survives, the others are `exact_duplicate` of it."""
    survivor = pc.min(group["doc_id"]).as_py()
    dup_of = [None if d == survivor else survivor for d in group["doc_id"].to_pylist()]
    out = group.append_column("exact_dup_of", pa.array(dup_of, type=pa.string()))
    return mark(out, [None if s is None else "exact_duplicate" for s in dup_of])


def mark_exact_duplicates(ds: ray.data.Dataset, num_partitions: int) -> ray.data.Dataset:
    return (
        ds.map_batches(add_text_hash, batch_format="pyarrow")
        .groupby("text_hash", num_partitions=num_partitions)
        .map_groups(keep_smallest_doc_id, batch_format="pyarrow")
    )
