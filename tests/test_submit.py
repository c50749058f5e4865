"""`athanor submit` against a real Ray head on loopback: the smoke pipeline runs as a Ray job, to SUCCEEDED.

The head is `ray start --head` with its dashboard/job server on 127.0.0.1 and Ray's token auth on
(tests/ray_head.py). The job ships the project without data or outputs, reads its inputs from absolute paths (a
shared filesystem, as on one machine), logs to a real `mlflow server` on loopback and writes every output to an
S3-compatible server on loopback (moto's). The S3 keys live in the head's environment, as a node's would (a
Kubernetes Secret, the environment `ray start` runs in), and nowhere in the job: the test then searches the job's
record and every task and actor spec Ray keeps for them, and `--env` refuses to forward a secret.

The job's run is also the suite's one whole run into object storage: every stage output and the Ray Train checkpoints
must be in the bucket, shards are read through checked node-local copies, and the same run again (its driver joining
the same head directly) skips every stage without rewriting any output. One head, one run for all of them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from cli_runner import ROOT
from mlflow.tracking import MlflowClient
from ray_head import free_port, ray_head

from athanor import storage
from athanor.layout import RunLayout

STEPS = 20


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    """A real `mlflow server` on loopback, SQLite backend, artifacts proxied to a local folder."""
    root = tmp_path_factory.mktemp("mlflow-submit")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not become healthy") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


BUCKET = "athanor-runs"
PREFIX = "submitted"


@pytest.fixture(scope="module")
def s3_endpoint(s3_endpoint):
    """The shared moto server (conftest), with this module's bucket and keys of its own, distinct enough to search
    for (moto takes any)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", f"AKIATEST{secrets.token_hex(6).upper()}")
        mp.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
        yield s3_endpoint


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_endpoint):
    """The head runs with Ray's token auth, as a cluster should; the CLI (and this test) hold the token. It holds
    the S3 keys in its own environment, as a pod does from a Secret; the endpoint comes from the job's config."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "AWS_ENDPOINT_URL"}
        env["ATHANOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("node-cache"))  # the node-local copies of s3 files
        with ray_head(num_cpus=2, env=env) as h:
            yield h


def _data_overrides(data_dir: Path) -> list[str]:
    """The smoke config's inputs as absolute paths: the job's working_dir carries no data/."""
    q = data_dir / "quality"
    high = ",".join(str(q / "high" / n) for n in ("lee_background.txt", "alice29.txt", "lcet10.txt", "plrabn12.txt"))
    return [f"data.html_dirs=[{data_dir / 'html' / 'news'}]", f"data.warc_files=[{data_dir / 'warc' / 'iana.warc.gz'}]",
            f"curate.langid.model_path={data_dir / 'models' / 'lid.176.ftz'}",
            f"curate.url_filter.blocklist_dir={data_dir / 'blocklists'}",
            f"curate.quality.high=[{high}]", f"curate.quality.low=[{q / 'low' / 'sms.txt'}]",
            f"curate.decontam.task_files=[{data_dir / 'eval' / 'athanor_cloze.jsonl'},"
            f"{data_dir / 'eval' / 'athanor_choice.jsonl'}]"]


def _athanor(*args, timeout=900, env=None):
    """`python -m athanor.cluster.cli ARGS` as a user runs it, with this test's environment (plus env)."""
    full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "athanor.cluster.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def _overrides(s3_endpoint: str, mlflow_url: str, data_dir: Path) -> list[str]:
    """The smoke run into the bucket, logged to the MLflow server: what the job runs, and the rerun beside it."""
    return [f"run.workdir=s3://{BUCKET}/{PREFIX}", f"data.s3_endpoint_override={s3_endpoint}",
            "run.name=submitted-smoke", f"mlflow.tracking_uri={mlflow_url}", "mlflow.experiment=athanor-submit",
            f"train.max_steps={STEPS}", "train.eval_every=10", "train.checkpoint_every=10", *_data_overrides(data_dir)]


