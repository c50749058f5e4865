"""Exact deduplication on normalized text: one survivor per identical text, the smallest doc_id.

Normalization (lowercase, punctuation/symbols/digits removed, whitespace collapsed) makes copies that differ only in
formatting count as identical, as in CCNet and DataTrove. Groups are formed with a Ray Data groupby on the text hash,
so no single process has to see every hash; up to `single_task_max_docs` documents, one task builds the hash ->
survivor table instead (the groupby's fixed cost dominates small inputs) and a map marks the documents from it, with
the same result. Signal columns `text_hash`, `exact_dup_of` (the survivor); drop reason `exact_duplicate`.
"""

from __future__ import annotations

from collections import Counter

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


@ray.remote(num_cpus=1)
def _survivors_task(*blocks: pa.Table) -> pa.Table:
    return survivors_by_hash(list(blocks))


def survivors_by_hash(blocks: list[pa.Table]) -> pa.Table:
    """(text_hash, survivor): the smallest doc_id of every text hash that more than one row has, on one process."""
    survivor: dict[str, str] = {}
    rows: Counter = Counter()
    for block in blocks:
        for doc_id, text_hash in zip(block["doc_id"].to_pylist(), block["text_hash"].to_pylist()):
            rows[text_hash] += 1
            if text_hash not in survivor or doc_id < survivor[text_hash]:  # code-point order = pc.min's UTF-8 order
                survivor[text_hash] = doc_id
    shared = sorted(h for h, n in rows.items() if n > 1)
    return pa.table({"text_hash": pa.array(shared, pa.string()),
                     "survivor": pa.array([survivor[h] for h in shared], pa.string())})


def mark_from_survivors(batch: pa.Table, survivors: list[ray.ObjectRef]) -> pa.Table:
    """Ray Data UDF: what keep_smallest_doc_id gives each row, looked up in the (text_hash, survivor) table."""
    table = ray.get(survivors[0])
    found = pc.take(table["survivor"], pc.index_in(batch["text_hash"], value_set=table["text_hash"]))
    dup_of = [None if s is None or s == d else s for d, s in zip(batch["doc_id"].to_pylist(), found.to_pylist())]
    out = batch.append_column("exact_dup_of", pa.array(dup_of, type=pa.string()))
    return mark(out, [None if s is None else "exact_duplicate" for s in dup_of])


def mark_exact_duplicates(ds: ray.data.Dataset, num_partitions: int, single_task_max_docs: int = 0
                          ) -> ray.data.Dataset:
    """Up to `single_task_max_docs` documents one task finds the survivors; above, a groupby on the text hash."""
    hashed = ds.map_batches(add_text_hash, batch_format="pyarrow")
    if single_task_max_docs:
        hashed = hashed.materialize()
        if hashed.count() <= single_task_max_docs:
            survivors = _survivors_task.remote(*hashed.to_arrow_refs())
            return hashed.map_batches(mark_from_survivors, fn_kwargs={"survivors": [survivors]},
                                      batch_format="pyarrow")
    return (
        hashed.groupby("text_hash", num_partitions=num_partitions)
        .map_groups(keep_smallest_doc_id, batch_format="pyarrow")
    )
