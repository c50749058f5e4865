"""The curation DAG: filter -> decontam -> dedup (exact, then near) -> quality, then curated/final.

`filter` is the reader and the row-wise stages extract -> url_filter -> langid -> heuristics -> c4 -> toxicity ->
fineweb -> pii fused into one Ray Data map (see filters.py); each of them still gets its own stats/<stage>.json and
funnel row. `decontam` drops documents sharing a 13-gram with the evaluation tasks (see decontam.py).
Each Ray stage marks rows (see stats.py); the driver then counts reasons and commits the stage (see
commit.py): its kept rows to curated/<stage>/, its dropped rows (with `drop_reason`, and `stage` naming the Ray
stage) to curated/dropped/<stage>/, both as doc_id-range shards sorted by doc_id, then its stats JSONs and a
completion marker, and hands the kept rows on. The last stage's committed shards are copied into curated/final/.
A re-run skips committed stages and ranges and writes the same bytes an uninterrupted run writes;
stats/report.html shows the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.context import ShuffleStrategy

from athanor import storage
from athanor.config import AthanorConfig
from athanor.console import Progress, heartbeat, say, stage_line
from athanor.layout import RunLayout
from athanor.pipelines.commit import (clear_stale, commit_shards, commit_stage, committed_files, finished_shards,
                                      num_shards, only_unfinished, shard_counts, stage_marker)
from athanor.pipelines.decontam import decontaminate, task_files_digest
from athanor.pipelines.dedup import mark_exact_duplicates
from athanor.pipelines.filters import READ, filter_batch, reason_owners, row_stages
from athanor.pipelines.minhash import mark_near_duplicates_stage
from athanor.pipelines.quality import (QualityScorer, local_model, model_is_current, model_path,
                                       train_quality_classifier)
from athanor.pipelines.read import list_files, list_html_files, read_crawl
from athanor.pipelines.report import write_report
from athanor.pipelines.stats import REASON, kept_rows, reason_counts, stage_stats, write_json

Stage = Callable[[ray.data.Dataset | None], ray.data.Dataset]
FINAL = "final"
FILTER = "filter"
DECONTAM = "decontam"
DEDUP, EXACT_DEDUP, NEAR_DEDUP = "dedup", "exact_dedup", "near_dedup"
# Stages that turn each row into one row with the same doc_id: resumed, they read only their unfinished ranges.
PER_DOCUMENT_STAGES = frozenset({DECONTAM, "quality"})


def one_actor() -> ray.data.ActorPoolStrategy:
    """One actor per model-holding UDF: the model is loaded once and memory stays flat."""
    return ray.data.ActorPoolStrategy(size=1)


def read_stage(cfg: AthanorConfig) -> ray.data.Dataset:
    """The crawl records, on a context every later dataset of the run inherits (the global one is left alone)."""
    ds = read_crawl(cfg.data)
    ds.context.shuffle_strategy = ShuffleStrategy(cfg.curate.shuffle_strategy)
    return ds


@contextlib.contextmanager
def _unsplit_reads() -> Iterator[None]:
    """By default Ray Data splits reads until blocks are ~1 MiB (up to 200 of them); every later stage then pays one
    task per block in each map, shuffle and count, which on a small corpus costs more than the work. While curating,
    reads keep Ray's other floor only: two blocks per CPU, or one per read task (file) if more. Ray's optimizer
    reads this from the driver's current DataContext, not the dataset's, hence the (restored) global setting."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.read_op_min_num_blocks = ctx.read_op_min_num_blocks, 1
    try:
        yield
    finally:
        ctx.read_op_min_num_blocks = before


def filter_stage(cfg: AthanorConfig) -> Stage:
    """The first stage: read, then every row-wise filter. Resumed, it reads and filters the input again (cheap next
    to committing raw HTML) and commits only the unfinished ranges."""
    return lambda _: read_stage(cfg).map_batches(filter_batch, fn_kwargs={"cfg": cfg.curate}, batch_format="pyarrow")


