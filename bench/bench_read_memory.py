"""Peak memory of read + extract at 1x and 10x input: streaming means it should barely move.

The input is the real sample data (258 news pages, the iana crawl, the 300 Lee articles as JSONL); 10x is the same
files copied ten times under different names. Each scale runs in a fresh subprocess with its own embedded Ray, which
streams read -> extract and counts the rows (nothing is collected); a sampler thread reads, every 100 ms, the RSS of
the driver and of every Ray worker process (`ray::...`, descendants of the driver, which started Ray) and keeps the
peaks: of the driver, of the workers' sum and of the largest single worker.

    python bench/bench_read_memory.py [--scales 1 10] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE_SECONDS = 0.1
MB = 2**20


def build_input(root: Path, copies: int) -> dict:
    """`copies` copies of the real pages, crawl and articles; returns the DataConfig fields that name them."""
    pages = root / "html"
    pages.mkdir(parents=True)
    articles = (DATA / "quality" / "high" / "lee_background.txt").read_text().strip("\n").split("\n")
    for i in range(copies):
        for page in sorted((DATA / "html" / "news").glob("*.html")):
            shutil.copyfile(page, pages / f"{i:02d}-{page.name}")
        shutil.copyfile(DATA / "warc" / "iana.warc.gz", root / f"iana-{i:02d}.warc.gz")
        (root / f"lee-{i:02d}.jsonl").write_text("".join(json.dumps({"id": f"{i}-{n}", "text": t}) + "\n"
                                                         for n, t in enumerate(articles)))
    return {"html_dirs": [str(pages)], "warc_files": [str(root / "*.warc.gz")],
            "jsonl_files": [str(root / "*.jsonl")]}


class PeakRss:
    """Samples the driver's RSS and its descendant Ray workers' RSS in a thread; keeps the peaks."""

    def __init__(self):
        self.driver = self.workers = self.largest_worker = 0
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.driver = max(self.driver, self._me.memory_info().rss)
        sizes = []
        for proc in self._me.children(recursive=True):
            try:
                if proc.name().startswith("ray::") or "default_worker.py" in " ".join(proc.cmdline()):
                    sizes.append(proc.memory_info().rss)
            except psutil.Error:  # a worker that exited between listing and reading
                continue
        self.workers = max(self.workers, sum(sizes))
        self.largest_worker = max([self.largest_worker, *sizes])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(fields: dict, cpus: int) -> dict:
    """In a fresh process: stream read -> extract over the input, counting rows; peak RSS figures."""
    import ray

    from athanor.config import DataConfig, ExtractConfig
    from athanor.pipelines.extract import extract_batch
    from athanor.pipelines.read import read_crawl
    from athanor.pipelines.stats import kept_rows

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    records = texts = 0
    with PeakRss() as peak:
        read = read_crawl(DataConfig(**fields))
        ds = read.map_batches(kept_rows, batch_format="pyarrow").map_batches(
            extract_batch, fn_kwargs={"cfg": ExtractConfig()}, batch_format="pyarrow")
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            records += batch.num_rows
            texts += batch.column("drop_reason").null_count
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"records_extracted": records, "texts": texts, "seconds": round(seconds, 1), "driver_mb": peak.driver / MB,
            "workers_mb": peak.workers / MB, "largest_worker_mb": peak.largest_worker / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON DataConfig fields: run one scale here
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child), args.cpus)))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        for scale in args.scales:
            fields = build_input(Path(tmp) / f"x{scale}", scale)
            size = sum(f.stat().st_size for f in (Path(tmp) / f"x{scale}").rglob("*") if f.is_file())
            out = subprocess.run([sys.executable, __file__, "--cpus", str(args.cpus), "--child", json.dumps(fields)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
            results[scale] = {"input_mb": size / MB, **json.loads(out.stdout.strip().splitlines()[-1])}

    print(f"\nread -> extract, streamed, {args.cpus} CPUs; peak RSS sampled every {SAMPLE_SECONDS * 1000:.0f} ms\n")
    print(f"{'scale':>6} {'input MB':>9} {'extracted':>10} {'texts':>7} {'seconds':>8} {'driver MB':>10} "
          f"{'workers MB':>11} {'largest worker MB':>18}")
    for scale, r in results.items():
        print(f"{scale:>5}x {r['input_mb']:>9.1f} {r['records_extracted']:>10} {r['texts']:>7} {r['seconds']:>8} "
              f"{r['driver_mb']:>10.0f} {r['workers_mb']:>11.0f} {r['largest_worker_mb']:>18.0f}")
    if len(results) > 1:
        lo, hi = results[min(results)], results[max(results)]
        print(f"{'ratio':>6} {hi['input_mb'] / lo['input_mb']:>9.1f} {'':>10} {'':>7} {'':>8} "
              f"{hi['driver_mb'] / lo['driver_mb']:>10.2f} {hi['workers_mb'] / lo['workers_mb']:>11.2f} "
              f"{hi['largest_worker_mb'] / lo['largest_worker_mb']:>18.2f}")


if __name__ == "__main__":
    main()
