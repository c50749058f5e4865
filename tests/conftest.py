"""Shared fixtures: the real sample data (fetched on first use) and one real local Ray instance per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

# Keep Ray quiet and small on a 2-core CI machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Credentials never travel with Ray tasks (storage.ray_env): each node reads its own. Every Ray the tests start on
# this machine inherits this process's environment, so the keys moto accepts are set before any of them starts
# (the session's embedded Ray comes up long before an S3 test's fixtures run). test_submit's head gets its own.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end or multi-process tests (CI runs them too)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no GPU tests either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real sample data from scripts/fetch_data.py (HTML pages, WARC, lid.176, quality corpora)."""
    if not (DATA / "SOURCES.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_data.py"), "--dest", str(DATA)], check=True)
    if not (DATA / "eval" / "manifest.json").exists():  # curation decontaminates against these tasks by default
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_eval_tasks.py"), "--data", str(DATA)], check=True)
    return DATA


def _faq_files(data_dir: Path, folder: str, script: str) -> tuple[Path, Path]:
    """(train, held-out) JSONL built from the Python FAQ (Debian's python3.11-doc) by `script`, if missing."""
    out = data_dir / folder
    if not (out / "SOURCES.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--data", str(data_dir)], check=True)
    return out / "python_faq.train.jsonl", out / "python_faq.heldout.jsonl"


@pytest.fixture(scope="session")
def faq(data_dir):
    """The Python FAQ question/answer pairs for fine-tuning."""
    return _faq_files(data_dir, "instructions", "build_instructions.py")


@pytest.fixture(scope="session")
def pairs(data_dir):
    """The FAQ preference pairs for DPO."""
    return _faq_files(data_dir, "preferences", "build_preferences.py")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core runner OpenMP spin-waits make them crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the tests that need Ray but not a fresh cluster of their own."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in this process, on a free loopback port; credentials go through the environment only, and
    the endpoint reaches the code under test through the config (or what the test passes), never AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        yield f"http://{host}:{port}"
    server.stop()


class CliRun(tuple):
    """(workdir, stdout) of a CLI run, with its stderr as `.stderr`."""

    def __new__(cls, workdir: Path, stdout: str, stderr: str):
        run = super().__new__(cls, (workdir, stdout))
        run.stderr = stderr
        return run


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir):
    """`athanor run configs/smoke.yaml` once per session: (workdir, stdout), and `.stderr`. Tests must not modify the
    workdir."""
    workdir = tmp_path_factory.mktemp("smoke")
    books = data_dir / "quality" / "high" / "alice29.txt"  # an extra eval set, scored at every evaluation
    proc = run_cli("run", "configs/smoke.yaml", "--set", f"run.workdir={workdir}",
                   "--set", f"train.eval_sets={{books: [{books}]}}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return CliRun(workdir, proc.stdout, proc.stderr)
