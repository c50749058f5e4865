"""MinHash signatures/s on one core: athanor's MinHasher (batched, compiled) against datasketch, same real pages.

The documents are the 258 extracted news pages (data/html/news), normalized as curation does (an Arrow string
array). datasketch gets each page's shingles prebuilt as UTF-8 bytes and runs
`MinHash(num_perm=112).update_batch(shingles)` per document (the usual per-document use, permutations drawn in the
constructor); a second baseline row reuses one permutation set (`MinHash(num_perm, permutations=...)`) to show what
is left without the constructor. MinHasher starts from the
normalized Arrow array (finding its shingle spans is inside the timing). Every signature is asserted identical.

    python bench/bench_minhash.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasketch import MinHash

from athanor.config import DedupConfig, ExtractConfig
from athanor.pipelines.dedup import normalize_texts
from athanor.pipelines.extract import html_to_text
from athanor.pipelines.minhash import MinHasher, word_shingles


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=Path("data/html/news"))
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs per method")
    parser.add_argument("--copies", type=int, default=4, help="the corpus repeated this many times per run")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for every method: a per-core figure
    cfg = DedupConfig()

    texts = [html_to_text(p.read_bytes(), ExtractConfig())[0] for p in sorted(args.pages.glob("*.html"))]
    normalized_array = normalize_texts(pa.array([t for t in texts if t] * args.copies))
    normalized = normalized_array.to_pylist()
    shingles = [[s.encode("utf-8") for s in word_shingles(t, cfg.ngram)] for t in normalized]
    docs, total = len(normalized), sum(map(len, shingles))
    print(f"{docs} documents ({len(normalized) // args.copies} pages x {args.copies}), {total:,} shingles, "
          f"num_perm={cfg.num_perm}, 1 core\n")

    hasher = MinHasher(cfg.num_perm, cfg.seed)
    hasher.text_signatures(normalized_array[:2], cfg.ngram)  # numba compiles (or loads its cache) outside the timing
    shared = MinHash(num_perm=cfg.num_perm, seed=cfg.seed).permutations

    def datasketch_fresh():
        out = []
        for s in shingles:
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
            m.update_batch(s)
            out.append(m.hashvalues)
        return np.array(out)

    def datasketch_shared():
        out = []
        for s in shingles:
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=shared, scheme="affine32")
            m.update_batch(s)
            out.append(m.hashvalues)
        return np.array(out)

    def athanor_batched():
        return hasher.text_signatures(normalized_array, cfg.ngram)

    rows = []
    for name, fn in [("datasketch MinHash(112).update_batch, per doc", datasketch_fresh),
                     ("datasketch, shared permutations, per doc", datasketch_shared),
                     ("athanor MinHasher.text_signatures, batched", athanor_batched)]:
        seconds, sig = best_of(args.repeat, fn)
        rows.append((name, seconds, sig))
    reference = rows[0][2]
    for name, _, sig in rows[1:]:
        np.testing.assert_array_equal(sig, reference, err_msg=f"{name}: signatures differ from datasketch")

    ours = rows[-1][1]
    print(f"{'method':<48} {'seconds':>8} {'signatures/s':>13} {'shingles/s':>12} {'athanor x':>10}")
    for name, seconds, _ in rows:
        print(f"{name:<48} {seconds:>8.3f} {docs / seconds:>13,.0f} {total / seconds:>12,.0f} {seconds / ours:>10.1f}")
    print(f"\nall {docs} signatures identical to datasketch's")


if __name__ == "__main__":
    main()