def _with_near_dup_of(batch: pa.Table) -> pa.Table:
    """Exact duplicates in near-dedup's output shape: `near_dup_of` (null) before `drop_reason`."""
    return batch.add_column(batch.schema.get_field_index(REASON), "near_dup_of", pa.nulls(batch.num_rows, pa.string()))


def dedup_stage(cfg: AthanorConfig, layout: RunLayout) -> Stage:
    """Exact dedup, then MinHash near-dedup of the exact survivors, as one Ray stage (one commit): the exact
    duplicates come out as marked, the rest as near-dedup marks them; stats split by reason."""
    d = cfg.curate.dedup

    def run(ds: ray.data.Dataset) -> ray.data.Dataset:
        if not d.minhash:
            return mark_exact_duplicates(ds, d.shuffle_partitions, d.single_task_max_docs)
        if not d.exact:
            return mark_near_duplicates_stage(ds, d, layout)
        exact = mark_exact_duplicates(ds, d.shuffle_partitions, d.single_task_max_docs).materialize()
        duplicates = exact.map_batches(_only_dropped, batch_format="pyarrow").map_batches(_with_near_dup_of,
                                                                                           batch_format="pyarrow")
        near = mark_near_duplicates_stage(exact.map_batches(kept_rows, batch_format="pyarrow"), d, layout)
        return duplicates.union(near)

    return run


def _only_dropped(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REASON]))


def curation_stages(cfg: AthanorConfig, layout: RunLayout) -> list[tuple[str, Stage]]:
    """Near FineWeb's order: the URL block list, language ID, Gopher's rules, C4's line cleaning (which rewrites
    `text`), then FineWeb's rules, which read the cleaned lines (all fused into `filter`). PII masking runs last
    before dedup: pages that differ only in an address dedup as one, and nothing downstream (dedup, quality model,
    tokenizer) sees an address. (FineWeb checks URLs before extracting; here extraction comes first, and blocked
    pages cost one extraction each.)

    Decontamination runs before dedup: every copy of an evaluation text is counted as `contaminated` (not as a
    duplicate of one), and near-dedup then picks its survivors among clean documents only; after dedup, a cluster
    whose chosen survivor held the evaluation passage would lose its clean near-copies with it."""
    c = cfg.curate
    stages: list[tuple[str, Stage]] = [(FILTER, filter_stage(cfg))]
    if c.decontam.enabled:
        stages.append((DECONTAM, lambda ds: decontaminate(ds, c.decontam)))
    if c.dedup.exact or c.dedup.minhash:
        stages.append((DEDUP, dedup_stage(cfg, layout)))
    if c.quality.enabled:
        model = str(model_path(layout))
        stages.append(("quality", lambda ds: ds.map_batches(QualityScorer, fn_constructor_args=(model, c.quality),
                                                            batch_format="pyarrow", compute=one_actor())))
    return stages


def reported_stages(name: str, cfg: AthanorConfig) -> tuple[str, ...]:
    """The stages a Ray stage reports stats for: the reader and the fused row-wise stages for `filter`, exact and
    near dedup for `dedup`, else itself."""
    d = cfg.curate.dedup
    if name == FILTER:
        return (READ, *row_stages(cfg.curate))
    if name == DEDUP:
        return tuple(s for s, on in ((EXACT_DEDUP, d.exact), (NEAR_DEDUP, d.minhash)) if on)
    return (name,)


def split_stats(stages: tuple[str, ...], counts: Counter, owners: dict[str, str], rest: str | None = None
                ) -> list[dict]:
    """Per-stage stats of fused stages from their reason counts (None = kept), each reason counted for its owner
    (`rest` owns the reasons `owners` does not name): stage i's `in` is what stage i-1 kept."""
    unknown = [r for r in counts if r is not None and r not in owners]
    if unknown and rest is None:
        raise ValueError(f"drop reasons {sorted(unknown)} belong to none of the stages {list(stages)}")
    owners = owners | dict.fromkeys(unknown, rest)
    docs, out = sum(counts.values()), []
    for stage in stages:
        dropped = Counter({r: n for r, n in counts.items() if r is not None and owners[r] == stage})
        kept = docs - sum(dropped.values())
        out.append(stage_stats(stage, dropped + Counter({None: kept})))
        docs = kept
    return out


