"""DPO's reference log-probs precomputed against a live reference: `athanor dpo` with dpo.reference=precomputed and
=live, for finetune.method=lora and =full, same base, pairs, batch and steps.

Every side is the same command a user runs, `athanor dpo CONFIG --set finetune.method=lora|full
--set dpo.reference=precomputed|live --set finetune.base=BASE --set run.workdir=<scratch>`, each in a fresh process
and a fresh working folder (so a precomputed side always pays for its reference stage: nothing is reused), with the
same config (default configs/dpo-smoke.yaml: the Python FAQ preference pairs in data/preferences, which `make setup`
builds), the same base checkpoint, global batch, sequence length, learning-rate schedule, seed, worker count and
--steps. Within a method only dpo.reference differs, so what differs in the figures is where the reference model
runs: precomputed scores every answer once with the base, in a Ray Data actor pool (cluster/reference.py) before
training, and training holds one model and does one forward and backward per step; live runs the reference inside
every step, an extra no-grad forward over the same rows (LoRA: the same model with its adapters switched off, no
second copy; full: a frozen copy of the base, a second model in every training worker's memory). With --repeats > 1
the order of the four sides reverses every repeat (lora-precomputed, lora-live, full-precomputed, full-live, then
back) so machine noise hits every side. Each side evaluates the held-out pairs before its first step and after its
last, and checkpoints once, at the end, so no step pays for a checkpoint or an evaluation mid-run.

Figures per side:
- peak memory of a training worker: on CPU its RSS (psutil, every --sample-s seconds, the RayTrainWorker processes
  under the command; the max over time and workers); on GPU the memory nvidia-smi shows per worker process (the
  caching allocator's reservation plus the CUDA context). The precomputed reference stage runs in Ray Data actors,
  not in the training workers, and is over before they start: it is not in this figure;
- steady-state step time: the median over the steps after --warmup of the gaps between the per-step timestamps
  `train.log_sample_ids` writes (a step = global batch x 2 answers x window tokens, padding included), over every
  repeat's steps, and the lowest of the repeats' own medians ("best run": the one least slowed by other load);
- the reference stage's wall time (the `reference=` figure of the command's "stage seconds" line: Ray Data start-up,
  the actor loading the base, scoring every train and held-out answer, writing the Parquet parts), the training
  stage's, and the command's whole wall time (Ray start-up, packing the pairs and evaluation included);
- the training loss at the first and the last step (the loop's global mean over the batch's pairs, from the same
  per-step records; ln 2 = 0.6931 at step 1, where the policy is still the reference) and, at the end, the held-out
  DPO loss and reward accuracy (MLflow val_dpo_loss, val_reward_accuracy).

The ratio rows are live / precomputed per method. Their loss column is the check that the comparison is one of
cost at the same output: the two modes compute the same loss from the same reference, so their per-step training
loss curves must agree; it shows the largest |Δ loss| over every step between the precomputed and the live side of
the same repeat (and the difference of the final held-out DPO loss). What is left is float noise: the reference
stage scores answers in batches of eval.batch_size, the live reference in micro-batches inside the loop, and a sum
of hundreds of token log-probs differs in its last bits; a gap of 1e-3 or more would mean the two modes do not compute
the same thing. With --repeats > 1 the same figure between repeats of one side is printed too: the run-to-run floor.
"pays back after" is the reference stage's time over the step time live adds: the step count beyond which
precomputing is cheaper end to end (this one base and data set; the stage is committed and reused by a rerun with
the same base and pairs, where it costs nothing).

On CPU with the smoke model (~0.3 M parameters) a step is short and the reference stage is dominated by Ray Data
start-up, so "pays back after" is large there and the memory ratio is near 1 (the PyTorch runtime and activations
dominate a worker); full-live's second model is then only the smoke model's ~1 MB. On a shared machine one repeat's
step times are noisy: use --repeats. The intended comparison is on a GPU with a base trained from the 1B preset
(model.preset=1b) and configs/dpo-demo.yaml with --gpu, where the live reference's extra forward should cost about
a third of a step (a forward beside a forward and backward) and full DPO's frozen copy is a second 1B model per
worker.

    python bench/bench_dpo.py --base runs/smoke --steps 20 --repeats 1
    python bench/bench_dpo.py            # runs/smoke if it has a checkpoint, else trains one first (~2.5 min)
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_bench import (ROOT, PeakMemory, add_run_args, athanor, check_run_args, default_base, metric_history, mlflow_run,  # noqa: E402
                       step_records, wait)

from athanor.config import load_config  # noqa: E402

METHODS = ("lora", "full")
REFERENCES = ("precomputed", "live")
AGREE = 1e-3  # |Δ loss| above this between the reference modes: they do not compute the same loss


def stage_seconds(log: Path) -> dict[str, float]:
    """The command's own "stage seconds: name=s, ..." line (cluster/cli.py), as a dict."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("stage seconds: ")]
    if not lines:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", lines[-1])}


