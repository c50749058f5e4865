"""A whole run with `run.workdir=s3://...` against a real S3-compatible server (moto's) on loopback.

Every stage output (curated shards, stats, report, quality model, tokenizer, token shards, manifest) and the Ray Train
checkpoints must land in the bucket, and a second identical run must skip every stage without rewriting any output.
"""

from __future__ import annotations

import json

import boto3
import pytest
from cli_runner import run_cli

from athanor import storage
from athanor.layout import RunLayout

BUCKET = "athanor-runs"
PREFIX = "smoke"
MAX_STEPS = 4


def _args(endpoint: str, tracking_db, *extra: str) -> list[str]:
    sets = {"run.workdir": f"s3://{BUCKET}/{PREFIX}", "data.s3_endpoint_override": endpoint,
            "mlflow.tracking_uri": f"sqlite:///{tracking_db}", "train.max_steps": str(MAX_STEPS),
            "train.checkpoint_every": "2", "train.eval_every": "2"}
    return ["run", "configs/smoke.yaml", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), *extra]


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, data_dir, tmp_path_factory):
    """One `athanor run` into the bucket, then a second identical one: (boto3 client, keys, second run's stdout)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    tmp = tmp_path_factory.mktemp("s3run")
    env = {"ATHANOR_CACHE_DIR": str(tmp / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        first = run_cli(*_args(s3_endpoint, tmp / "mlflow.db"))
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
        after_first = _listing(s3)
        second = run_cli(*_args(s3_endpoint, tmp / "mlflow.db"))
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return s3, _listing(s3), after_first, second.stdout, tmp / "mlflow.db"


def _listing(s3) -> dict[str, dict]:
    """Every object of the run: key (below the run's prefix) -> its listing entry (size, ETag, LastModified)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return {o["Key"].removeprefix(f"{PREFIX}/"): o for page in pages for o in page.get("Contents", [])}


def _json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())


@pytest.mark.slow
def test_every_stage_output_is_in_the_bucket(s3_run):
    s3, keys, _, _, _ = s3_run
    summary = _json(s3, "stats/curation.json")
    assert summary["kept"] > 0 and summary["in"] == summary["kept"] + sum(summary["dropped"].values())
    for stage in summary["stages"]:
        assert _json(s3, f"stats/{stage['stage']}.json") == stage
    committed = {k.split("/")[1] for k in keys if k.startswith("curated/") and k.endswith("/_SUCCESS.json")}
    with_parts = {k.split("/")[1] for k in keys if k.startswith("curated/") and k.endswith(".parquet")} - {"dropped"}
    assert "final" in with_parts and with_parts <= committed  # every stage folder with shards is marked complete
    assert {"stats/report.html", "quality/quality.bin", "quality/report.json", "tokenizer/tokenizer.model",
            "tokenizer/tokenizer.vocab", "manifest.json", "stages/curate.json", "stages/tokenize.json",
            "config.resolved.yaml", "mlflow_run_id"} <= set(keys)
    assert not any(k.rsplit("/", 1)[-1].startswith(".") and k.endswith(".tmp") for k in keys)  # no temporaries

    manifest = _json(s3, "manifest.json")
    shards = [s for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert shards and manifest["splits"]["train"]["sequences"] > 0
    for s in shards:  # every shard listed is in the bucket, with the size the manifest records
        assert keys[s["path"]]["Size"] == s["bytes"]


@pytest.mark.slow
def test_ray_train_checkpoints_go_to_the_bucket_and_load_back(s3_run, tmp_path, monkeypatch):
    s3, keys, _, _, tracking_db = s3_run
    checkpoints = sorted(k.rsplit("/", 1)[0] for k in keys if k.startswith("checkpoints/")
                         and k.endswith("/trainer_state.json"))
    assert len(checkpoints) >= 1, sorted(keys)
    newest = checkpoints[-1]
    assert f"{newest}/trainer_state.json" in keys and f"{newest}/tokenizer.model" in keys
    assert _json(s3, f"{newest}/trainer_state.json")["step"] == MAX_STEPS
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracking_db}")
    (run,) = client.search_runs([client.get_experiment_by_name("athanor-smoke").experiment_id])
    assert run.data.tags["checkpoint.final"] == f"s3://{BUCKET}/{PREFIX}/{newest}"
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/{PREFIX}/mlartifacts/")  # MLflow's files: the bucket too
    assert any(k.startswith("mlartifacts/") and k.endswith("/report/report.html") for k in keys)

    from athanor.cluster.checkpoint import find_checkpoint

    monkeypatch.setenv("ATHANOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.meta.endpoint_url)
    local = find_checkpoint(f"s3://{BUCKET}/{PREFIX}")  # the run's workdir URI: the newest checkpoint under it
    assert local == storage.cached(storage.location(f"s3://{BUCKET}/{PREFIX}/{newest}"))
    assert (local / "tokenizer.model").read_bytes() == s3.get_object(
        Bucket=BUCKET, Key=f"{PREFIX}/tokenizer/tokenizer.model")["Body"].read()


@pytest.mark.slow
def test_second_identical_run_skips_every_stage(s3_run):
    _, keys, after_first, second, _ = s3_run
    assert "curate=0.0" in second and "tokenize=0.0" in second, second[-3000:]
    outputs = [k for k in after_first if k.split("/")[0] in ("curated", "stats", "quality", "tokenizer", "shards",
                                                                "stages", "manifest.json")]
    assert len(outputs) > 20
    for k in outputs:  # not one stage output written again: same object, same bytes
        assert (keys[k]["ETag"], keys[k]["LastModified"]) == (after_first[k]["ETag"], after_first[k]["LastModified"]), k


def test_a_uri_workdir_needs_a_shared_tracking_server():
    from athanor.cluster.tracking import tracking_uri

    from athanor.config import AthanorConfig, ConfigError

    cfg = AthanorConfig.model_validate({"run": {"workdir": f"s3://{BUCKET}/{PREFIX}"}})
    with pytest.raises(ConfigError, match="mlflow.tracking_uri"):
        tracking_uri(cfg, RunLayout.from_workdir(cfg.run.workdir))
    with_server = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": "http://mlf:5000"})})
    assert tracking_uri(with_server, RunLayout.from_workdir(cfg.run.workdir)) == "http://mlf:5000"


@pytest.mark.slow
def test_token_shards_are_read_through_a_checked_node_local_copy(s3_run, s3_endpoint, tmp_path, monkeypatch):
    s3 = s3_run[0]
    monkeypatch.setenv("ATHANOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    from athanor.pipelines.shards import ShardIntegrityError, TokenShards

    workdir = f"s3://{BUCKET}/{PREFIX}"
    shards = TokenShards(workdir, "train")
    manifest = _json(s3, "manifest.json")
    assert len(shards) == manifest["splits"]["train"]["sequences"]
    local = RunLayout.from_workdir(workdir).on_this_node()
    first = manifest["splits"]["train"]["shards"][0]["path"]
    assert (local.root / first).read_bytes() == s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{first}")["Body"].read()

    (local.root / first).write_bytes(b"damaged")  # a bad cache copy is fetched again, not memory-mapped
    assert len(TokenShards(workdir, "train")) == len(shards)
    original = (local.root / first).read_bytes()
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{first}", Body=b"damaged in the bucket")
    (local.root / first).unlink()  # (a copy that still has the manifest's sha256 would rightly be used as it is)
    try:
        with pytest.raises(ShardIntegrityError, match="does not match the manifest"):
            TokenShards(workdir, "train")
    finally:  # the real shard back, for any test that runs after this one
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{first}", Body=original)
