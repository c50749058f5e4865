"""End to end: real pages, the real WARC and three kinds of bad input through every stage, all accounted for."""

from __future__ import annotations

import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

from athanor.config import load_config
from athanor.layout import RunLayout
from athanor.pipelines.curate import run_curation

pytestmark = pytest.mark.slow  # one full curation run (quality training + seven Ray stages) shared by the module

STAGES = ["read", "extract", "langid", "heuristics", "exact_dedup", "near_dedup", "quality"]
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
    iana = (data_dir / "warc" / "iana.warc.gz").read_bytes()
    (tmp / "truncated.warc.gz").write_bytes(iana[: len(iana) // 3])
    shutil.copy(data_dir / "warc" / "pywb_samples" / "example.arc", tmp / "not_a.warc")

    high = ",".join(str(data_dir / "quality" / "high" / f) for f in ["lee_background.txt", "alice29.txt"])
    cfg = load_config(None, [
        f"data.html_dirs=[{news},{bad}]",
        f"data.warc_files=[{data_dir / 'warc' / 'iana.warc.gz'},{tmp / 'truncated.warc.gz'},{tmp / 'not_a.warc'}]",
        "data.max_docs_per_source=12",
        f"curate.quality.high=[{high}]",
        f"curate.quality.low=[{data_dir / 'quality' / 'low' / 'sms.txt'}]",
        f"run.workdir={tmp / 'run'}",
    ])
    layout = RunLayout.from_workdir(cfg.run.workdir)
    return cfg, layout, run_curation(cfg, layout)


def test_every_stage_conserves_documents(curated):
    _, layout, summary = curated
    assert [s["stage"] for s in summary["stages"]] == STAGES
    previous_kept = None
    for stats in summary["stages"]:
        assert stats["in"] == stats["kept"] + sum(stats["dropped"].values())
        if previous_kept is not None:
            assert stats["in"] == previous_kept
        previous_kept = stats["kept"]
        assert json.loads(layout.stats(stats["stage"]).read_text()) == stats
    assert summary["in"] == summary["kept"] + sum(summary["dropped"].values())
    assert json.loads(layout.stats("curation").read_text()) == summary


def test_bad_inputs_are_named_drops_and_quarantine_entries(curated):
    _, _, summary = curated
    read, extract = summary["stages"][0]["dropped"], summary["stages"][1]["dropped"]
    assert read["warc_truncated"] == 1 and read["warc_invalid"] == 1
    assert read["empty_html"] >= 1 and read["warc_revisit"] > 0 and read["warc_not_response"] > 0
    assert extract["binary_content"] == 1


def test_kept_and_dropped_rows_are_written_per_stage(curated):
    cfg, layout, summary = curated
    for stats in summary["stages"]:
        if stats["kept"]:
            assert pq.read_table(layout.curated(stats["stage"])).num_rows == stats["kept"]
        if stats["dropped"]:
            dropped = pq.read_table(layout.dropped / stats["stage"], columns=["doc_id", "drop_reason", "stage"])
            assert set(dropped["stage"].to_pylist()) == {stats["stage"]}
            assert {r: dropped["drop_reason"].to_pylist().count(r) for r in stats["dropped"]} == stats["dropped"]
    extracted = pq.read_table(layout.curated("extract"), columns=["source", "text"]).to_pylist()
    (cp1252,) = [r["text"] for r in extracted if r["source"].endswith("cp1252.html")]
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
    assert [s["in"] for s in summary["stages"]] == [2, 1, 0, 0, 0, 0]  # no quality stage when it is disabled
