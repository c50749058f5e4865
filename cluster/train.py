"""Pretraining on Ray Train: a `TorchTrainer` whose workers read packed token shards and train the decoder.

The driver stays thin: it builds the trainer, Ray Train places the workers and sets up the process group
(gloo on CPU, NCCL on GPU). Each worker runs `train_loop_per_worker`, which is plain PyTorch: build the model,
wrap it in DDP, take its slice of every global batch from the global-index loader, step. Rank 0 logs to the
MLflow run the driver resolved. Checkpoints carry model, optimizer, schedule and loader state; a relaunch with
the same run name resumes from the latest one.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from athanor.config import AthanorConfig, ModelConfig, TrainConfig
from athanor.layout import RunLayout

from .checkpoint import load_state, save_checkpoint


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def grad_accum_steps(t: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step so that the global batch stays the same at any worker count."""
    per_rank, rem = divmod(t.global_batch_size, world_size)
    if rem or per_rank % t.micro_batch_size:
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x workers ({world_size})"
        )
    return per_rank // t.micro_batch_size


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, not biases), fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), fused=fused)


def model_config_for(cfg: AthanorConfig, vocab_size: int) -> ModelConfig:
    """The model section resolved: preset shape under explicit fields, vocabulary from the tokenizer if left at 0."""
    m = cfg.model.model_copy()
    if m.preset is not None:
        from athanor.model.presets import PRESETS

        explicit = m.model_dump(include=m.model_fields_set - {"preset"})
        m = ModelConfig(**{**PRESETS[m.preset], "vocab_size": 0, **explicit})
    if m.vocab_size == 0:
        m.vocab_size = vocab_size
    elif m.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
    m.max_seq_len = max(m.max_seq_len, cfg.tokenize.seq_len)
    return m


def _all_mean(x: torch.Tensor) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def _gather_sample_ids(ids: torch.Tensor) -> list[int]:
    """Every rank's slice of this step's global batch, in rank order: the global batch as the loader defined it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ids.tolist()
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids)
    return torch.cat(parts).tolist()


def _append_jsonl(path: Path, record: dict) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards, rank: int, world: int, t: TrainConfig, device) -> float | None:
    """Mean validation loss over the first eval_batches x micro_batch_size sequences, split across ranks."""
    n = min(len(shards), t.eval_batches * t.micro_batch_size)
    if n == 0:
        return None
    model.eval()
    core = getattr(model, "module", model)
    total = torch.zeros(2)
    for start in range(rank * t.micro_batch_size, n, world * t.micro_batch_size):
        ids = range(start, min(start + t.micro_batch_size, n))
        seqs = torch.stack([torch.from_numpy(shards[i].astype("int64")) for i in ids]).to(device)
        logits = core(seqs[:, :-1])
        total += torch.tensor([float(core.loss(logits, seqs[:, 1:])) * len(ids), len(ids)])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1]) if total[1] else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import mlflow
    import ray.train
    import ray.train.torch

    from athanor.cluster.loader import GlobalBatchLoader
    from athanor.model.flops import flops_per_token
    from athanor.model.transformer import Transformer
    from athanor.pipelines.shards import TokenShards

    cfg = AthanorConfig.model_validate(config["cfg"])
    layout = RunLayout(Path(config["workdir"]))
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)
    torch.set_num_threads(max(1, t.cpus_per_worker))

    train_data = TokenShards(layout.root, "train")
    val_data = TokenShards(layout.root, "val") if _has_split(layout, "val") else None
    mcfg = model_config_for(cfg, train_data.vocab_size)
    model = Transformer(mcfg).to(device)
    optimizer = build_optimizer(model, t)

    step, loader_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, loader_state = state["step"], state["loader"]

    model = ray.train.torch.prepare_model(model)  # DDP across workers (no-op wrapper for one worker)
    core = getattr(model, "module", model)
    accum = grad_accum_steps(t, world)
    loader = GlobalBatchLoader(train_data, t.global_batch_size, seed=t.seed, rank=rank, world_size=world,
                               state=loader_state)
    tokens_per_step = t.global_batch_size * train_data.seq_len

    flops_per_step = flops_per_token(mcfg, train_data.seq_len) * tokens_per_step
    samples_log = layout.root / "train_samples.jsonl"
    logging_rank = rank == 0 and config.get("mlflow_run_id")
    if logging_rank:
        mlflow.set_tracking_uri(config["mlflow_uri"])
        mlflow.start_run(run_id=config["mlflow_run_id"], log_system_metrics=t.system_metrics)
        mlflow.log_params({"model.num_params": core.num_params(), "train.grad_accum_steps": accum,
                           "model.vocab_size_resolved": mcfg.vocab_size})

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()
    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, t)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = loader.next_batch()
        inputs, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            sl = slice(i * t.micro_batch_size, (i + 1) * t.micro_batch_size)
            sync = nullcontext() if i == accum - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast:
                loss = core.loss(model(inputs[sl]), targets[sl]) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss = _all_mean(loss_sum)
        dt = time.perf_counter() - t0

        metrics = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / dt,
                   "world_size": world, "grad_accum_steps": accum, "step": step}
        if device.type == "cuda":
            metrics["mfu"] = flops_per_step / dt / (world * t.peak_tflops * 1e12)
        if t.log_sample_ids:
            ids = _gather_sample_ids(batch["sample_ids"].to(device))
            if rank == 0:  # a step replayed after a failure appends again: the last record of a step counts
                _append_jsonl(samples_log, {"step": step, "world_size": world, "loss": step_loss, "sample_ids": ids})
        if val_data is not None and (step % t.eval_every == 0 or step == t.max_steps):
            val_loss = evaluate(model, val_data, rank, world, t, device)
            if val_loss is not None:
                metrics["val_loss"] = val_loss
        if logging_rank and (step % t.log_every == 0 or step == t.max_steps):
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)

        if step % t.checkpoint_every == 0 or step == t.max_steps:
            state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "loader": loader.state_dict(), "model_config": mcfg.model_dump(mode="json")}
            _report_with_checkpoint(metrics, rank, state, layout.tokenizer_model)
    if logging_rank:
        mlflow.end_run()


def _has_split(layout: RunLayout, split: str) -> bool:
    import json

    manifest = json.loads(layout.manifest.read_text())
    return manifest["splits"].get(split, {}).get("sequences", 0) > 0


def _report_with_checkpoint(metrics: dict, rank: int, state: dict, tokenizer_model: Path) -> None:
    """Every rank calls report (it is a barrier); rank 0 attaches the checkpoint (DDP replicas are identical)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d), state, tokenizer_model)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_training(cfg: AthanorConfig, layout: RunLayout, mlflow_run_id: str | None, mlflow_uri: str | None):
    """Build and fit the TorchTrainer; returns Ray Train's Result (its checkpoint is the final one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    for world in range(t.min_workers or t.num_workers, t.num_workers + 1):
        grad_accum_steps(t, world)  # fail fast on a batch that some allowed worker count cannot split
    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "workdir": str(layout.root),
                           "mlflow_run_id": mlflow_run_id, "mlflow_uri": mlflow_uri},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
                                     use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(layout.checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(t.cpus_per_worker)}},
        ),
    )
    return trainer.fit()
