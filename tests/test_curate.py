"""End to end: real pages, the real WARC and three kinds of bad input through every stage, all accounted for."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from athanor.config import load_config
from athanor.layout import RunLayout
from athanor.pipelines.commit import SHARD_MARKERS, STAGE_MARKER
from athanor.pipelines.curate import FILTER, FINAL, curation_stages, reported_stages, run_curation

pytestmark = pytest.mark.slow  # one full curation run (quality training + every Ray stage) shared by the module

CP1252_PAGE = "06ed0a833361190536a4f61888354e07dccaa501bd9a1c0f1c545533bde1650b.html"


@pytest.fixture(scope="module")
def curated(data_dir, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("curate")
    news = data_dir / "html" / "news"
    bad = tmp / "bad_html"
    bad.mkdir()
    (bad / "empty.html").write_bytes(b"")
    page = (news / CP1252_PAGE).read_bytes()
    (bad / "cp1252.html").write_bytes(page.decode("utf-8").encode("cp1252", errors="xmlcharrefreplace"))
    (bad / "binary.html").write_bytes(gzip.compress(page))
    near_copy = page.replace(b"six years longer", b"six years more")  # one word changed: a near-duplicate
    assert near_copy != page
    (bad / "near_copy.html").write_bytes(near_copy)
    iana = (data_dir / "warc" / "iana.warc.gz").read_bytes()
    (tmp / "truncated.warc.gz").write_bytes(iana[: len(iana) // 3])
    shutil.copy(data_dir / "warc" / "pywb_samples" / "example.arc", tmp / "not_a.warc")

    high = ",".join(str(data_dir / "quality" / "high" / f) for f in ["lee_background.txt", "alice29.txt"])
    cfg = load_config(None, [
        f"data.html_dirs=[{news},{bad}]",
        f"data.warc_files=[{data_dir / 'warc' / 'iana.warc.gz'},{tmp / 'truncated.warc.gz'},{tmp / 'not_a.warc'}]",
        "data.max_docs_per_source=12",
        "curate.docs_per_shard=16",  # several doc_id ranges per stage, to resume from
        f"curate.quality.high=[{high}]",
        f"curate.quality.low=[{data_dir / 'quality' / 'low' / 'sms.txt'}]",
        f"run.workdir={tmp / 'run'}",
    ])
    layout = RunLayout.from_workdir(cfg.run.workdir)
    return cfg, layout, run_curation(cfg, layout)


def _digests(layout: RunLayout) -> dict[str, str]:
    files = sorted(p for d in ("curated", "stats") for p in (layout.root / d).rglob("*") if p.is_file())
    return {str(p.relative_to(layout.root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if p.name != "timings.json"}


def test_every_stage_conserves_documents(curated):
    cfg, layout, summary = curated
    ray_stages = [name for name, _ in curation_stages(cfg, layout)]
    assert ray_stages == [FILTER, "decontam", "dedup", "quality"]  # the row-wise stages run fused, so do both dedups
    assert [s["stage"] for s in summary["stages"]] == [s for name in ray_stages for s in reported_stages(name, cfg)]
    assert [s["stage"] for s in summary["stages"]][1:8] == ["extract", "url_filter", "langid", "heuristics", "c4",
                                                           "fineweb", "pii"]  # toxicity is off by default
    assert [s["stage"] for s in summary["stages"]][8:] == ["decontam", "exact_dedup", "near_dedup", "quality"]
    previous_kept = None
    for stats in summary["stages"]:
        assert stats["in"] == stats["kept"] + sum(stats["dropped"].values())
        if previous_kept is not None:
            assert stats["in"] == previous_kept
        previous_kept = stats["kept"]
        assert json.loads(layout.stats(stats["stage"]).read_text()) == stats
    assert summary["in"] == summary["kept"] + sum(summary["dropped"].values())
    assert json.loads(layout.stats("curation").read_text()) == {k: v for k, v in summary.items() if k != "seconds"}
    assert set(json.loads(layout.stats("timings").read_text())) == set(ray_stages) | {FINAL}


def test_bad_inputs_are_named_drops_and_quarantine_entries(curated):
    _, _, summary = curated
    read, extract = summary["stages"][0]["dropped"], summary["stages"][1]["dropped"]
    assert read["warc_truncated"] == 1 and read["warc_invalid"] == 1
    assert read["empty_html"] >= 1 and read["warc_revisit"] > 0 and read["warc_not_response"] > 0
    assert extract["binary_content"] == 1


def test_kept_and_dropped_rows_are_written_per_stage(curated):
    """One folder per Ray stage; the fused filter stage's folders hold what the reader and the seven row-wise stages
    kept and dropped (the reader's drops included, raw HTML not)."""
    cfg, layout, summary = curated
    by_name = {s["stage"]: s for s in summary["stages"]}
    for name, _ in curation_stages(cfg, layout):
        parts = [by_name[s] for s in reported_stages(name, cfg)]
        kept, dropped_counts = parts[-1]["kept"], {r: n for s in parts for r, n in s["dropped"].items()}
        if kept:
            assert pq.read_table(layout.curated(name)).num_rows == kept
        if dropped_counts:
            dropped = pq.read_table(layout.dropped / name, columns=["doc_id", "drop_reason", "stage"])
            assert set(dropped["stage"].to_pylist()) == {name}
            assert {r: dropped["drop_reason"].to_pylist().count(r) for r in dropped_counts} == dropped_counts
    filtered = pq.read_table(layout.curated(FILTER), columns=["source", "text", "lang", "word_count", "pii_ips"])
    assert filtered.num_rows and None not in filtered["pii_ips"].to_pylist()  # kept rows passed every filter
    assert "html" not in pq.read_schema(next((layout.dropped / FILTER).glob("*.parquet"))).names
    blank = pq.read_table(layout.dropped / FILTER, columns=["drop_reason", "lang", "word_count"]).to_pylist()
    assert all(r["lang"] is None for r in blank if r["drop_reason"] == "binary_content")  # no later signals
    assert all(r["lang"] and r["word_count"] is None for r in blank if r["drop_reason"] == "lang_low_score")
    rows = [*filtered.to_pylist(), *pq.read_table(layout.dropped / FILTER, columns=["source", "text"]).to_pylist()]
    (cp1252,) = [r["text"] for r in rows if r["source"].endswith("cp1252.html")]
    assert "\u2019" in cp1252 or "\u201c" in cp1252  # decoded by detection, not mangled as UTF-8


def test_final_output_is_sorted_with_provenance(curated):
    _, layout, summary = curated
    files = sorted(layout.curated("final").glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == summary["kept"] > 10
    ids = [r["doc_id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # file order then row order is doc_id order
    for col in ("doc_id", "text", "url", "source", "lang", "quality_score"):
        assert col in rows[0]
    assert all(r["lang"] == "en" and r["text"] and r["quality_score"] >= 0.5 for r in rows)
    assert any(r["url"] and r["url"].startswith("http") for r in rows)  # WARC documents keep their URL
    assert str(pq.read_schema(files[0]).field("doc_id").type) == "string"


def test_a_run_where_everything_is_dropped_still_finishes(data_dir, tmp_path, ray_local):
    bad = tmp_path / "bad_html"
    bad.mkdir()
    (bad / "empty.html").write_bytes(b"")
    page = sorted((data_dir / "html" / "news").iterdir())[0]
    (bad / "binary.html").write_bytes(gzip.compress(page.read_bytes()))
    overrides = [f"data.html_dirs=[{bad}]", "curate.quality.enabled=false", f"run.workdir={tmp_path / 'run'}"]
    cfg = load_config(None, overrides)
    summary = run_curation(cfg, RunLayout.from_workdir(cfg.run.workdir))
    assert summary["in"] == 2 and summary["kept"] == 0
    assert summary["dropped"] == {"empty_html": 1, "binary_content": 1}
    ins = [s["in"] for s in summary["stages"]]
    assert ins[:2] == [2, 1] and not any(ins[2:]) and "quality" not in [s["stage"] for s in summary["stages"]]


def _svg_counts(page: str, name: str) -> tuple[int, list[int]]:
    (svg,) = re.findall(rf'<svg class="histogram" data-name="{name}" data-total="(\d+)"(.*?)</svg>', page, re.S)
    return int(svg[0]), [int(n) for n in re.findall(r'data-count="(\d+)"', svg[1])]


def test_report_shows_funnel_histograms_and_clusters(curated):
    _, layout, summary = curated
    page = (layout.stats_dir / "report.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    for stats in summary["stages"]:
        assert 'data-stage="{stage}" data-in="{in}" data-kept="{kept}"'.format(**stats) in page
        assert all(f"{reason}: {n}" in page for reason, n in stats["dropped"].items())
    for name in ("length_words", "quality_score"):
        total, bars = _svg_counts(page, name)
        assert total == sum(bars) == summary["kept"]
    near = {s["stage"]: s for s in summary["stages"]}["near_dedup"]["dropped"].get("near_duplicate", 0)
    assert near >= 1  # the one-word copy of a real page
    clusters, bars = _svg_counts(page, "cluster_size")
    sizes = [int(s) for s in re.findall(r'data-bin="(\d+)"', page.split('data-name="cluster_size"')[1])]
    assert clusters == sum(bars) >= 1 and sum((size - 1) * n for size, n in zip(sizes, bars)) == near


def test_a_rerun_skips_committed_stages_and_writes_the_same_bytes(curated):
    cfg, layout, _ = curated
    before = _digests(layout)
    markers = {p: p.stat().st_mtime_ns for p in layout.root.glob(f"curated/*/{STAGE_MARKER}")}
    run_curation(cfg, layout)
    assert _digests(layout) == before
    assert {p: p.stat().st_mtime_ns for p in markers} == markers


def test_a_half_committed_stage_redoes_only_its_missing_ranges(curated):
    """The state a kill leaves: quality has some ranges committed, final none; the rest is done."""
    cfg, layout, _ = curated
    before = _digests(layout)
    quality = layout.curated("quality")
    shard_markers = sorted((quality / SHARD_MARKERS).glob("*.json"))
    assert len(shard_markers) >= 2
    for stage in ("quality", FINAL):
        (layout.curated(stage) / STAGE_MARKER).unlink()
    shutil.rmtree(layout.curated(FINAL))
    for marker in shard_markers[::2]:
        marker.unlink()
        (quality / marker.with_suffix(".parquet").name).unlink(missing_ok=True)
    kept = {p: p.stat().st_mtime_ns for p in shard_markers[1::2]}
    run_curation(cfg, layout)
    assert _digests(layout) == before
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
