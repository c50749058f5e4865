"""Curation documents/s against DataTrove's FineWeb-style pipeline: same WARC files, same CPU count, one invocation.

Input: the 258 real news pages (data/html/news) packed as WARC response records, `--copies` times under different
URLs (one .warc.gz per copy, so DataTrove gets one task per file as its readers expect), plus the real 2014 crawl
data/warc/iana.warc.gz. Every copy after the first is a true duplicate of a page that survives the filters. All
runs read the same files; more copies mean more documents of the same kind for both systems, so the ratio shows how
each scales with corpus size (athanor pays a fixed Ray cost per stage, DataTrove's cost is almost all per page).

    athanor   the stages of configs/demo.yaml's curation: read (fastwarc) -> extract -> URL filter -> langid
              (lid.176) -> Gopher -> C4 -> FineWeb -> PII, fused into one Ray Data map and one commit, then exact
              dedup + MinHash near-dedup (5-grams, 14x8) as one stage and commit, then curated/final; the quality
              classifier, toxicity and decontamination are off (DataTrove's pipeline has none). Run with
              `athanor curate` at cluster.num_cpus = 1 and 2, twice each: with athanor's default extractor and with
              trafilatura as DataTrove runs it.
    DataTrove bench/datatrove_pipeline.py in its own venv (bench/.venv-datatrove, built on first use and rebuilt
              when an install was interrupted): WarcReader -> Trafilatura -> Gopher repetition and quality -> C4 ->
              FineWeb -> MinHash signature/buckets/cluster/filter (5-grams, 14x8), tasks = 1 and 2.

Two ratios per CPU count, so unlike work is never the headline: same extractor (athanor with trafilatura against
DataTrove) and default against default. Each row carries its extractor's word F1 on the news reference pages of
bench/bench_extract.py, so a faster extractor that keeps more boilerplate shows it. Throughput is input documents
(WARC response records) over pipeline seconds: athanor's stage seconds from stats/timings.json (Ray start-up
excluded), DataTrove's phase seconds (interpreter start-up excluded); wall-clock seconds of each whole command are
printed beside them.

    python bench/bench_curate.py [--copies 12] [--cpus 1 2]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from baseline_venv import ensure_venv  # bench/, this script's folder
from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType

from athanor.config import ExtractConfig

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-datatrove"
# DataTrove 0.10.1 pins trafilatura<1.12; the second step moves it to the trafilatura athanor pins, so that "same
# extractor" is the same code on both sides (DataTrove's Trafilatura step only calls trafilatura.extract).
DATATROVE_INSTALLS = [["datatrove[processing]==0.10.1", "warcio==1.8.1", "faust-cchardet==3.2.0", "python-magic==0.4.27",
                       "orjson", "lxml_html_clean", "spacy"], ["trafilatura==2.3.1"]]
WORK = ROOT / "data" / "bench" / "curate"


def response_record(url: str, html: bytes) -> bytes:
    record = WarcRecord()
    record.init_headers(record_type=WarcRecordType.response)
    record.headers["WARC-Target-URI"] = url
    record.headers["Content-Type"] = "application/http; msgtype=response"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(html)
    record.set_bytes_content(head + html)
    out = io.BytesIO()
    record.write(out)
    return gzip.compress(out.getvalue(), mtime=0)  # one gzip member per record, as crawlers write them


def build_input(pages: Path, crawl: Path, copies: int, dest: Path) -> int:
    """Pack the pages into `copies` WARC files under distinct URLs, next to the real crawl; returns response count."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    htmls = sorted(pages.glob("*.html"))
    for copy in range(copies):
        records = [response_record(f"https://copy{copy}.example.org/news/{p.stem}", p.read_bytes()) for p in htmls]
        (dest / f"news-copy{copy}.warc.gz").write_bytes(b"".join(records))
    shutil.copy(crawl, dest / crawl.name)
    crawl_responses = sum(1 for r in ArchiveIterator(crawl.open("rb")) if r.record_type == WarcRecordType.response)
    return copies * len(htmls) + crawl_responses


