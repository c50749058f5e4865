"""The row-wise stages (extract -> url_filter -> langid -> heuristics -> c4 -> toxicity -> fineweb -> pii), fused.

Each of them turns a row into one row, so running them back to back on a batch in one task, fused by Ray Data into
the reader's own tasks, gives what eight Ray Data stages give without eight materializations and eight shard commits (the
reader's, of raw HTML, the costliest): on a small cluster those fixed costs dwarf the filters themselves. A row
dropped by the reader or one filter skips the rest, as before; the fused output holds every row once, with the
signal columns of the filters it reached (null after), its `drop_reason`, and no `html` (extraction replaces it).
Tasks, not an actor pool: actors holding every CPU would starve the read tasks feeding them, and a task fused into
the read never ships raw HTML between processes. The URL list and lid.176 load once per worker process (Ray reuses
worker processes), through a process-level cache. Toxicity (off by default) runs after c4 because C4 applied its
bad-words filter to the line-cleaned page (a list word in a dropped menu line does not drop the page), and it reads
langid's `lang` to pick the language's list.

Every drop reason belongs to exactly one filter (each module's DROP_REASONS, checked when the chain is built and
on every batch); the reader owns every other reason. So the per-stage stats follow from the reason counts alone
(stage i sees what the stages before it kept), and stay exact on resume, where only the committed shards' reason
counts are left.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from athanor.config import CurateConfig
from athanor.pipelines import c4, extract, fineweb, heuristics, langid, pii, toxicity, urlfilter
from athanor.pipelines.stats import REASON

ROW_STAGES = ("extract", "url_filter", "langid", "heuristics", "c4", "toxicity", "fineweb", "pii")
READ = "read"  # the reader: its rows come in already marked, with reasons of its own (see read.py)


def row_stages(c: CurateConfig) -> tuple[str, ...]:
    """The enabled row-wise stages, in pipeline order (extract, langid and heuristics always run)."""
    enabled = {"url_filter": c.url_filter.enabled, "c4": c.c4.enabled, "fineweb": c.fineweb.enabled,
               "pii": c.pii.enabled, "toxicity": c.toxicity.enabled}
    return tuple(s for s in ROW_STAGES if enabled.get(s, True))


def drop_reasons(stage: str, c: CurateConfig) -> tuple[str, ...]:
    if stage == "heuristics":
        return heuristics.drop_reasons(c.heuristics)
    return {"extract": extract.DROP_REASONS, "url_filter": urlfilter.DROP_REASONS, "langid": langid.DROP_REASONS,
            "c4": c4.DROP_REASONS, "fineweb": fineweb.DROP_REASONS, "pii": pii.DROP_REASONS,
            "toxicity": toxicity.DROP_REASONS}[stage]


def reason_owners(stages: tuple[str, ...], c: CurateConfig) -> dict[str, str]:
    """drop reason -> the one stage that gives it; a reason shared by two stages is a configuration error."""
    owners: dict[str, str] = {}
    for stage in stages:
        for reason in drop_reasons(stage, c):
            if reason in owners:
                raise ValueError(f"drop reason {reason!r} is given by both {owners[reason]} and {stage}")
            owners[reason] = stage
    return owners


class FilterChain:
    """The enabled row-wise stages over a batch; holds the loaded URL list and lid.176."""

    def __init__(self, c: CurateConfig):
        self.stages = row_stages(c)
        self.reasons = {s: set(drop_reasons(s, c)) for s in self.stages}
        reason_owners(self.stages, c)
        make: dict[str, Callable[[], Callable[[pa.Table], pa.Table]]] = {
            "extract": lambda: partial(extract.extract_batch, cfg=c.extract),
            "url_filter": lambda: urlfilter.UrlFilter(c.url_filter),
            "langid": lambda: langid.LanguageIdentifier(c.langid),
            "heuristics": lambda: partial(heuristics.heuristics_batch, cfg=c.heuristics),
            "c4": lambda: partial(c4.c4_batch, cfg=c.c4),
            "toxicity": lambda: toxicity.ToxicityFilter(c.toxicity, c.langid.languages),
            "fineweb": lambda: partial(fineweb.fineweb_batch, cfg=c.fineweb),
            "pii": lambda: partial(pii.pii_batch, cfg=c.pii),
        }
        self.steps = [(s, make[s]()) for s in self.stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Every step runs (on no rows, once all are dropped), so every batch comes out with the same schema.
        Rows the reader dropped pass through (without `html`, which no dropped row keeps)."""
        parts, pending = [], batch
        if REASON in batch.column_names:
            read_dropped = pc.is_valid(batch[REASON])
            parts.append(batch.filter(read_dropped).drop_columns(["html"]))
            pending = batch.filter(pc.invert(read_dropped)).drop_columns([REASON])
        for stage, step in self.steps:
            marked = step(pending)
            reasons = set(pc.unique(marked[REASON]).to_pylist()) - {None}
            if not reasons <= self.reasons[stage]:
                raise ValueError(f"{stage} gave drop reasons {sorted(reasons - self.reasons[stage])} missing from "
                                 "its module's DROP_REASONS")
            dropped = pc.is_valid(marked[REASON])
            parts.append(marked.filter(dropped))
            pending = marked.filter(pc.invert(dropped)).drop_columns([REASON])
        out = pa.concat_tables([*parts, pending], promote_options="default")  # later signals: null where dropped
        reason = out[REASON]
        return out.drop_columns([REASON]).append_column(REASON, reason)


_CHAINS: dict[str, FilterChain] = {}  # this worker process's loaded chain, by config


def filter_batch(batch: pa.Table, cfg: CurateConfig) -> pa.Table:
    """Ray Data UDF: the chain for `cfg`, built on this process's first batch and reused for the rest."""
    key = cfg.model_dump_json()
    if key not in _CHAINS:
        _CHAINS.clear()
        _CHAINS[key] = FilterChain(cfg)
    return _CHAINS[key](batch)
