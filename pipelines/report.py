"""The curation report: one self-contained HTML page (hand-written SVG, no scripts, no external files).

It shows the drop funnel (per stage: in, kept, dropped by reason), histograms of the final documents' length in words
and quality score, and the near-duplicate cluster sizes. It holds no timestamps, so two runs over the same input
write the same bytes. Every chart carries its numbers as `data-*` attributes, so the page can be checked by machine.
"""

from __future__ import annotations

import html
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from athanor import storage
from athanor.layout import RunLayout
from athanor.pipelines.stats import write_text
from athanor.storage import Location

REPORT_FILE = "report.html"
CLUSTERS_FILE = "near_dedup_clusters.json"
QUALITY_BINS = 20
BAR_W, CHART_H, LABEL_H = 28, 160, 56
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
svg text{font-size:10px}.kept{fill:#4a7}.dropped{fill:#d65}.bar{fill:#47a}"""


def _final_columns(layout: RunLayout) -> tuple[np.ndarray, np.ndarray | None]:
    """Words per final document and their quality scores (None without a quality stage), file by file."""
    words, scores = [], []
    for path in storage.glob(layout.curated("final"), "*.parquet"):
        f = pq.ParquetFile(storage.open_input(path))
        has_score = "quality_score" in f.schema_arrow.names
        for batch in f.iter_batches(columns=["text", "quality_score"] if has_score else ["text"]):
            words.append(pc.list_value_length(pc.utf8_split_whitespace(batch.column("text"))).to_numpy(False))
            if has_score:
                scores.append(batch.column("quality_score").to_numpy(zero_copy_only=False))
    counts = np.concatenate(words) if words else np.zeros(0, dtype=np.int64)
    return counts, (np.concatenate(scores) if scores else None)


def length_histogram(words: np.ndarray) -> list[tuple[str, int]]:
    """Power-of-two bins ([64, 128) words, ...): document lengths span orders of magnitude."""
    top = max(1, int(words.max()) if len(words) else 1).bit_length()
    edges = [0, *(2**k for k in range(top + 1))]
    counts, _ = np.histogram(words, bins=edges)
    first = int(np.flatnonzero(counts)[0]) if counts.any() else 0  # no run of empty bins below the shortest
    bins = [(f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo), int(n)) for lo, hi, n in zip(edges, edges[1:], counts)]
    return bins[first:]


def score_histogram(scores: np.ndarray) -> list[tuple[str, int]]:
    counts, edges = np.histogram(scores, bins=QUALITY_BINS, range=(0.0, 1.0))  # the last bin includes 1.0
    return [(f"{lo:.2f}", int(n)) for lo, n in zip(edges, counts)]


def cluster_sizes(layout: RunLayout) -> dict[int, int] | None:
    """{cluster size: clusters}: near-dedup's own report when there is one, else counted from the dropped rows
    (a cluster is its survivor plus every document whose `near_dup_of` names it); None when neither exists."""
    report = storage.read_json(layout.stats_dir / CLUSTERS_FILE)
    if report is not None:
        return {int(k): v for k, v in report["cluster_sizes"].items()}
    files = storage.glob(layout.dropped / "near_dedup", "*.parquet")
    if not files:
        return None
    survivors = Counter(s for f in files
                        for s in pq.read_table(storage.open_input(f), columns=["near_dup_of"])[0].to_pylist())
    return dict(sorted(Counter(n + 1 for n in survivors.values()).items()))


