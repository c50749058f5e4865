"""Recovery time: from a training worker's death (SIGKILL) to the first optimizer step after the resume, and its parts.

Runs `athanor train` (default configs/smoke.yaml: two workers, FSDP2) with a checkpoint every --checkpoint-every
steps, kills one RayTrainWorker process once training is --after steps past a checkpoint, and reads the per-step
records (`train.log_sample_ids`): the first record of the new worker group carries its start time, the seconds it
spent before loading the checkpoint (process group, model build), the checkpoint load, and its first step. Printed:

    detect + restart   kill -> the new worker group's training function starts (Ray notices the death, tears the
                       group down, places and starts new workers)
    set-up             process group, mesh, model and optimizer in the new workers
    checkpoint load    DCP load, resharded to the new group
    warm-up            the first step after the load
    replayed steps     steps since the checkpoint, trained again (their time is the price of the checkpoint interval)

    python bench/bench_recovery.py --workdir runs/smoke        # a run folder with shards and a tokenizer
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from training_runs import fresh_training_dir, records, start_train, train_workers  # noqa: E402


def one_recovery(config: Path, data_run: Path, scratch: Path, checkpoint_every: int, after: int, i: int) -> dict:
    work = fresh_training_dir(data_run, scratch / f"run{i}")
    steps = 2 * checkpoint_every + after
    proc = start_train(work, f"train.checkpoint_every={checkpoint_every}", f"train.max_steps={steps}",
                       "train.log_sample_ids=true", config=str(config))
    try:
        while max((r["step"] for r in records(work)), default=0) < checkpoint_every + after:
            if proc.poll() is not None:
                raise SystemExit(f"training ended early:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.05)
        killed_at = time.time()
        last_step = records(work)[-1]["step"]
        train_workers(proc.pid)[-1].send_signal(signal.SIGKILL)
        proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode:
        raise SystemExit(f"training failed after the kill (rc={proc.returncode})")
    recs = records(work)
    first = next(r for r in recs if "started" in r and r["started"] > killed_at)
    steady = statistics.median(b["time"] - a["time"] for a, b in zip(recs, recs[1:]) if "started" not in b)
    return {
        "detect + restart": first["started"] - killed_at,
        "set-up": first["setup_s"],
        "checkpoint load": first["restore_s"],
        "warm-up": first["first_step_s"],
        "kill -> first step": first["time"] - killed_at,
        "replayed steps": last_step - (first["step"] - 1),
        "steady step": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smoke.yaml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smoke")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--after", type=int, default=10, help="kill this many steps past a checkpoint")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (args.workdir / "manifest.json").exists():
        raise SystemExit(f"{args.workdir} has no token shards: run `athanor run {args.config}` first or pass --workdir")
    with tempfile.TemporaryDirectory() as scratch:
        runs = [one_recovery(args.config, args.workdir, Path(scratch), args.checkpoint_every, args.after, i)
                for i in range(args.repeats)]
    print(f"\nSIGKILL of one of the workers {args.after} steps past a checkpoint; median of {args.repeats} runs\n")
    print("| part | seconds |")
    print("|---|---|")
    for key in runs[0]:
        value = statistics.median(r[key] for r in runs)
        print(f"| {key} | {value:.0f} |" if key == "replayed steps" else f"| {key} | {value:.2f} |")


if __name__ == "__main__":
    main()