def dpo(method: str, reference: str, args, base: Path, work: Path, gpu: bool) -> dict:
    """One side: `athanor dpo` with this method and reference mode, measured; its figures."""
    sets = [f"finetune.method={method}", f"dpo.reference={reference}", f"finetune.base={base}",
            f"run.workdir={work}", f"run.name=bench-dpo-{method}-{reference}", f"train.max_steps={args.steps}",
            "train.log_sample_ids=true", f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}"]
    if gpu:
        sets.append("train.use_gpu=true")
    sets += args.set
    cfg = load_config(args.config, sets)
    log = work.parent / f"{work.name}.log"
    work.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = athanor(["dpo", str(args.config)] + [a for s in sets for a in ("--set", s)], log)
    with PeakMemory(proc.pid, args.sample_s, gpu) as memory:
        wait(proc, log, f"athanor dpo (method={method}, reference={reference})")
    wall = time.perf_counter() - t0

    records, step_times = step_records(work, f"{method}/{reference}")
    client, run = mlflow_run(work, cfg.mlflow.experiment)
    history = metric_history(client, run, ("val_dpo_loss", "val_reward_accuracy"))
    final = max(history["val_dpo_loss"])
    stages = stage_seconds(log)
    return {"trainable": int(run.data.params["model.trainable_params"]),
            "rss": memory.peak_rss, "gpu": memory.peak_gpu, "workers": len(memory.workers),
            "steps": step_times[args.warmup:], "wall": wall,
            "reference_s": stages.get("reference"), "train_s": stages.get("train"),
            "losses": {s: r["loss"] for s, r in records.items()},
            "val_loss": (history["val_dpo_loss"][0], history["val_dpo_loss"][final]),
            "val_accuracy": (history["val_reward_accuracy"][0], history["val_reward_accuracy"][final]),
            "final_step": final, "rows_per_step": 2 * cfg.train.global_batch_size, "cfg": cfg, "log": log}


def max_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """The largest |Δ| between two loss curves over the steps both have (inf when a step is missing from one)."""
    if set(a) != set(b):
        return float("inf")
    return max(abs(a[s] - b[s]) for s in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, ROOT / "configs" / "dpo-smoke.yaml", 20, "align")
    parser.add_argument("--method", dest="methods", action="append", choices=METHODS, default=None,
                        help="finetune.method to measure (repeatable; default: both)")
    args = parser.parse_args()
    check_run_args(args)
    args.methods = tuple(m for m in METHODS if m in (args.methods or METHODS))

    tmp = tempfile.TemporaryDirectory(prefix="bench-dpo-") if args.scratch is None else None
    scratch = Path(tmp.name) if tmp else args.scratch.resolve()
    sides = [(m, r) for m in args.methods for r in REFERENCES]
    try:
        base = default_base(args.base, scratch)
        results: dict[tuple[str, str], list[dict]] = {side: [] for side in sides}
        for i in range(args.repeats):
            for method, reference in (sides if i % 2 == 0 else sides[::-1]):
                print(f"repeat {i + 1}/{args.repeats}: athanor dpo, method={method}, reference={reference} ...",
                      flush=True)
                results[method, reference].append(
                    dpo(method, reference, args, base, scratch / f"{method}-{reference}-{i}", args.gpu))
    finally:
        if tmp:
            tmp.cleanup()

    report(args, base, results)


