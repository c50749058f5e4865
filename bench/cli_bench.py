"""What the benchmarks of whole `athanor` commands share (bench_finetune.py, bench_dpo.py): running a command as a
user does, in its own process and session; sampling its training workers' peak memory; the steady-state step
times from the per-step records `train.log_sample_ids` writes; the base model to start from.

Not a benchmark itself: `python bench/bench_finetune.py` and `python bench/bench_dpo.py` import it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Samples the RayTrainWorker processes under `root_pid` in a thread: peak RSS (CPU) or per-process GPU memory
    as nvidia-smi reports it (GPU), the max over time and workers, in bytes."""

    def __init__(self, root_pid: int, interval: float, gpu: bool):
        self.root_pid, self.interval, self.gpu = root_pid, interval, gpu
        self.peak_rss = 0
        self.peak_gpu = 0
        self.workers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _train_workers(self) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for p in procs:
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            workers = self._train_workers()
            for p in workers:
                try:
                    self.peak_rss = max(self.peak_rss, p.memory_info().rss)
                    self.workers.add(p.pid)
                except psutil.Error:
                    pass
            if self.gpu and workers:
                self.peak_gpu = max(self.peak_gpu, gpu_memory({p.pid for p in workers}))


def gpu_memory(pids: set[int]) -> int:
    """The largest GPU memory (bytes) nvidia-smi reports for one of these processes."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    used = [int(mib) * 2**20 for pid, mib in (line.split(", ") for line in out.strip().splitlines() if ", " in line)
            if pid.isdigit() and int(pid) in pids and mib.strip().isdigit()]
    return max(used, default=0)


def athanor(args: list[str], log: Path) -> subprocess.Popen:
    """An `athanor` command as a user runs it, in its own session (so an interrupt can stop all it started)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray per command, as on a laptop
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "athanor.cluster.cli", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, what: str) -> None:
    try:
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    if rc:
        raise SystemExit(f"{what} failed (exit {rc}):\n{log.read_text()[-4000:]}")


def has_checkpoint(path: Path) -> bool:
    from athanor.cluster.checkpoint import find_checkpoint

    try:
        find_checkpoint(path)
        return True
    except FileNotFoundError:
        return False


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def default_base(base: Path | None, scratch: Path) -> Path:
    """`base` checked, or runs/smoke if it has a checkpoint, else a smoke run trained into `scratch` first."""
    if base is None:
        base = ROOT / "runs" / "smoke"
        if not has_checkpoint(base):
            base = scratch / "smoke"
            print(f"runs/smoke has no checkpoint: training the base first, `athanor run configs/smoke.yaml "
                  f"--set run.workdir={base}` (about 2.5 minutes on 2 CPUs)", flush=True)
            log = scratch / "smoke.log"
            scratch.mkdir(parents=True, exist_ok=True)
            wait(athanor(["run", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run.workdir={base}"], log),
                 log, "athanor run configs/smoke.yaml")
    base = base.resolve()
    if not has_checkpoint(base):
        raise SystemExit(f"{base} holds no checkpoint: pass --base a run folder or checkpoint")
    return base


def step_records(work: Path, what: str) -> tuple[dict[int, dict], list[float]]:
    """The run's per-step records (`train.log_sample_ids`), by step, and every step's duration: the first one's as
    the loop timed it, the others as the gaps between consecutive steps' timestamps."""
    records = [json.loads(line) for line in (work / "train_samples.jsonl").read_text().splitlines()]
    last = {r["step"]: r for r in records}  # a step replayed after a worker failure: its last record counts
    if len(last) != len(records):
        print(f"note: {what}: {len(records) - len(last)} step(s) replayed after a failure", file=sys.stderr)
    stamps = [last[s]["time"] for s in sorted(last)]
    return last, [records[0]["first_step_s"]] + [b - a for a, b in zip(stamps, stamps[1:])]


def mlflow_run(work: Path, experiment: str):
    """The one MLflow run of a working folder's local store, and a client to read it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def metric_history(client, run, names) -> dict[str, dict[int, float]]:
    return {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in names}


def add_run_args(parser: argparse.ArgumentParser, config: Path, steps: int, what: str) -> None:
    """The options every CLI-run benchmark shares: config, base, steps, warm-up, repeats, sampling, GPU, overrides,
    scratch folder."""
    parser.add_argument("--config", type=Path, default=config)
    parser.add_argument("--base", type=Path, default=None,
                        help=f"the model to {what}: a run folder or checkpoint (default: runs/smoke if it has a "
                             "checkpoint, else a smoke run trained first)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state median")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved")
    parser.add_argument("--sample-s", type=float, default=0.2, help="memory sampling interval")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="train on GPUs (train.use_gpu=true); default: when torch sees CUDA")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another override for every side, e.g. train.num_workers=1 (repeatable)")
    parser.add_argument("--scratch", type=Path, default=None, help="keep the working folders and command logs here "
                                                                   "(default: a temporary folder, removed)")


def check_run_args(args: argparse.Namespace) -> None:
    """Validate and resolve what add_run_args parsed (--gpu defaults to whether torch sees CUDA)."""
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    args.config = args.config.resolve()