def _stats(name: str, counts: Counter, cfg: AthanorConfig) -> list[dict]:
    stages = reported_stages(name, cfg)
    if name == FILTER:
        return split_stats(stages, counts, reason_owners(stages[1:], cfg.curate), rest=READ)
    if name == DEDUP:
        return split_stats(stages, counts, {"exact_duplicate": EXACT_DEDUP, "near_duplicate": NEAR_DEDUP})
    return [stage_stats(name, counts)]


def _run_key(cfg: AthanorConfig, layout: RunLayout) -> str:
    """What every stage's output depends on: the data and curate config, the input files (names and sizes: a new
    or grown input must not reuse committed stages), when decontaminating, the task files' bytes, and, when scoring,
    the quality model."""
    d = cfg.data
    inputs = [*list_html_files(d), *(f for field in ("warc_files", "jsonl_files", "parquet_files", "text_files")
                                     for f in list_files(getattr(d, field), d, field))]
    digest = hashlib.sha256(f"{cfg.section_hash('data', 'curate')} {inputs}".encode())
    if cfg.curate.decontam.enabled:
        digest.update(task_files_digest(cfg.curate.decontam))
    if cfg.curate.quality.enabled:
        digest.update(local_model(model_path(layout)).read_bytes())
    return digest.hexdigest()[:16]


def _stage_key(upstream: str, name: str) -> str:
    """A stage's completion-marker key: its name chained onto its upstream's key (the run key at the root)."""
    return hashlib.sha256(f"{upstream}/{name}".encode()).hexdigest()[:16]


def _committed(cfg: AthanorConfig, layout: RunLayout, stage: str) -> ray.data.Dataset:
    """A committed stage's kept rows, read back for the next stage on curation's shuffle strategy (as read_stage)."""
    ds = storage.read_parquet(committed_files(layout.curated(stage)))
    ds.context.shuffle_strategy = ShuffleStrategy(cfg.curate.shuffle_strategy)
    return ds


def _copy_final(layout: RunLayout, last: str, key: str, upstream: str, kept: int) -> None:
    """curated/final is the last stage's committed shards, copied byte for byte: they are its survivors, already
    sorted in doc_id ranges, so no Ray pass is needed. Copied whole each time (a kill mid-copy leaves no marker),
    the completion marker last."""
    out = layout.curated(FINAL)
    storage.delete_tree(out)
    files = [storage.location(f) for f in committed_files(layout.curated(last))]
    for src in files:
        storage.write_bytes(out / src.name, storage.read_bytes(src))
    commit_stage(out, key, upstream, len(files), [stage_stats(FINAL, Counter({None: kept}))])


def _commit(marked: ray.data.Dataset | None, name: str, key: str, upstream: str, shards: int,
            finished: dict[int, dict], stats: list[dict], layout: RunLayout, write_dropped: bool) -> None:
    """Unfinished ranges first, then the stats JSONs, then the completion marker: a marker implies all the rest."""
    dropped_dir = layout.dropped / name if write_dropped else None
    progress = Progress(name, shards - len(finished), what="shards committed", rate=False)
    commit_shards(marked, name, key, shards, finished, layout.curated(name), dropped_dir, progress.update)
    for s in stats:
        write_json(layout.stats(s["stage"]), s)
    commit_stage(layout.curated(name), key, upstream, shards, stats)