def _listing(s3) -> dict[str, dict]:
    """Every object of the run: key (below the run's prefix) -> its listing entry (size, ETag, LastModified)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return {o["Key"].removeprefix(f"{PREFIX}/"): o for page in pages for o in page.get("Contents", [])}


def _json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())


@pytest.fixture(scope="module")
def submitted(head, mlflow_url, s3_endpoint, data_dir):
    """The smoke pipeline submitted as a Ray job, run to the end: its outputs in the bucket are what the tests below
    check (one whole run into object storage, shared by them all)."""
    sets = [a for o in _overrides(s3_endpoint, mlflow_url, data_dir) for a in ("--set", o)]
    t0 = time.monotonic()
    proc = _athanor("submit", "configs/smoke.yaml", *sets, "--env", "AWS_DEFAULT_REGION", "--address",
                    head.dashboard_url, timeout=300)  # a setting may travel; the keys are the head's own
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    assert f"athanor jobs logs {job_id} --follow --address {head.dashboard_url}" in proc.stdout

    proc = _athanor("jobs", "status", job_id, "--address", head.dashboard_url, "--wait", "--timeout", "840")
    logs = _athanor("jobs", "logs", job_id, "--address", head.dashboard_url, timeout=120).stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-6000:]
    assert f"{job_id}: SUCCEEDED" in proc.stdout
    print(f"job {job_id} succeeded in {time.monotonic() - t0:.1f} s")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    return {"job_id": job_id, "logs": logs, "s3": s3, "keys": _listing(s3)}


@pytest.mark.slow
def test_submit_smoke_pipeline_to_a_ray_head(submitted, head, mlflow_url):
    job_id, logs, s3 = submitted["job_id"], submitted["logs"], submitted["s3"]
    # The final report of `athanor run` reached the job's log.
    assert "curation (documents in -> kept, dropped by reason):" in logs
    assert re.search(r"training loss: first [\d.]+ -> last [\d.]+", logs)
    run_id = re.search(r"MLflow run id: (\w+)", logs).group(1)
    followed = _athanor("jobs", "logs", job_id, "--follow", "--address", head.dashboard_url, timeout=120)
    assert followed.returncode == 0 and f"MLflow run id: {run_id}" in followed.stdout  # ends with the job
    assert f"open {mlflow_url}" in logs
    manifest = _json(s3, "manifest.json")
    assert manifest["splits"]["train"]["sequences"] > 0

    # One MLflow run, named after run.name, with the training metrics of every step.
    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name("athanor-submit")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.run_name == "submitted-smoke"
    assert runs[0].info.status == "FINISHED" or runs[0].info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, STEPS + 1))
    assert runs[0].data.params["train.max_steps"] == str(STEPS)

    # The job record: the project went up as a working_dir package, with the run name as metadata.
    req = urllib.request.Request(f"{head.dashboard_url}/api/jobs/{job_id}",
                                 headers={"x-ray-authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    info = json.load(urllib.request.urlopen(req, timeout=30))
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert info["metadata"]["athanor.run_name"] == "submitted-smoke"
    assert info["entrypoint"].startswith("python -m athanor.cluster.cli run configs/smoke.yaml --set")
    assert info["runtime_env"]["env_vars"] == {"RAY_JOB_STOP_WAIT_TIME_S": "300",
                                               "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"]}
    _assert_no_keys_in_specs(head, job_id, logs)


_STATE_DUMP = """
import json, sys
from dataclasses import asdict
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_jobs, list_tasks

address, job_id = sys.argv[1], sys.argv[2]
def dump(rows):
    return json.dumps([asdict(r) if hasattr(r, "__dataclass_fields__") else r for r in rows], default=str)
state = {"address": address, "detail": True, "limit": 10_000, "raise_on_missing_output": False}
print(json.dumps({"job info": dump([JobSubmissionClient(address).get_job_info(job_id)]), "jobs": dump(list_jobs(**state)),
                  "tasks": dump(list_tasks(**state)), "actors": dump(list_actors(**state))}))
