"""The curation DAG: read -> extract -> langid -> heuristics -> exact_dedup -> near_dedup -> quality -> final.

Each stage marks rows (see stats.py); the driver then counts reasons, writes the stage's stats JSON, its kept rows to
curated/<stage>/ and its dropped rows (with `drop_reason` and `stage`) to curated/dropped/<stage>/, and hands the kept
rows on. The survivors of the last stage are sorted by doc_id into curated/final/ with stable file names, so two runs
over the same input write the same bytes for the tokenizer and packer to read.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import ray
from ray.data import SaveMode
from ray.data.context import ShuffleStrategy
from ray.data.datasource import FilenameProvider

from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.pipelines.c4 import c4_batch
from athanor.pipelines.dedup import mark_exact_duplicates
from athanor.pipelines.extract import extract_batch
from athanor.pipelines.fineweb import fineweb_batch
from athanor.pipelines.heuristics import heuristics_batch
from athanor.pipelines.langid import LanguageIdentifier
from athanor.pipelines.minhash import mark_near_duplicates_stage
from athanor.pipelines.pii import pii_batch
from athanor.pipelines.quality import QualityScorer, model_is_current, model_path, train_quality_classifier
from athanor.pipelines.read import read_crawl
from athanor.pipelines.stats import dropped_rows, kept_rows, reason_counts, stage_stats, write_json

from athanor.pipelines.urlfilter import UrlFilter
Stage = Callable[[ray.data.Dataset | None], ray.data.Dataset]
FINAL = "final"
DOCS_PER_FINAL_FILE = 50_000
SORT_KEY_HEX_DIGITS = 15  # 60 bits: fits an int64


def one_actor() -> ray.data.ActorPoolStrategy:
    """One actor per model-holding UDF: the model is loaded once and memory stays flat."""
    return ray.data.ActorPoolStrategy(size=1)


class _PartNames(FilenameProvider):
    """part-00000.parquet, ...: run-independent names whose lexical order is the write order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"


def read_stage(cfg: AthanorConfig) -> ray.data.Dataset:
    """The crawl records, on a context every later dataset of the run inherits (the global one is left alone)."""
    ds = read_crawl(cfg.data)
    ds.context.shuffle_strategy = ShuffleStrategy(cfg.curate.shuffle_strategy)
    return ds


def curation_stages(cfg: AthanorConfig, layout: RunLayout) -> list[tuple[str, Stage]]:
    """Near FineWeb's order: the URL block list, language ID, Gopher's rules, C4's line cleaning (which rewrites
    `text`), then FineWeb's rules, which read the cleaned lines. PII masking runs last before dedup: pages that
    differ only in an address dedup as one, and nothing downstream (dedup, quality model, tokenizer) sees an
    address. (FineWeb checks URLs before extracting; here extraction stays the second stage, where the stage
    list's consumers expect it, and blocked pages cost one extraction each.)"""
    c = cfg.curate

    def udf(fn: Callable, section) -> Stage:
        return lambda ds: ds.map_batches(fn, fn_kwargs={"cfg": section}, batch_format="pyarrow")

    stages: list[tuple[str, Stage]] = [
        ("read", lambda _: read_stage(cfg)),
        ("extract", udf(extract_batch, c.extract)),
    ]
    if c.url_filter.enabled:
        stages.append(("url_filter", lambda ds: ds.map_batches(
            UrlFilter, fn_constructor_args=(c.url_filter,), batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=c.url_filter.actors))))
    stages += [
        ("langid", lambda ds: ds.map_batches(LanguageIdentifier, fn_constructor_args=(c.langid,),
                                             batch_format="pyarrow", compute=one_actor())),
        ("heuristics", udf(heuristics_batch, c.heuristics)),
    ]
    stages += [(name, udf(fn, section)) for name, fn, section in
               (("c4", c4_batch, c.c4), ("fineweb", fineweb_batch, c.fineweb), ("pii", pii_batch, c.pii))
               if section.enabled]
    if c.dedup.exact:
        stages.append(("exact_dedup", lambda ds: mark_exact_duplicates(ds, c.dedup.shuffle_partitions)))
    if c.dedup.minhash:
        stages.append(("near_dedup", lambda ds: mark_near_duplicates_stage(ds, c.dedup)))
    if c.quality.enabled:
        model = str(model_path(layout))
        stages.append(("quality", lambda ds: ds.map_batches(QualityScorer, fn_constructor_args=(model, c.quality),
                                                            batch_format="pyarrow", compute=one_actor())))
    return stages


