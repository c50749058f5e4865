"""Read raw crawl input (HTML files and WARC records) into rows that carry their provenance.

One Ray read task per WARC file (and one per group of HTML files), each yielding small blocks as it goes, so memory
stays bounded by a block, not by a file. Every record leaves the reader as a row: a document (`html` bytes,
`drop_reason` None) or a named drop (`warc_not_response`, `warc_revisit`, `warc_not_html`, `empty_html`). A file that
breaks mid-way keeps the records read before the break and adds one file-level quarantine row (`warc_truncated`,
`warc_invalid`, `unreadable_file`) with `offset` -1, so a broken input is counted, never a traceback.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import ray
from fastwarc.warc import ArchiveIterator, WarcRecordType
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from athanor.config import DataConfig

SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("offset", pa.int64()),  # byte offset of the WARC record (gzip member) in its file; 0 for an HTML file
        ("url", pa.string()),
        ("html", pa.binary()),
        ("drop_reason", pa.string()),
    ]
)
FILE_LEVEL_OFFSET = -1  # quarantine rows describe a whole file, not one record
ROWS_PER_BLOCK = 256
HTML_FILES_PER_TASK = 32
HTML_SUFFIXES = (".html", ".htm")
HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")


def doc_id_for(source: str, offset: int) -> str:
    """Deterministic id from where the record lives, so reruns and reshuffles agree on identity."""
    return hashlib.sha1(f"{source}@{offset}".encode()).hexdigest()[:24]


def _row(source: str, offset: int, url: str | None = None, html: bytes | None = None, reason: str | None = None):
    return {"doc_id": doc_id_for(source, offset), "source": source, "offset": offset, "url": url, "html": html,
            "drop_reason": reason}


def html_file_rows(path: str) -> Iterator[dict]:
    try:
        payload = Path(path).read_bytes()
    except OSError:
        yield _row(path, FILE_LEVEL_OFFSET, reason="unreadable_file")
        return
    if not payload.strip():
        yield _row(path, 0, reason="empty_html")
    else:
        yield _row(path, 0, html=payload)


def _record_drop_reason(record) -> str | None:
    if record.record_type == WarcRecordType.revisit:
        return "warc_revisit"
    if record.record_type != WarcRecordType.response:
        return "warc_not_response"
    content_type = (record.http_content_type or "").lower() if record.is_http else ""
    if not content_type.startswith(HTML_CONTENT_TYPES):
        return "warc_not_html"
    return None


def warc_rows(path: str, max_docs: int | None = None) -> Iterator[dict]:
    """Rows for every record of one WARC file; stops after `max_docs` HTML documents."""
    kept = 0
    try:
        for record in ArchiveIterator(path, parse_http=True):
            payload = record.reader.read()
            if len(payload) < record.content_length:  # the file ended inside this record
                yield _row(path, FILE_LEVEL_OFFSET, reason="warc_truncated")
                return
            url = record.headers.get("WARC-Target-URI")
            reason = _record_drop_reason(record)
            if reason is None and not payload.strip():
                reason = "empty_html"
            yield _row(path, record.stream_pos, url, payload if reason is None else None, reason)
            if reason is None:
                kept += 1
                if kept == max_docs:
                    return
    except OSError:  # not a WARC (e.g. an ARC file), a corrupt gzip member, or a malformed header
        yield _row(path, FILE_LEVEL_OFFSET, reason="warc_invalid")


def _blocks(rows: Iterator[dict]) -> Iterator[pa.Table]:
    buffer = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= ROWS_PER_BLOCK:
            yield pa.Table.from_pylist(buffer, schema=SCHEMA)
            buffer = []
    if buffer:
        yield pa.Table.from_pylist(buffer, schema=SCHEMA)


def list_html_files(data: DataConfig) -> list[str]:
    files = []
    for folder in data.html_dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"data.html_dirs: no such folder: {folder}")
        found = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in HTML_SUFFIXES)
        files.extend(found[: data.max_docs_per_source])
    return files


def list_warc_files(data: DataConfig) -> list[str]:
    files = []
    for pattern in data.warc_files:
        found = sorted(glob.glob(pattern))
        if not found:
            raise FileNotFoundError(f"data.warc_files: nothing matches {pattern}")
        files.extend(found)
    return files


class CrawlDatasource(Datasource):
    """HTML folders and WARC files as one Ray Data source."""

    def __init__(self, data: DataConfig):
        super().__init__()
        self._html = list_html_files(data)
        self._warcs = list_warc_files(data)
        self._max_docs = data.max_docs_per_source

    def estimate_inmemory_data_size(self) -> int:
        return sum(Path(p).stat().st_size for p in self._html + self._warcs)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for path in self._warcs:
            tasks.append(self._task([path], lambda p=path, n=self._max_docs: _blocks(warc_rows(p, n))))
        for i in range(0, len(self._html), HTML_FILES_PER_TASK):
            group = self._html[i : i + HTML_FILES_PER_TASK]
            tasks.append(self._task(group, lambda g=group: _blocks(r for p in g for r in html_file_rows(p))))
        return tasks

    @staticmethod
    def _task(paths: list[str], read_fn) -> ReadTask:
        size = sum(Path(p).stat().st_size for p in paths)
        meta = BlockMetadata(num_rows=None, size_bytes=size, input_files=paths, exec_stats=None)
        return ReadTask(read_fn, meta, schema=SCHEMA)


def read_crawl(data: DataConfig) -> ray.data.Dataset:
    """All records of the configured inputs, marked kept or dropped (see the module docstring)."""
    if not data.html_dirs and not data.warc_files:
        raise ValueError("no input: set data.html_dirs and/or data.warc_files")
    return ray.data.read_datasource(CrawlDatasource(data))