def report(args, base: Path, results: dict[tuple[str, str], list[dict]]) -> None:
    first = next(iter(results.values()))[0]
    cfg = first["cfg"]
    t, ft, d = cfg.train, cfg.finetune, cfg.dpo
    mb = 1 / 2**20

    def median(runs, key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    def row(side) -> dict:
        runs = results[side]
        return {"trainable": runs[0]["trainable"],
                "memory": max(r["gpu"] if args.gpu else r["rss"] for r in runs) * mb,
                "step": statistics.median(s for r in runs for s in r["steps"]),
                "step_best": min(statistics.median(r["steps"]) for r in runs),
                "reference_s": median(runs, "reference_s"), "train_s": median(runs, "train_s"),
                "wall": median(runs, "wall"),
                "loss": (statistics.median(r["losses"][1] for r in runs),
                         statistics.median(r["losses"][max(r["losses"])] for r in runs)),
                "val_loss": statistics.median(r["val_loss"][1] for r in runs),
                "val_accuracy": statistics.median(r["val_accuracy"][1] for r in runs),
                "final": runs[0]["final_step"], "workers": max(r["workers"] for r in runs)}

    rows = {side: row(side) for side in results}
    memory = "peak GPU MB (nvidia-smi, per worker)" if args.gpu else "peak RSS MB (per worker)"
    lora = (f", LoRA rank {ft.rank}, alpha {ft.alpha:g} on {','.join(ft.target_modules)}"
            if "lora" in args.methods else "")
    print(f"\nbase {base}; {args.config.name}: {args.steps} steps x {t.global_batch_size} pairs (x 2 answers) x "
          f"{d.seq_len} tokens, {t.num_workers} worker(s) ({'GPU' if args.gpu else f'{t.cpus_per_worker} CPU each'}), "
          f"{d.loss_type} loss, β {d.beta:g}{lora}; reference stage: {cfg.eval.actors} actor(s), batch "
          f"{cfg.eval.batch_size}; step time the median after the first {args.warmup}; {args.repeats} interleaved "
          f"repeat(s)\n")
    print(f"| method | reference | trainable params | {memory} | step s (steady; best run) | reference stage s "
          f"| train stage s | wall s | train loss step 1 → {args.steps} | val DPO loss after | val reward acc after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def secs(v):
        return "—" if v is None else f"{v:.1f}"

    for (m, ref), r in rows.items():
        print(f"| {m} | {ref} | {r['trainable']:,} | {r['memory']:,.0f} | {r['step']:.3f}; {r['step_best']:.3f} | "
              f"{secs(r['reference_s'])} | {secs(r['train_s'])} | {r['wall']:.1f} | "
              f"{r['loss'][0]:.4f} → {r['loss'][1]:.4f} | "
              f"{r['val_loss']:.4f} | {r['val_accuracy']:.3f} |")
    notes, gaps = [], {}
    for m in args.methods:
        pre, live = rows[m, "precomputed"], rows[m, "live"]
        gaps[m] = max(max_gap(a["losses"], b["losses"])
                      for a, b in zip(results[m, "precomputed"], results[m, "live"]))
        val_gap = max(abs(a["val_loss"][1] - b["val_loss"][1])
                      for a, b in zip(results[m, "precomputed"], results[m, "live"]))
        train_ratio = (f"{live['train_s'] / pre['train_s']:.3f}" if live["train_s"] and pre["train_s"] else "—")
        print(f"| {m}: live / precomputed | | {live['trainable'] / pre['trainable']:.3f} | "
              f"{live['memory'] / pre['memory']:.3f} | {live['step'] / pre['step']:.3f}; "
              f"{live['step_best'] / pre['step_best']:.3f} | "
              f"0 vs {secs(pre['reference_s'])} | {train_ratio} | {live['wall'] / pre['wall']:.3f} | "
              f"max \\|Δ\\| {gaps[m]:.1e} over {args.steps} steps | Δ {val_gap:.1e} | |")
        for what, key in (("median step", "step"), ("best run's median step", "step_best")):
            extra = live[key] - pre[key]
            if pre["reference_s"] is None:
                break
            payback = (f"precomputing pays back its {pre['reference_s']:.1f} s reference stage after "
                       f"{pre['reference_s'] / extra:,.0f} steps (live adds {extra * 1e3:.1f} ms a step)"
                       if extra > 0 else f"live adds no step time here ({extra * 1e3:+.1f} ms a step)")
            notes.append(f"{m}, by the {what}: {payback}")
        if gaps[m] > AGREE:
            notes.append(f"{m}: the loss curves of the two reference modes differ by up to {gaps[m]:.2e} (> {AGREE:g}):"
                         " they do not compute the same loss")
        if args.repeats > 1:
            floor = max(max_gap(runs[0]["losses"], r["losses"]) for ref in REFERENCES
                        for runs in [results[m, ref]] for r in runs[1:])
            notes.append(f"{m}: run-to-run floor, max |Δ loss| between repeats of one side: {floor:.1e}")
    for (m, ref), r in rows.items():
        if r["final"] != args.steps:
            notes.append(f"{m}/{ref}: the last val_dpo_loss is at step {r['final']}, not {args.steps}")
        if not r["workers"]:
            notes.append(f"{m}/{ref}: no RayTrainWorker process was sampled (a run shorter than --sample-s?)")
        if (ref == "precomputed") != (r["reference_s"] is not None):
            notes.append(f"{m}/{ref}: the command's stage seconds {'lack' if ref == 'precomputed' else 'have'} a "
                         "reference stage")
    for n in notes:
        print(f"\nnote: {n}")


if __name__ == "__main__":
    main()
