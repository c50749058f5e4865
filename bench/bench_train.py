"""Ray Train's overhead: `athanor train` on one worker against a plain PyTorch loop, same model, data and batch.

Both sides train the same config (default configs/demo.yaml's model, batch and schedule) on the same token shards
for --steps optimizer steps, each in a fresh process with the same thread settings (OMP_NUM_THREADS as Ray gives a
training worker), one after the other, repeated --repeats times and interleaved so machine noise hits both. The plain loop is what a user would write by hand: the Transformer,
the global-index loader, AdamW, gradient accumulation, clipping, the same learning-rate schedule; no Ray, no
process group, no checkpoints, no MLflow. `athanor train` runs with its checkpoints and MLflow logging on, as a user
runs it (one worker trains the bare model: FSDP2 or DDP over a single rank would only add overhead).

Two figures per side: steady-state tokens/s (median step time after --warmup steps, from the per-step timestamps
`train.log_sample_ids` writes) and end-to-end wall time of the command (start-up included).

    python bench/bench_train.py --workdir runs/demo           # a run folder with shards and a tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from athanor.cluster.loader import GlobalBatchLoader
from athanor.cluster.schedule import lr_at
from athanor.cluster.train import build_optimizer, grad_accum_steps, model_config_for
from athanor.config import load_config
from athanor.model.transformer import Transformer
from athanor.pipelines.shards import TokenShards

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg, workdir: Path, steps: int) -> list[float]:
    """Per-step wall times of a hand-written single-process loop."""
    t = cfg.train
    torch.manual_seed(t.seed)
    torch.set_num_threads(t.cpus_per_worker)
    data = TokenShards(workdir, "train")
    model = Transformer(model_config_for(cfg, data.vocab_size))
    optimizer = build_optimizer(model, t)
    loader = GlobalBatchLoader(data, t.global_batch_size, seed=t.seed, rank=0, world_size=1)
    accum = grad_accum_steps(t, 1)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, t)
        batch = loader.next_batch()
        for i in range(accum):
            sl = slice(i * t.micro_batch_size, (i + 1) * t.micro_batch_size)
            loss = model.loss(model(batch["input_ids"][sl]), batch["targets"][sl]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def plain_loop_process(config: Path, workdir: Path, steps: int, threads: int) -> list[float]:
    """plain_loop in a fresh process with the thread settings Ray gives a training worker (OMP_NUM_THREADS), so
    neither side runs in a process the other does not have: in this one, the loop measured ~5% slower."""
    cmd = [sys.executable, __file__, "--config", str(config), "--workdir", str(workdir), "--steps", str(steps),
           "--plain-loop-json"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"plain loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def athanor_train(config: Path, workdir: Path, steps: int, scratch: Path) -> tuple[list[float], float]:
    """(per-step wall times, command wall time) of `athanor train` on one worker in a fresh copy of the run folder."""
    run = scratch / "athanor"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for name in ("shards", "tokenizer", "manifest.json"):
        (shutil.copytree if (workdir / name).is_dir() else shutil.copy)(workdir / name, run / name)
    sets = [f"run.workdir={run}", "train.num_workers=1", "train.min_workers=null", f"train.max_steps={steps}",
            "train.log_sample_ids=true", f"train.checkpoint_every={steps}",
            f"train.eval_every={steps}", "run.name=bench-train"]
    cmd = [sys.executable, "-m", "athanor.cluster.cli", "train", str(config)] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"athanor train failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "train_samples.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records]
    first = records[0]["first_step_s"]
    return [first] + [b - a for a, b in zip(stamps, stamps[1:])], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-loop-json", action="store_true", help=argparse.SUPPRESS)  # the plain loop's process
    args = parser.parse_args()
    if not (args.workdir / "manifest.json").exists():
        raise SystemExit(f"{args.workdir} has no token shards: run `athanor run {args.config}` first or pass --workdir")
    cfg = load_config(args.config, [f"run.workdir={args.workdir}", "train.num_workers=1", "train.min_workers=null"])
    if args.plain_loop_json:
        print(json.dumps(plain_loop(cfg, args.workdir, args.steps)))
        return
    tokens_per_step = cfg.train.global_batch_size * cfg.tokenize.seq_len

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            steps = plain_loop_process(args.config, args.workdir, args.steps, cfg.train.cpus_per_worker)
            side = results.setdefault("plain PyTorch loop", {"step": [], "wall": []})
            side["step"] += steps[args.warmup:]
            side["wall"].append(time.perf_counter() - t0)
            steps, wall = athanor_train(args.config, args.workdir, args.steps, Path(scratch))
            side = results.setdefault("athanor train, 1 worker", {"step": [], "wall": []})
            side["step"] += steps[args.warmup:]
            side["wall"].append(wall)

    base = statistics.median(results["plain PyTorch loop"]["step"])
    print(f"\n{args.steps} steps x {tokens_per_step} tokens, {cfg.train.cpus_per_worker} thread(s), "
          f"median of steps after the first {args.warmup}, {args.repeats} interleaved repeats\n")
    print("| side | tokens/s (steady) | ratio to plain loop | overhead | wall s (median, incl. start-up) |")
    print("|---|---|---|---|---|")
    for name, side in results.items():
        step = statistics.median(side["step"])
        print(f"| {name} | {tokens_per_step / step:,.0f} | {base / step:.3f} | {step / base - 1:+.1%} | "
              f"{statistics.median(side['wall']):.1f} |")


if __name__ == "__main__":
    main()
