"""The crawl reader on the real sample data: provenance, record-type drops, pywb's odd files, a truncated WARC."""

from __future__ import annotations

import zlib
from collections import Counter

from athanor.config import load_config
from athanor.pipelines.read import FILE_LEVEL_OFFSET, doc_id_for, html_file_rows, read_crawl, warc_rows


def test_iana_warc_rows_keep_provenance_and_name_every_drop(data_dir):
    path = str(data_dir / "warc" / "iana.warc.gz")
    rows = list(warc_rows(path))
    reasons = Counter(r["drop_reason"] for r in rows)
    # 343 records in this crawl: requests/warcinfo, revisits and non-HTML responses are named drops.
    assert sum(reasons.values()) == 343
    assert reasons["warc_not_response"] == 172 and reasons["warc_revisit"] == 123
    assert reasons[None] > 0 and reasons["warc_not_html"] > 0
    assert len({r["doc_id"] for r in rows}) == len(rows)

    raw = (data_dir / "warc" / "iana.warc.gz").read_bytes()
    for row in (r for r in rows if r["drop_reason"] is None):
        assert row["url"].startswith("http") and row["html"].lstrip()[:1] == b"<"
        assert row["doc_id"] == doc_id_for(path, row["offset"])
        # The offset is where this record's gzip member starts: decompressing from there gives its WARC header.
        member = zlib.decompressobj(31).decompress(raw[row["offset"] :], 4096)
        assert member.startswith(b"WARC/1.0") and row["url"].encode() in member


def test_max_docs_caps_html_documents_per_warc(data_dir):
    rows = list(warc_rows(str(data_dir / "warc" / "iana.warc.gz"), max_docs=3))
    assert sum(r["drop_reason"] is None for r in rows) == 3


def test_truncated_warc_keeps_records_before_the_break(data_dir, tmp_path):
    whole = (data_dir / "warc" / "iana.warc.gz").read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    full = list(warc_rows(str(data_dir / "warc" / "iana.warc.gz")))
    rows = list(warc_rows(str(cut)))

    assert rows[-1]["drop_reason"] == "warc_truncated" and rows[-1]["offset"] == FILE_LEVEL_OFFSET
    before = rows[:-1]
    assert len(before) > 10
    same_start = full[: len(before)]
    assert [(r["offset"], r["drop_reason"]) for r in before] == [(r["offset"], r["drop_reason"]) for r in same_start]


def test_pywb_odd_files_give_rows_or_named_quarantine(data_dir):
    by_file = {p.name: list(warc_rows(str(p))) for p in sorted((data_dir / "warc" / "pywb_samples").iterdir())}
    known = {None, "warc_not_response", "warc_revisit", "warc_not_html", "empty_html", "warc_invalid", "warc_truncated"}
    for name, rows in by_file.items():
        assert rows, name
        assert {r["drop_reason"] for r in rows} <= known, name
    # ARC is not WARC: one named quarantine entry, no traceback.
    assert [r["drop_reason"] for r in by_file["example.arc"]] == ["warc_invalid"]
    # A revisit-only file yields its revisit as a named drop.
    assert "warc_revisit" in {r["drop_reason"] for r in by_file["example-url-agnostic-revisit.warc.gz"]}
    # A WARC with a malformed record at its end keeps what came before it.
    reasons = [r["drop_reason"] for r in by_file["example.warc"]]
    assert reasons[-1] == "warc_invalid" and None in reasons[:-1]


def test_empty_html_file_is_a_named_drop(data_dir, tmp_path):
    empty = tmp_path / "empty.html"
    empty.write_bytes(b"   \n")
    assert [r["drop_reason"] for r in html_file_rows(str(empty))] == ["empty_html"]
    page = next(iter(sorted((data_dir / "html" / "news").iterdir())))
    (row,) = html_file_rows(str(page))
    assert row["drop_reason"] is None and row["offset"] == 0 and row["url"] is None and row["html"] == page.read_bytes()


def test_read_crawl_on_ray_is_deterministic_and_capped(data_dir, ray_local):
    cfg = load_config(None, [f"data.html_dirs=[{data_dir / 'html' / 'news'}]",
                             f"data.warc_files=[{data_dir / 'warc' / 'iana.warc.gz'}]", "data.max_docs_per_source=10"])
    first = read_crawl(cfg.data).select_columns(["doc_id", "source", "drop_reason"]).take_all()
    second = read_crawl(cfg.data).select_columns(["doc_id"]).take_all()
    assert sorted(r["doc_id"] for r in first) == sorted(r["doc_id"] for r in second)
    kept = Counter(r["source"].endswith(".html") for r in first if r["drop_reason"] is None)
    assert kept[True] == 10 and kept[False] == 10  # 10 pages from the folder, 10 HTML responses from the WARC
