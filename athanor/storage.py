"""Where a run's files live: a local (or shared NFS) folder, or an object store (`s3://`, `gs://`), over pyarrow.fs.

A location is a `pathlib.Path` for local folders (everything local behaves exactly as plain files) or a `Uri` (a str
that joins with `/` like a Path) for object stores, so layout code reads the same either way. Writes are whole or
absent: locally a hidden temporary name is renamed into place; an object store PUT is atomic by itself. Markers are
written after the data they vouch for, on both.

`s3://` goes to `data.s3_endpoint_override` or $AWS_ENDPOINT_URL (the driver exports the former as the latter, and
Ray forwards it to every task), with credentials from the AWS_* variables of the node's own environment, else its
cloud role. Keys never travel through Ray: a task's runtime_env is part of its spec, shown by the dashboard and the
state API, so each node holds its own (a Kubernetes Secret, the environment `ray start` ran in, an IAM role).
`gs://` uses pyarrow's GcsFileSystem and its default credentials. Tools that need a real local file (fastText,
memory-mapped token shards, a checkpoint to load) read a copy in the node-local cache: $ATHANOR_CACHE_DIR, else
~/.cache/athanor, laid out as `<cache>/<scheme>/<bucket>/<key>`.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pyarrow.fs as pafs

# Where the store is and how to reach it, never who signs in: the only AWS_* variables the driver passes to Ray tasks.
AWS_SETTINGS = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_NO_SIGN_REQUEST")
SCHEMES = ("s3", "gs")
# Requests to S3 are retried with the AWS SDK's standard backoff: a random wait of up to 1, 2, 4, ... s (at most 20 s)
# after each failed attempt that can pass (5xx, SlowDown throttling, a connection reset or timeout; not a 403 or 404),
# with a client-wide retry quota so a store that is down fails fast. S3 answers a burst of requests on one prefix with
# 503 SlowDown while it scales, for seconds to a minute: eight attempts wait through up to about 70 s (35 s on
# average) before the error reaches the caller, and a read then fails its task rather than lose the file
# (pipelines/read.py). The SDK's own default, 3 attempts, gives up after 3 s at most.
S3_RETRY_ATTEMPTS = 8
# GCS: pyarrow retries transient errors with google-cloud-cpp's exponential backoff until this much time has passed
# (its default, 15 minutes per request, stalls a task for a quarter of an hour on a store that is down).
GCS_RETRY_TIME_LIMIT = timedelta(minutes=2)


class Uri(str):
    """An object-store location (`s3://bucket/key`); `/` appends a key part, as Path's `/` does."""

    def __truediv__(self, part: str) -> Uri:
        return Uri(f"{self.rstrip('/')}/{part}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Uri:
        return Uri(self.rstrip("/").rsplit("/", 1)[0])

    @property
    def scheme(self) -> str:
        return self.split("://", 1)[0]


Location = Path | Uri


def is_uri(where: str | Path) -> bool:
    return "://" in str(where)


def location(where: str | Path) -> Location:
    """A Uri for `scheme://...` (s3 and gs only), else the absolute local Path."""
    if isinstance(where, Path) or not is_uri(where):
        return Path(where).expanduser().resolve()
    scheme = where.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported storage URI {where!r}: use a local path, s3://bucket/prefix or "
                         "gs://bucket/prefix")
    return Uri(where.rstrip("/"))


def s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    """S3 (or an S3-compatible server at `endpoint`): keys from the AWS_* environment, else the cloud role; requests
    retried with backoff up to `S3_RETRY_ATTEMPTS` times."""
    return _s3_filesystem(endpoint, S3_RETRY_ATTEMPTS)


@functools.lru_cache(maxsize=4)
def _s3_filesystem(endpoint: str | None, attempts: int) -> pafs.S3FileSystem:
    env = os.environ
    # Note: pickling an S3FileSystem (as a Ray task argument) keeps no retry strategy: the copy retries 3 times.
    kwargs = {"endpoint_override": endpoint} if endpoint else {}
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    if region := env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = region
    if "AWS_ACCESS_KEY_ID" not in env and env.get("AWS_NO_SIGN_REQUEST", "").lower() in ("1", "true", "yes"):
        kwargs["anonymous"] = True  # public buckets, as the AWS CLI's --no-sign-request
    # Keys are never passed in: the AWS SDK's default chain reads them where the filesystem is used (the AWS_*
    # environment, else the cloud role: EC2 instance profile, EKS IRSA web identity, ECS task). Passed in, they would
    # be pickled with the filesystem into every Ray task it is handed to (Ray Train's storage, Parquet reads).
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=1)
def _gcs() -> pafs.FileSystem:
    if not hasattr(pafs, "GcsFileSystem"):
        raise RuntimeError("gs:// needs a pyarrow built with GCS support (pyarrow.fs.GcsFileSystem)")
    return pafs.GcsFileSystem(retry_time_limit=GCS_RETRY_TIME_LIMIT)


def filesystem(where: str | Path, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); an s3:// endpoint defaults to $AWS_ENDPOINT_URL."""
    s = str(where)
    if s.startswith("s3://"):
        return s3_filesystem(endpoint or os.environ.get("AWS_ENDPOINT_URL")), s.removeprefix("s3://")
    if s.startswith("gs://"):
        return _gcs(), s.removeprefix("gs://")
    if is_uri(s):
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s))


def use_endpoint(endpoint: str | None) -> None:
    """Make `endpoint` the S3 endpoint of this process and (through `ray_env`) of every Ray task it starts."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def ray_env() -> dict[str, str]:
    """The driver's non-secret S3 settings (endpoint, region) for Ray tasks on other nodes; keys stay out, because
    a runtime_env is readable by anyone who can see the cluster's dashboard: nodes sign in with their own."""
    return {k: os.environ[k] for k in AWS_SETTINGS if k in os.environ}


