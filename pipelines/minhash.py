"""Near-duplicate detection: MinHash signatures over word n-gram shingles, LSH banding, connected components.

Signatures are computed for a whole batch in one compiled pass and are bit-identical to datasketch's default
`MinHash(num_perm, seed)` (scheme "affine32") fed the same shingles: sha1_hash32 of each shingle's UTF-8 bytes
(SHA-1 compiled with numba over byte ranges of the text, so no per-shingle string or hashlib call),
premixed with the 32-bit MurmurHash3 finalizer, then `a * h + b mod 2**32` with datasketch's own permutations.
Candidate pairs come from a Ray Data groupby on (band, bucket), each pair once. An optional exact-Jaccard check
brings both shingle sets to each pair through two more groupbys and drops pairs below `jaccard_threshold`.
Components are found by large-star/small-star (Kiveris et al. 2014) as groupbys over the edge dataset, so no process
holds every edge; `duplicate_roots` (union-find on one process) is kept as the reference the tests compare against.
The smallest doc_id of each component survives; the others are `near_duplicate`, with `near_dup_of` naming the
survivor. The documents meet their survivors in a groupby "join" on a hash of doc_id (documents and (doc_id, dup_of)
rows in one dataset, one group per partition), so a task holds its partition's share of the map, never all of it.
Documents shorter than one shingle have no signature and are never candidates. The cluster report (size
distribution, candidate pairs, pairs removed by the Jaccard check) goes to stats/near_dedup_clusters.json.

Inputs of at most `single_task_max_docs` documents skip the groupbys, whose fixed cost dominates small inputs: one
task computes the same signatures and band keys, groups buckets by sorting, runs the same Jaccard arithmetic and the
same large-star/small-star rounds in memory (`near_duplicates_in_process`), and a map marks the documents from its
roots. Same survivors, columns, drop reasons and report as the groupbys.
"""

from __future__ import annotations

from collections import Counter

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash
from ray.data.expressions import col

from athanor.config import DedupConfig
from athanor.layout import RunLayout
from athanor.pipelines.dedup import normalize_texts
from athanor.pipelines.stats import mark, write_json

CLUSTER_REPORT = "near_dedup_clusters"  # stats/near_dedup_clusters.json
MAX_HASH = np.uint32(0xFFFFFFFF)
INITIAL_STATE = np.array([0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0], dtype=np.uint32)  # SHA-1's
LANES = 64  # messages hashed side by side in _sha1_one_block
EDGE_SCHEMA = pa.schema([("doc_id", pa.string()), ("dup_of", pa.string())])  # dup_of < doc_id
STAR_SCHEMA = EDGE_SCHEMA.append(pa.field("unstable", pa.bool_())).append(pa.field("component_size", pa.int64()))
SCORED_EDGE_SCHEMA = EDGE_SCHEMA.append(pa.field("jaccard", pa.float64()))
JOIN_SCHEMA = pa.schema([("key", pa.string()), ("partner", pa.string()), ("shingles", pa.list_(pa.uint32()))])


