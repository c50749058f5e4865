"""Training throughput and MFU of the model presets on one GPU in bf16, attention backends side by side.

For each preset (default `350m` and `1b`, at their published shapes and vocabularies) and each attention backend
(flash-attn when it imports, then PyTorch SDPA as the baseline), times whole training steps: forward, backward and a
fused AdamW step under bf16 autocast, fp32 master weights, as `athanor train` runs them. The tokens are real: the
curated corpus packed at --seq-len in a scratch workdir (as bench_loader does), read by the training loader.
MFU = achieved FLOP/s / peak, with the project's FLOPs-per-token formula (athanor.model.flops, attention included)
and the H100's 989 TFLOP/s dense bf16 peak unless --peak-tflops says otherwise. A preset that does not fit at the
asked micro-batch prints OOM instead of a figure; --activation-checkpointing and --compile add those variants.

    python bench/bench_gpu.py --curated runs/demo/curated/final --tokenizer runs/demo/tokenizer/tokenizer.model
    python bench/bench_gpu.py --device cpu --presets tiny --seq-len 256 --steps 3   # checks the script on CPU
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from athanor.cluster.loader import GlobalBatchLoader
from athanor.cluster.parallelize import parallelize
from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.model import attention
from athanor.model.flops import flops_per_token
from athanor.model.presets import preset
from athanor.model.transformer import Transformer
from athanor.pipelines.shards import TokenShards


def pack(curated: Path, tokenizer: Path, seq_len: int, workdir: Path) -> TokenShards:
    """The curated corpus as train shards of seq_len + 1 tokens, packed by the project's own pack stage."""
    import ray  # only to pack: with --shards (bench/gpu_check.sh on a GPU machine without Ray) it is not needed

    from athanor.pipelines.pack import pack_shards

    layout = RunLayout.from_workdir(workdir)
    shutil.copytree(curated, layout.curated("final"))
    layout.tokenizer_dir.mkdir(parents=True)
    shutil.copy(tokenizer, layout.tokenizer_model)
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pack_shards(AthanorConfig.model_validate({"tokenize": {"seq_len": seq_len, "val_fraction": 0.0}}), layout)
    ray.shutdown()
    return TokenShards(layout.root, "train")


def measure(name: str, backend: str, shards: TokenShards, args, device: torch.device, compiled: bool,
            checkpointed: bool) -> dict:
    """Tokens/s, step time and peak memory of --steps training steps after --warmup."""
    shape = preset(name)  # its own vocabulary, unless the tokenizer's is larger (the CPU check's `tiny`)
    cfg = preset(name, attention=backend, vocab_size=max(shape.vocab_size, shards.vocab_size),
                 max_seq_len=max(shards.seq_len, shape.max_seq_len))
    torch.manual_seed(0)
    model = parallelize(Transformer(cfg).to(device), None, activation_checkpointing=checkpointed, compile=compiled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loader = GlobalBatchLoader(shards, args.micro_batch, seed=0, rank=0, world_size=1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        batch = loader.next_batch()
        inputs = batch["input_ids"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        with autocast:
            loss = model.loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    tokens = args.micro_batch * shards.seq_len
    flops = flops_per_token(cfg, shards.seq_len) * tokens / seconds
    return {"params": model.num_params(), "tokens_s": tokens / seconds, "step_ms": 1e3 * seconds,
            "tflops": flops / 1e12, "mfu": flops / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
            "mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curated", type=Path, default=Path("runs/demo/curated/final"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer/tokenizer.model"))
    parser.add_argument("--shards", type=Path, default=None,
                        help="a workdir already packed at --seq-len (bench/gpu_check.sh --prepare makes one): no "
                             "packing, no Ray")
    parser.add_argument("--presets", nargs="+", default=["350m", "1b"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, autotuning, compile)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100 SXM)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    parser.add_argument("--activation-checkpointing", action="store_true", help="also time checkpointed blocks")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu to check the script on CPU")
    for path in (args.curated, args.tokenizer) if args.shards is None else (args.shards / "manifest.json",):
        if not path.exists():
            raise SystemExit(f"{path} not found: run `athanor run configs/demo.yaml` or pass --curated/--tokenizer")

    backends = ["flash", "sdpa"] if device.type == "cuda" else ["sdpa", "math"]
    if "flash" in backends and not attention.flash_available():
        print("flash-attn is not importable here: SDPA rows only")
        backends.remove("flash")
    variants = [(False, False)] + [(True, False)] * args.compile + [(False, True)] * args.activation_checkpointing
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = {}  # (preset, compiled, checkpointed, backend) -> measurement, None for OOM
    with tempfile.TemporaryDirectory() as tmp:
        shards = (TokenShards(args.shards, "train") if args.shards is not None
                  else pack(args.curated, args.tokenizer, args.seq_len, Path(tmp)))
        print(f"\n{gpu}, torch {torch.__version__}, seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
              f"{len(shards)} real sequences, {args.steps} timed steps after {args.warmup}\n")
        for name in args.presets:
            for compiled, checkpointed in variants:
                for backend in backends:
                    try:
                        rows[name, compiled, checkpointed, backend] = measure(name, backend, shards, args, device,
                                                                              compiled, checkpointed)
                    except torch.cuda.OutOfMemoryError:
                        rows[name, compiled, checkpointed, backend] = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

    print(f"| preset | params | attention | tokens/s | step ms | TFLOP/s | MFU | peak memory GiB | vs {backends[-1]} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, compiled, checkpointed, backend), r in rows.items():
        label = backend + " + compile" * compiled + " + activation checkpointing" * checkpointed
        if r is None:
            print(f"| {name} | | {label} | OOM at micro-batch {args.micro_batch} | | | | | |")
            continue
        base = rows.get((name, compiled, checkpointed, backends[-1]))
        ratio = f"{r['tokens_s'] / base['tokens_s']:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['mem_gib']:.1f}" if r["mem_gib"] is not None else "-"
        print(f"| {name} | {r['params'] / 1e6:,.1f}M | {label} | {r['tokens_s']:,.0f} | {r['step_ms']:.1f} | "
              f"{r['tflops']:.1f} | {mfu} | {mem} | {ratio} |")

if __name__ == "__main__":
    main()
