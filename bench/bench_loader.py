"""Loader throughput at seq_len 2048 against what one H100 training a 1B-parameter model would consume.

Packs the curated corpus into seq_len-2048 shards in a scratch workdir, then times GlobalBatchLoader.next_batch()
for one rank (mmap read, gather, int64 tensors) over a few epochs. Demand: the project's own training FLOPs per token
(`athanor.model.flops.flops_per_token`: 6 * N_matmul plus attention, 12 * n_layers * dim * seq_len) for the `1b`
preset (Llama-3.2-1B's shape) at the benchmark's seq_len; an H100 (989 dense bf16 TFLOP/s) at 50% MFU then consumes
0.5 * 989e12 / 8.22e9 = 60,160 tokens/s at seq_len 2048, i.e. 29.4 sequences/s of 2048 tokens (the 6 * 1e9 rule
of thumb, without attention, said 40.2).

    python bench/bench_loader.py --curated runs/demo/curated/final --tokenizer runs/demo/tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import ray

from athanor.cluster.loader import GlobalBatchLoader
from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.model.flops import flops_per_token
from athanor.model.presets import preset
from athanor.pipelines.pack import pack_shards
from athanor.pipelines.shards import TokenShards

H100_BF16_DENSE_FLOPS = 989e12
MFU = 0.5
MODEL = "1b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curated", type=Path, default=Path("runs/demo/curated/final"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer/tokenizer.model"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="time each batch size for about this long")
    args = parser.parse_args()
    for path in (args.curated, args.tokenizer):
        if not path.exists():
            raise SystemExit(f"{path} not found: run `athanor run configs/demo.yaml` or pass --curated/--tokenizer")

    demand = MFU * H100_BF16_DENSE_FLOPS / flops_per_token(preset(MODEL), args.seq_len) / args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        layout = RunLayout.from_workdir(tmp)
        shutil.copytree(args.curated, layout.curated("final"))
        layout.tokenizer_dir.mkdir(parents=True)
        shutil.copy(args.tokenizer, layout.tokenizer_model)
        ray.init(include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = AthanorConfig.model_validate({"tokenize": {"seq_len": args.seq_len, "val_fraction": 0.0}})
        pack_shards(cfg, layout)
        ray.shutdown()
        shards = TokenShards(layout.root, "train")

        print(f"\n{len(shards)} train sequences of {args.seq_len + 1} tokens ({shards.dtype}), one rank")
        print(f"demand: the {MODEL} preset on one H100 at {MFU:.0%} MFU = {demand:.1f} sequences/s "
              f"({flops_per_token(preset(MODEL), args.seq_len) / 1e9:.2f} GFLOP per token, attention included)\n")
        print(f"{'global batch':>12} {'steps':>8} {'sequences/s':>12} {'tokens/s':>12} {'x demand':>9}")
        for batch_size in args.batch_sizes:
            loader = GlobalBatchLoader(shards, batch_size, seed=0, rank=0, world_size=1)
            steps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                loader.next_batch()
                steps += 1
            rate = steps * batch_size / (time.perf_counter() - t0)
            print(f"{batch_size:>12} {steps:>8} {rate:>12,.0f} {rate * args.seq_len:>12,.0f} {rate / demand:>8,.0f}x")


if __name__ == "__main__":
    main()
