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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_bench import (ROOT, PeakMemory, add_run_args, athanor, check_run_args, default_base, dir_bytes, metric_history,  # noqa: E402
                       mlflow_run, step_records, wait)

from athanor.config import load_config  # noqa: E402

METHODS = ("lora", "full")


def finetune(method: str, args, base: Path, work: Path, gpu: bool) -> dict:
    """One side: `athanor finetune` with this method, measured; its figures."""
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

    _, step_times = step_records(work, method)
    client, run = mlflow_run(work, cfg.mlflow.experiment)
    history = metric_history(client, run, ("val_loss", "val_bpb"))
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
    add_run_args(parser, ROOT / "configs" / "finetune-smoke.yaml", 40, "fine-tune")
    args = parser.parse_args()
    check_run_args(args)

    tmp = tempfile.TemporaryDirectory(prefix="bench-finetune-") if args.scratch is None else None
    scratch = Path(tmp.name) if tmp else args.scratch.resolve()
    try:
        base = default_base(args.base, scratch)

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
