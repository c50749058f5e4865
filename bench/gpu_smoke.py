"""A 2-rank training smoke run on one device, without Ray: the loop's own pieces (parallel model, optimizer, global
batch loader, precision context) on real packed shards, two processes sharing the GPU.

For a GPU machine that lacks Ray (bench/gpu_check.sh: Ray's wheel is larger than what can be carried there). NCCL
refuses two ranks on one GPU, so the ranks talk over gloo and train data-parallel with DDP, whose gradient
all-reduce gloo does on CUDA tensors; it checks that a multi-rank step runs on the GPU in the loop's precision and
that the loss falls, not the speed of NCCL. Prints one line of JSON.

    python bench/gpu_smoke.py --shards .gpu/shards --device cuda
    python bench/gpu_smoke.py --shards .gpu/shards --device cpu --preset tiny --steps 20   # the script, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    from athanor.cluster.inference import training_precision
    from athanor.cluster.loader import GlobalBatchLoader
    from athanor.cluster.objective import objective_for
    from athanor.cluster.train import build_optimizer, build_parallel_model
    from athanor.config import AthanorConfig
    from athanor.model.presets import preset
    from athanor.pipelines.shards import TokenShards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    shards = TokenShards(args.shards, "train")
    mcfg = preset(args.preset, vocab_size=shards.vocab_size, max_seq_len=max(shards.seq_len, 256))
    cfg = AthanorConfig.model_validate({"train": {
        "data_parallel": "ddp", "micro_batch_size": args.micro_batch, "global_batch_size": WORLD * args.micro_batch,
        "lr": args.lr, "num_workers": WORLD}})
    t, objective = cfg.train, objective_for(cfg, "pretrain")
    torch.manual_seed(0)
    model = build_parallel_model(mcfg, t, device, WORLD)
    optimizer = build_optimizer(model, t)
    loader = GlobalBatchLoader(shards, t.global_batch_size, seed=0, rank=rank, world_size=WORLD)
    losses, started = [], time.perf_counter()
    for _ in range(args.steps):
        batch = {k: v.to(device) for k, v in loader.next_batch().items()}
        with training_precision(device):  # the loop's forward and loss, as cluster/train.py runs them
            loss = objective.micro_loss(model, batch, slice(None), 1, WORLD)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float().cpu()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if rank == 0:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        Path(out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "ranks": WORLD,
            "preset": args.preset, "params": model.module.num_params() if hasattr(model, "module") else None,
            "steps": args.steps, "loss_first": round(first, 4), "loss_last": round(last, 4),
            "tokens_per_s": round(args.steps * t.global_batch_size * shards.seq_len / seconds),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "ok": last < first}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="a packed workdir (bench/gpu_check.sh --prepare)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"athanor-gpu-smoke-{os.getpid()}.json"
    mp.spawn(rank_main, args=(args, free_port(), str(out)), nprocs=WORLD, join=True)
    result = json.loads(out.read_text())
    print(json.dumps(result))
    if not result["ok"]:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
