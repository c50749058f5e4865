"""The dedup stage (exact, then MinHash near-dedup) on one task against Ray Data groupbys, same input, one invocation.

Both paths run curation's own dedup stage (pipelines/curate.py `dedup_stage`, configs/demo.yaml's 5-grams, 14x8
bands) on the same materialized documents: `single task` with `curate.dedup.single_task_max_docs` above the input
size, `groupbys` with it at 0 (the LSH and component groupbys, and the groupby join that marks the documents). The
marked rows of both are asserted equal (sorted by doc_id, as the commit writes them: equal rows are equal bytes), and
so are the near-dedup cluster reports. Timed like `run_stage`: the stage materialized and its reasons counted; a
warm-up round first, then `--repeat` rounds with the two paths alternating, best of each. The ratio is the figure to
read: on a shared machine the seconds move with the load, the ratio much less.

Documents are real text only: the 258 news pages (data/html/news, extracted as curation does), the Lee news
background lines, the three books and the Python documentation sources (data/pydoc/html/_sources) cut into
~250-word pieces, and the SMS lines. A size above that count repeats the corpus; each repeat drops one word of each
document (a different word per repeat), so repeats are near-duplicates, as syndicated copies in a crawl are, and not
exact ones. The `demo` row is the news pages alone, the size of the demo's dedup input.

    python bench/bench_dedup.py [--sizes demo 1000 3000 10000] [--cpus 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray
from ray.data.context import ShuffleStrategy

from athanor.config import AthanorConfig, ExtractConfig
from athanor.console import quiet_ray_data
from athanor.layout import RunLayout
from athanor.pipelines.curate import dedup_stage
from athanor.pipelines.extract import html_to_text
from athanor.pipelines.stats import REASON, reason_counts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
PIECE_WORDS = 250


def pieces(text: str, words: int = PIECE_WORDS) -> list[str]:
    """Consecutive paragraphs joined until a piece has `words` words (the last, shorter piece too)."""
    out, current, n = [], [], 0
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        current.append(paragraph)
        n += len(paragraph.split())
        if n >= words:
            out.append("\n\n".join(current))
            current, n = [], 0
    return out + (["\n\n".join(current)] if current else [])


def real_corpus() -> tuple[list[str], int]:
    """(texts, how many are news pages: they come first)."""
    news = [html_to_text(p.read_bytes(), ExtractConfig())[0] for p in sorted((DATA / "html" / "news").glob("*.html"))]
    texts = [t for t in news if t]
    n_news = len(texts)
    texts += [line.strip() for line in (DATA / "quality/high/lee_background.txt").read_text().splitlines() if line.strip()]
    for book in ("alice29.txt", "lcet10.txt", "plrabn12.txt"):
        texts += pieces((DATA / "quality/high" / book).read_text(encoding="latin-1"))
    for source in sorted((DATA / "pydoc/html/_sources").rglob("*.txt")):
        texts += pieces(source.read_text(encoding="utf-8", errors="replace"))
    texts += [line.strip() for line in (DATA / "quality/low/sms.txt").read_text(encoding="latin-1").splitlines()
              if line.strip()]
    return texts, n_news


def documents(texts: list[str], size: int) -> list[str]:
    out = []
    for i in range(size):
        text, repeat = texts[i % len(texts)], i // len(texts)
        if repeat:
            words = text.split()
            del words[(repeat * 13) % len(words)]
            text = " ".join(words)
        out.append(text)
    return out


def dataset(texts: list[str], blocks: int, strategy: str) -> ray.data.Dataset:
    ids = [f"{i:08d}" for i in range(len(texts))]
    tables = [pa.table({"doc_id": ids[k::blocks], "text": texts[k::blocks]}) for k in range(blocks)]
    ds = ray.data.from_arrow(tables)
    ds.context.shuffle_strategy = ShuffleStrategy(strategy)  # as curation's datasets
    return ds.materialize()


def run(cfg: AthanorConfig, ds: ray.data.Dataset, workdir: Path) -> tuple[float, pa.Table, str]:
    layout = RunLayout(workdir)
    start = time.perf_counter()
    marked = dedup_stage(cfg, layout)(ds).materialize()
    reason_counts(marked)
    seconds = time.perf_counter() - start
    rows = pa.concat_tables(ray.get(marked.to_arrow_refs()), promote_options="default").sort_by("doc_id")
    return seconds, rows, layout.stats("near_dedup_clusters").read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["demo", "1000", "3000", "10000"])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=10, help="input blocks (the demo's dedup input has 10)")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per path")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data(True)
    texts, n_news = real_corpus()
    base = AthanorConfig.model_validate({"curate": {"dedup": {"ngram": 5, "num_bands": 14, "rows_per_band": 8}}})
    print(f"{len(texts):,} real documents ({n_news} news pages), {args.cpus} CPUs, {args.blocks} input blocks, "
          f"best of {args.repeat}\n")
    print(f"{'documents':>10} {'exact dup':>9} {'near dup':>9} {'single task s':>13} {'groupbys s':>10} "
          f"{'groupbys / single':>17}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            docs = texts[:n_news] if size == "demo" else documents(texts, int(size))
            ds = dataset(docs, args.blocks, base.curate.shuffle_strategy)
            configs = {}
            for name, threshold in (("single", len(docs)), ("groupbys", 0)):
                configs[name] = base.model_copy(deep=True)
                configs[name].curate.dedup.single_task_max_docs = threshold
            seconds, outputs = {name: [] for name in configs}, {}
            for k in range(args.repeat + 1):  # the first round warms both up; the paths alternate, so a busy spell
                for name in (list(configs) if k % 2 else list(configs)[::-1]):  # on a shared machine hits both
                    elapsed, *outputs[name] = run(configs[name], ds, Path(tmp) / f"{size}-{name}-{k}")
                    seconds[name] += [elapsed] if k else []
            timings = {name: min(times) for name, times in seconds.items()}
            (single_rows, single_report), (grouped_rows, grouped_report) = outputs["single"], outputs["groupbys"]
            assert single_rows.equals(grouped_rows), f"{size}: the two paths mark different rows"
            assert single_report == grouped_report, f"{size}: the cluster reports differ"
            reasons = single_rows[REASON].to_pylist()
            ratio = timings["groupbys"] / timings["single"]
            results.append({"size": size, "documents": len(docs), **timings, "ratio": round(ratio, 2)})
            print(f"{size if size == 'demo' else len(docs):>10} {reasons.count('exact_duplicate'):>9} "
                  f"{reasons.count('near_duplicate'):>9} {timings['single']:>13.2f} {timings['groupbys']:>10.2f} "
                  f"{ratio:>16.1f}x", flush=True)
    print("\nboth paths: identical marked rows and cluster reports at every size")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
