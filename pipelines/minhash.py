"""Near-duplicate detection: MinHash signatures over word n-gram shingles, LSH banding, connected components.

Signatures are computed for a whole batch at once in numpy and are bit-identical to datasketch's default
`MinHash(num_perm, seed)` (scheme "affine32") fed the same shingles: sha1_hash32 of each shingle's UTF-8 bytes,
premixed with the 32-bit MurmurHash3 finalizer, then `a * h + b mod 2**32` with datasketch's own permutations.
Candidate pairs come from a Ray Data groupby on (band, bucket), each pair once. An optional exact-Jaccard check
brings both shingle sets to each pair through two more groupbys and drops pairs below `jaccard_threshold`.
Components are found by large-star/small-star (Kiveris et al. 2014) as groupbys over the edge dataset, so no process
holds every edge; `duplicate_roots` (union-find on one process) is kept as the reference the tests compare against.
The smallest doc_id of each component survives; the others are `near_duplicate`, with `near_dup_of` naming the
survivor. Documents shorter than one shingle have no signature and are never candidates. The cluster report (size
distribution, candidate pairs, pairs removed by the Jaccard check) goes to stats/near_dedup_clusters.json.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col
from datasketch import MinHash

from athanor.config import DedupConfig
from athanor.layout import RunLayout
from athanor.pipelines.dedup import normalize_texts
from athanor.pipelines.stats import mark, write_json

CLUSTER_REPORT = "near_dedup_clusters"  # stats/near_dedup_clusters.json
MAX_HASH = np.uint32(0xFFFFFFFF)
SHINGLES_PER_CHUNK = 1 << 16  # bounds the (shingles x num_perm) matrix to ~30 MB at 112 permutations
EDGE_SCHEMA = pa.schema([("doc_id", pa.string()), ("dup_of", pa.string())])  # dup_of < doc_id
STAR_SCHEMA = EDGE_SCHEMA.append(pa.field("unstable", pa.bool_()))
SCORED_EDGE_SCHEMA = EDGE_SCHEMA.append(pa.field("jaccard", pa.float64()))
JOIN_SCHEMA = pa.schema([("key", pa.string()), ("partner", pa.string()), ("shingles", pa.list_(pa.uint32()))])


def word_shingles(normalized_text: str, ngram: int) -> list[str]:
    """Distinct word n-grams in first-seen order (a set for MinHash: repeats change nothing)."""
    words = normalized_text.split()
    return list(dict.fromkeys(" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)))


def sha1_hash32(shingles: list[str]) -> np.ndarray:
    """datasketch.hashfunc.sha1_hash32 over many shingles: the first 4 bytes of SHA-1, little-endian."""
    digests = b"".join(hashlib.sha1(s.encode("utf-8")).digest()[:4] for s in shingles)
    return np.frombuffer(digests, dtype="<u4").astype(np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (wrapping uint32 arithmetic), datasketch's premix for affine32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Many documents' signatures in one numpy pass, with datasketch's permutations for (num_perm, seed)."""

    def __init__(self, num_perm: int, seed: int):
        a, b = MinHash(num_perm=num_perm, seed=seed).permutations  # the library's permutations, not a copy
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.num_perm = num_perm

    def signatures(self, hashes: list[np.ndarray]) -> np.ndarray:
        """(docs, num_perm) uint32; a document without shingles keeps the all-max "empty" signature."""
        sig = np.full((len(hashes), self.num_perm), MAX_HASH, dtype=np.uint32)
        docs = [i for i, h in enumerate(hashes) if len(h)]
        start = 0
        while start < len(docs):
            end, total = start, 0
            while end < len(docs) and (end == start or total + len(hashes[docs[end]]) <= SHINGLES_PER_CHUNK):
                total += len(hashes[docs[end]])
                end += 1
            chunk = docs[start:end]
            mixed = fmix32(np.concatenate([hashes[i] for i in chunk]))
            permuted = mixed[:, None] * self.a[None, :] + self.b[None, :]
            offsets = np.cumsum([0] + [len(hashes[i]) for i in chunk[:-1]])
            sig[chunk] = np.minimum.reduceat(permuted, offsets, axis=0)
            start = end
        return sig