def _clear_outputs(layout: RunLayout, stages: list[str]) -> None:
    for path in [layout.curated(s) for s in stages + [FINAL]] + [layout.dropped]:
        shutil.rmtree(path, ignore_errors=True)


def run_stage(name: str, stage: Stage, ds: ray.data.Dataset | None, layout: RunLayout, write_dropped: bool,
              writer: ThreadPoolExecutor) -> tuple[ray.data.Dataset, dict, list[Future]]:
    """Run one stage; returns (kept dataset, stats, pending writes). `in == kept + sum(dropped)` by construction.

    The Parquet writes of a stage run on `writer` threads while the next stage computes: on a small cluster the
    stages are latency-bound, and overlapping them keeps the cores busy.
    """
    marked = stage(ds).materialize()
    stats = stage_stats(name, reason_counts(marked))
    write_json(layout.stats(name), stats)
    kept = marked.map_batches(kept_rows, batch_format="pyarrow")
    writes = []
    if stats["kept"]:
        writes.append(writer.submit(kept.write_parquet, str(layout.curated(name))))
    if write_dropped and stats["in"] > stats["kept"]:
        dropped = marked.map_batches(dropped_rows, fn_kwargs={"stage": name}, batch_format="pyarrow")
        writes.append(writer.submit(dropped.write_parquet, str(layout.dropped / name)))
    return kept, stats, writes


def _add_sort_key(batch: pa.Table) -> pa.Table:
    keys = [int(d[:SORT_KEY_HEX_DIGITS], 16) for d in batch["doc_id"].to_pylist()]
    return batch.append_column("sort_key", pa.array(keys, type=pa.int64()))


def _drop_sort_key(batch: pa.Table) -> pa.Table:
    return batch.drop_columns(["sort_key"])


def write_final(kept: ray.data.Dataset, num_docs: int, layout: RunLayout) -> None:
    """Sort by doc_id into part-i files split at fixed (not sampled) boundaries, so every run splits alike.

    doc_ids are fixed-length hex SHA-1 prefixes: their first 60 bits are a uniform integer whose order is the
    doc_id order, and Ray's sort takes explicit boundaries only for numeric keys.
    """
    parts = max(2, math.ceil(num_docs / DOCS_PER_FINAL_FILE))
    boundaries = [i * 16**SORT_KEY_HEX_DIGITS // parts for i in range(1, parts)]
    final = (
        kept.map_batches(_add_sort_key, batch_format="pyarrow")
        .sort("sort_key", boundaries=boundaries)
        .map_batches(_drop_sort_key, batch_format="pyarrow")
    )
    final.context.execution_options.preserve_order = True  # part-i holds the i-th key range
    final.write_parquet(str(layout.curated(FINAL)), filename_provider=_PartNames(), mode=SaveMode.OVERWRITE)


def run_curation(cfg: AthanorConfig, layout: RunLayout) -> dict:
    """Curate `cfg.data` into `layout.curated("final")`; returns the summary also written to stats/curation.json."""
    if cfg.curate.quality.enabled and not model_is_current(cfg, layout):
        train_quality_classifier(cfg, layout)
    stages = curation_stages(cfg, layout)
    _clear_outputs(layout, [name for name, _ in stages])

    per_stage, seconds, dropped, writes = [], {}, Counter(), []
    ds = None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="curate-write") as writer:
        for name, stage in stages:
            start = time.perf_counter()
            if ds is not None and per_stage[-1]["kept"] == 0:
                stats = stage_stats(name, Counter())  # nothing left to look at: the stage sees 0 documents
                write_json(layout.stats(name), stats)
            else:
                ds, stats, stage_writes = run_stage(name, stage, ds, layout, cfg.curate.write_dropped, writer)
                writes.extend(stage_writes)
            per_stage.append(stats)
            dropped.update(stats["dropped"])
            seconds[name] = round(time.perf_counter() - start, 3)

        start = time.perf_counter()
        if per_stage[-1]["kept"]:
            write_final(ds, per_stage[-1]["kept"], layout)
        for write in writes:
            write.result()  # re-raises a failed write here
        seconds[FINAL] = round(time.perf_counter() - start, 3)
    summary = {
        "stages": per_stage,
        "in": per_stage[0]["in"],
        "kept": per_stage[-1]["kept"],
        "dropped": dict(sorted(dropped.items())),
        "seconds": seconds,
    }
    write_json(layout.stats("curation"), summary)
    return summary
