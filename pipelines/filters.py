"""The row-wise stages (extract -> url_filter -> langid -> heuristics -> c4 -> fineweb -> pii) fused into one UDF.

Each of them turns a row into one row, so running them back to back on a batch in one actor gives what seven
Ray Data stages give, without seven materializations and seven shard commits: on a small cluster those fixed costs
(seconds each) dwarf the filters themselves. A row dropped by one filter skips the rest, as before; the fused
output holds every row once, with the signal columns of the filters it reached (null after) and its `drop_reason`.

Every drop reason belongs to exactly one filter (each module's DROP_REASONS, checked when the chain is built and
on every batch), so the per-filter stats follow from the reason counts alone: filter i sees what filters before it
kept. That keeps stats exact on resume, where only the committed shards' reason counts are left.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from athanor.config import CurateConfig
from athanor.pipelines import c4, extract, fineweb, heuristics, langid, pii, urlfilter
from athanor.pipelines.stats import REASON, stage_stats

ROW_STAGES = ("extract", "url_filter", "langid", "heuristics", "c4", "fineweb", "pii")


def row_stages(c: CurateConfig) -> tuple[str, ...]:
    """The enabled row-wise stages, in pipeline order (extract, langid and heuristics always run)."""
    enabled = {"url_filter": c.url_filter.enabled, "c4": c.c4.enabled, "fineweb": c.fineweb.enabled,
               "pii": c.pii.enabled}
    return tuple(s for s in ROW_STAGES if enabled.get(s, True))


def drop_reasons(stage: str, c: CurateConfig) -> tuple[str, ...]:
    if stage == "heuristics":
        return heuristics.drop_reasons(c.heuristics)
    return {"extract": extract.DROP_REASONS, "url_filter": urlfilter.DROP_REASONS, "langid": langid.DROP_REASONS,
            "c4": c4.DROP_REASONS, "fineweb": fineweb.DROP_REASONS, "pii": pii.DROP_REASONS}[stage]


def reason_owners(stages: tuple[str, ...], c: CurateConfig) -> dict[str, str]:
    """drop reason -> the one stage that gives it; a reason shared by two stages is a configuration error."""
    owners: dict[str, str] = {}
    for stage in stages:
        for reason in drop_reasons(stage, c):
            if reason in owners:
                raise ValueError(f"drop reason {reason!r} is given by both {owners[reason]} and {stage}")
            owners[reason] = stage
    return owners


def split_stats(stages: tuple[str, ...], counts: Counter, c: CurateConfig) -> list[dict]:
    """Per-stage stats of a fused run from its reason counts (None = kept): stage i's `in` is what i-1 kept."""
    owners = reason_owners(stages, c)
    unknown = [r for r in counts if r is not None and r not in owners]
    if unknown:
        raise ValueError(f"drop reasons {sorted(unknown)} belong to none of the stages {list(stages)}")
    docs, out = sum(counts.values()), []
    for stage in stages:
        dropped = Counter({r: n for r, n in counts.items() if r is not None and owners[r] == stage})
        kept = docs - sum(dropped.values())
        out.append(stage_stats(stage, dropped + Counter({None: kept})))
        docs = kept
    return out


class FilterChain:
    """Ray Data class UDF: the enabled row-wise stages over each batch; the URL list and lid.176 load once per actor."""

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
            "fineweb": lambda: partial(fineweb.fineweb_batch, cfg=c.fineweb),
            "pii": lambda: partial(pii.pii_batch, cfg=c.pii),
        }
        self.steps = [(s, make[s]()) for s in self.stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Every step runs (on no rows, once all are dropped), so every batch comes out with the same schema."""
        parts, pending = [], batch
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