def run_athanor(inputs: Path, cpus: int, work: Path, extractor: str) -> dict:
    curate = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["curate"]
    config = {
        "run": {"name": "bench-curate", "workdir": str(work)},
        "data": {"warc_files": [str(inputs / "*.warc.gz")]},
        "curate": {**curate, "extract": {**curate.get("extract", {}), "extractor": extractor},
                   "quality": {"enabled": False}, "toxicity": {"enabled": False}, "decontam": {"enabled": False},
                   "write_dropped": False},
        "cluster": {"num_cpus": cpus},
    }
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work.parent / f"{work.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    with (work.parent / f"{work.name}.log").open("w") as log:
        subprocess.run([str(Path(sys.executable).parent / "athanor"), "curate", str(path)], cwd=ROOT, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    summary = json.loads((work / "stats" / "curation.json").read_text())
    dropped = summary["dropped"]
    seconds = json.loads((work / "stats" / "timings.json").read_text())  # per stage, final write included
    return {"seconds": sum(seconds.values()), "wall": wall, "in": summary["in"], "kept": summary["kept"],
            "duplicates": dropped.get("exact_duplicate", 0) + dropped.get("near_duplicate", 0),
            "detail": f"exact {dropped.get('exact_duplicate', 0)} + near {dropped.get('near_duplicate', 0)}"}


def run_datatrove(python: Path, inputs: Path, tasks: int, work: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([str(python), str(ROOT / "bench" / "datatrove_pipeline.py"), str(inputs), str(work),
                           str(tasks)], cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": sum(result["seconds"].values()), "wall": wall, "kept": result["kept_after_dedup"],
            "duplicates": result["kept_after_filters"] - result["kept_after_dedup"], "detail": "minhash"}


def news_f1(extractors: list[str]) -> dict[str, float]:
    """Word F1 (micro) of each extractor on the news pages with reference texts (bench/bench_extract.py)."""
    from bench_extract import evaluate, kind_sets

    pages, references = kind_sets(ROOT / "data", ["news"], None)["news"]
    return {e: evaluate(e, pages, references)["f1_micro"] for e in extractors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=ROOT / "data" / "html" / "news")
    parser.add_argument("--crawl", type=Path, default=ROOT / "data" / "warc" / "iana.warc.gz")
    parser.add_argument("--copies", type=int, default=12, help="copies of the news pages, under different URLs")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    python = ensure_venv(VENV, DATATROVE_INSTALLS)
    inputs = WORK / "input"
    docs = build_input(args.pages, args.crawl, args.copies, inputs)
    default = ExtractConfig().extractor
    print(f"{docs} WARC response records ({args.copies} x {len(list(args.pages.glob('*.html')))} news pages + "
          f"{args.crawl.name}) in {inputs}\n", flush=True)

    rows = []  # (system, extractor, cpus, result); at each CPU count the runs alternate, so noise hits all alike
    for cpus in args.cpus:
        for extractor in dict.fromkeys([default, "trafilatura"]):
            rows.append(("athanor", extractor, cpus, run_athanor(inputs, cpus, WORK / f"athanor-{extractor}-{cpus}",
                                                                  extractor)))
        rows.append(("datatrove", "trafilatura", cpus, run_datatrove(python, inputs, cpus, WORK / f"datatrove-{cpus}")))
        for name, extractor, _, r in rows[-3:]:
            print(f"  {name} ({extractor}) on {cpus} CPU: {r['seconds']:.1f} s", flush=True)

    f1 = news_f1([default, "trafilatura"])
    print(f"\n{'system':<10} {'extractor':<12} {'news F1':>7} {'CPUs':>4} {'seconds':>8} {'wall s':>7} {'docs/s':>8} "
          f"{'vs DataTrove':>12} {'kept':>5} {'duplicates removed':>24}")
    for name, extractor, cpus, r in rows:
        baseline = next(b for n, _, c, b in rows if n == "datatrove" and c == cpus)
        ratio = baseline["seconds"] / r["seconds"]
        print(f"{name:<10} {extractor:<12} {f1[extractor]:>7.3f} {cpus:>4} {r['seconds']:>8.1f} {r['wall']:>7.1f} "
              f"{docs / r['seconds']:>8.1f} {ratio:>11.2f}x {r['kept']:>5} {r['duplicates']:>6} ({r['detail']})")
    print("\nvs DataTrove: its pipeline seconds over athanor's at the same CPU count; athanor with trafilatura is the "
          "same-extractor ratio, athanor's default extractor the default-against-default one. news F1: word F1 of "
          "the extractor (DataTrove runs trafilatura with the same settings) on the news reference set of "
          "bench/bench_extract.py.")


if __name__ == "__main__":
    main()
