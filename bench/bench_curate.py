"""Curation documents/s against DataTrove's FineWeb-style pipeline: same WARC files, same CPU count, one invocation.

Input: the 258 real news pages (data/html/news) packed as WARC response records, `--copies` times under different
URLs (one .warc.gz per copy, so DataTrove gets one task per file as its readers expect), plus the real 2014 crawl
data/warc/iana.warc.gz. Every copy after the first is a true duplicate of a page that survives the filters. Both
systems read the same files; more copies mean more documents of the same kind for both, so the ratio shows how
each scales with corpus size (athanor pays a fixed Ray cost per stage, DataTrove's cost is almost all per page).

    athanor   the stages of configs/demo.yaml's curation: read (fastwarc) -> extract (resiliparse) -> URL filter ->
              langid (lid.176) -> Gopher -> C4 -> FineWeb -> PII, fused into one Ray Data map and one commit, then
              exact dedup + MinHash near-dedup (5-grams, 14x8) as one stage and commit, then curated/final; the
              quality classifier is off (DataTrove's baseline has none). Run with `athanor curate`,
              cluster.num_cpus = 1 and 2. `--extractor trafilatura` runs athanor with DataTrove's extractor.
    DataTrove WarcReader -> Trafilatura -> GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality ->
              MinHash signature/buckets/cluster/filter (5-grams, 14x8), tasks = 1 and 2
              (../shared/bench/datatrove_baseline.py, in its own virtualenv bench/.venv-datatrove).

Throughput is input documents (WARC response records) over pipeline seconds: athanor's stage seconds from
stats/timings.json (Ray start-up excluded), DataTrove's phase seconds (interpreter start-up excluded); wall-clock
seconds of each whole command are printed beside them.

    python bench/bench_curate.py [--copies 12] [--extractor resiliparse|trafilatura]
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
from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-datatrove"
DATATROVE_PACKAGES = ["datatrove[processing]", "warcio", "faust-cchardet", "python-magic", "orjson", "lxml_html_clean",
                      "spacy"]
WORK = ROOT / "data" / "bench" / "curate"


def datatrove_python() -> Path:
    """DataTrove's own virtualenv, created on first use (it pins libraries athanor does not want)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "ensurepip", "-q"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *DATATROVE_PACKAGES], check=True)
    return python


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


def run_athanor(inputs: Path, cpus: int, work: Path, extractor: str = "resiliparse") -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config = {
        "run": {"name": "bench-curate", "workdir": str(work)},
        "data": {"warc_files": [str(inputs / "*.warc.gz")]},
        "curate": {**cfg["curate"], "extract": {"extractor": extractor}, "quality": {"enabled": False},
                   "write_dropped": False},
        "cluster": {"num_cpus": cpus},
    }
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work.parent / f"athanor-{cpus}cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    with (work.parent / f"athanor-{cpus}cpu.log").open("w") as log:
        subprocess.run([str(Path(sys.executable).parent / "athanor"), "curate", str(path)], cwd=ROOT, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    summary = json.loads((work / "stats" / "curation.json").read_text())
    dropped = summary["dropped"]
    seconds = json.loads((work / "stats" / "timings.json").read_text())  # per stage, final write included
    return {"seconds": sum(seconds.values()), "wall": wall, "in": summary["in"], "kept": summary["kept"],
            "duplicates": dropped.get("exact_duplicate", 0) + dropped.get("near_duplicate", 0),
            "detail": f"exact {dropped.get('exact_duplicate', 0)} + near {dropped.get('near_duplicate', 0)}"}


def run_datatrove(python: Path, script: Path, inputs: Path, tasks: int, work: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([str(python), str(script), str(inputs), str(work), str(tasks)], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": sum(result["seconds"].values()), "wall": wall, "kept": result["kept_after_dedup"],
            "duplicates": result["kept_after_filters"] - result["kept_after_dedup"], "detail": "minhash"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=ROOT / "data" / "html" / "news")
    parser.add_argument("--crawl", type=Path, default=ROOT / "data" / "warc" / "iana.warc.gz")
    parser.add_argument("--copies", type=int, default=12, help="copies of the news pages, under different URLs")
    parser.add_argument("--extractor", choices=["resiliparse", "trafilatura"], default="resiliparse",
                        help="athanor's extractor (DataTrove's baseline always uses trafilatura)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--datatrove-script", type=Path,
                        default=ROOT.parent / "shared" / "bench" / "datatrove_baseline.py")
    args = parser.parse_args()

    python = datatrove_python()
    inputs = WORK / "input"
    docs = build_input(args.pages, args.crawl, args.copies, inputs)
    print(f"{docs} WARC response records ({args.copies} x {len(list(args.pages.glob('*.html')))} news pages + "
          f"{args.crawl.name}) in {inputs}; extractor: athanor {args.extractor}, DataTrove trafilatura\n", flush=True)

    rows = []
    for cpus in args.cpus:  # the two systems alternate at each CPU count, so machine noise hits both alike
        rows.append(("athanor", cpus, run_athanor(inputs, cpus, WORK / f"athanor-{cpus}", args.extractor)))
        rows.append(("datatrove", cpus, run_datatrove(python, args.datatrove_script, inputs, cpus,
                                                        WORK / f"datatrove-{cpus}")))
        for name, _, r in rows[-2:]:
            print(f"  {name} on {cpus} CPU: {r['seconds']:.1f} s", flush=True)

    print(f"\n{'system':<10} {'CPUs':>4} {'seconds':>8} {'wall s':>7} {'docs/s':>8} {'vs DataTrove':>12} "
          f"{'kept':>5} {'duplicates removed':>24}")
    for name, cpus, r in rows:
        baseline = next(b for n, c, b in rows if n == "datatrove" and c == cpus)
        ratio = baseline["seconds"] / r["seconds"]
        print(f"{name:<10} {cpus:>4} {r['seconds']:>8.1f} {r['wall']:>7.1f} {docs / r['seconds']:>8.1f} "
              f"{ratio:>11.1f}x {r['kept']:>5} {r['duplicates']:>6} ({r['detail']})")


if __name__ == "__main__":
    main()
