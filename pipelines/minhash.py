"""Near-duplicate detection: MinHash signatures over word n-gram shingles, LSH banding, connected components.

Signatures are computed for a whole batch at once in numpy and are bit-identical to datasketch's default
`MinHash(num_perm, seed)` (scheme "affine32") fed the same shingles: sha1_hash32 of each shingle's UTF-8 bytes,
premixed with the 32-bit MurmurHash3 finalizer, then `a * h + b mod 2**32` with datasketch's own permutations.
Candidate pairs come from a Ray Data groupby on (band, bucket); components are resolved by a union-find on the
driver (`duplicate_roots`, kept separate so a distributed algorithm can replace it). The smallest doc_id of each
component survives; the others are `near_duplicate`, with `near_dup_of` naming the survivor. Documents shorter than
one shingle have no signature and are never candidates.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import ray
from datasketch import MinHash

from athanor.config import DedupConfig
from athanor.pipelines.dedup import normalize_texts
from athanor.pipelines.stats import mark

MAX_HASH = np.uint32(0xFFFFFFFF)
SHINGLES_PER_CHUNK = 1 << 16  # bounds the (shingles x num_perm) matrix to ~30 MB at 112 permutations
EDGE_SCHEMA = pa.schema([("doc_id", pa.string()), ("dup_of", pa.string())])


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


def bucket_edges(group: pa.Table) -> pa.Table:
    """One LSH bucket: every member is a candidate duplicate of the bucket's smallest doc_id (a star, enough for CC)."""
    members = sorted(set(group["doc_id"].to_pylist()))
    if len(members) < 2:
        return EDGE_SCHEMA.empty_table()
    return pa.table({"doc_id": members[1:], "dup_of": [members[0]] * (len(members) - 1)}, schema=EDGE_SCHEMA)


def candidate_edges(ds: ray.data.Dataset, cfg: DedupConfig) -> list[tuple[str, str]]:
    edges = (
        ds.map_batches(lsh_band_rows, fn_kwargs={"cfg": cfg}, batch_format="pyarrow")
        .groupby(["band", "bucket"], num_partitions=cfg.shuffle_partitions)
        .map_groups(bucket_edges, batch_format="pyarrow")
        .take_all()
    )
    return [(e["doc_id"], e["dup_of"]) for e in edges]


def duplicate_roots(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find over candidate edges: {doc_id: smallest doc_id of its component} for every non-survivor."""
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


def mark_near_duplicates(batch: pa.Table, roots: dict[str, str]) -> pa.Table:
    dup_of = [roots.get(d) for d in batch["doc_id"].to_pylist()]
    out = batch.append_column("near_dup_of", pa.array(dup_of, type=pa.string()))
    return mark(out, [None if r is None else "near_duplicate" for r in dup_of])


def mark_near_duplicates_stage(ds: ray.data.Dataset, cfg: DedupConfig) -> ray.data.Dataset:
    roots = duplicate_roots(candidate_edges(ds, cfg))
    return ds.map_batches(mark_near_duplicates, fn_kwargs={"roots": roots}, batch_format="pyarrow")
