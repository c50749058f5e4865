"""Kill `athanor curate` (its whole process group, embedded Ray included) at a random shard commit, run it again, and
get byte for byte what an uninterrupted run writes: every file under curated/ and stats/."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from athanor.config import load_config
from athanor.layout import RunLayout
from athanor.pipelines.commit import SHARD_MARKERS, STAGE_MARKER
from athanor.pipelines.curate import FINAL, run_curation

pytestmark = pytest.mark.slow  # three curation runs, one of them killed

ROOT = Path(__file__).resolve().parents[1]
ATHANOR = Path(sys.executable).parent / "athanor"
SEED = 20261122
# A few dozen real pages and WARC records in ranges of eight documents: several shards per stage to resume from.
# The URL, C4, FineWeb and PII filters are row-wise stages like heuristics, resumed by the same code: left out to
# keep three runs short.
OVERRIDES = ["data.max_docs_per_source=30", "curate.docs_per_shard=8", "curate.url_filter.enabled=false",
             "curate.c4.enabled=false", "curate.fineweb.enabled=false", "curate.pii.enabled=false"]
TIMINGS = "stats/timings.json"  # wall-clock seconds: the one output that differs between runs by nature


def _digests(root: Path) -> dict[str, str]:
    files = sorted(p for d in ("curated", "stats") for p in (root / d).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if str(p.relative_to(root)) != TIMINGS}


def _shard_markers(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (root / "curated").glob(f"*/{SHARD_MARKERS}/*.json")}


def _curate_cli(workdir: Path) -> subprocess.Popen:
    args = [str(ATHANOR), "curate", "configs/smoke.yaml", "--set", f"run.workdir={workdir}",
            "--set", f"run.name=resume-{workdir.name}", *(x for o in OVERRIDES for x in ("--set", o))]
    return subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _session_processes(sid: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getsid(int(proc.name)) == sid:
                pids.append(int(proc.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _kill_at_shard_commit(proc: subprocess.Popen, root: Path, commits: int, jitter_s: float) -> None:
    """SIGKILL the run's process group `jitter_s` after its `commits`-th shard marker appears."""
    while len(_shard_markers(root)) < commits:
        assert proc.poll() is None, f"the run ended before its kill point: {proc.stderr.read()[-3000:]}"
        time.sleep(0.02)
    time.sleep(jitter_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _session_processes(proc.pid) and time.monotonic() < deadline:  # raylet, gcs, workers die with the group
        time.sleep(0.1)
    assert not _session_processes(proc.pid), "Ray processes of the killed run survived the group kill"


def test_a_killed_curation_resumes_to_identical_bytes(data_dir, tmp_path, ray_local):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [*OVERRIDES, f"run.workdir={tmp_path / 'whole'}"])
    whole = RunLayout.from_workdir(cfg.run.workdir)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's data paths are relative to the repository, as for the CLI
    try:
        summary = run_curation(cfg, whole)
    finally:
        os.chdir(cwd)
    expected = _digests(whole.root)
    total_commits = len(_shard_markers(whole.root))
    assert summary["kept"] > 10 and total_commits > 2 * len(summary["stages"])

    killed = tmp_path / "killed"
    shutil.copytree(whole.quality_dir, killed / "quality")  # the same classifier: this test is about the stages
    rng = random.Random(SEED)
    kill_after, jitter = rng.randint(1, total_commits - 2), rng.uniform(0.0, 0.3)
    _kill_at_shard_commit(_curate_cli(killed), killed, kill_after, jitter)
    print(f"killed after shard commit {kill_after} of {total_commits} (+{jitter:.2f} s)")
    assert not (killed / "curated" / FINAL / STAGE_MARKER).exists(), "killed after the run had finished"
    committed_before = _shard_markers(killed)
    assert _digests(killed) != expected

    rerun = _curate_cli(killed)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-3000:]
    assert _digests(killed) == expected
    assert {p: _shard_markers(killed)[p] for p in committed_before} == committed_before  # finished ranges skipped
    run_id = (killed / "mlflow_run_id").read_text().strip()
    logged = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}").list_artifacts(run_id, "report")
    assert [a.path for a in logged] == ["report/report.html"]  # the curation report reaches MLflow
