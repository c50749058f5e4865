"""DataTrove's FineWeb-style pipeline over a folder of WARC files: the baseline side of bench/bench_curate.py.

Run inside DataTrove's own venv (bench_curate.py builds it):

    python bench/datatrove_pipeline.py INPUT_DIR WORKDIR TASKS

Steps, with DataTrove's defaults unless named: WarcReader -> Trafilatura(favour_precision, deduplicate, 1 s
timeout) -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter(filter_no_terminal_punct=False) ->
FineWebQualityFilter, then MinHash dedup (5-grams, 14 buckets x 8 hashes, 64-bit hashes: signature, buckets,
cluster, filter). One filter task per WARC file, TASKS at a time. Prints one JSON line: seconds per phase (the
interpreter's start-up excluded) and the documents kept after the filters and after dedup.
"""

from __future__ import annotations

import glob
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader, WarcReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig


def run(steps: list, tasks: int, workers: int, logs: Path) -> None:
    LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=workers, logging_dir=str(logs)).run()


def count(folder: Path) -> int:
    return sum(1 for f in glob.glob(str(folder / "*.jsonl.gz")) for _ in gzip.open(f, "rt"))


def main() -> None:
    inputs, work, cpus = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
    shutil.rmtree(work, ignore_errors=True)
    files = len(list(inputs.glob("*.warc.gz")))
    workers = min(cpus, files)
    minhash = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
    seconds = {}

    start = time.perf_counter()
    run([WarcReader(str(inputs), glob_pattern="*.warc.gz"), Trafilatura(favour_precision=True),
         GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
         FineWebQualityFilter(), JsonlWriter(str(work / "filtered"))], files, workers, work / "logs" / "filter")
    seconds["filter"] = time.perf_counter() - start

    start = time.perf_counter()
    run([JsonlReader(str(work / "filtered")), MinhashDedupSignature(output_folder=str(work / "sigs"), config=minhash)],
        files, workers, work / "logs" / "signatures")
    run([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=minhash)],
        minhash.num_buckets, cpus, work / "logs" / "buckets")
    run([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=minhash)],
        1, 1, work / "logs" / "cluster")
    run([JsonlReader(str(work / "filtered")), MinhashDedupFilter(input_folder=str(work / "remove")),
         JsonlWriter(str(work / "deduped"))], files, workers, work / "logs" / "dedup_filter")
    seconds["dedup"] = time.perf_counter() - start

    print(json.dumps({"seconds": seconds, "kept_after_filters": count(work / "filtered"),
                      "kept_after_dedup": count(work / "deduped")}))


if __name__ == "__main__":
    main()
