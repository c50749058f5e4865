"""Committed stage output: Parquet shards at fixed doc_id ranges, each renamed into place, then completion markers.

A stage's marked rows are split into `shards` doc_id ranges (range i holds the i-th slice of the 60-bit doc_id
prefix space), one Ray Data group per range. A group is sorted by doc_id and written as `part-i.parquet` (kept rows)
and `dropped/<stage>/part-i.parquet` (dropped rows) under a hidden temporary name and `os.replace`d, then
`_shards/part-i.json` records its counts (on an object store, each file is one atomic PUT: see athanor.storage).
The file bytes depend only on which rows fall in the range, never on Ray's block boundaries or task order, so a
killed run that redoes the unmarked ranges writes what an unbroken run writes.
Once every range is committed, `_SUCCESS.json` records the stage's key (config, inputs, upstream) and its stats.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from athanor import storage
from athanor.pipelines.stats import REASON, dropped_rows, kept_rows, write_json
from athanor.storage import Location, location

SORT_KEY_HEX_DIGITS = 15  # 60 bits of the hex doc_id: fits an int64 and orders like the doc_id
KEY_SPACE = 16**SORT_KEY_HEX_DIGITS
STAGE_MARKER = "_SUCCESS.json"
SHARD_MARKERS = "_shards"
SHARD_COLUMN = "_shard"


def num_shards(num_docs: int, docs_per_shard: int) -> int:
    return max(1, math.ceil(num_docs / docs_per_shard))


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def shard_of(doc_ids: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """The doc_id range each id falls in: fixed boundaries, so every run (and every block split) agrees."""
    keys = np.array([int(d[:SORT_KEY_HEX_DIGITS], 16) for d in doc_ids.to_pylist()], dtype=np.int64)
    boundaries = np.array([i * KEY_SPACE // shards for i in range(1, shards)], dtype=np.int64)
    return np.searchsorted(boundaries, keys, side="right")


def write_atomic(table: pa.Table, path: Location) -> None:
    """Serialize in memory, then write whole (storage.write_bytes): a file is whole or absent, local or remote."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(None).combine_chunks(), sink)
    storage.write_bytes(path, sink.getvalue().to_pybytes())


def read_json(path: Location) -> dict | None:
    return storage.read_json(path)


def committed_files(out_dir: Location) -> list[str]:
    """The committed shards of a stage, in doc_id order (part-i holds the i-th range)."""
    return [str(p) for p in storage.glob(out_dir, "part-*.parquet")]


def stage_marker(out_dir: Location, key: str) -> dict | None:
    """The stage's completion marker when it was written for this key (same config and upstream), else None."""
    marker = read_json(out_dir / STAGE_MARKER)
    return marker if marker and marker["key"] == key else None


def finished_shards(out_dir: Location, key: str) -> dict[int, dict]:
    """shard -> its marker, for the ranges already committed under this key (each marker also holds `shards`)."""
    markers = (read_json(p) for p in storage.glob(out_dir / SHARD_MARKERS, "part-*.json"))
    return {m["shard"]: m for m in markers if m and m["key"] == key}


def clear_stale(out_dir: Location, dropped_dir: Location | None, key: str) -> None:
    """Remove output left by a different config (or an older layout) and half-written temporaries.

    A folder is kept only when every marker in it carries this key; then its unmarked files are ranges a killed run
    was writing, which the resumed run overwrites with the same bytes. (Only local folders can hold temporaries.)
    """
    markers = [out_dir / STAGE_MARKER, *storage.glob(out_dir / SHARD_MARKERS, "part-*.json")]
    keys = {m["key"] for m in map(read_json, markers) if m}
    dirs = [d for d in (out_dir, dropped_dir) if d is not None]
    if keys != {key}:
        for d in dirs:
            storage.delete_tree(d)
        return
    for d in dirs:
        for tmp in storage.glob(d, ".*.tmp", recursive=True):
            storage.delete(tmp)


def shard_counts(markers: list[dict]) -> Counter:
    """Summed reason counts of shard markers (None = kept), the same shape `reason_counts` returns."""
    total: Counter = Counter()
    for m in markers:
        total[None] += m["kept"]
        total.update(m["dropped"])
    return total


def _add_shard(batch: pa.Table, shards: int) -> pa.Table:
    return batch.append_column(SHARD_COLUMN, pa.array(shard_of(batch["doc_id"], shards), type=pa.int64()))


def _only_shards(batch: pa.Table, shards: int, todo: list[int]) -> pa.Table:
    return batch.filter(pa.array(np.isin(shard_of(batch["doc_id"], shards), todo)))


def _commit_shard(group: pa.Table, stage: str, key: str, shards: int, out_dir: str,
                  dropped_dir: str | None) -> pa.Table:
    shard = group[SHARD_COLUMN][0].as_py()
    rows = group.drop_columns([SHARD_COLUMN]).sort_by("doc_id")
    kept, name = kept_rows(rows), part_name(shard)
    if kept.num_rows:
        write_atomic(kept, location(out_dir) / name)
    dropped = dropped_rows(rows, stage)
    if dropped_dir is not None and dropped.num_rows:
        write_atomic(dropped, location(dropped_dir) / name)
    _mark_shard(location(out_dir), key, shard, shards, kept.num_rows, Counter(dropped[REASON].to_pylist()))
    return pa.table({"shard": [shard]})


def _mark_shard(out_dir: Location, key: str, shard: int, shards: int, kept: int, dropped: Counter) -> None:
    marker = {"key": key, "shard": shard, "shards": shards, "kept": kept, "dropped": dict(sorted(dropped.items()))}
    write_json(out_dir / SHARD_MARKERS / f"part-{shard:05d}.json", marker)


def only_unfinished(ds: ray.data.Dataset, shards: int, finished: dict[int, dict]) -> ray.data.Dataset:
    """The rows of `ds` in ranges that still need committing (all of them when none is finished)."""
    if not finished:
        return ds
    todo = [i for i in range(shards) if i not in finished]
    return ds.map_batches(_only_shards, fn_kwargs={"shards": shards, "todo": todo}, batch_format="pyarrow")


def commit_shards(marked: ray.data.Dataset | None, stage: str, key: str, shards: int, finished: dict[int, dict],
                  out_dir: Location, dropped_dir: Location | None,
                  progress: Callable[[int], None] | None = None) -> None:
    """Commit every unfinished range: `marked` (rows of those ranges only, or None for none) grouped by range, each
    group written and marked as in the module doc; ranges without rows get a marker too, so `finished` can be whole.
    `progress` is called with the number of ranges written so far as each one lands."""
    written: set[int] = set()
    if marked is not None and marked.count():
        groups = (
            marked.map_batches(_add_shard, fn_kwargs={"shards": shards}, batch_format="pyarrow")
            .groupby(SHARD_COLUMN, num_partitions=min(shards, 64))
            .map_groups(_commit_shard, batch_format="pyarrow",
                        fn_kwargs={"stage": stage, "key": key, "shards": shards, "out_dir": str(out_dir),
                                   "dropped_dir": None if dropped_dir is None else str(dropped_dir)})
        )
        for row in groups.iter_rows():
            written.add(row["shard"])
            if progress is not None:
                progress(len(written))
    for shard in sorted(set(range(shards)) - written - set(finished)):
        _mark_shard(out_dir, key, shard, shards, 0, Counter())


def commit_stage(out_dir: Location, key: str, upstream: str, shards: int, stats: dict) -> None:
    write_json(out_dir / STAGE_MARKER, {"key": key, "upstream": upstream, "shards": shards, "stats": stats})
