"""Tokenizer throughput: the pack stage's Ray Data encoding vs bare SentencePiece, side by side, per CPU.

Bare runs encode texts already in memory, in one process, with 1 thread and with one thread per core. The Ray runs
are the real pack path (`encode_in_order`): read the curated Parquet, encode in Ray Data tasks (one CPU each, the
tokenizer loaded once per worker process) and stream the tokens to the driver in doc_id order. They include the
Parquet read and worker start-up (a fixed cost of a second or more, reported separately as the time to the first
batch, which the default corpus size keeps small beside the encoding). The corpus is the curated text repeated `--repeat` times,
written as curation writes it (sorted, each file one doc_id range); `--unordered` adds a row with the same documents
round-robin over the files, which sends them through the global sort instead.

Each comparison is 1 CPU against 1 CPU (bare 1 thread vs 1 encoding task at a time) and all cores against all cores
(bare one thread per core vs one task per core); on the Ray side the driver (which only collects the batches) and
Ray's own processes share the machine with the tasks. The machine may be busy, so every trial runs all methods
back to back, and the table reports medians over trials, with each ratio paired with its trial's bare run.

    python bench/bench_tokenize.py --curated runs/demo/curated/final --tokenizer runs/demo/tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from athanor.pipelines.pack import encode_in_order
from athanor.pipelines.tokenizer import Tokenizer


def replicate(curated: Path, out: Path, repeat: int, files: int, ordered: bool) -> list[str]:
    """The curated texts repeated `repeat` times, as `files` Parquet files; returns the texts in doc_id order.

    `ordered` writes consecutive doc_id ranges (as curation does), otherwise documents go round-robin over files.
    """
    table = pq.read_table(curated, columns=["doc_id", "text"])
    rows = sorted(
        (f"{doc_id}-{r:03d}", text)
        for r in range(repeat)
        for doc_id, text in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist())
    )
    out.mkdir(parents=True)
    for k in range(files):
        part = rows[k * len(rows) // files : (k + 1) * len(rows) // files] if ordered else rows[k::files]
        pq.write_table(pa.table({"doc_id": [d for d, _ in part], "text": [t for _, t in part]}),
                       out / f"part-{k:05d}.parquet")
    return [text for _, text in rows]


def bare(model: Path, texts: list[str], threads: int) -> tuple[int, float, float]:
    tok = Tokenizer(model, num_threads=threads)
    t0 = time.perf_counter()
    tokens = sum(len(ids) for ids in tok.encode(texts))
    return tokens, time.perf_counter() - t0, 0.0


def through_ray(model: Path, folder: Path, actors: int) -> tuple[int, float, float]:
    """Tokens, seconds, and seconds to the first batch (order check, actor start-up, the first row group)."""
    t0 = time.perf_counter()
    ds = encode_in_order(sorted(folder.glob("*.parquet")), model, seed=0, val_fraction=0.0, actors=actors)
    tokens, first = 0, None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        first = first or time.perf_counter() - t0
        tokens += pc.sum(pc.list_value_length(batch.column("tokens"))).as_py() or 0
    return tokens, time.perf_counter() - t0, first or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curated", type=Path, default=Path("runs/demo/curated/final"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer/tokenizer.model"))
    parser.add_argument("--repeat", type=int, default=48, help="replicate the corpus this many times")
    parser.add_argument("--files", type=int, default=8, help="Parquet files to spread the corpus over")
    parser.add_argument("--trials", type=int, default=3, help="run every method this many times; report medians")
    parser.add_argument("--unordered", action="store_true", help="also time files that need the global sort")
    args = parser.parse_args()
    for path in (args.curated, args.tokenizer):
        if not path.exists():
            raise SystemExit(f"{path} not found: run `athanor run configs/demo.yaml` or pass --curated/--tokenizer")

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        ordered, unordered = Path(tmp, "ordered"), Path(tmp, "unordered")
        texts = replicate(args.curated, ordered, args.repeat, args.files, ordered=True)
        methods = [  # (name, CPUs it may use, run)
            ("bare SentencePiece, 1 thread", 1, lambda: bare(args.tokenizer, texts, 1)),
            ("Ray tasks, 1 CPU", 1, lambda: through_ray(args.tokenizer, ordered, 1)),
        ]
        if args.unordered:
            replicate(args.curated, unordered, args.repeat, args.files, ordered=False)
            methods.append(("Ray tasks, 1 CPU, unordered files", 1, lambda: through_ray(args.tokenizer, unordered, 1)))
        if cores > 1:
            methods += [
                (f"bare SentencePiece, {cores} threads", cores, lambda: bare(args.tokenizer, texts, cores)),
                (f"Ray tasks, {cores} CPUs", cores, lambda: through_ray(args.tokenizer, ordered, cores)),
            ]
        runs: dict[str, list[tuple[int, float, float]]] = {name: [] for name, _, _ in methods}
        for _ in range(args.trials):
            for name, _, run in methods:
                runs[name].append(run())
    ray.shutdown()

    print(f"\n{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, {cores} cores, "
          f"median of {args.trials} trials (ratios are paired with the bare run of the same trial)\n")
    print(f"{'method':<36} {'CPUs':>4} {'tokens':>11} {'seconds':>8} {'1st batch s':>11} {'tokens/s/CPU':>13} "
          f"{'vs bare, same CPUs':>19}")
    baseline = {}  # CPUs -> the bare method's runs
    for name, cpus, _ in methods:
        tokens = runs[name][0][0]
        assert all(t == tokens for t, _, _ in runs[name]), f"{name}: token counts differ between trials"
        base = baseline.setdefault(cpus, runs[name])
        ratio = statistics.median(b / s for (_, s, _), (_, b, _) in zip(runs[name], base))
        seconds = statistics.median(s for _, s, _ in runs[name])
        first = statistics.median(f for _, _, f in runs[name])
        print(f"{name:<36} {cpus:>4} {tokens:>11,} {seconds:>8.2f} {first:>11.2f} {tokens / seconds / cpus:>13,.0f} "
              f"{ratio:>18.2f}x")

if __name__ == "__main__":
    main()
