"""Read raw input (HTML folders, WARC, JSONL, Parquet, plain text; local or s3://) into rows that carry their provenance.

One Ray read task per WARC/JSONL/Parquet file (and one per group of HTML files), each streaming its file and yielding
blocks bounded in rows and bytes, so memory stays bounded by a block, not by a file. Every record leaves the reader as
a row: a document (`html` bytes, or `text` for JSONL/Parquet records, `drop_reason` None) or a named drop
(`warc_not_response`, `warc_revisit`, `warc_not_html`, `empty_html`, `empty_text`, `too_large`, `binary_content`,
`undecodable`, `bad_json`, `missing_text`). A malformed file keeps the records read before the break and adds one
file-level quarantine row (`warc_truncated`, `warc_invalid`, `parquet_invalid`, `unreadable_file`) with `offset` -1;
so do a file with no records (`empty_file`) and a Parquet file without the text column (`bad_schema`): a broken input
is counted, never a traceback.

A storage that fails to deliver a listed file (a network error, a 5xx still there after the S3 client's retries with
backoff, access denied) is not the file's fault: the reader raises `StorageReadError`, naming the file, which fails
the read task and so the stage, before anything of it is committed; a rerun reads the file again. Counting it as a
drop would lose the file for good, since a committed stage is never redone.

Files are opened through pyarrow filesystems; `s3://` goes to `data.s3_endpoint_override` or $AWS_ENDPOINT_URL, with
credentials taken from the AWS_* environment variables only (forwarded from the driver to the read tasks).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from fastwarc.warc import ArchiveIterator, WarcRecordType
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from athanor import storage
from athanor.config import DataConfig

SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        # WARC: byte offset of the record (gzip member); JSONL: 0-based line number; Parquet: row index; HTML file: 0
        ("offset", pa.int64()),
        ("url", pa.string()),
        ("html", pa.binary()),  # HTML inputs; None for records that come as text
        ("text", pa.string()),  # JSONL/Parquet inputs; extraction passes it on unchanged
        ("drop_reason", pa.string()),
    ]
)
FILE_LEVEL_OFFSET = -1  # quarantine rows describe a whole file, not one record
ROWS_PER_BLOCK = 256
BYTES_PER_BLOCK = 32 * 2**20  # a block is flushed at this many payload bytes even when it has fewer rows
HTML_FILES_PER_TASK = 32
HTML_SUFFIXES = (".html", ".htm")
HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")
SKIP_CHUNK = 2**20  # a dropped WARC payload or the rest of an over-long JSONL line is read through this much at a time
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}  # JSONL and text files, by extension


def doc_id_for(source: str, offset: int, record_id: str | None = None) -> str:
    """Deterministic id from where the record lives (or its own id there), so reruns and reshuffles agree."""
    where = f"{source}@{offset}" if record_id is None else f"{source}#{record_id}"
    return hashlib.sha1(where.encode()).hexdigest()[:24]


def _row(source: str, offset: int, url: str | None = None, html: bytes | None = None, reason: str | None = None,
         text: str | None = None, record_id: str | None = None) -> dict:
    return {"doc_id": doc_id_for(source, offset, record_id), "source": source, "offset": offset, "url": url,
            "html": html, "text": text, "drop_reason": reason}


def filesystem_for(uri: str, data: DataConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI (see athanor.storage)."""
    return storage.filesystem(uri, data.s3_endpoint_override)


class StorageReadError(RuntimeError):
    """The storage did not deliver a listed file's bytes (network, 5xx after the client's retries, access denied): an
    error of the storage, not of the file, so it fails the read task instead of becoming a drop. Not an OSError, so
    the parsers' `except OSError` (their way of saying "malformed file") never takes it for one."""

    def __init__(self, uri: str, cause: object):
        super().__init__(uri, str(cause))  # plain args: the error pickles back to the driver as it was raised
        self.uri = uri

    def __str__(self) -> str:
        return (f"reading {self.uri} failed in storage: {self.args[1]} (a storage error, not a malformed file: the "
                "task fails instead of dropping it; rerun once the storage answers)")


