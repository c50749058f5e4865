"""s3:// inputs against a real S3-compatible server (moto's) on loopback: the same documents as the local copies."""

from __future__ import annotations

import json
from collections import Counter

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from athanor.config import DataConfig
from athanor.pipelines.read import file_rows, read_crawl

BUCKET = "crawl"
PAGES = 20


@pytest.fixture(scope="module")
def local_inputs(data_dir, tmp_path_factory):
    """Real pages, the real crawl and the Lee articles as JSONL, on local disk."""
    pages = tmp_path_factory.mktemp("news")
    for page in sorted((data_dir / "html" / "news").iterdir())[:PAGES]:
        (pages / page.name).write_bytes(page.read_bytes())
    articles = (data_dir / "quality" / "high" / "lee_background.txt").read_text().strip("\n").split("\n")
    jsonl = tmp_path_factory.mktemp("jsonl") / "lee.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(articles)))
    parquet = jsonl.with_suffix(".parquet")
    pq.write_table(pa.table({"text": articles, "url": [f"https://lee.example/{i}" for i in range(300)]}), parquet,
                   row_group_size=100)
    return {"pages": pages, "warc": data_dir / "warc" / "iana.warc.gz", "jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="module")
def bucket(s3_endpoint, local_inputs):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for page in sorted(local_inputs["pages"].iterdir()):
        s3.upload_file(str(page), BUCKET, f"html/news/{page.name}")
    s3.upload_file(str(local_inputs["warc"]), BUCKET, "warc/iana.warc.gz")
    s3.upload_file(str(local_inputs["jsonl"]), BUCKET, "jsonl/lee.jsonl")
    s3.upload_file(str(local_inputs["parquet"]), BUCKET, "parquet/lee.parquet")
    return f"s3://{BUCKET}"


def _documents(rows) -> Counter:
    """What a reader read, independent of where: file name, offset, URL, payload, reason."""
    return Counter((r["source"].rsplit("/", 1)[1], r["offset"], r["url"], r["html"], r["text"], r["drop_reason"])
                   for r in rows)


def test_s3_warc_jsonl_and_parquet_stream_the_same_records_as_local(s3_endpoint, bucket, local_inputs):
    data = DataConfig(s3_endpoint_override=s3_endpoint)
    for kind, key, local in (("warc", "warc/iana.warc.gz", local_inputs["warc"]),
                             ("jsonl", "jsonl/lee.jsonl", local_inputs["jsonl"]),
                             ("parquet", "parquet/lee.parquet", local_inputs["parquet"])):
        remote = list(file_rows(kind, f"{bucket}/{key}", data))
        assert remote[0]["source"] == f"{bucket}/{key}"
        assert _documents(remote) == _documents(file_rows(kind, str(local), data))
    missing = list(file_rows("warc", f"{bucket}/warc/missing.warc.gz", data))
    assert [r["drop_reason"] for r in missing] == ["unreadable_file"]


def test_read_crawl_on_ray_from_s3_equals_local(s3_endpoint, bucket, local_inputs, ray_local):
    remote = DataConfig(html_dirs=[f"{bucket}/html/news"], warc_files=[f"{bucket}/warc/*.warc.gz"],
                        jsonl_files=[f"{bucket}/jsonl/lee.jsonl"], s3_endpoint_override=s3_endpoint)
    local = DataConfig(html_dirs=[str(local_inputs["pages"])], warc_files=[str(local_inputs["warc"])],
                       jsonl_files=[str(local_inputs["jsonl"])])
    from_s3, from_disk = read_crawl(remote).take_all(), read_crawl(local).take_all()
    assert all(r["source"].startswith("s3://") for r in from_s3)
    assert Counter(r["drop_reason"] for r in from_s3)[None] == PAGES + 18 + 300
    assert _documents(from_s3) == _documents(from_disk)


def test_a_filesystem_handed_to_ray_tasks_carries_no_key(s3_endpoint, bucket, local_inputs):
    """The S3 filesystem is pickled into the Ray tasks it is given to (Ray Train's storage, Parquet reads): it must
    not hold the driver's keys; each node's AWS SDK reads its own. It still reads the bucket."""
    import os
    import pickle

    from athanor import storage

    fs = storage.s3_filesystem(s3_endpoint)
    blob = pickle.dumps(fs)
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    assert os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    copy = pickle.loads(blob)
    assert copy.get_file_info(bucket.removeprefix("s3://")).type.name == "Directory"
