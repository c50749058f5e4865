"""Storage errors are not drops: reads from an S3 server (moto's, on loopback) behind a proxy that fails chosen requests
(503 SlowDown, 500, 403, a connection reset mid-body). A few failures are retried with backoff and read as the local
copies read; a file the storage keeps failing raises StorageReadError naming it, with no drop row; a malformed file
is still a named drop."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import struct
import threading
from collections import Counter

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from athanor import storage
from athanor.config import DataConfig
from athanor.pipelines.read import FILE_LEVEL_OFFSET, StorageReadError, file_rows, read_crawl

BUCKET = "flaky"
ERROR_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


class FaultyProxy:
    """An HTTP proxy in front of the S3 server that answers chosen requests for a key with an error of its own.

    `script(key, modes, then)`: the next requests (GET unless `method` says otherwise) for that key get `modes` in
    turn, every later one gets `then`; a mode is an HTTP status (an S3 XML error body), "reset" (the real response
    cut off half-way through its body by a TCP reset) or None (passed through)."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.scripts: dict[tuple[str, str], tuple[list, object]] = {}
        self.failed: Counter = Counter()  # (method, key) -> requests answered with a fault
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                proxy.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def script(self, key: str, modes: list, then: object = None, method: str = "GET") -> None:
        with self.lock:
            self.scripts[(method, f"/{BUCKET}/{key}")] = (list(modes), then)

    def reset(self) -> None:
        with self.lock:
            self.scripts.clear()
            self.failed.clear()

    def _mode(self, method: str, path: str):
        with self.lock:
            modes, then = self.scripts.get((method, path), ([], None))
            mode = modes.pop(0) if modes else then
            if mode is not None:
                self.failed[(method, path.removeprefix(f"/{BUCKET}/"))] += 1
            return mode

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        mode = self._mode(req.command, req.path.split("?", 1)[0])
        if isinstance(mode, int):
            error = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{ERROR_CODES[mode]}</Code>"
                     "<Message>injected by the test proxy</Message></Error>").encode()
            req.send_response(mode)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(error)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(error)
            return
        upstream = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = {k: v for k, v in req.headers.items() if k.lower() != "connection"}
        upstream.request(req.command, req.path, body=body or None, headers=headers)
        resp = upstream.getresponse()
        payload = resp.read()
        upstream.close()
        req.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                req.send_header(k, v)
        length = resp.getheader("Content-Length", "0") if req.command == "HEAD" else str(len(payload))
        req.send_header("Content-Length", length)
        req.end_headers()
        if req.command == "HEAD":
            return
        if mode == "reset":  # the headers promise the whole body; half of it comes, then a TCP reset
            req.wfile.write(payload[: len(payload) // 2])
            req.wfile.flush()
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req.close_connection = True
            req.connection.close()
            return
        req.wfile.write(payload)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def inputs(data_dir, tmp_path_factory):
    """The real crawl, the Lee articles as JSONL and Parquet, and three malformed files made from real ones."""
    folder = tmp_path_factory.mktemp("inputs")
    articles = (data_dir / "quality" / "high" / "lee_background.txt").read_text().strip("\n").split("\n")
    jsonl = folder / "lee.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(articles)))
    parquet = folder / "lee.parquet"
    pq.write_table(pa.table({"text": articles, "url": [f"https://lee.example/{i}" for i in range(len(articles))]}),
                   parquet, row_group_size=100)
    warc = data_dir / "warc" / "iana.warc.gz"
    cut = folder / "cut.warc.gz"  # a crawl whose file ends inside a record
    cut.write_bytes(warc.read_bytes()[: warc.stat().st_size // 2])
    not_parquet = folder / "crawl.parquet"  # a WARC under a Parquet name
    not_parquet.write_bytes(warc.read_bytes())
    return {"warc/iana.warc.gz": warc, "jsonl/lee.jsonl": jsonl, "parquet/lee.parquet": parquet,
            "warc/cut.warc.gz": cut, "warc/example.arc": data_dir / "warc" / "pywb_samples" / "example.arc",
            "parquet/crawl.parquet": not_parquet}


@pytest.fixture(scope="module")
def proxy(s3_endpoint, inputs):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for key, path in inputs.items():
        s3.upload_file(str(path), BUCKET, key)
    proxy = FaultyProxy(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def faults(proxy):
    proxy.reset()
    yield proxy
    proxy.reset()


def _kind(key: str) -> str:
    return key.split("/", 1)[0]


def _documents(rows) -> Counter:
    """What a reader read, independent of where: file name, offset, URL, payload, reason."""
    return Counter((r["source"].rsplit("/", 1)[1], r["offset"], r["url"], r["html"], r["text"], r["drop_reason"])
                   for r in rows)


def test_transient_errors_are_retried_and_read_as_local(faults, inputs):
    data = DataConfig(s3_endpoint_override=faults.endpoint)
    faults.script("warc/iana.warc.gz", [503, 503])  # SlowDown twice on the first range read
    faults.script("warc/iana.warc.gz", [503], method="HEAD")  # and once on opening
    faults.script("jsonl/lee.jsonl", ["reset"])  # the connection dropped mid-body
    faults.script("parquet/lee.parquet", [None, 500])  # an internal error after the footer
    assert storage.S3_RETRY_ATTEMPTS > 3
    for key in ("warc/iana.warc.gz", "jsonl/lee.jsonl", "parquet/lee.parquet"):
        remote = list(file_rows(_kind(key), f"s3://{BUCKET}/{key}", data))
        assert _documents(remote) == _documents(file_rows(_kind(key), str(inputs[key]), data)), key
        assert all(r["offset"] != FILE_LEVEL_OFFSET for r in remote), key
    assert faults.failed == {("GET", "warc/iana.warc.gz"): 2, ("HEAD", "warc/iana.warc.gz"): 1,
                             ("GET", "jsonl/lee.jsonl"): 1, ("GET", "parquet/lee.parquet"): 1}


@pytest.mark.parametrize("key, modes, then, records_before", [
    ("warc/iana.warc.gz", [], 503, False),  # every request fails: no record at all
    ("warc/iana.warc.gz", [None] * 4, "reset", True),  # fails after some records: not warc_truncated
    ("jsonl/lee.jsonl", [], 403, False),  # access denied is not retried by the client
    ("parquet/lee.parquet", [None], 500, False),  # the footer is read, then the row groups fail: not parquet_invalid
])
def test_storage_that_keeps_failing_fails_the_read_naming_the_file(faults, monkeypatch, key, modes, then,
                                                                   records_before):
    monkeypatch.setattr(storage, "S3_RETRY_ATTEMPTS", 2)  # one retry, so giving up takes a second, not a minute
    faults.script(key, modes, then)
    uri = f"s3://{BUCKET}/{key}"
    rows = []
    with pytest.raises(StorageReadError, match=re.escape(f"reading {uri} failed in storage")) as failure:
        rows.extend(file_rows(_kind(key), uri, DataConfig(s3_endpoint_override=faults.endpoint)))
    assert failure.value.uri == uri and not isinstance(failure.value, OSError)
    assert all(r["offset"] != FILE_LEVEL_OFFSET for r in rows)  # records before the failure, no file-level drop
    assert bool(rows) == records_before
    assert faults.failed[("GET", key)] == (1 if then == 403 else 2)  # 403: no retry; else one retry


def test_access_denied_on_open_fails_the_read(faults):
    faults.script("parquet/lee.parquet", [], 403, method="HEAD")
    with pytest.raises(StorageReadError, match="lee.parquet"):
        list(file_rows("parquet", f"s3://{BUCKET}/parquet/lee.parquet", DataConfig(s3_endpoint_override=faults.endpoint)))


def test_malformed_files_stay_named_drops_over_a_flaky_store(faults):
    data = DataConfig(s3_endpoint_override=faults.endpoint)
    for key, reason in (("warc/cut.warc.gz", "warc_truncated"), ("warc/example.arc", "warc_invalid"),
                        ("parquet/crawl.parquet", "parquet_invalid")):
        faults.script(key, [503])  # a transient error on top: retried, then the file's own fault shows
        rows = list(file_rows(_kind(key), f"s3://{BUCKET}/{key}", data))
        assert rows[-1]["drop_reason"] == reason and rows[-1]["offset"] == FILE_LEVEL_OFFSET, key
        assert faults.failed[("GET", key)] == 1, key
    missing = list(file_rows("warc", f"s3://{BUCKET}/warc/missing.warc.gz", data))
    assert [r["drop_reason"] for r in missing] == ["unreadable_file"]  # listed, then gone: stays gone on a rerun


def test_read_crawl_on_ray_fails_instead_of_dropping(faults, ray_local):
    """On Ray the error reaches the driver and fails the dataset (and so the curation stage, before its commit)."""
    faults.script("jsonl/lee.jsonl", [], 403)  # not retried by the client, so the task fails at once
    data = DataConfig(jsonl_files=[f"s3://{BUCKET}/jsonl/lee.jsonl"], s3_endpoint_override=faults.endpoint)
    with pytest.raises(StorageReadError, match=re.escape(f"s3://{BUCKET}/jsonl/lee.jsonl")):
        read_crawl(data).take_all()