def run_stage(name: str, stage: Stage, ds: ray.data.Dataset | None, docs_in: int | None, key: str, upstream: str,
              cfg: AthanorConfig, layout: RunLayout, writer: ThreadPoolExecutor
              ) -> tuple[ray.data.Dataset | None, list[dict], Future]:
    """Run one stage and hand its commit to `writer`; returns (kept rows, or None when the next stage must read them
    back from disk; stats of each reported stage; the pending commit). `in == kept + sum(dropped)` by construction.

    Ranges an earlier run committed under the same key are not written again, and a per-document stage does not
    recompute them either. Commits run on writer threads while the next stage computes: on a small cluster the
    stages are latency-bound, and overlapping them keeps the cores busy.
    """
    clear_stale(layout.curated(name), layout.dropped / name, key)
    finished = finished_shards(layout.curated(name), key)
    if finished and len(finished) == next(iter(finished.values()))["shards"]:  # killed before its stage marker
        stats = _stats(name, shard_counts(list(finished.values())), cfg)
        shards = len(finished)
        return None, stats, writer.submit(_commit, None, name, key, upstream, shards, finished, stats, layout,
                                          cfg.curate.write_dropped)

    resume = bool(finished) and bool(docs_in) and name in PER_DOCUMENT_STAGES
    if resume:
        ds = only_unfinished(ds, num_shards(docs_in, cfg.curate.docs_per_shard), finished).materialize()
    empty = docs_in == 0 or (resume and ds.count() == 0)
    marked = None if empty else stage(ds).materialize()
    counts = Counter() if marked is None else reason_counts(marked)
    shards = num_shards(sum(counts.values()) if docs_in is None else docs_in, cfg.curate.docs_per_shard)
    stats = _stats(name, counts + shard_counts(list(finished.values())) if resume else counts, cfg)
    todo = None if marked is None else only_unfinished(marked, shards, finished)
    commit = writer.submit(_commit, todo, name, key, upstream, shards, finished, stats, layout,
                           cfg.curate.write_dropped)
    kept = None if resume or marked is None else marked.map_batches(kept_rows, batch_format="pyarrow")
    return kept, stats, commit


def run_curation(cfg: AthanorConfig, layout: RunLayout) -> dict:
    """Curate `cfg.data` into `layout.curated("final")`, resuming from what an earlier run of the same config
    committed; returns the summary written to stats/curation.json, plus `seconds` (written to stats/timings.json,
    the one output that differs between runs)."""
    if cfg.curate.quality.enabled and not model_is_current(cfg, layout):
        train_quality_classifier(cfg, layout)
    with _unsplit_reads():
        return _curate(cfg, layout, curation_stages(cfg, layout))


def _curate(cfg: AthanorConfig, layout: RunLayout, stages: list[tuple[str, Stage]]) -> dict:

    per_stage, seconds, commits = [], {}, []
    ds, docs_in, previous, upstream = None, None, None, _run_key(cfg, layout)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="curate-commit") as writer:
        for name, stage in stages:
            start = time.perf_counter()
            key = _stage_key(upstream, name)
            done = stage_marker(layout.curated(name), key)
            if done is not None:
                ds, stats = None, done["stats"]
                for s in stats:
                    write_json(layout.stats(s["stage"]), s)
            else:
                if ds is None and docs_in:  # the previous stage's rows are on disk, not in memory
                    for commit in commits:
                        commit.result()
                    ds = _committed(cfg, layout, previous)
                with heartbeat(name, "" if docs_in is None else f", {docs_in:,} docs in"):
                    ds, stats, commit = run_stage(name, stage, ds, docs_in, key, upstream, cfg, layout, writer)
                commits.append(commit)
            per_stage += stats
            docs_in, previous, upstream = stats[-1]["kept"], name, key
            seconds[name] = round(time.perf_counter() - start, 3)
            say(stage_line(name, stats[0]["in"], docs_in, None if done is not None else seconds[name]))

        start = time.perf_counter()
        for commit in commits:
            commit.result()  # re-raises a failed commit here
        key = _stage_key(upstream, FINAL)
        if stage_marker(layout.curated(FINAL), key) is None:
            _copy_final(layout, previous, key, upstream, docs_in)
        seconds[FINAL] = round(time.perf_counter() - start, 3)
    dropped = sum((Counter(s["dropped"]) for s in per_stage), Counter())
    summary = {
        "stages": per_stage,
        "in": per_stage[0]["in"],
        "kept": per_stage[-1]["kept"],
        "dropped": dict(sorted(dropped.items())),
    }
    write_json(layout.stats("curation"), summary)
    write_json(layout.stats("timings"), seconds)
    write_report(layout, summary)
    return {**summary, "seconds": seconds}
