"""Time from `athanor train` to its first step: this tree against a baseline commit, alternated in one invocation.

Each round runs `athanor train configs/smoke.yaml` for one step, once from each source tree, on the same tokenized
workdir (a fresh `run.name` each time, so nothing resumes). "First step" is the MLflow timestamp of step 1's loss
(rank 0 logs it right after the step) minus the moment the command was started; "total" is the command's wall time.
The baseline is a `git worktree` of `--base` run with the same venv (PYTHONPATH puts its tree first, for the driver
and for the Ray workers it starts). Alternating the two sides spreads the machine's noise over both.

    python bench/bench_startup.py --base 1d84a4c --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(workdir: Path) -> None:
    """Curate and tokenize the smoke config's data once (the workdir is kept between invocations)."""
    if (workdir / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "athanor.cluster.cli", "tokenize" if (workdir / "stats").is_dir() else "run",
                    "configs/smoke.yaml", "--set", f"run.workdir={workdir}", "--set", "train.max_steps=1"],
                   cwd=ROOT, check=True)


def first_step_epoch(workdir: Path, run_name: str) -> float:
    """The wall-clock time (s since the epoch) at which rank 0 logged step 1's loss, from the run's MLflow store."""
    with sqlite3.connect(workdir / "mlflow.db") as db:
        row = db.execute("SELECT MIN(m.timestamp) FROM metrics m JOIN tags t ON m.run_uuid = t.run_uuid "
                         "WHERE t.key = 'athanor.run_name' AND t.value = ? AND m.step = 1 "
                         "AND m.key IN ('loss', 'train/loss')", (run_name,)).fetchone()
    if row[0] is None:
        raise RuntimeError(f"no step-1 loss for run {run_name} in {workdir}/mlflow.db")
    return row[0] / 1000


def one_run(tree: Path, workdir: Path, run_name: str) -> tuple[float, float]:
    """(seconds to the first step, seconds to exit) of one `athanor train` from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.time()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "athanor.cluster.cli", "train", "configs/smoke.yaml",
                        "--set", f"run.workdir={workdir}", "--set", f"run.name={run_name}",
                        "--set", "train.max_steps=1", "--set", "train.checkpoint_every=1000"],
                       cwd=tree, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{tree}: athanor train failed:\n{p.stderr[-3000:]}")
    return first_step_epoch(workdir, run_name) - started, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the baseline commit (e.g. the commit before a start-up change)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "athanor-bench-startup")
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    prepare(workdir)
    base_tree = Path(tempfile.mkdtemp(prefix="athanor-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                   capture_output=True)
    results: dict[str, list[tuple[float, float]]] = {"baseline": [], "this tree": []}
    try:
        stamp = int(time.time())
        for r in range(args.rounds):
            for side, tree in (("baseline", base_tree), ("this tree", ROOT)):
                name = f"startup-{stamp}-{r}-{'base' if side == 'baseline' else 'new'}"
                results[side].append(one_run(tree, workdir, name))
                print(f"round {r + 1} {side:<9}: first step {results[side][-1][0]:5.1f} s, "
                      f"exit {results[side][-1][1]:5.1f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    med = {side: (statistics.median(f for f, _ in v), statistics.median(t for _, t in v)) for side, v in
           results.items()}
    print(f"\n| side | first step (median of {args.rounds}) | exit (median) |")
    print("|---|---|---|")
    for side, (first, total) in med.items():
        print(f"| {side} | {first:.1f} s | {total:.1f} s |")
    print(f"| ratio (baseline / this tree) | {med['baseline'][0] / med['this tree'][0]:.2f}x | "
          f"{med['baseline'][1] / med['this tree'][1]:.2f}x |")


if __name__ == "__main__":
    main()