def word_shingles(normalized_text: str, ngram: int) -> list[str]:
    """Distinct word n-grams in first-seen order: the reference definition that shingle_spans matches."""
    words = normalized_text.split()
    return list(dict.fromkeys(" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)))


def shingle_spans(normalized_texts: pa.Array | pa.ChunkedArray, ngram: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every document's word n-grams as byte ranges of the texts' Arrow buffer: (buffer, starts, ends, doc_offsets).

    Normalized text has single spaces between words, so the n-gram " ".join(words[i:i+n]) is the slice from the
    start of word i to the end of word i+n-1: no shingle string is built and no Python runs per text. Repeats stay
    (the minimum ignores them). A null text has no shingles.
    """
    texts = normalized_texts.cast(pa.large_string())
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    texts = pc.fill_null(texts, "") if texts.null_count else texts
    _, offsets, data = texts.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    buf = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, dtype=np.uint8)
    return (buf, *_ngram_spans(buf, bounds, ngram))


@numba.njit(cache=True, nogil=True)
def _ngram_spans(buf, bounds, ngram):
    longest = max(np.max(np.diff(bounds)), 0) if len(bounds) > 1 else 0
    word_ends = np.empty(longest + 1, np.int64)  # one text's words, reused: stays in cache
    cap = max(bounds[-1] - bounds[0], 1)  # no text has more words than bytes
    starts, ends = np.empty(cap, np.int64), np.empty(cap, np.int64)
    doc_offsets = np.zeros(len(bounds), np.int64)
    k = 0
    for d in range(len(bounds) - 1):
        lo, hi, n = bounds[d], bounds[d + 1], 0
        for pos in range(lo, hi):  # branchless: every byte writes a candidate end, only a space keeps it
            word_ends[n] = pos
            n += buf[pos] == 32
        word_ends[n] = hi
        n_words = n + 1 if hi > lo else 0
        for i in range(n_words - ngram + 1):  # word i starts one byte after word i-1 ends
            starts[k], ends[k] = (lo if i == 0 else word_ends[i - 1] + 1), word_ends[i + ngram - 1]
            k += 1
        doc_offsets[d + 1] = k
    return starts[:k], ends[:k], doc_offsets


@numba.njit(cache=True, nogil=True)
def _rotl(x, n):
    return ((x << np.uint64(n)) | (x >> np.uint64(32 - n))) & np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, nogil=True)
def _padded_word(buf, start, length, total, pos):
    """Big-endian word at message position pos, past the text: 0x80, zero padding, then the bit length."""
    word = np.uint64(0)
    for k in range(4):
        p = pos + k
        if p < length:
            byte = np.uint64(buf[start + p])
        elif p == length:
            byte = np.uint64(0x80)
        elif p >= total - 8:
            byte = (np.uint64(length) * np.uint64(8) >> np.uint64(8 * (total - 1 - p))) & np.uint64(255)
        else:
            byte = np.uint64(0)
        word = (word << np.uint64(8)) | byte
    return word


@numba.njit(cache=True, nogil=True)
def _sha1_any_length(buf, starts, ends, idx, out):
    """Messages of any length, one at a time (the rare shingle longer than 55 bytes)."""
    mask = np.uint64(0xFFFFFFFF)
    w = np.empty(80, dtype=np.uint64)
    for i in idx:
        start, length = starts[i], ends[i] - starts[i]
        total = ((length + 8) // 64 + 1) * 64  # message + 0x80 + zero pad + 64-bit bit length
        h0, h1, h2 = np.uint64(INITIAL_STATE[0]), np.uint64(INITIAL_STATE[1]), np.uint64(INITIAL_STATE[2])
        h3, h4 = np.uint64(INITIAL_STATE[3]), np.uint64(INITIAL_STATE[4])
        for block in range(0, total, 64):
            for t in range(16):
                pos = block + 4 * t
                if pos + 4 <= length:  # a whole word of message bytes: the common case
                    q = start + pos
                    w[t] = ((np.uint64(buf[q]) << np.uint64(24)) | (np.uint64(buf[q + 1]) << np.uint64(16))
                            | (np.uint64(buf[q + 2]) << np.uint64(8)) | np.uint64(buf[q + 3]))
                else:
                    w[t] = _padded_word(buf, start, length, total, pos)
            for t in range(16, 80):
                w[t] = _rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1)
            a, b, c, d, e = h0, h1, h2, h3, h4
            for t in range(20):
                tmp = (_rotl(a, 5) + ((b & c) | (~b & mask & d)) + e + np.uint64(0x5A827999) + w[t]) & mask
                a, b, c, d, e = tmp, a, _rotl(b, 30), c, d
            for t in range(20, 40):
                tmp = (_rotl(a, 5) + (b ^ c ^ d) + e + np.uint64(0x6ED9EBA1) + w[t]) & mask
                a, b, c, d, e = tmp, a, _rotl(b, 30), c, d
            for t in range(40, 60):
                tmp = (_rotl(a, 5) + ((b & c) | (b & d) | (c & d)) + e + np.uint64(0x8F1BBCDC) + w[t]) & mask
                a, b, c, d, e = tmp, a, _rotl(b, 30), c, d
            for t in range(60, 80):
                tmp = (_rotl(a, 5) + (b ^ c ^ d) + e + np.uint64(0xCA62C1D6) + w[t]) & mask
                a, b, c, d, e = tmp, a, _rotl(b, 30), c, d
            h0, h1 = (h0 + a) & mask, (h1 + b) & mask
            h2, h3, h4 = (h2 + c) & mask, (h3 + d) & mask, (h4 + e) & mask
        out[i] = np.uint32((h0 >> np.uint64(24)) | ((h0 >> np.uint64(8)) & np.uint64(0xFF00))
                           | ((h0 << np.uint64(8)) & np.uint64(0xFF0000)) | ((h0 << np.uint64(24)) & mask))


@numba.njit(cache=True, nogil=True, inline="always")
def _rotl32(x, n):
    return np.uint32((x << np.uint32(n)) | (x >> np.uint32(32 - n)))


@numba.njit(cache=True, nogil=True, inline="always")
def _sha1_f(t, b, c, d):
    """SHA-1's round function for round t: choose, parity, majority, parity."""
    if t < 20:
        return (b & c) | (~b & d)
    if 40 <= t < 60:
        return (b & c) | (b & d) | (c & d)
    return b ^ c ^ d


@numba.njit(cache=True, nogil=True)
def _sha1_one_block(buf, starts, ends, idx, out):
    """Messages of at most 55 bytes (one padded block), LANES at a time. The rounds go five at a time with each
    lane's state in registers, in a loop over lanes that LLVM turns into SIMD instructions."""
    w = np.zeros((80, LANES), dtype=np.uint32)
    state = np.empty((5, LANES), np.uint32)
    k = np.array([0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xCA62C1D6], dtype=np.uint32)
    for base in range(0, len(idx), LANES):
        m = min(LANES, len(idx) - base)
        w[:16, :] = 0
        for j in range(m):
            start, length = starts[idx[base + j]], ends[idx[base + j]] - starts[idx[base + j]]
            for t in range(length >> 2):  # whole big-endian words, then the last bytes one by one
                q = start + 4 * t
                w[t, j] = ((np.uint32(buf[q]) << np.uint32(24)) | (np.uint32(buf[q + 1]) << np.uint32(16))
                           | (np.uint32(buf[q + 2]) << np.uint32(8)) | np.uint32(buf[q + 3]))
            for p in range(length & ~3, length):
                w[p >> 2, j] |= np.uint32(buf[start + p]) << np.uint32(24 - 8 * (p & 3))
            w[length >> 2, j] |= np.uint32(0x80) << np.uint32(24 - 8 * (length & 3))
            w[15, j] = np.uint32(8 * length)
        for t in range(16, 80):
            for j in range(LANES):
                w[t, j] = _rotl32(w[t - 3, j] ^ w[t - 8, j] ^ w[t - 14, j] ^ w[t - 16, j], 1)
        for i in range(5):
            state[i, :] = INITIAL_STATE[i]
        for t in range(0, 80, 5):
            kt = k[t // 20]
            for j in range(LANES):
                a, b, c, d, e = state[0, j], state[1, j], state[2, j], state[3, j], state[4, j]
                for r in range(t, t + 5):  # the five share t's round function: no group crosses a multiple of 20
                    new_a = np.uint32(_rotl32(a, 5) + _sha1_f(t, b, c, d) + e + kt + w[r, j])
                    a, b, c, d, e = new_a, a, _rotl32(b, 30), c, d
                state[0, j], state[1, j], state[2, j], state[3, j], state[4, j] = a, b, c, d, e
        for j in range(m):
            h0 = np.uint32(state[0, j] + INITIAL_STATE[0])
            out[idx[base + j]] = ((h0 >> np.uint32(24)) | ((h0 >> np.uint32(8)) & np.uint32(0xFF00))
                                  | ((h0 << np.uint32(8)) & np.uint32(0xFF0000)) | (h0 << np.uint32(24)))


def sha1_hash32(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """datasketch.hashfunc.sha1_hash32 of each buf[start:end]: the first 4 SHA-1 digest bytes read little-endian.

    SHA-1 (FIPS 180-4) compiled by numba for the whole batch instead of one hashlib call per shingle; word 5-grams
    almost always fit one block, and those are hashed LANES messages at a time in SIMD registers.
    """
    out = np.empty(len(starts), dtype=np.uint32)
    one_block = ends - starts <= 55
    _sha1_one_block(buf, starts, ends, np.flatnonzero(one_block), out)
    _sha1_any_length(buf, starts, ends, np.flatnonzero(~one_block), out)
    return out


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (wrapping uint32 arithmetic), datasketch's premix for affine32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@numba.njit(cache=True, nogil=True)
def _min_affine(mixed: np.ndarray, doc_offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sig[d, p] = min over document d's hashes h of (a[p] * h + b[p]) mod 2**32, fused: no shingles x perms matrix."""
    mask = np.uint64(0xFFFFFFFF)
    sig = np.full((len(doc_offsets) - 1, len(a)), MAX_HASH, dtype=np.uint32)
    for d in range(len(doc_offsets) - 1):
        row = sig[d]
        for i in range(doc_offsets[d], doc_offsets[d + 1]):
            h = np.uint64(mixed[i])
            for p in range(len(a)):
                v = np.uint32((np.uint64(a[p]) * h + np.uint64(b[p])) & mask)  # mod 2**32, as datasketch's uint32
                if v < row[p]:
                    row[p] = v
    return sig


class MinHasher:
    """Many documents' signatures in one compiled pass, with datasketch's permutations for (num_perm, seed)."""

    def __init__(self, num_perm: int, seed: int):
        from datasketch import MinHash  # here: importing it (scipy) costs a worker ~1 s, and only this needs it

        a, b = MinHash(num_perm=num_perm, seed=seed).permutations  # the library's permutations, not a copy
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.num_perm = num_perm

    def signatures(self, hashes: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
        """(docs, num_perm) uint32 from shingle hashes grouped by doc_offsets; no shingles: all-max "empty"."""
        return _min_affine(fmix32(hashes), doc_offsets, self.a, self.b)

    def text_signatures(self, normalized_texts: pa.Array | pa.ChunkedArray, ngram: int) -> np.ndarray:
        buf, starts, ends, doc_offsets = shingle_spans(normalized_texts, ngram)
        return self.signatures(sha1_hash32(buf, starts, ends), doc_offsets)


def band_buckets(sig: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """(docs, bands) uint64 bucket keys: a polynomial hash of each band's rows (vectorized over docs and bands)."""
    bands = sig[:, : num_bands * rows_per_band].reshape(len(sig), num_bands, rows_per_band).astype(np.uint64)
    key = np.full(bands.shape[:2], 0xCBF29CE484222325, dtype=np.uint64)
    for r in range(rows_per_band):
        key = (key ^ bands[:, :, r]) * np.uint64(0x100000001B3)
    return key


def lsh_band_rows(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Ray Data UDF: documents -> one (doc_id, band, bucket) row per band; documents without shingles give none."""
    buf, starts, ends, doc_offsets = shingle_spans(normalize_texts(batch["text"]), cfg.ngram)
    has_shingles = np.diff(doc_offsets) > 0
    sig = MinHasher(cfg.num_perm, cfg.seed).signatures(sha1_hash32(buf, starts, ends), doc_offsets)
    keys = band_buckets(sig[has_shingles], cfg.num_bands, cfg.rows_per_band)
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
    buf, starts, ends, doc_offsets = shingle_spans(normalize_texts(batch["text"]), cfg.ngram)
    hashes = sha1_hash32(buf, starts, ends)
    sets = [np.unique(hashes[lo:hi]) for lo, hi in zip(doc_offsets[:-1], doc_offsets[1:])]
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
    node; when no row is flagged the graph is a forest of stars around each component's smallest doc_id, and
    `component_size` (root and leaves) is the size of the root's component.
    """
    u = group["doc_id"][0].as_py()
    neighbours = set(group["dup_of"].to_pylist())
    m = min(neighbours | {u})
    stable = m == u or len(neighbours) == 1
    out = sorted({(v, m) for v in neighbours if v > u} | (set() if stable else {(u, m)}))
    return pa.table({"doc_id": [a for a, _ in out], "dup_of": [b for _, b in out],
                     "unstable": [not stable] * len(out), "component_size": [len(neighbours) + 1] * len(out)},
                    schema=STAR_SCHEMA)


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
def _block_star_counts(block: pa.Table) -> tuple[int, Counter]:
    if not block.num_rows:
        return 0, Counter()
    sizes = pc.value_counts(block["component_size"]).to_pylist()
    return int(pc.sum(block["unstable"]).as_py() or 0), Counter({c["values"]: c["counts"] for c in sizes})


def star_counts(stars: ray.data.MaterializedDataset) -> tuple[int, dict[int, int]]:
    """(unstable rows, {component size: components}), one small task per block: only counts reach the driver.

    The size histogram is meaningful once nothing is unstable: a root's component of size s has s - 1 leaf rows.
    """
    unstable, rows = 0, Counter()
    for block_unstable, block_rows in ray.get([_block_star_counts.remote(ref) for ref in stars.to_arrow_refs()]):
        unstable += block_unstable
        rows.update(block_rows)
    return unstable, {size: n // (size - 1) for size, n in sorted(rows.items())}


def connected_components(edges: ray.data.Dataset, cfg: DedupConfig
                         ) -> tuple[ray.data.MaterializedDataset, int, dict[int, int]]:
    """Edges (doc_id, dup_of) -> (doc_id, dup_of=smallest doc_id of its component) for every non-smallest node.

    Alternates large-star (on both directions of each edge) and small-star (on edges pointing to the smaller node),
    each a groupby on doc_id, until large-star finds every node stable; O(log n) rounds, no process holding every
    edge. Returns the mapping, the number of rounds and {component size: components}.
    """
    for round_ in range(1, cfg.max_component_rounds + 1):
        stars = (
            edges.map_batches(both_directions, batch_format="pyarrow")
            .groupby("doc_id", num_partitions=cfg.shuffle_partitions)
            .map_groups(large_star, batch_format="pyarrow")
            .materialize()
        )
        unstable, sizes = star_counts(stars)
        if unstable == 0:
            return stars, round_, sizes
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


# --- One task: the same survivors and report for inputs of at most DedupConfig.single_task_max_docs ---


def _lsh_edges(ranks: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """bucket_edges + distinct_partners on doc ranks (rank order = doc_id order): (pairs, 2) int64 rows
    (doc, smallest doc of a shared band bucket), each pair once, sorted."""
    n = int(ranks.max()) + 1 if len(ranks) else 0
    codes = []
    for band in range(keys.shape[1]):
        order = np.lexsort((ranks, keys[:, band]))
        k, r = keys[order, band], ranks[order]
        fresh = np.ones(len(k), dtype=bool)
        fresh[1:] = (k[1:] != k[:-1]) | (r[1:] != r[:-1])  # the same doc twice in a bucket is one member
        k, r = k[fresh], r[fresh]
        first = np.ones(len(k), dtype=bool)
        first[1:] = k[1:] != k[:-1]
        smallest = r[np.flatnonzero(first)[np.cumsum(first) - 1]]  # each row's bucket's smallest rank
        codes.append(r[~first] * n + smallest[~first])
    codes = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    return np.stack([codes // max(n, 1), codes % max(n, 1)], axis=1)


def star_components(pairs: list[tuple[int, int]], max_rounds: int) -> tuple[dict[int, int], int, dict[int, int]]:
    """large_star / small_star as `connected_components` runs them, on one process: the same mapping {node: smallest
    node of its component}, the same number of rounds and the same {component size: components}."""
    edges = set(pairs)
    for round_ in range(1, max_rounds + 1):
        neighbours: dict[int, set[int]] = {}
        for a, b in edges:
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
        stars, unstable = set(), False
        for u, adjacent in neighbours.items():
            m = min(min(adjacent), u)
            stars.update((v, m) for v in adjacent if v > u)
            if m != u and len(adjacent) > 1:
                stars.add((u, m))
                unstable = True
        if not unstable:  # a forest of stars: every edge is a leaf and its root
            roots = dict(stars)
            return roots, round_, dict(sorted(Counter(len(neighbours[m]) + 1 for m in set(roots.values())).items()))
        smaller: dict[int, set[int]] = {}
        for a, b in stars:
            smaller.setdefault(a, set()).add(b)
        edges = {(v, min(adjacent)) for u, adjacent in smaller.items() for v in adjacent | {u} if v != min(adjacent)}
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")


def near_duplicates_in_process(blocks: list[pa.Table], cfg: DedupConfig, hasher: MinHasher | None = None
                               ) -> tuple[pa.Table, dict]:
    """Everything `mark_near_duplicates_stage` computes with groupbys, on one process: the (doc_id, dup_of) roots of
    every near-duplicate (sorted by doc_id) and the cluster report, equal to the distributed path's.

    Signatures, band keys, bucket stars, the exact Jaccard and the component rounds are the same functions or the
    same arithmetic on the same values; only the grouping is numpy sorting instead of shuffles. `hasher` (built for
    cfg's num_perm and seed when None) lets the driver hand the task its permutations.
    """
    hasher = hasher or MinHasher(cfg.num_perm, cfg.seed)
    doc_ids, keys, shingle_sets = [], [], []
    for block in blocks:
        if not block.num_rows:
            continue
        buf, starts, ends, doc_offsets = shingle_spans(normalize_texts(block["text"]), cfg.ngram)
        hashes = sha1_hash32(buf, starts, ends)
        has_shingles = np.diff(doc_offsets) > 0
        sig = hasher.signatures(hashes, doc_offsets)
        keys.append(band_buckets(sig[has_shingles], cfg.num_bands, cfg.rows_per_band))
        doc_ids += [d for d, has in zip(block["doc_id"].to_pylist(), has_shingles) if has]
        if cfg.jaccard_threshold is not None:
            shingle_sets += [np.unique(hashes[lo:hi]) for lo, hi, has in
                             zip(doc_offsets[:-1], doc_offsets[1:], has_shingles) if has]
    names, ranks = np.unique(np.array(doc_ids, dtype=object), return_inverse=True)  # rank order = doc_id order
    ranks = ranks.astype(np.int64)
    pairs = _lsh_edges(ranks, np.concatenate(keys) if keys else np.zeros((0, cfg.num_bands), np.uint64))
    report = {"documents": sum(b.num_rows for b in blocks), "candidate_pairs": len(pairs),
              "jaccard_threshold": cfg.jaccard_threshold, "pairs_removed_by_jaccard": 0}
    if cfg.jaccard_threshold is not None and len(pairs):
        sets = dict(zip(ranks.tolist(), shingle_sets))
        scores = [len(np.intersect1d(sets[b], sets[a], assume_unique=True)) / len(np.union1d(sets[b], sets[a]))
                  for a, b in pairs.tolist()]  # pair_jaccard's arithmetic, from the smaller doc's side
        pairs = pairs[np.array(scores) >= cfg.jaccard_threshold]
        report["pairs_removed_by_jaccard"] = report["candidate_pairs"] - len(pairs)
    roots, rounds, sizes = (star_components(map(tuple, pairs.tolist()), cfg.max_component_rounds) if len(pairs)
                            else ({}, 0, {}))
    report.update({"component_rounds": rounds, "duplicates": len(roots), "clusters": sum(sizes.values()),
                   "cluster_sizes": {str(k): v for k, v in sizes.items()}})
    ordered = sorted(roots.items())
    table = pa.table({"doc_id": [names[a] for a, _ in ordered], "dup_of": [names[b] for _, b in ordered]},
                     schema=EDGE_SCHEMA)
    return table, report


@ray.remote(num_cpus=1, num_returns=2)
def _near_duplicates_task(cfg: DedupConfig, hasher: MinHasher, *blocks: pa.Table) -> tuple[pa.Table, dict]:
    return near_duplicates_in_process(list(blocks), cfg, hasher)


def mark_near_duplicates(batch: pa.Table, roots: list[ray.ObjectRef]) -> pa.Table:
    """Ray Data UDF: look each doc_id up in the (doc_id, dup_of) roots. Only the single-task path uses it: its roots
    are at most `single_task_max_docs` rows; above that, `join_near_duplicates` brings each task only its share."""
    mapping = pa.concat_tables(ray.get(roots)) if roots else EDGE_SCHEMA.empty_table()
    at = pc.index_in(batch["doc_id"], value_set=mapping["doc_id"])
    dup_of = pc.take(mapping["dup_of"], at) if mapping.num_rows else pa.nulls(batch.num_rows, pa.string())
    out = batch.append_column("near_dup_of", dup_of.cast(pa.string()))
    return mark(out, [None if r is None else "near_duplicate" for r in out["near_dup_of"].to_pylist()])


# --- Marking without a broadcast: documents and roots meet in doc_id hash partitions (a groupby "join") ---

JOIN_PART, JOIN_IS_ROOT = "_near_dup_partition", "_near_dup_is_root"  # temporary columns of the join


def doc_id_partition(doc_ids: pa.Array | pa.ChunkedArray, partitions: int) -> pa.Array:
    """A doc_id's join partition: the same on every worker and run (xxh3, not Python's salted hash)."""
    return pa.array([xxhash.xxh3_64_intdigest(d.encode()) % partitions for d in doc_ids.to_pylist()], pa.int64())


def keyed_documents(batch: pa.Table, partitions: int) -> pa.Table:
    """Documents as join rows: their own columns, `near_dup_of` (null until joined), partition, not a root."""
    out = batch.append_column("near_dup_of", pa.nulls(batch.num_rows, pa.string()))
    out = out.append_column(JOIN_PART, doc_id_partition(batch["doc_id"], partitions))
    return out.append_column(JOIN_IS_ROOT, pa.array(np.zeros(batch.num_rows, dtype=bool)))


def keyed_roots(roots: pa.Table, schema: pa.Schema, partitions: int) -> pa.Table:
    """(doc_id, dup_of) roots in the shape of keyed_documents' rows (`schema`): the documents' columns null but
    doc_id, `near_dup_of` = dup_of, flagged as roots."""
    n = roots.num_rows
    columns = {JOIN_PART: doc_id_partition(roots["doc_id"], partitions),
               JOIN_IS_ROOT: pa.array(np.ones(n, dtype=bool)), "near_dup_of": roots["dup_of"]}
    arrays = [roots["doc_id"].cast(f.type) if f.name == "doc_id" else columns.get(f.name, pa.nulls(n, f.type))
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def join_partition(group: pa.Table, columns: list[str]) -> pa.Table:
    """One partition's documents and roots: each document gets its survivor (or null) and its mark. `columns` are the
    documents' own columns, in order; the output is what `mark_near_duplicates` gives for the same documents."""
    is_root = group[JOIN_IS_ROOT]
    docs, roots = group.filter(pc.invert(is_root)), group.filter(is_root)
    at = pc.index_in(docs["doc_id"], value_set=roots["doc_id"])
    out = docs.select(columns).append_column("near_dup_of", pc.take(roots["near_dup_of"], at).cast(pa.string()))
    return mark(out, [None if r is None else "near_duplicate" for r in out["near_dup_of"].to_pylist()])


def join_near_duplicates(ds: ray.data.Dataset, roots: ray.data.Dataset, cfg: DedupConfig,
                         join_fn=join_partition) -> ray.data.Dataset:
    """Documents left-joined with their (doc_id, dup_of) roots on doc_id, as one groupby over both, hash-partitioned
    into `shuffle_partitions` parts: a task holds one part's documents and roots, never the whole mapping."""
    parts = cfg.shuffle_partitions
    schema = ds.schema(fetch_if_missing=True).base_schema
    columns = schema.names
    keyed = ds.map_batches(keyed_documents, fn_kwargs={"partitions": parts}, batch_format="pyarrow")
    joined_schema = (schema.append(pa.field("near_dup_of", pa.string())).append(pa.field(JOIN_PART, pa.int64()))
                     .append(pa.field(JOIN_IS_ROOT, pa.bool_())))
    root_rows = roots.select_columns(["doc_id", "dup_of"]).map_batches(
        keyed_roots, fn_kwargs={"schema": joined_schema, "partitions": parts}, batch_format="pyarrow")
    return (
        keyed.union(root_rows)
        .groupby(JOIN_PART, num_partitions=parts)
        .map_groups(join_fn, fn_kwargs={"columns": columns}, batch_format="pyarrow")
    )


# --- The stage ---


def _no_near_duplicates(batch: pa.Table) -> pa.Table:
    return mark_near_duplicates(batch, [])


def mark_near_duplicates_stage(ds: ray.data.Dataset, cfg: DedupConfig, layout: RunLayout | None = None
                               ) -> ray.data.Dataset:
    """Mark near-duplicates; the cluster report (sizes, candidate pairs, Jaccard removals) goes to the run's stats.

    Up to `cfg.single_task_max_docs` documents, one task finds the roots (near_duplicates_in_process) and a map marks
    the documents from them; above, the groupbys find them and a groupby join marks the documents. Same output.
    """
    ds = ds.materialize()
    documents = ds.count()
    if cfg.single_task_max_docs and documents <= cfg.single_task_max_docs:  # 0: always the groupbys
        hasher = MinHasher(cfg.num_perm, cfg.seed)  # on the driver, which has datasketch loaded already
        roots_ref, report_ref = _near_duplicates_task.remote(cfg, hasher, *ds.to_arrow_refs())
        report = ray.get(report_ref)
        if layout is not None:
            write_json(layout.stats(CLUSTER_REPORT), report)
        refs = [roots_ref] if report["duplicates"] else []
        return ds.map_batches(mark_near_duplicates, fn_kwargs={"roots": refs}, batch_format="pyarrow")
    pairs = candidate_pairs(ds, cfg).materialize()
    report = {"documents": documents, "candidate_pairs": pairs.count(), "jaccard_threshold": cfg.jaccard_threshold,
              "pairs_removed_by_jaccard": 0}
    if cfg.jaccard_threshold is not None and report["candidate_pairs"]:
        scored = jaccard_scored_pairs(pairs, ds, cfg)
        pairs = scored.filter(expr=col("jaccard") >= cfg.jaccard_threshold).select_columns(["doc_id", "dup_of"])
        pairs = pairs.materialize()
        report["pairs_removed_by_jaccard"] = report["candidate_pairs"] - pairs.count()
    roots, rounds, sizes = connected_components(pairs, cfg) if pairs.count() else (pairs, 0, {})
    report.update({"component_rounds": rounds, "duplicates": roots.count(), "clusters": sum(sizes.values()),
                   "cluster_sizes": {str(k): v for k, v in sizes.items()}})
    if layout is not None:
        write_json(layout.stats(CLUSTER_REPORT), report)
    if not report["duplicates"]:
        return ds.map_batches(_no_near_duplicates, batch_format="pyarrow")
    return join_near_duplicates(ds, roots, cfg)
