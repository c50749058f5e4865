"""LoRA against full fine-tuning: `athanor finetune` with finetune.method=lora and =full, same base, data and batch.

Both sides are the same command a user runs, `athanor finetune CONFIG --set finetune.method=lora|full
--set finetune.base=BASE --set run.workdir=<scratch>`, each in a fresh process and a fresh working folder, with the
same config (default configs/finetune-smoke.yaml: the Python FAQ pairs in data/instructions, which `make setup`
builds), the same base checkpoint, global batch, sequence length, learning-rate schedule, worker count and --steps.
Only finetune.method differs, so what differs in the figures is what LoRA changes: which parameters train, what the
optimizer holds, what a checkpoint holds. With --repeats > 1 the sides alternate (lora, full, full, lora, ...) so
machine noise hits both. Each side evaluates the held-out responses before its first step (the base model, logged
as val_loss / val_bpb at step 0, so "before" must agree across the sides) and after its last; it checkpoints once,
at the end, so no step pays for a checkpoint mid-run.

Figures per side:
- trainable and total parameters (MLflow params model.trainable_params / model.total_params; LoRA's total counts
  its adapters too);
- peak memory of a training worker: on CPU its RSS (psutil, every --sample-s seconds, the RayTrainWorker
  processes under the command; the max over time and workers); on GPU the memory nvidia-smi shows per worker
  process (what the caching allocator reserved plus the CUDA context: allocated memory, torch's
  max_memory_allocated, lives inside the worker, which does not log it);
- steady-state tokens/s: global batch x window tokens (padding included, as the loop's tokens_per_s counts them)
  over the median step time after --warmup steps, from the per-step timestamps `train.log_sample_ids` writes;
- held-out response loss (nats/token) and bits per byte before -> after (MLflow metrics val_loss, val_bpb);
- the final checkpoint's size on disk (a LoRA checkpoint holds the adapters and their optimizer state only) and
  the command's wall time (Ray start-up, packing the pairs and evaluation included).

On CPU with the smoke model (~0.3 M parameters) memory is dominated by the PyTorch runtime and activations, so the
memory ratio is near 1 there and the parameter and checkpoint ratios are what to read. The intended comparison is
on a GPU with a base trained from the 1B preset (model.preset=1b), e.g. with configs/finetune-demo.yaml and
--gpu, where full fine-tuning's fp32 AdamW state (~16 bytes per parameter) is what LoRA saves.

    python bench/bench_finetune.py --base runs/smoke --steps 40
    python bench/bench_finetune.py            # runs/smoke if it has a checkpoint, else trains one first (~2.5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from athanor.config import load_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "full")


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
                self.peak_gpu = max(self.peak_gpu, _gpu_memory({p.pid for p in workers}))


def _gpu_memory(pids: set[int]) -> int:
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


def finetune(method: str, args, base: Path, work: Path, gpu: bool) -> dict:
    """One side: `athanor finetune` with this method, measured; its figures."""
    from mlflow.tracking import MlflowClient

    from athanor.cluster.checkpoint import find_checkpoint

    sets = [f"finetune.method={method}", f"finetune.base={base}", f"run.workdir={work}",
            f"run.name=bench-finetune-{method}", f"train.max_steps={args.steps}", "train.log_sample_ids=true",
            f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}"]
    if gpu:
        sets.append("train.use_gpu=true")
    sets += args.set
    cfg = load_config(args.config, sets)
    log = work.parent / f"{work.name}.log"
    work.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = athanor(["finetune", str(args.config)] + [a for s in sets for a in ("--set", s)], log)
    with PeakMemory(proc.pid, args.sample_s, gpu) as memory:
        wait(proc, log, f"athanor finetune (method={method})")
    wall = time.perf_counter() - t0

    records = [json.loads(line) for line in (work / "train_samples.jsonl").read_text().splitlines()]
    last = {r["step"]: r for r in records}  # a step replayed after a worker failure: its last record counts
    if len(last) != len(records):
        print(f"note: {method}: {len(records) - len(last)} step(s) replayed after a failure", file=sys.stderr)
    stamps = [last[s]["time"] for s in sorted(last)]
    step_times = [records[0]["first_step_s"]] + [b - a for a, b in zip(stamps, stamps[1:])]

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    [run] = client.search_runs([experiment.experiment_id])
    history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
               for name in ("val_loss", "val_bpb")}
    final = max(history["val_loss"])
    checkpoint = find_checkpoint(work)
    return {"trainable": int(run.data.params["model.trainable_params"]),
            "total": int(run.data.params["model.total_params"]),
            "rss": memory.peak_rss, "gpu": memory.peak_gpu, "workers": len(memory.workers),
            "steps": step_times[args.warmup:], "wall": wall,
            "loss": (history["val_loss"][0], history["val_loss"][final]),
            "bpb": (history["val_bpb"][0], history["val_bpb"][final]), "final_step": final,
            "checkpoint": dir_bytes(checkpoint),
            "tokens_per_step": cfg.train.global_batch_size * cfg.finetune.seq_len, "cfg": cfg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "finetune-smoke.yaml")
    parser.add_argument("--base", type=Path, default=None,
                        help="the model to fine-tune: a run folder or checkpoint (default: runs/smoke if it has a "
                             "checkpoint, else a smoke run trained first)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state median")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved")
    parser.add_argument("--sample-s", type=float, default=0.2, help="memory sampling interval")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="train on GPUs (train.use_gpu=true); default: when torch sees CUDA")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another override for both sides, e.g. train.num_workers=1 (repeatable)")
    parser.add_argument("--scratch", type=Path, default=None, help="keep the working folders here (default: a "
                                                                   "temporary folder, removed)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    args.config = args.config.resolve()

    tmp = tempfile.TemporaryDirectory(prefix="bench-finetune-") if args.scratch is None else None
    scratch = Path(tmp.name) if tmp else args.scratch.resolve()
    try:
        base = args.base
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

        results: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(args.repeats):
            for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                print(f"repeat {r + 1}/{args.repeats}: athanor finetune, method={method} ...", flush=True)
                results[method].append(finetune(method, args, base, scratch / f"{method}-{r}", args.gpu))
    finally:
        if tmp:
            tmp.cleanup()

    report(args, base, results)


def report(args, base: Path, results: dict[str, list[dict]]) -> None:
    first = results["lora"][0]
    cfg = first["cfg"]
    t, ft = cfg.train, cfg.finetune
    mb = 1 / 2**20

    def row(method: str) -> dict:
        runs = results[method]
        step = statistics.median(s for r in runs for s in r["steps"])
        return {"trainable": runs[0]["trainable"], "total": runs[0]["total"],
                "memory": max(r["gpu"] if args.gpu else r["rss"] for r in runs) * mb,
                "tokens_s": runs[0]["tokens_per_step"] / step,
                "loss": (statistics.median(r["loss"][0] for r in runs), statistics.median(r["loss"][1] for r in runs)),
                "bpb": (statistics.median(r["bpb"][0] for r in runs), statistics.median(r["bpb"][1] for r in runs)),
                "checkpoint": statistics.median(r["checkpoint"] for r in runs) * mb,
                "wall": statistics.median(r["wall"] for r in runs), "final": runs[0]["final_step"],
                "workers": max(r["workers"] for r in runs)}

    rows = {m: row(m) for m in METHODS}
    memory = "peak GPU MB (nvidia-smi, per worker)" if args.gpu else "peak RSS MB (per worker)"
    print(f"\nbase {base}; {args.config.name}: {args.steps} steps x {t.global_batch_size} windows x {ft.seq_len} "
          f"tokens, {t.num_workers} worker(s) ({'GPU' if args.gpu else f'{t.cpus_per_worker} CPU each'}), "
          f"LoRA rank {ft.rank}, alpha {ft.alpha:g} on {','.join(ft.target_modules)}; tokens/s from the median step "
          f"after the first {args.warmup}; {args.repeats} interleaved repeat(s)\n")
    print(f"| method | trainable params | total params | {memory} | tokens/s (steady) | val loss before → after | "
          f"val bpb before → after | checkpoint MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['trainable']:,} | {r['total']:,} | {r['memory']:,.0f} | {r['tokens_s']:,.0f} | "
              f"{r['loss'][0]:.4f} → {r['loss'][1]:.4f} | {r['bpb'][0]:.4f} → {r['bpb'][1]:.4f} | "
              f"{r['checkpoint']:.2f} | {r['wall']:.1f} |")
    lo, fu = rows["lora"], rows["full"]
    print(f"| LoRA / full | {lo['trainable'] / fu['trainable']:.4f} | {lo['total'] / fu['total']:.3f} | "
          f"{lo['memory'] / fu['memory']:.3f} | {lo['tokens_s'] / fu['tokens_s']:.3f} | "
          f"Δ {lo['loss'][1] - lo['loss'][0]:+.4f} vs {fu['loss'][1] - fu['loss'][0]:+.4f} | "
          f"Δ {lo['bpb'][1] - lo['bpb'][0]:+.4f} vs {fu['bpb'][1] - fu['bpb'][0]:+.4f} | "
          f"{lo['checkpoint'] / fu['checkpoint']:.3f} | {lo['wall'] / fu['wall']:.3f} |")
    notes = []
    if abs(lo["loss"][0] - fu["loss"][0]) > 1e-4:
        notes.append(f"the step-0 losses differ ({lo['loss'][0]:.6f} vs {fu['loss'][0]:.6f}): the sides did not "
                     "start from the same model")
    for m, r in rows.items():
        if r["final"] != args.steps:
            notes.append(f"{m}: the last val_loss is at step {r['final']}, not {args.steps}")
        if not r["workers"]:
            notes.append(f"{m}: no RayTrainWorker process was sampled (a run shorter than --sample-s?)")
    for n in notes:
        print(f"\nnote: {n}")


if __name__ == "__main__":
    main()
