"""The readers on the real sample data: provenance, record-type drops, pywb's odd files, JSONL and Parquet records,
and bad input (truncated, empty, NUL bytes, not UTF-8, a 100 MB page, a Parquet file with the wrong schema)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from athanor.config import DataConfig, ExtractConfig, load_config
from athanor.pipelines.extract import extract_batch
from athanor.pipelines.read import (
    FILE_LEVEL_OFFSET,
    SCHEMA,
    doc_id_for,
    file_rows,
    html_file_rows,
    read_crawl,
    warc_rows,
)
from athanor.pipelines.stats import kept_rows

HUNDRED_MB = 100 * 2**20


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
    rows = list(file_rows("warc", str(data_dir / "warc" / "iana.warc.gz"), DataConfig(max_docs_per_source=3)))
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


def lee_articles(data_dir) -> list[str]:
    """The 300 real news articles of the Lee background corpus, one per line."""
    return (data_dir / "quality" / "high" / "lee_background.txt").read_text().strip("\n").split("\n")


def padded_page(data_dir, size: int) -> bytes:
    """A real news page grown to `size` bytes with real article text repeated inside its body."""
    page = sorted((data_dir / "html" / "news").iterdir())[0].read_bytes()
    filler = " ".join(lee_articles(data_dir)).encode()
    at = page.rfind(b"</body>")
    padding = (filler * (size // len(filler) + 1))[: size - len(page)]
    return page[:at] + padding + page[at:]


def test_jsonl_and_parquet_records_keep_text_and_provenance(data_dir, tmp_path):
    articles = lee_articles(data_dir)
    assert len(articles) == 300
    jsonl = tmp_path / "lee.jsonl.gz"  # compressed: the reader detects it from the name
    with gzip.open(jsonl, "wt") as f:
        for i, text in enumerate(articles):
            f.write(json.dumps({"id": f"lee-{i}", "text": text, "url": f"https://lee.example/{i}"}) + "\n")
    parquet = tmp_path / "lee.parquet"
    pq.write_table(pa.table({"text": articles, "extra": list(range(300))}), parquet, row_group_size=64)

    from_jsonl = list(file_rows("jsonl", str(jsonl)))
    from_parquet = list(file_rows("parquet", str(parquet)))
    for rows in (from_jsonl, from_parquet):
        assert [r["text"] for r in rows] == articles
        assert [r["offset"] for r in rows] == list(range(300))
        assert all(r["drop_reason"] is None and r["html"] is None for r in rows)
        assert len({r["doc_id"] for r in rows}) == 300
    assert [r["url"] for r in from_jsonl] == [f"https://lee.example/{i}" for i in range(300)]
    assert from_jsonl[7]["doc_id"] == doc_id_for(str(jsonl), 7, "lee-7")  # the record's own id, not its line
    assert all(r["url"] is None for r in from_parquet)  # no url column: no URL
    assert from_parquet[7]["doc_id"] == doc_id_for(str(parquet), 7)
    assert [r["doc_id"] for r in file_rows("parquet", str(parquet))] == [r["doc_id"] for r in from_parquet]

    # Extraction leaves text records alone and still extracts the HTML ones in the same batch.
    page = sorted((data_dir / "html" / "news").iterdir())[0]
    batch = pa.Table.from_pylist(from_jsonl[:3] + list(html_file_rows(str(page))), schema=SCHEMA)
    out = extract_batch(batch.drop_columns(["drop_reason"]), ExtractConfig()).to_pylist()
    assert [r["text"] for r in out[:3]] == articles[:3]
    assert out[3]["drop_reason"] is None and len(out[3]["text"]) > 500 and "html" not in out[3]


def test_bad_records_in_jsonl_are_named_drops(data_dir, tmp_path):
    articles = lee_articles(data_dir)
    lines = [
        json.dumps({"text": articles[0]}).encode(),
        json.dumps({"text": articles[1][:50] + "\x00" + articles[1][50:]}).encode(),  # a NUL in the text
        json.dumps({"text": articles[2] + " (caf\xe9)"}, ensure_ascii=False).encode("latin-1"),  # not UTF-8
        json.dumps({"text": articles[3]}).encode()[:-40],  # cut short: not JSON
        json.dumps({"body": articles[4]}).encode(),  # no text field
        json.dumps({"text": "  "}).encode(),
        b"",  # blank lines are not records, but they count as lines
        json.dumps({"text": articles[5]}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = list(file_rows("jsonl", str(path)))
    assert [(r["offset"], r["drop_reason"]) for r in rows] == [
        (0, None), (1, "binary_content"), (2, "undecodable"), (3, "bad_json"), (4, "missing_text"),
        (5, "empty_text"), (7, None)]
    assert rows[-1]["text"] == articles[5]


def test_a_100mb_page_is_dropped_as_too_large_in_every_format(data_dir, tmp_path):
    big = padded_page(data_dir, HUNDRED_MB)
    articles = lee_articles(data_dir)
    html = tmp_path / "big.html"
    html.write_bytes(big)
    jsonl = tmp_path / "big.jsonl"
    with jsonl.open("wb") as f:
        f.write(json.dumps({"text": articles[0]}).encode() + b"\n")
        f.write(json.dumps({"text": big.decode("utf-8", "replace")}).encode() + b"\n")
        f.write(json.dumps({"text": articles[1]}).encode() + b"\n")
    # An uncompressed WARC: one 100 MB HTML response, then every record of the real crawl.
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + big
    header = (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: https://big.example/\r\nWARC-Record-ID: "
              b"<urn:uuid:0e3d6f2a-7c1b-4e55-9a55-2b1f0f6c9d10>\r\nWARC-Date: 2014-01-03T03:03:21Z\r\n"
              b"Content-Type: application/http; msgtype=response\r\nContent-Length: %d\r\n\r\n" % len(http))
    crawl = gzip.decompress((data_dir / "warc" / "iana.warc.gz").read_bytes())
    warc = tmp_path / "big.warc"
    warc.write_bytes(header + http + b"\r\n\r\n" + crawl)
    try:
        assert [r["drop_reason"] for r in file_rows("html", str(html))] == ["too_large"]
        assert [(r["offset"], r["drop_reason"]) for r in file_rows("jsonl", str(jsonl))] == [
            (0, None), (1, "too_large"), (2, None)]
        rows = list(file_rows("warc", str(warc)))
        assert (rows[0]["url"], rows[0]["drop_reason"], rows[0]["html"]) == ("https://big.example/", "too_large", None)
        # Skipping the big record's payload lands exactly on the next record: the whole real crawl follows.
        normal = Counter(r["drop_reason"] for r in warc_rows(str(data_dir / "warc" / "iana.warc.gz")))
        assert Counter(r["drop_reason"] for r in rows[1:]) == normal
        raised = DataConfig(max_record_bytes=2 * HUNDRED_MB)
        assert [r["drop_reason"] for r in file_rows("html", str(html), raised)] == [None]
    finally:
        for path in (html, jsonl, warc):
            path.unlink()


def test_empty_and_wrong_schema_files_are_one_counted_entry_each(data_dir, tmp_path):
    for name in ("empty.jsonl", "empty.parquet", "empty.warc.gz"):
        (tmp_path / name).write_bytes(b"")
    articles = lee_articles(data_dir)
    pq.write_table(pa.table({"body": articles}), tmp_path / "wrong.parquet")  # no `text` column
    pq.write_table(pa.table({"text": list(range(300))}), tmp_path / "numbers.parquet")  # `text` is not text
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "no_rows.parquet")
    (tmp_path / "not.parquet").write_bytes(articles[0].encode())

    def reasons(kind, name):
        rows = list(file_rows(kind, str(tmp_path / name)))
        assert all(r["offset"] == FILE_LEVEL_OFFSET for r in rows)
        return [r["drop_reason"] for r in rows]

    assert reasons("jsonl", "empty.jsonl") == ["empty_file"]
    assert reasons("parquet", "empty.parquet") == ["empty_file"]
    assert reasons("warc", "empty.warc.gz") == ["empty_file"]
    assert reasons("parquet", "no_rows.parquet") == ["empty_file"]
    assert reasons("parquet", "wrong.parquet") == ["bad_schema"]
    assert reasons("parquet", "numbers.parquet") == ["bad_schema"]
    assert reasons("parquet", "not.parquet") == ["parquet_invalid"]
    assert reasons("html", "gone.html") == ["unreadable_file"]


def test_read_crawl_on_ray_counts_every_input_and_bad_file(data_dir, tmp_path, ray_local):
    pages = tmp_path / "pages"
    pages.mkdir()
    news = sorted((data_dir / "html" / "news").iterdir())[:40]
    for page in news:
        (pages / page.name).write_bytes(page.read_bytes())
    nul = news[0].read_bytes()
    (pages / "nul.html").write_bytes(nul[:100] + b"\x00" + nul[100:])  # binary-looking: extraction drops it
    (pages / "empty.html").write_bytes(b"")
    (pages / "big.html").write_bytes(padded_page(data_dir, HUNDRED_MB))  # dropped by its size, never read
    articles = lee_articles(data_dir)
    (tmp_path / "lee.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in articles[:150]))
    pq.write_table(pa.table({"text": articles[150:]}), tmp_path / "lee.parquet")
    pq.write_table(pa.table({"body": articles[:10]}), tmp_path / "wrong.parquet")
    (tmp_path / "empty.warc.gz").write_bytes(b"")
    cfg = load_config(None, [f"data.html_dirs=[{pages}]",
                             f"data.warc_files=[{data_dir / 'warc' / 'iana.warc.gz'}, {tmp_path / '*.warc.gz'}]",
                             f"data.jsonl_files=[{tmp_path / '*.jsonl'}]",
                             f"data.parquet_files=[{tmp_path / '*.parquet'}]"])
    try:
        read = read_crawl(cfg.data).materialize()
        reasons = Counter(r["drop_reason"] for r in read.select_columns(["drop_reason"]).take_all())
        assert reasons["bad_schema"] == 1 and reasons["empty_file"] == 1 and reasons["too_large"] == 1
        assert reasons["empty_html"] == 3  # empty.html and 2 records of the WARC
        assert reasons[None] == 41 + 18 + 300  # pages (NUL one included), the WARC's HTML responses, the articles
        assert read.count() == 43 + 343 + 300 + 2

        ids = sorted(r["doc_id"] for r in read.select_columns(["doc_id"]).take_all())
        assert sorted(r["doc_id"] for r in read_crawl(cfg.data).select_columns(["doc_id"]).take_all()) == ids
        extracted = read.map_batches(kept_rows, batch_format="pyarrow")
        extracted = extracted.map_batches(extract_batch, fn_kwargs={"cfg": ExtractConfig()}, batch_format="pyarrow")
        texts = extracted.select_columns(["text", "drop_reason"]).take_all()
        assert sorted(r["text"] for r in texts if r["text"] in set(articles)) == sorted(articles)
        assert Counter(r["drop_reason"] for r in texts)["binary_content"] == 1
    finally:
        (pages / "big.html").unlink()