"""


def _assert_no_keys_in_specs(head, job_id: str, logs: str) -> None:
    """The S3 keys the job used appear in no spec Ray keeps: the job's record (runtime_env, entrypoint, metadata)
    from the Jobs API, the jobs list, and every task and actor in detail from the state API (the dashboard's data),
    runtime_env included; nor in the driver's log. The queries run in a process of their own, as a user's would:
    Ray's clients read the auth mode and token once per process, and this one has met other clusters."""
    proc = subprocess.run([sys.executable, "-c", _STATE_DUMP, head.dashboard_url, job_id], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, RAY_AUTH_MODE="token"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    specs = {**json.loads(proc.stdout.strip().splitlines()[-1]), "driver log": logs}
    tasks, actors = specs["tasks"], specs["actors"]
    assert len(json.loads(tasks)) > 10 and len(json.loads(actors)) > 3, (tasks[:2000], actors[:2000])
    # The search sees what a task's runtime_env carries: the endpoint the driver passes to every task is there.
    assert '"AWS_ENDPOINT_URL' in tasks or "AWS_ENDPOINT_URL" in actors, tasks[:3000]
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        value = os.environ[name]
        leaked = [where for where, text in specs.items() if value in text]
        assert not leaked, f"{name}'s value is in the {', '.join(leaked)}"


@pytest.mark.slow
def test_every_stage_output_is_in_the_bucket(submitted):
    s3, keys = submitted["s3"], submitted["keys"]
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
def test_ray_train_checkpoints_go_to_the_bucket_and_load_back(submitted, mlflow_url, tmp_path, monkeypatch):
    s3, keys = submitted["s3"], submitted["keys"]
    checkpoints = sorted(k.rsplit("/", 1)[0] for k in keys if k.startswith("checkpoints/")
                         and k.endswith("/trainer_state.json"))
    assert len(checkpoints) >= 1, sorted(keys)
    newest = checkpoints[-1]
    assert f"{newest}/trainer_state.json" in keys and f"{newest}/tokenizer.model" in keys
    assert _json(s3, f"{newest}/trainer_state.json")["step"] == STEPS
    client = MlflowClient(mlflow_url)
    (run,) = client.search_runs([client.get_experiment_by_name("athanor-submit").experiment_id])
    assert run.data.tags["checkpoint.final"] == f"s3://{BUCKET}/{PREFIX}/{newest}"
    # The experiment keeps its artifacts beside the run's other outputs: the bucket, not the server's disk.
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/{PREFIX}/mlartifacts/")
    assert any(k.startswith("mlartifacts/") and k.endswith("/report/report.html") for k in keys)

    from athanor.cluster.checkpoint import find_checkpoint

    monkeypatch.setenv("ATHANOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.meta.endpoint_url)
    local = find_checkpoint(f"s3://{BUCKET}/{PREFIX}")  # the run's workdir URI: the newest checkpoint under it
    assert local == storage.cached(storage.location(f"s3://{BUCKET}/{PREFIX}/{newest}"))
    assert (local / "tokenizer.model").read_bytes() == s3.get_object(
        Bucket=BUCKET, Key=f"{PREFIX}/tokenizer/tokenizer.model")["Body"].read()


@pytest.mark.slow
def test_token_shards_are_read_through_a_checked_node_local_copy(submitted, s3_endpoint, tmp_path, monkeypatch):
    s3 = submitted["s3"]
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
    finally:  # the real shard back, for the tests that run after this one
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{first}", Body=original)


@pytest.mark.slow
def test_second_identical_run_skips_every_stage(submitted, head, mlflow_url, s3_endpoint, data_dir, tmp_path):
    """The same run again, its driver joining the same cluster directly (no job): every stage is up to date in the
    bucket, so not one output is written again, and MLflow still holds one run."""
    sets = [a for o in _overrides(s3_endpoint, mlflow_url, data_dir) for a in ("--set", o)]
    before = _listing(submitted["s3"])  # now: the shard test above puts a shard back, under a new ETag
    proc = _athanor("run", "configs/smoke.yaml", *sets, "--set", f"cluster.address={head.gcs_address}",
                    env={"ATHANOR_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "curate=0.0" in proc.stdout and "tokenize=0.0" in proc.stdout, proc.stdout[-3000:]
    after = _listing(submitted["s3"])
    outputs = [k for k in before if k.split("/")[0] in ("curated", "stats", "quality", "tokenizer", "shards",
                                                          "stages", "manifest.json")]
    assert len(outputs) > 20
    for k in outputs:  # not one stage output written again: same object, same bytes
        assert (after[k]["ETag"], after[k]["LastModified"]) == (before[k]["ETag"], before[k]["LastModified"]), k
    client = MlflowClient(mlflow_url)
    assert len(client.search_runs([client.get_experiment_by_name("athanor-submit").experiment_id])) == 1


def test_a_uri_workdir_needs_a_shared_tracking_server():
    from athanor.cluster.tracking import tracking_uri
    from athanor.config import AthanorConfig, ConfigError

    cfg = AthanorConfig.model_validate({"run": {"workdir": f"s3://{BUCKET}/{PREFIX}"}})
    with pytest.raises(ConfigError, match="mlflow.tracking_uri"):
        tracking_uri(cfg, RunLayout.from_workdir(cfg.run.workdir))
    with_server = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": "http://mlf:5000"})})
    assert tracking_uri(with_server, RunLayout.from_workdir(cfg.run.workdir)) == "http://mlf:5000"


@pytest.mark.slow
def test_jobs_errors_are_one_line_and_exit_2(head, tmp_path):
    for args in (["jobs", "status", "raysubmit_doesnotexist", "--address", head.dashboard_url],
                 ["jobs", "logs", "raysubmit_doesnotexist", "--address", head.dashboard_url],
                 ["jobs", "stop", "raysubmit_doesnotexist", "--address", head.dashboard_url]):
        proc = _athanor(*args, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"athanor: error: no job raysubmit_doesnotexist on {head.dashboard_url}")
    closed = f"http://127.0.0.1:{free_port()}"
    proc = _athanor("jobs", "status", "x", "--address", closed, timeout=120)
    assert proc.returncode == 2 and f"cannot reach the Ray job server at {closed}" in proc.stderr
    proc = _athanor("jobs", "list", "--address", head.dashboard_url, env={"RAY_ADDRESS": closed}, timeout=120)
    assert proc.returncode == 0, proc.stderr  # an explicit --address wins over $RAY_ADDRESS (Ray's client reverses it)
    proc = _athanor("jobs", "list", "--address", head.dashboard_url, env={"RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert proc.returncode == 2 and f"the Ray job server at {head.dashboard_url} wants a token" in proc.stderr
    proc = _athanor("submit", "configs/smoke.yaml", "--address", head.dashboard_url, timeout=120)
    assert proc.returncode == 2 and "run.workdir 'runs/smoke' is relative" in proc.stderr
    proc = _athanor("submit", "configs/smoke.yaml", "--set", f"run.workdir={tmp_path}", "--env", "ATHANOR_UNSET_VAR",
                    "--address", head.dashboard_url, timeout=120)
    assert proc.returncode == 2 and "--env ATHANOR_UNSET_VAR: not set" in proc.stderr
    named = ("AWS_DEFAULT_REGION", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")
    proc = _athanor("submit", "configs/smoke.yaml", "--set", f"run.workdir={tmp_path}",
                    *[a for n in named for a in ("--env", n)], "--address", head.dashboard_url, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "athanor: error: --env AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD: secrets never travel with a job")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def test_working_dir_leaves_out_data_outputs_and_caches():
    """What Ray would upload for the job, walked by Ray's own packaging code with submit's excludes."""
    from athanor.cluster.submit import EXCLUDES
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[str] = []
    _dir_travel(ROOT, [_get_excludes(ROOT, EXCLUDES)], lambda p: files.append(p.relative_to(ROOT).as_posix()),
                include_gitignore=True)
    assert {"pyproject.toml", "cluster/cli.py", "pipelines/curate.py", "athanor/config.py", "configs/smoke.yaml"} <= set(
        files)
    assert not [f for f in files if f.split("/")[0] in ("data", "runs", ".venv", ".git", "mlruns")]
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".db"))]
    size = sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file())
    print(f"working_dir: {len(files)} paths, {size / 2**20:.1f} MiB")
    assert size < 50 * 2**20


def test_runtime_env_carries_only_named_variables_and_pip_without_ray(monkeypatch):
    from athanor.cluster.submit import build_runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-forwarded-unless-named")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = build_runtime_env(ROOT, ["MLFLOW_TRACKING_URI"], pip=False)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_JOB_STOP_WAIT_TIME_S": "300"}
    assert "pip" not in env and "not-forwarded-unless-named" not in json.dumps(env)
    assert build_runtime_env(ROOT, [], pip=False)["env_vars"] == {"RAY_JOB_STOP_WAIT_TIME_S": "300"}
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "30")  # a grace period of the user's own, when named
    assert build_runtime_env(ROOT, ["RAY_JOB_STOP_WAIT_TIME_S"], pip=False)["env_vars"] == {
        "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    pip = build_runtime_env(ROOT, [], pip=True)["pip"]
    assert "mlflow==3.17.2" in pip and not [d for d in pip if d.startswith("ray")]


def test_entrypoint_carries_the_stage_overrides_and_verbosity():
    from athanor.cluster.submit import build_entrypoint

    assert build_entrypoint("configs/smoke.yaml", ["run.name=a b"], "train", force=True) == (
        "python -m athanor.cluster.cli train configs/smoke.yaml --set 'run.name=a b' --force")
    assert build_entrypoint("configs/smoke.yaml", [], verbose=True).endswith(" run configs/smoke.yaml --verbose")


def test_env_refuses_secret_names(monkeypatch):
    """Names that hold credentials never reach a runtime_env, set or not; settings do."""
    from athanor.cluster.submit import SubmitError, build_runtime_env, secret_names

    secret = ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "WANDB_API_KEY", "OPENAI_APIKEY", "GOOGLE_APPLICATION_CREDENTIALS",
              "DB_PASS", "DB_PWD", "RAY_AUTH_TOKEN", "SSH_PRIVATE_KEY_PATH", "my_client_secret"]
    settings = ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_EXPERIMENT_NAME", "AWS_REGION",
                "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "TOKENIZERS_PARALLELISM", "RAY_JOB_STOP_WAIT_TIME_S",
                "RAY_AUTH_MODE", "PWD", "KEYBOARD_LAYOUT"]
    assert secret_names(secret + settings) == secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(SubmitError, match=r"^--env AWS_SECRET_ACCESS_KEY: secrets never travel .* cloud role$"):
        build_runtime_env(ROOT, ["AWS_REGION", "AWS_SECRET_ACCESS_KEY"], pip=False)
    assert build_runtime_env(ROOT, ["AWS_REGION"], pip=False)["env_vars"]["AWS_REGION"] == "us-east-1"


def test_ray_tasks_get_s3_settings_but_never_keys(monkeypatch):
    """What init_ray hands every task's runtime_env: endpoint and region, no key (the nodes hold their own)."""
    from athanor import storage

    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t",
                        "AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio:9000"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_NO_SIGN_REQUEST", raising=False)
    assert storage.ray_env() == {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio:9000"}


def test_an_installed_wheel_submits_without_a_checkout(tmp_path):
    """Built and installed as a wheel, athanor runs from any folder: its three subpackages import from the install
    (and the source tree's tests/ and bench/ are no athanor modules), and `athanor submit` outside a checkout ships
    only the config's folder, for the athanor installed on the cluster."""
    root = Path(__file__).resolve().parent.parent
    source, wheels, site, elsewhere = (tmp_path / d for d in ("source", "wheels", "site", "elsewhere"))
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "athanor", "pipelines", "model", "cluster"):  # built outside the
        copy = shutil.copytree if (root / part).is_dir() else shutil.copy  # checkout: setuptools writes build/
        copy(root / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (root / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("athanor-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text((root / "configs" / "smoke.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import athanor.cluster.cli as c, athanor.pipelines.read as r, athanor.model.transformer as t\n"
             "print(c.__file__, r.__file__, t.__file__)\n"
             "try:\n    import athanor.tests\nexcept ImportError:\n    print('no athanor.tests')\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(p.startswith(str(site)) for p in out.stdout.split()[:3]), out.stdout
    assert "no athanor.tests" in out.stdout
    closed = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "athanor.cluster.cli", "submit", "mine.yaml", "--set",
                           f"run.workdir={tmp_path / 'run'}", "--address", closed], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"cannot reach the Ray job server at {closed}" in proc.stderr, proc.stderr[-2000:]
    assert "not the athanor project folder" not in proc.stderr
