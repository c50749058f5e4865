"""The drop_reason contract and per-stage counts.

A stage marks, it does not silently drop: it sets `drop_reason` (None when kept) on every row it sees. Counting the
reasons of a stage's marked output gives `{"stage", "in", "kept", "dropped": {reason: n}}` with
`in == kept + sum(dropped)` by construction, which is what makes every document accountable.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import ray

from athanor import storage
from athanor.storage import Location

REASON = "drop_reason"


def mark(table: pa.Table, reasons: list[str | None]) -> pa.Table:
    """Add the drop_reason column to a stage's output (a stage's input never has one: see kept_rows)."""
    return table.append_column(REASON, pa.array(reasons, type=pa.string()))


def kept_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table[REASON])).drop_columns([REASON])


def dropped_rows(table: pa.Table, stage: str) -> pa.Table:
    dropped = table.filter(pc.is_valid(table[REASON]))
    return dropped.append_column("stage", pa.array([stage] * dropped.num_rows, type=pa.string()))


@ray.remote(num_cpus=0.1)
def _block_reason_counts(block: pa.Table) -> dict[str | None, int]:
    counts = pc.value_counts(block[REASON]).to_pylist() if block.num_rows else []
    return {c["values"]: c["counts"] for c in counts}


def reason_counts(marked: ray.data.MaterializedDataset) -> Counter:
    """Counts per drop_reason (None = kept), one small Ray task per block: nothing but the counts reach the driver."""
    total: Counter = Counter()
    for part in ray.get([_block_reason_counts.remote(ref) for ref in marked.to_arrow_refs()]):
        total.update(part)
    return total


def stage_stats(stage: str, counts: Counter) -> dict:
    dropped = {reason: n for reason, n in sorted(counts.items(), key=lambda kv: str(kv[0])) if reason is not None}
    stats = {"stage": stage, "in": sum(counts.values()), "kept": counts.get(None, 0), "dropped": dropped}
    assert stats["in"] == stats["kept"] + sum(dropped.values())
    return stats


def write_text(path: Location, text: str) -> None:
    """Whole or absent (see storage.write_bytes): a reader (or a resumed run) sees the whole file or none."""
    storage.write_text(path, text)


def write_json(path: Location, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