def _info(where: Location) -> pafs.FileInfo:
    fs, path = filesystem(where)
    return fs.get_file_info(path)


def exists(where: Location) -> bool:
    return _info(where).type != pafs.FileType.NotFound


def is_file(where: Location) -> bool:
    return _info(where).type == pafs.FileType.File


def size(where: Location) -> int:
    info = _info(where)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {where}")
    return info.size


def open_input(where: Location):
    """A random-access file (pq.ParquetFile, pq.read_table and pa.ipc read it as they read a local path)."""
    fs, path = filesystem(where)
    return fs.open_input_file(path)


def read_bytes(where: Location) -> bytes:
    if isinstance(where, Path):
        return where.read_bytes()
    with open_input(where) as f:
        return f.read()


def read_text(where: Location) -> str:
    return read_bytes(where).decode("utf-8")


def read_json(where: Location) -> dict | None:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(read_bytes(where))
    except FileNotFoundError:
        return None


def write_bytes(where: Location, data: bytes) -> None:
    """Whole or absent: locally a hidden temporary name (readers skip '.' files) renamed into place; one PUT on an
    object store."""
    if isinstance(where, Path):
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_name(f".{where.name}.{uuid.uuid4().hex[:8]}.tmp")  # unique: writers may race on one name
        tmp.write_bytes(data)
        os.replace(tmp, where)
        return
    fs, path = filesystem(where)
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_text(where: Location, text: str) -> None:
    write_bytes(where, text.encode("utf-8"))


def makedirs(where: Location) -> None:
    """A local folder; nothing on an object store (keys need no parent)."""
    if isinstance(where, Path):
        where.mkdir(parents=True, exist_ok=True)


def glob(folder: Location, pattern: str, recursive: bool = False) -> list[Location]:
    """Files under `folder` whose name matches `pattern` (directly in it, or at any depth), sorted."""
    if isinstance(folder, Path):
        found = folder.rglob(pattern) if recursive else folder.glob(pattern)
        return sorted(p for p in found if p.is_file())
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    scheme = folder.scheme
    return sorted(Uri(f"{scheme}://{i.path}") for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern))


def ray_storage(where: Location) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem): the bucket path and its filesystem for a URI, so checkpoints
    reach the same endpoint with the same credentials; the plain path (Ray's local handling) otherwise."""
    if isinstance(where, Path):
        return str(where), None
    fs, path = filesystem(where)
    return path, fs


def read_parquet(files: list[str | Location]):
    """A Ray Dataset over local or object-store Parquet files (the filesystem travels with the read tasks)."""
    import ray

    fs, _ = filesystem(files[0])
    return ray.data.read_parquet([filesystem(f)[1] for f in files], filesystem=fs)


def delete(where: Location) -> None:
    """Remove a file if it is there."""
    if isinstance(where, Path):
        where.unlink(missing_ok=True)
    elif is_file(where):
        fs, path = filesystem(where)
        fs.delete_file(path)


def delete_tree(folder: Location) -> None:
    """Remove a folder (every key under the prefix) if it is there."""
    if isinstance(folder, Path):
        shutil.rmtree(folder, ignore_errors=True)
        return
    fs, path = filesystem(folder)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload(local: Path, where: Location) -> None:
    """Put a local file at `where` (a copy renamed into place when `where` is local too)."""
    if isinstance(where, Path):
        if Path(local).resolve() != where:
            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = where.with_name(f".{where.name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, where)
        return
    fs, path = filesystem(where)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if Path(local).resolve() == cached(where).resolve():  # the cache copy is current: fetch need not download it
        mtime = fs.get_file_info(path).mtime_ns
        if mtime is not None:
            os.utime(local, ns=(mtime, mtime))


def cache_dir() -> Path:
    return Path(os.environ.get("ATHANOR_CACHE_DIR") or Path.home() / ".cache" / "athanor").expanduser()


def cached(where: Location) -> Path:
    """The node-local path that mirrors `where` (the path itself when it is already local)."""
    if isinstance(where, Path):
        return where
    return cache_dir() / where.scheme / where.split("://", 1)[1]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _same(local: Path, info: pafs.FileInfo) -> bool:
    """rsync's quick check: the cache copy has the remote file's size and modification time."""
    if not local.is_file() or info.mtime_ns is None:
        return False
    st = local.stat()
    return st.st_size == info.size and st.st_mtime_ns == info.mtime_ns


def fetch(where: Location, sha256: str | None = None) -> Path:
    """A local copy of a file: the file itself when local, else its cache copy, downloaded unless the copy already
    has `sha256` (or, without one, the remote size and modification time). The download lands under a name unique
    to this process, then is renamed into place, so workers on one node can fetch the same file at once."""
    if isinstance(where, Path):
        return where
    local = cached(where)
    if sha256 is not None and local.is_file() and file_sha256(local) == sha256:
        return local
    fs, path = filesystem(where)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {where}")
    if sha256 is None and _same(local, info):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if info.mtime_ns is not None:
        os.utime(tmp, ns=(info.mtime_ns, info.mtime_ns))
    os.replace(tmp, local)
    return local


def fetch_tree(folder: Location) -> Path:
    """A local copy of every file under a folder (the folder itself when local), each fetched as `fetch` does."""
    if isinstance(folder, Path):
        return folder
    for f in glob(folder, "*", recursive=True):
        fetch(f)
    return cached(folder)
