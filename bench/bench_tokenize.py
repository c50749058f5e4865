"""Tokenizer throughput: SentencePiece through the pack stage's Ray Data actor pool vs bare SentencePiece.

Bare runs encode texts already in memory, in one process, with 1 thread and with every core. The Ray runs are the
real pack path: read the curated Parquet, encode in an actor pool of N actors (one CPU each, the tokenizer loaded
once per actor), and stream the token lists back to the driver; they include the Parquet read and actor start-up.

    python bench/bench_tokenize.py --curated runs/demo/curated/final --tokenizer runs/demo/tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from athanor.pipelines.pack import EncodeDocuments, encode_pool_size
from athanor.pipelines.tokenizer import Tokenizer


def replicate(curated: Path, out: Path, repeat: int, files: int) -> list[str]:
    """The curated texts repeated `repeat` times (for a measurable run), written as `files` Parquet files."""
    table = pq.read_table(curated, columns=["doc_id", "text"])
    texts = table.column("text").to_pylist() * repeat
    doc_ids = [f"{doc_id}-{r}" for r in range(repeat) for doc_id in table.column("doc_id").to_pylist()]
    for k in range(files):
        pq.write_table(pa.table({"doc_id": doc_ids[k::files], "text": texts[k::files]}), out / f"part-{k:03d}.parquet")
    return texts


def bare(model: Path, texts: list[str], threads: int) -> tuple[int, float]:
    tok = Tokenizer(model, num_threads=threads)
    t0 = time.perf_counter()
    tokens = sum(len(ids) for ids in tok.encode(texts))
    return tokens, time.perf_counter() - t0


def through_ray(model: Path, folder: Path, actors: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(str(folder)).map_batches(
        EncodeDocuments,
        fn_constructor_kwargs={"model_path": str(model), "seed": 0, "val_fraction": 0.0},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_format="pyarrow",
        batch_size=256,
    )
    tokens = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tokens += pc.sum(pc.list_value_length(batch.column("tokens"))).as_py() or 0
    return tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curated", type=Path, default=Path("runs/demo/curated/final"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer/tokenizer.model"))
    parser.add_argument("--repeat", type=int, default=8, help="replicate the corpus this many times")
    parser.add_argument("--actors", type=int, nargs="+", help="pool sizes (default 1, 2, 4, ... up to cores - 1)")
    args = parser.parse_args()
    for path in (args.curated, args.tokenizer):
        if not path.exists():
            raise SystemExit(f"{path} not found: run `athanor run configs/demo.yaml` or pass --curated/--tokenizer")

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    most = encode_pool_size(os.cpu_count())
    actors = sorted({min(n, most) for n in args.actors}) if args.actors else [2**k for k in range(most.bit_length())]
    with tempfile.TemporaryDirectory() as tmp:
        texts = replicate(args.curated, Path(tmp), args.repeat, files=max(actors) * 4)
        rows = [("bare SentencePiece, 1 thread", *bare(args.tokenizer, texts, 1))]
        rows.append((f"bare SentencePiece, {os.cpu_count()} threads", *bare(args.tokenizer, texts, -1)))
        for n in actors:
            rows.append((f"Ray Data actor pool, {n} actor(s)", *through_ray(args.tokenizer, Path(tmp), n)))
    ray.shutdown()

    baseline = rows[0][1] / rows[0][2]
    print(f"\n{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, {os.cpu_count()} cores\n")
    print(f"{'method':<40} {'tokens':>12} {'seconds':>9} {'tokens/s':>12} {'vs bare 1 thread':>17}")
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"{name:<40} {tokens:>12,} {seconds:>9.2f} {rate:>12,.0f} {rate / baseline:>16.2f}x")


if __name__ == "__main__":
    main()