def _histogram_svg(name: str, bins: list[tuple[str, int]], xlabel: str) -> str:
    peak = max((n for _, n in bins), default=0) or 1
    width = BAR_W * len(bins) + 20
    parts = [f'<svg class="histogram" data-name="{name}" data-total="{sum(n for _, n in bins)}" width="{width}" '
             f'height="{CHART_H + LABEL_H}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, n) in enumerate(bins):
        h = round(CHART_H * n / peak)
        x = 10 + i * BAR_W
        parts.append(f'<rect class="bar" data-bin="{html.escape(label)}" data-count="{n}" x="{x}" '
                     f'y="{CHART_H - h}" width="{BAR_W - 4}" height="{h}"><title>{html.escape(label)}: {n}</title>'
                     f'</rect><text x="{x + BAR_W // 2}" y="{CHART_H + 8}" transform="rotate(60 {x + BAR_W // 2} '
                     f'{CHART_H + 8})">{html.escape(label)}</text>')
    parts.append(f'<text x="10" y="{CHART_H + LABEL_H - 2}">{html.escape(xlabel)}</text></svg>')
    return "".join(parts)


def _funnel_svg(stages: list[dict]) -> str:
    """One bar per stage, as long as its input: the kept part, then the dropped part."""
    total = max((s["in"] for s in stages), default=0) or 1
    row, width = 22, 600
    parts = [f'<svg class="funnel" width="{width + 250}" height="{row * len(stages) + 4}" '
             'xmlns="http://www.w3.org/2000/svg">']
    for i, s in enumerate(stages):
        y, kept_w = i * row, width * s["kept"] / total
        dropped_w = width * (s["in"] - s["kept"]) / total
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(s["stage"])}</text>'
                     f'<rect class="kept" x="130" y="{y + 3}" width="{kept_w:.1f}" height="{row - 6}">'
                     f'<title>kept {s["kept"]}</title></rect>'
                     f'<rect class="dropped" x="{130 + kept_w:.1f}" y="{y + 3}" width="{dropped_w:.1f}" '
                     f'height="{row - 6}"><title>dropped {s["in"] - s["kept"]}</title></rect>'
                     f'<text x="{134 + kept_w + dropped_w:.1f}" y="{y + 15}">{s["in"]} \u2192 {s["kept"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _funnel_table(stages: list[dict]) -> str:
    rows = ["<table><tr><th>stage</th><th>in</th><th>kept</th><th>dropped</th><th>by reason</th></tr>"]
    for s in stages:
        reasons = ", ".join(f"{html.escape(r)}: {n}" for r, n in s["dropped"].items()) or "-"
        rows.append(f'<tr class="stage" data-stage="{html.escape(s["stage"])}" data-in="{s["in"]}" '
                    f'data-kept="{s["kept"]}"><td>{html.escape(s["stage"])}</td><td>{s["in"]}</td><td>{s["kept"]}</td>'
                    f'<td>{s["in"] - s["kept"]}</td><td style="text-align:left">{reasons}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def render_report(summary: dict, words: np.ndarray, scores: np.ndarray | None, clusters: dict[int, int] | None) -> str:
    sections = [f"<h1>Curation report</h1><p>{summary['in']} documents in, {summary['kept']} kept.</p>",
                "<h2>Drop funnel</h2>", _funnel_svg(summary["stages"]), _funnel_table(summary["stages"]),
                f"<h2>Document length (words), {len(words)} final documents</h2>",
                _histogram_svg("length_words", length_histogram(words), "words per document")]
    if scores is not None:
        sections += ["<h2>Quality score, final documents</h2>",
                     _histogram_svg("quality_score", score_histogram(scores), "P(high quality)")]
    sections.append("<h2>Near-duplicate clusters</h2>")
    if clusters:
        bins = [(str(size), n) for size, n in sorted(clusters.items())]
        sections += [f"<p>{sum(clusters.values())} clusters of two or more documents.</p>",
                     _histogram_svg("cluster_size", bins, "documents per cluster")]
    else:
        sections.append("<p>No near-duplicate clusters were found (or near-dedup did not run).</p>")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Curation report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(sections)}</body></html>\n")


def write_report(layout: RunLayout, summary: dict) -> Location:
    """Render stats/report.html from the curation summary and the committed output; returns its path."""
    words, scores = _final_columns(layout)
    path = layout.stats_dir / REPORT_FILE
    write_text(path, render_report(summary, words, scores, cluster_sizes(layout)))
    return path