def _storage_call(uri: str, call: Callable, *args, gone_is_final: bool = False):
    """`call(*args)` with an OSError of the storage re-raised as StorageReadError. With `gone_is_final` (opening a
    file), FileNotFoundError passes as it is: a file listed but gone before it is read stays gone on a rerun (S3 lists
    and reads consistently), so file_rows counts it as `unreadable_file`. One that vanishes mid-read fails the task
    like any storage error, and the rerun counts it."""
    try:
        return call(*args)
    except FileNotFoundError as e:
        if gone_is_final:
            raise
        raise StorageReadError(uri, f"deleted while it was read ({e})") from e
    except OSError as e:
        raise StorageReadError(uri, e) from e


class _StorageFile(io.RawIOBase):
    """A file opened on storage whose I/O errors come out as StorageReadError. The parsers read through it (fastwarc
    and pyarrow hand a Python file's exception back unchanged, tested in tests/test_read_retry.py), so the OSError
    they raise themselves is left to mean a malformed file: not a WARC, a corrupt gzip member or Parquet page."""

    def __init__(self, uri: str, raw: pa.NativeFile):
        super().__init__()
        self.uri, self._raw = uri, raw

    def read(self, size: int | None = -1) -> bytes:
        return _storage_call(self.uri, self._raw.read, None if size is None or size < 0 else size)

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer) -> int:
        return _storage_call(self.uri, self._raw.readinto, buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return _storage_call(self.uri, self._raw.seek, offset, whence)

    def tell(self) -> int:
        return _storage_call(self.uri, self._raw.tell)

    def size(self) -> int:
        return _storage_call(self.uri, self._raw.size)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _open(uri: str, data: DataConfig, random_access: bool = True) -> _StorageFile:
    """A listed input file, read through _StorageFile (a stream when random access is not needed)."""
    fs, path = filesystem_for(uri, data)
    if random_access:
        return _StorageFile(uri, _storage_call(uri, fs.open_input_file, path, gone_is_final=True))
    # compression None: the stored bytes (pyarrow would otherwise decompress by the file name, out of our reach)
    return _StorageFile(uri, _storage_call(uri, fs.open_input_stream, path, None, gone_is_final=True))


def _open_decompressed(uri: str, data: DataConfig):
    """A stream of the file's content, decompressed as its extension says (.gz, .bz2, .zst, .lz4, as pyarrow's
    compression="detect"): the decompressor's own OSError (a corrupt stream) stays an OSError, of the file."""
    raw = _open(uri, data, random_access=False)
    codec = COMPRESSION.get(os.path.splitext(uri)[1].lower())
    return pa.CompressedInputStream(raw, codec) if codec else raw


def html_file_rows(uri: str, data: DataConfig = DataConfig()) -> Iterator[dict]:
    with _open(uri, data) as f:
        if f.size() > data.max_record_bytes:
            yield _row(uri, 0, reason="too_large")
            return
        payload = f.read()
    yield _row(uri, 0, reason="empty_html") if not payload.strip() else _row(uri, 0, html=payload)


def _record_drop_reason(record, max_bytes: int) -> str | None:
    if record.record_type == WarcRecordType.revisit:
        return "warc_revisit"
    if record.record_type != WarcRecordType.response:
        return "warc_not_response"
    content_type = (record.http_content_type or "").lower() if record.is_http else ""
    if not content_type.startswith(HTML_CONTENT_TYPES):
        return "warc_not_html"
    if record.content_length > max_bytes:
        return "too_large"
    return None


def _skip(reader) -> int:
    """Read a payload through in chunks, holding none of it: how many bytes it had."""
    total = 0
    while chunk := reader.read(SKIP_CHUNK):
        total += len(chunk)
    return total


def warc_rows(uri: str, data: DataConfig = DataConfig()) -> Iterator[dict]:
    """Rows for every record of one WARC file, streamed: a dropped record's payload is skipped, never held."""
    with _open(uri, data) as f:
        try:
            for record in ArchiveIterator(f, parse_http=True):
                url = record.headers.get("WARC-Target-URI")
                reason = _record_drop_reason(record, data.max_record_bytes)
                payload = record.reader.read() if reason is None else None
                length = len(payload) if reason is None else _skip(record.reader)
                if length < record.content_length:  # the file ended inside this record
                    yield _row(uri, FILE_LEVEL_OFFSET, reason="warc_truncated")
                    return
                if reason is None and not payload.strip():
                    reason, payload = "empty_html", None
                yield _row(uri, record.stream_pos, url, payload, reason)
        except OSError:  # not a WARC (e.g. an ARC file), a corrupt gzip member, or a malformed header; an error of the
            # storage comes as StorageReadError, which fastwarc passes on (it does not end the stream as if truncated)
            yield _row(uri, FILE_LEVEL_OFFSET, reason="warc_invalid")


def _text_row(source: str, offset: int, record, data: DataConfig) -> dict:
    """A JSONL/Parquet record as a row: its text, URL and id where the configured fields hold them."""
    text = record.get(data.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return _row(source, offset, reason="missing_text")
    url, record_id = record.get(data.url_field), record.get(data.id_field)
    url = url if isinstance(url, str) else None
    record_id = None if record_id is None else str(record_id)
    if len(text.encode()) > data.max_record_bytes:
        return _row(source, offset, url, reason="too_large", record_id=record_id)
    reason = "empty_text" if not text.strip() else "binary_content" if "\x00" in text else None
    return _row(source, offset, url, reason=reason, text=None if reason else text, record_id=record_id)


def jsonl_rows(uri: str, data: DataConfig = DataConfig()) -> Iterator[dict]:
    """One row per non-blank line; a line longer than `max_record_bytes` is skipped through, never held whole."""
    limit = data.max_record_bytes
    with _open_decompressed(uri, data) as raw:
        lines = io.BufferedReader(raw, SKIP_CHUNK)
        number = 0
        while line := lines.readline(limit + 1):
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := lines.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
                    pass
                yield _row(uri, number, reason="too_large")
            elif line.strip():
                yield _json_line_row(uri, number, line, data)
            number += 1


def _json_line_row(source: str, number: int, line: bytes, data: DataConfig) -> dict:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return _row(source, number, reason="undecodable")
    try:
        record = json.loads(decoded)
    except ValueError:
        return _row(source, number, reason="bad_json")
    return _text_row(source, number, record, data)


def parquet_rows(uri: str, data: DataConfig = DataConfig()) -> Iterator[dict]:
    """One row per Parquet row, read a batch at a time and only the text/id/url columns."""
    with _open(uri, data) as f:
        if f.size() == 0:
            return
        try:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            text_type = schema.field(data.text_field).type if data.text_field in schema.names else pa.null()
            if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
                yield _row(uri, FILE_LEVEL_OFFSET, reason="bad_schema")
                return
            columns = [c for c in dict.fromkeys((data.text_field, data.id_field, data.url_field)) if c in schema.names]
            offset = 0
            for batch in parquet.iter_batches(batch_size=ROWS_PER_BLOCK, columns=columns):
                for record in batch.to_pylist():
                    yield _text_row(uri, offset, record, data)
                    offset += 1
        except (pa.ArrowInvalid, OSError):  # not Parquet, or a corrupt page or footer (storage: StorageReadError)
            yield _row(uri, FILE_LEVEL_OFFSET, reason="parquet_invalid")


def text_file_rows(uri: str, data: DataConfig = DataConfig()) -> Iterator[dict]:
    """A plain-text file as one document (a book, an article): UTF-8 or an `undecodable` drop."""
    fs, path = filesystem_for(uri, data)
    info = _storage_call(uri, fs.get_file_info, path, gone_is_final=True)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(path)  # counted by file_rows as unreadable_file
    if info.size > data.max_record_bytes:
        yield _row(uri, 0, reason="too_large")
        return
    with _open_decompressed(uri, data) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield _row(uri, 0, reason="undecodable")
        return
    if raw:
        yield _text_row(uri, 0, {data.text_field: text}, data)


READERS: dict[str, Callable[[str, DataConfig], Iterator[dict]]] = {
    "html": html_file_rows, "warc": warc_rows, "jsonl": jsonl_rows, "parquet": parquet_rows, "text": text_file_rows,
}


def file_rows(kind: str, uri: str, data: DataConfig = DataConfig()) -> Iterator[dict]:
    """Every row of one input file; at most `data.max_docs_per_source` kept documents; `empty_file` if it has none."""
    seen = kept = 0
    try:
        for row in READERS[kind](uri, data):
            seen += 1
            yield row
            kept += row["drop_reason"] is None
            if kept == data.max_docs_per_source:
                return
    except OSError:  # gone between listing and reading (FileNotFoundError), or a compressed JSONL/text file that does
        # not decompress: errors of the file. The storage's own errors are StorageReadError and fail the task.
        seen += 1
        yield _row(uri, FILE_LEVEL_OFFSET, reason="unreadable_file")
    if not seen:
        yield _row(uri, FILE_LEVEL_OFFSET, reason="empty_file")


def _blocks(rows: Iterator[dict]) -> Iterator[pa.Table]:
    buffer, size = [], 0
    for row in rows:
        buffer.append(row)
        size += len(row["html"] or b"") + len(row["text"] or "")
        if len(buffer) >= ROWS_PER_BLOCK or size >= BYTES_PER_BLOCK:
            yield pa.Table.from_pylist(buffer, schema=SCHEMA)
            buffer, size = [], 0
    if buffer:
        yield pa.Table.from_pylist(buffer, schema=SCHEMA)


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def list_html_files(data: DataConfig) -> list[tuple[str, int]]:
    """(uri, size) of the HTML files of each folder, sorted, at most `max_docs_per_source` per folder."""
    files = []
    for folder in data.html_dirs:
        fs, path = filesystem_for(folder, data)
        if fs.get_file_info(path).type != pafs.FileType.Directory and not folder.startswith("s3://"):
            raise FileNotFoundError(f"data.html_dirs: no such folder: {folder}")
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        found = sorted((_join(folder, i.base_name), i.size) for i in infos
                       if i.type == pafs.FileType.File and i.base_name.lower().endswith(HTML_SUFFIXES))
        files.extend(found[: data.max_docs_per_source])
    return files


def list_files(patterns: list[str], data: DataConfig, field: str) -> list[tuple[str, int]]:
    """(uri, size) of the files each pattern names; globs work on local paths and s3:// URIs alike."""
    files = []
    for pattern in patterns:
        fs, path = filesystem_for(pattern, data)
        if not glob.has_magic(path):
            found = [(pattern, fs.get_file_info(path))]
        elif pattern.startswith("s3://"):
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            found = [(f"s3://{i.path}", i) for i in infos if fnmatch.fnmatchcase(i.path, path)]
        else:
            names = glob.glob(pattern)
            found = list(zip(names, fs.get_file_info([os.path.abspath(n) for n in names])))
        found = sorted((uri, info.size) for uri, info in found if info.type == pafs.FileType.File)
        if not found:
            raise FileNotFoundError(f"data.{field}: nothing matches {pattern}")
        files.extend(found)
    return files


class CrawlDatasource(Datasource):
    """HTML folders and WARC, JSONL and Parquet files as one Ray Data source."""

    def __init__(self, data: DataConfig):
        super().__init__()
        # Resolved here so the read tasks on any node see the same endpoint, whatever their environment.
        endpoint = data.s3_endpoint_override or os.environ.get("AWS_ENDPOINT_URL")
        self._data = data.model_copy(update={"s3_endpoint_override": endpoint})
        self._html = list_html_files(self._data)
        self._per_file = [(kind, uri, size) for kind, field in (("warc", "warc_files"), ("jsonl", "jsonl_files"),
                                                                 ("parquet", "parquet_files"), ("text", "text_files"))
                          for uri, size in list_files(getattr(data, field), self._data, field)]

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size in self._html) + sum(size for _, _, size in self._per_file)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        groups = [[(kind, uri, size)] for kind, uri, size in self._per_file]
        for i in range(0, len(self._html), HTML_FILES_PER_TASK):
            groups.append([("html", uri, size) for uri, size in self._html[i : i + HTML_FILES_PER_TASK]])
        return [self._task(group) for group in groups]

    def _task(self, group: list[tuple[str, str, int]]) -> ReadTask:
        meta = BlockMetadata(num_rows=None, size_bytes=sum(s for _, _, s in group),
                             input_files=[uri for _, uri, _ in group], exec_stats=None)
        data = self._data
        return ReadTask(lambda: _blocks(r for kind, uri, _ in group for r in file_rows(kind, uri, data)), meta,
                        schema=SCHEMA)


def read_crawl(data: DataConfig) -> ray.data.Dataset:
    """All records of the configured inputs, marked kept or dropped (see the module docstring)."""
    inputs = (data.html_dirs, data.warc_files, data.jsonl_files, data.parquet_files, data.text_files)
    if not any(inputs):
        raise ValueError("no input: set data.html_dirs, data.warc_files, data.jsonl_files, data.parquet_files "
                         "and/or data.text_files")
    uses_s3 = any(uri.startswith("s3://") for uris in inputs for uri in uris)
    aws_env = storage.ray_env() if uses_s3 else {}
    runtime_env = {"env_vars": aws_env} if aws_env else None  # read tasks may run where the driver's env is not
    return ray.data.read_datasource(CrawlDatasource(data), runtime_env=runtime_env)
