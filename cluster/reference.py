"""DPO's reference log-probs, computed once: a Ray Data batch-inference stage over the preference pairs.

Every row of the preference shards (chosen and rejected answers, one example per window) goes through the
`WindowScorer` actor pool with its answer mask, so a row's number is the reference model's log-prob of that answer
given its prompt: the same scoring path as `athanor eval`. The results are committed beside the shards, in parts of
`PART_ROWS` rows (`<dpo root>/reference/<split>/part-NNNNN.parquet`, each written whole, then a marker naming the
reference model and the shards' fingerprint): a stage killed halfway redoes only its missing parts, and a changed
base or data set recomputes everything. Training then reads them instead of running a second model.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from athanor import storage
from athanor.storage import Location

from .inference import WindowScorer, describe, map_with_model

log = logging.getLogger("athanor")
PART_ROWS = 2048  # an even number: a part holds whole pairs


def reference_dir(root: Location, split: str) -> Location:
    return root / "reference" / split


def _marker(root: Location, split: str) -> Location:
    return reference_dir(root, split) / "_COMMITTED.json"


def _rows(batch: dict[str, np.ndarray], root: str, split: str) -> dict[str, list]:
    """Shard rows -> windows trimmed of their padding, with the answer mask over their targets."""
    from athanor.pipelines.shards import TokenShards

    shards = TokenShards(root, split, verify=False)
    tokens, masks = [], []
    for r in batch["id"]:
        window, mask = shards.example(int(r))
        tokens.append(window.astype(np.int32))
        masks.append(mask.astype(np.int8))
    return {"row": batch["id"], "tokens": tokens, "target_mask": masks,
            "n_scored": np.array([len(t) - 1 for t in tokens])}


def compute_reference_logps(root: Location, base: str, *, actors: int = 1, cpus: int = 1, batch_size: int = 8,
                            use_gpu: bool | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, ([pairs, 2] summed answer log-probs under `base`, [pairs, 2] answer token counts), chosen first;
    only the parts not yet committed for this base and these shards are computed."""
    import ray

    from athanor.pipelines.shards import read_manifest

    manifest = read_manifest(root)
    out = {}
    for split in ("train", "val"):
        n = manifest["splits"][split]["sequences"]
        # the checkpoint a run folder resolves to now: a newer checkpoint of the base is another reference
        identity = {"base": str(describe(base).directory), "fingerprint": manifest["splits"][split]["fingerprint"], "rows": n,
                    "part_rows": PART_ROWS}
        marker = storage.read_json(_marker(root, split))
        if marker is not None and marker.get("identity") != identity:  # another base or data set: start over
            storage.delete_tree(reference_dir(root, split))
            marker = None
        parts = range(0, n, PART_ROWS)
        done = set((marker or {}).get("parts", []))
        todo = [p for p in parts if p not in done]
        if todo:
            log.info("reference log-probs: %d of %d %s parts to compute", len(todo), len(parts), split)
            ids = np.concatenate([np.arange(p, min(p + PART_ROWS, n)) for p in todo])
            ds = ray.data.from_arrow(pa.table({"id": ids})).map_batches(_rows, fn_kwargs={"root": str(root), "split": split},
                                                      batch_format="numpy")
            scored = map_with_model(ds, WindowScorer, base, actors=actors, batch_rows=batch_size * 4, cpus=cpus,
                                    use_gpu=use_gpu, batch_size=batch_size, as_training=True)
            results = scored.select_columns(["row", "logprob", "n_counted"]).to_pandas().sort_values("row")
            for p in todo:
                part = results[(results["row"] >= p) & (results["row"] < p + PART_ROWS)]
                buf = io.BytesIO()
                pq.write_table(pa.Table.from_pandas(part, preserve_index=False), buf)
                storage.write_bytes(reference_dir(root, split) / f"part-{p // PART_ROWS:05d}.parquet",
                                    buf.getvalue())
                done.add(p)
                storage.write_text(_marker(root, split), json.dumps({"identity": identity, "parts": sorted(done)}))
        elif marker is None:  # nothing to score (an empty split): committed as such
            storage.write_text(_marker(root, split), json.dumps({"identity": identity, "parts": []}))
        out[split] = load_reference_logps(root, split)
    return out


def load_reference_logps(root: Location, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """([pairs, 2] log-probs, [pairs, 2] answer token counts) of a split when its reference is committed."""
    from athanor.pipelines.shards import read_manifest

    marker = storage.read_json(_marker(root, split))
    n = read_manifest(root)["splits"][split]["sequences"]
    if marker is None or len(marker["parts"]) != len(range(0, n, PART_ROWS)):
        return None
    logps, counts = np.zeros(n), np.zeros(n)
    for f in sorted(storage.glob(reference_dir(root, split), "part-*.parquet")):
        part = pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pandas()
        logps[part["row"].to_numpy()] = part["logprob"].to_numpy()
        counts[part["row"].to_numpy()] = part["n_counted"].to_numpy()
    return logps.reshape(-1, 2), counts.reshape(-1, 2)