def band_buckets(sig: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """(docs, bands) uint64 bucket keys: a polynomial hash of each band's rows (vectorized over docs and bands)."""
    bands = sig[:, : num_bands * rows_per_band].reshape(len(sig), num_bands, rows_per_band).astype(np.uint64)
    key = np.full(bands.shape[:2], 0xCBF29CE484222325, dtype=np.uint64)
    for r in range(rows_per_band):
        key = (key ^ bands[:, :, r]) * np.uint64(0x100000001B3)
    return key


def lsh_band_rows(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Ray Data UDF: documents -> one (doc_id, band, bucket) row per band; documents without shingles give none."""
    normalized = normalize_texts(batch["text"]).to_pylist()
    hashes = [sha1_hash32(word_shingles(t, cfg.ngram)) for t in normalized]
    has_shingles = np.array([len(h) > 0 for h in hashes], dtype=bool)
    sig = MinHasher(cfg.num_perm, cfg.seed).signatures([h for h in hashes if len(h)])  # permutations: microseconds
    keys = band_buckets(sig, cfg.num_bands, cfg.rows_per_band)
    doc_ids = np.array(batch["doc_id"].to_pylist(), dtype=object)[has_shingles]
    return pa.table(
        {
            "doc_id": pa.array(np.repeat(doc_ids, cfg.num_bands), type=pa.string()),
            "band": pa.array(np.tile(np.arange(cfg.num_bands, dtype=np.int32), len(doc_ids))),
            "bucket": pa.array(keys.reshape(-1)),
        }
    )


def _edges(pairs: list[tuple[str, str]] | set[tuple[str, str]]) -> pa.Table:
    pairs = sorted(pairs)
    return pa.table({"doc_id": [p[0] for p in pairs], "dup_of": [p[1] for p in pairs]}, schema=EDGE_SCHEMA)


def bucket_edges(group: pa.Table) -> pa.Table:
    """One LSH bucket: every member is a candidate duplicate of the bucket's smallest doc_id (a star, enough for CC)."""
    members = sorted(set(group["doc_id"].to_pylist()))
    return _edges({(m, members[0]) for m in members[1:]})


def distinct_partners(group: pa.Table) -> pa.Table:
    """All candidate edges of one doc_id: the same pair found in several bands counts once."""
    return _edges(set(zip(group["doc_id"].to_pylist(), group["dup_of"].to_pylist())))


def candidate_pairs(ds: ray.data.Dataset, cfg: DedupConfig) -> ray.data.Dataset:
    """(doc_id, dup_of) with dup_of < doc_id, each pair once: LSH band buckets through two Ray Data groupbys."""
    return (
        ds.map_batches(lsh_band_rows, fn_kwargs={"cfg": cfg}, batch_format="pyarrow")
        .groupby(["band", "bucket"], num_partitions=cfg.shuffle_partitions)
        .map_groups(bucket_edges, batch_format="pyarrow")
        .groupby("doc_id", num_partitions=cfg.shuffle_partitions)
        .map_groups(distinct_partners, batch_format="pyarrow")
    )


# --- Exact Jaccard of candidate pairs, computed where the shingles are (two groupby "joins", no driver collect) ---


def shingle_set_rows(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Ray Data UDF: documents -> (key=doc_id, partner=None, shingles=sorted distinct shingle hashes)."""
    normalized = normalize_texts(batch["text"]).to_pylist()
    sets = [np.unique(sha1_hash32(word_shingles(t, cfg.ngram))) for t in normalized]
    return pa.table({"key": batch["doc_id"], "partner": pa.nulls(batch.num_rows, pa.string()),
                     "shingles": pa.array(sets, type=pa.list_(pa.uint32()))}, schema=JOIN_SCHEMA)


def pair_rows(edges: pa.Table) -> pa.Table:
    """Candidate edges keyed by their larger doc_id, in the shape of shingle_set_rows (shingles None)."""
    return pa.table({"key": edges["doc_id"], "partner": edges["dup_of"],
                     "shingles": pa.nulls(edges.num_rows, pa.list_(pa.uint32()))}, schema=JOIN_SCHEMA)


def _split(group: pa.Table) -> tuple[np.ndarray | None, list[tuple[str, np.ndarray | None]]]:
    own, pairs = None, []
    for partner, shingles in zip(group["partner"].to_pylist(), group["shingles"].to_numpy(zero_copy_only=False)):
        if partner is None:
            own = shingles
        else:
            pairs.append((partner, shingles))
    return own, pairs


def carry_shingles_to_partner(group: pa.Table) -> pa.Table:
    """Join step 1, one doc_id: its pairs leave re-keyed by the partner, carrying this document's shingles."""
    own, pairs = _split(group)
    key = group["key"][0].as_py()
    return pa.table({"key": [p for p, _ in pairs], "partner": [key] * len(pairs),
                     "shingles": pa.array([own] * len(pairs), type=pa.list_(pa.uint32()))}, schema=JOIN_SCHEMA)


def pair_jaccard(group: pa.Table) -> pa.Table:
    """Join step 2, one doc_id (the smaller of each pair): the exact Jaccard with every partner that reached it."""
    own, pairs = _split(group)
    key = group["key"][0].as_py()
    scores = [len(np.intersect1d(own, theirs, assume_unique=True)) / len(np.union1d(own, theirs))
              for _, theirs in pairs]
    return pa.table({"doc_id": [p for p, _ in pairs], "dup_of": [key] * len(pairs),
                     "jaccard": pa.array(scores, type=pa.float64())}, schema=SCORED_EDGE_SCHEMA)


def jaccard_scored_pairs(pairs: ray.data.Dataset, ds: ray.data.Dataset, cfg: DedupConfig) -> ray.data.Dataset:
    """(doc_id, dup_of, jaccard) for every candidate pair: shingle sets travel to the pairs through groupbys."""
    shingle_sets = ds.map_batches(shingle_set_rows, fn_kwargs={"cfg": cfg}, batch_format="pyarrow").materialize()
    step1 = (
        shingle_sets.union(pairs.map_batches(pair_rows, batch_format="pyarrow"))
        .groupby("key", num_partitions=cfg.shuffle_partitions)
        .map_groups(carry_shingles_to_partner, batch_format="pyarrow")
    )
    return (
        shingle_sets.union(step1)
        .groupby("key", num_partitions=cfg.shuffle_partitions)
        .map_groups(pair_jaccard, batch_format="pyarrow")
    )


# --- Connected components: large-star / small-star (Kiveris et al. 2014) on Ray Data ---


def large_star(group: pa.Table) -> pa.Table:
    """One node u with all its neighbours: link every larger neighbour (and u) to the smallest node in sight.

    `unstable` flags a node that is neither a root (all neighbours larger) nor a leaf hanging off a single smaller
    node; when no row is flagged the graph is a forest of stars around each component's smallest doc_id.
    """
    u = group["doc_id"][0].as_py()
    neighbours = set(group["dup_of"].to_pylist())
    m = min(neighbours | {u})
    stable = m == u or len(neighbours) == 1
    out = sorted({(v, m) for v in neighbours if v > u} | (set() if stable else {(u, m)}))
    return pa.table({"doc_id": [a for a, _ in out], "dup_of": [b for _, b in out],
                     "unstable": [not stable] * len(out)}, schema=STAR_SCHEMA)


def small_star(group: pa.Table) -> pa.Table:
    """One node u with its smaller neighbours: link u and all of them to the smallest."""
    u = group["doc_id"][0].as_py()
    neighbours = set(group["dup_of"].to_pylist())
    m = min(neighbours)
    return _edges({(v, m) for v in neighbours | {u} if v != m})


def both_directions(edges: pa.Table) -> pa.Table:
    reverse = pa.table({"doc_id": edges["dup_of"], "dup_of": edges["doc_id"]}, schema=EDGE_SCHEMA)
    return pa.concat_tables([edges.select(["doc_id", "dup_of"]), reverse])


@ray.remote(num_cpus=0.1)
def _block_true_count(block: pa.Table, column: str) -> int:
    return int(pc.sum(block[column]).as_py() or 0) if block.num_rows else 0


def true_count(ds: ray.data.MaterializedDataset, column: str) -> int:
    """Rows with `column` true, one small task per block: only the counts reach the driver."""
    return sum(ray.get([_block_true_count.remote(ref, column) for ref in ds.to_arrow_refs()]))


def connected_components(edges: ray.data.Dataset, cfg: DedupConfig) -> tuple[ray.data.MaterializedDataset, int]:
    """Edges (doc_id, dup_of) -> (doc_id, dup_of=smallest doc_id of its component) for every non-smallest node.

    Alternates large-star (on both directions of each edge) and small-star (on edges pointing to the smaller node),
    each a groupby on doc_id, until large-star finds every node stable; O(log n) rounds, no process holding every
    edge. Returns the mapping and the number of rounds.
    """
    for round_ in range(1, cfg.max_component_rounds + 1):
        stars = (
            edges.map_batches(both_directions, batch_format="pyarrow")
            .groupby("doc_id", num_partitions=cfg.shuffle_partitions)
            .map_groups(large_star, batch_format="pyarrow")
            .materialize()
        )
        if true_count(stars, "unstable") == 0:
            return stars.select_columns(["doc_id", "dup_of"]).materialize(), round_
        edges = (
            stars.groupby("doc_id", num_partitions=cfg.shuffle_partitions)
            .map_groups(small_star, batch_format="pyarrow")
            .materialize()
        )
    raise RuntimeError(f"connected components did not converge in {cfg.max_component_rounds} rounds")


def duplicate_roots(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find reference (one process, every edge): {doc_id: smallest doc_id of its component} for non-survivors.

    Tests check the distributed `connected_components` against it.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smaller id is always the root, hence the survivor
    return {x: find(x) for x in list(parent) if find(x) != x}


# --- The stage ---


def mark_near_duplicates(batch: pa.Table, roots: list[ray.ObjectRef]) -> pa.Table:
    """Ray Data UDF: look each doc_id up in the (doc_id, survivor) blocks (a broadcast join on duplicates only)."""
    mapping = pa.concat_tables(ray.get(roots)) if roots else EDGE_SCHEMA.empty_table()
    at = pc.index_in(batch["doc_id"], value_set=mapping["doc_id"])
    dup_of = pc.take(mapping["dup_of"], at) if mapping.num_rows else pa.nulls(batch.num_rows, pa.string())
    out = batch.append_column("near_dup_of", dup_of.cast(pa.string()))
    return mark(out, [None if r is None else "near_duplicate" for r in out["near_dup_of"].to_pylist()])


def cluster_sizes(roots: ray.data.MaterializedDataset, cfg: DedupConfig) -> dict[int, int]:
    """{component size: number of components} for components of two or more documents (a groupby per level)."""
    if roots.count() == 0:
        return {}
    sizes = (
        roots.groupby("dup_of", num_partitions=cfg.shuffle_partitions).count()
        .map_batches(_component_size, batch_format="pyarrow")
        .groupby("size", num_partitions=cfg.shuffle_partitions).count()
        .take_all()
    )
    return {int(s["size"]): int(s["count()"]) for s in sorted(sizes, key=lambda s: s["size"])}


def _component_size(per_survivor: pa.Table) -> pa.Table:
    return pa.table({"size": pc.add(per_survivor["count()"], 1)})


def mark_near_duplicates_stage(ds: ray.data.Dataset, cfg: DedupConfig, layout: RunLayout | None = None
                               ) -> ray.data.Dataset:
    """Mark near-duplicates; the cluster report (sizes, candidate pairs, Jaccard removals) goes to the run's stats."""
    ds = ds.materialize()
    pairs = candidate_pairs(ds, cfg).materialize()
    report = {"documents": ds.count(), "candidate_pairs": pairs.count(), "jaccard_threshold": cfg.jaccard_threshold,
              "pairs_removed_by_jaccard": 0}
    if cfg.jaccard_threshold is not None and report["candidate_pairs"]:
        scored = jaccard_scored_pairs(pairs, ds, cfg).materialize()
        pairs = scored.filter(expr=col("jaccard") >= cfg.jaccard_threshold).select_columns(["doc_id", "dup_of"])
        pairs = pairs.materialize()
        report["pairs_removed_by_jaccard"] = report["candidate_pairs"] - pairs.count()
    roots, rounds = connected_components(pairs, cfg) if pairs.count() else (pairs, 0)
    sizes = cluster_sizes(roots, cfg)
    report.update({"component_rounds": rounds, "duplicates": roots.count(), "clusters": sum(sizes.values()),
                   "cluster_sizes": {str(k): v for k, v in sizes.items()}})
    if layout is not None:
        write_json(layout.stats(CLUSTER_REPORT), report)
    refs = roots.to_arrow_refs() if report["duplicates"] else []
    return ds.map_batches(mark_near_duplicates, fn_kwargs={"roots": refs}, batch_format="pyarrow")
