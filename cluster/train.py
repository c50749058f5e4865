"""Pretraining on Ray Train: a `TorchTrainer` whose workers read packed token shards and train the decoder.

The driver stays thin: it builds the trainer, Ray Train places the workers and sets up the process group
(gloo on CPU, NCCL on GPU). Each worker runs `train_loop_per_worker`, which is plain PyTorch: build the model,
parallelize it over a (dp, tp) mesh of all workers (FSDP2 or DDP, and the tensor-parallel plan), take its data-parallel
slice of every global batch from the global-index loader, step. Rank 0 logs to the MLflow run the driver resolved.
Checkpoints (DCP, one file set per rank) carry model, optimizer, loader and RNG state; when the group is resized or
restarted, or the driver is relaunched with the same run name, training resumes from the newest one at any world size.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from athanor.config import AthanorConfig, DataConfig, ModelConfig, TrainConfig
from athanor.layout import RunLayout
from athanor.model.lora import trainable_parameters
from athanor.pipelines.tokenizer import Tokenizer

from .checkpoint import load_checkpoint, save_checkpoint
from .inference import compute_dtype, training_precision
from .objective import objective_for
from .parallelize import build_mesh, clip_grad_norm_, parallelize
from .schedule import lr_at


def grad_accum_steps(t: TrainConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step so that the global batch stays the same at any data-parallel size."""
    per_rank, rem = divmod(t.global_batch_size, dp_size)
    if rem or per_rank % t.micro_batch_size:
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel workers ({dp_size})"
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
    """The model section for this data (its preset was resolved when the config loaded): the vocabulary from the
    tokenizer if left at 0, a context at least the data's."""
    m = cfg.model.model_copy()
    if m.vocab_size == 0:
        m.vocab_size = vocab_size
    elif m.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
    m.max_seq_len = max(m.max_seq_len, cfg.tokenize.seq_len)
    return m


def _step_loss_and_stop(loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """The loss averaged over ranks, and whether any rank was asked to stop: one all-reduce carries both, so every
    rank takes the same decision after the same step."""
    import torch.distributed as dist

    x = torch.stack([loss.detach().float(), torch.tensor(float(stop_requested), device=loss.device)])
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
        world = dist.get_world_size()
    return float(x[0]) / world, bool(x[1] > 0)


def _gather_sample_ids(ids: torch.Tensor, tp_size: int) -> list[int]:
    """Every data-parallel rank's slice of this step's global batch, in rank order: the global batch as the loader
    defined it (tensor-parallel peers hold the same slice, so one per group is kept)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ids.tolist()
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids)
    return torch.cat(parts[::tp_size]).tolist()


def _append_jsonl(path: Path, record: dict) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class EvalSet:
    """Windows to score at every evaluation: the validation shards' first sequences, or a named set of documents."""

    name: str
    windows: list[list[int]]
    n_bytes: list[int]  # UTF-8 bytes behind each window's scored targets (a document's bytes on its first window)
    masks: list[list[int]] | None = None  # which targets count (fine-tuning: the responses); None: all


def val_shard_set(shards, n: int, tokenizer: Tokenizer) -> EvalSet:
    """The first n validation sequences, each one window with every target scored; in fine-tuning shards (one
    example per validation window, padded) the example alone, its response targets scored."""
    lengths, dummy = tokenizer.byte_lengths(), tokenizer.adds_dummy_prefix
    ids = range(min(len(shards), n))
    if not shards.has_loss_mask:
        return EvalSet("val", [shards[i].astype("int64").tolist() for i in ids],
                       [shards.target_bytes(i, lengths, dummy) for i in ids])
    windows, masks, n_bytes = [], [], []
    for i in ids:
        tokens, mask = shards.example(i)
        windows.append(tokens.astype("int64").tolist())
        masks.append(mask.astype(int).tolist())
        n_bytes.append(int(lengths[tokens[1:][mask.astype(bool)]].sum()))
    return EvalSet("val", windows, n_bytes, masks)


def document_set(name: str, files: list[str], tokenizer_path: str, context: int, max_windows: int,
                 data: DataConfig) -> EvalSet:
    """`train.eval_sets[name]`: its files read as curation reads them, cut like `athanor eval` cuts documents
    (BOS + tokens, non-overlapping windows of the training length), at most max_windows windows."""
    import pyarrow as pa

    from athanor.cluster.evaluate import document_windows, input_kind
    from athanor.pipelines.read import SCHEMA, file_rows

    rows = [r for path in files for r in file_rows(input_kind(path).removesuffix("_files"), path, data)]
    table = document_windows(pa.Table.from_pylist(rows, schema=SCHEMA), tokenizer_path, context, context)
    kept = [r for r in table.to_pylist() if r["error"] is None][:max_windows]
    if not kept:
        raise ValueError(f"train.eval_sets.{name}: no readable document in {files}")
    # Bytes per window from the targets it scores (a capped set scores part of a document, so the document's own
    # byte count would overstate them); the dummy-prefix space of a document's first piece is not in its text.
    tok = Tokenizer(tokenizer_path, num_threads=1)
    lengths, dummy = tok.byte_lengths(), tok.adds_dummy_prefix
    windows = [r["tokens"] for r in kept]
    n_bytes = [int(lengths[w[len(w) - r["n_scored"]:]].sum())
               - int(dummy and w[0] == tok.bos_id and lengths[w[1]] > 0) for w, r in zip(windows, kept)]
    masks = [[0] * (len(w) - 1 - r["n_scored"]) + [1] * r["n_scored"] for w, r in zip(windows, kept)]
    return EvalSet(name, windows, n_bytes, masks)


def rank_share(n: int, dp_rank: int, dp: int) -> tuple[list[int], list[int]]:
    """This data-parallel rank's contiguous share of n evaluation items, and that share padded with repeats of its
    last item to the same length on every rank (FSDP and TP need every rank to run the same forward passes; the
    repeats are scored and ignored)."""
    per_rank = -(-n // dp)
    mine = list(range(min(n, dp_rank * per_rank), min(n, (dp_rank + 1) * per_rank)))
    return mine, mine + [mine[-1] if mine else n - 1] * (per_rank - len(mine))


def forward_precision(model: torch.nn.Module, t: TrainConfig):
    """The precision of every forward pass of the loop, train steps and evaluation alike (`training_precision`)."""
    from torch.distributed.fsdp import FSDPModule

    device = next(model.parameters()).device
    return training_precision(device, t.mixed_precision, fsdp=isinstance(model, FSDPModule))


def vocab_parallel(t: TrainConfig):
    """loss_parallel() where tensor parallelism leaves the logits sharded by vocabulary (`build_parallel_model`):
    cross-entropy on the shards. It must cover the backward as well as the forward."""
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel() if t.tp_size > 1 else nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_set: EvalSet, dp_rank: int, dp: int, t: TrainConfig) -> dict[str, float]:
    """Loss (mean nats per token) and bits per byte of a set, its windows split across the dp ranks.

    The forward passes are training's: the same precision, the same cross-entropy (`token_nll`, on vocabulary
    shards under TP), so that val_loss and loss are one computation. Every rank runs the same number of them (FSDP
    and TP gather weights collectively): a rank whose share is short repeats its last window with weight zero.
    """
    import torch.distributed as dist

    from athanor.model.scoring import bits_per_byte, score_windows

    mine, padded = rank_share(len(eval_set.windows), dp_rank, dp)
    windows = [eval_set.windows[i] for i in padded]
    masks = [eval_set.masks[i] for i in padded] if eval_set.masks else None
    with forward_precision(model, t), vocab_parallel(t):
        scores = score_windows(model, windows, [len(w) - 1 for w in windows], batch_size=t.micro_batch_size,
                               target_masks=masks)
    total = torch.zeros(3, dtype=torch.float64)
    for i, s in zip(mine, scores):
        total += torch.tensor([-s.logprob, s.n_scored, eval_set.n_bytes[i]], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        total /= t.tp_size  # tensor-parallel peers computed the same windows
        dist.all_reduce(total)
    nats, tokens, n_bytes = (float(x) for x in total)
    return {"loss": nats / tokens, "bits_per_byte": bits_per_byte(nats, n_bytes)}


def _eval_metrics(model, eval_set: EvalSet, dp_rank: int, dp: int, t: TrainConfig) -> dict[str, float]:
    """A set's metrics under their MLflow names: val_loss / val_bpb for the validation shards."""
    result = evaluate(model, eval_set, dp_rank, dp, t)
    if eval_set.name == "val":
        return {"val_loss": result["loss"], "val_bpb": result["bits_per_byte"]}
    return {f"eval/{eval_set.name}/{k}": v for k, v in result.items()}


def system_metrics_in_background(tracking_uri: str, run_id: str):
    """MLflow's system-metrics monitor for this node (CPU, memory, GPU, under `system/`), started in a thread, so
    that importing MLflow and opening its store (~3 s) is not on the way to the first step; returns `stop()`. (Here,
    not in athanor.cluster.tracking, whose import is MLflow's.)"""
    import threading

    started: list = []

    def start() -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
        monitor.start()
        started.append(monitor)

    thread = threading.Thread(target=start, name="athanor-system-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        thread.join()
        for monitor in started:
            monitor.finish()

    return stop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: plain PyTorch over a (dp, tp) mesh of all workers."""
    import ray.train
    import ray.train.torch
    from athanor.cluster.console import StepConsole, post, quiet_worker_logs
    from athanor.cluster.loader import GlobalBatchLoader
    from athanor.cluster.stop import StopWatch
    from athanor.model.flops import flops_per_token
    from athanor.pipelines.shards import TokenShards

    started = time.time()  # with the first step's record: how a (re)start's time splits
    cfg = AthanorConfig.model_validate(config["cfg"])
    objective = objective_for(cfg, config.get("objective", "pretrain"))
    workdir = RunLayout.from_workdir(config["workdir"])
    layout = workdir.on_this_node()  # local files: a URI's node-local copy
    data = RunLayout(objective.data_root(workdir)).on_this_node()  # the shards this objective trains on
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    torch.set_num_threads(max(1, t.cpus_per_worker))

    train_data = objective.dataset(data.root, "train")
    mcfg = objective.model_config(train_data.vocab_size)
    tokenizer = Tokenizer(data.tokenizer_model, num_threads=1)
    eval_sets = [val_shard_set(TokenShards(data.root, "val"), t.eval_batches * t.micro_batch_size, tokenizer)
                 ] if _has_split(data, "val") else []
    eval_sets += [document_set(name, files, str(data.tokenizer_model), train_data.seq_len,
                               t.eval_batches * t.micro_batch_size, cfg.data) for name, files in t.eval_sets.items()]
    dp, dp_rank = world // t.tp_size, rank // t.tp_size
    model = build_parallel_model(mcfg, t, device, world, objective.prepare)
    optimizer = build_optimizer(model, t)

    step, loader_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    restore_started, restore_s = time.time(), 0.0
    if checkpoint is not None:
        t_restore = time.perf_counter()
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer, rank)
        step, loader_state = state["step"], state["loader"]
        restore_s = time.perf_counter() - t_restore

    accum = grad_accum_steps(t, dp)
    loader = GlobalBatchLoader(train_data, t.global_batch_size, seed=t.seed, rank=dp_rank, world_size=dp,
                               state=loader_state)
    tokens_per_step = t.global_batch_size * getattr(train_data, "rows_per_sample", 1) * train_data.seq_len
    flops_per_step = flops_per_token(mcfg, train_data.seq_len) * tokens_per_step
    samples_log = layout.root / "train_samples.jsonl"
    logging_rank = rank == 0 and config.get("mlflow_run_id")
    metrics_logger = config.get("metrics_logger") if logging_rank else None
    stop_watch = StopWatch(config.get("stop_request") if rank == 0 else None)
    if not config.get("verbose"):
        quiet_worker_logs()
    relay = config.get("console")
    peak_flops = world * t.peak_tflops * 1e12 if device.type == "cuda" else None  # MFU on GPUs only
    console = StepConsole(objective.name, t.max_steps, t.log_every, tokens_per_step, flops_per_step, peak_flops,
                          started) if rank == 0 else None
    stop_system_metrics = None
    if logging_rank:  # nothing here waits on MLflow: the actor writes, the monitor starts in a thread
        trainable, total = trainable_parameters(model)
        metrics_logger.start.remote({"model.num_params": model.num_params(),
                                     "model.vocab_size_resolved": mcfg.vocab_size,
                                     "model.trainable_params": trainable, "model.total_params": total})
        if t.system_metrics:
            stop_system_metrics = system_metrics_in_background(config["mlflow_uri"], config["mlflow_run_id"])

    if step == 0 and objective.measures_start:  # fine-tuning: where the base model starts, as step 0
        start = {k: v for eval_set in eval_sets for k, v in _eval_metrics(model, eval_set, dp_rank, dp, t).items()}
        start.update(objective.extra_eval(model, dp_rank, dp, t))
        if metrics_logger and start:
            metrics_logger.log.remote(start, 0, int(time.time() * 1000))
    model.train()
    first_step = True
    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, t)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = loader.next_batch()
        on_device = {k: v.to(device) for k, v in batch.items() if k != "sample_ids"}
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            sl = slice(i * t.micro_batch_size, (i + 1) * t.micro_batch_size)
            loss_sum += micro_step(model, objective, on_device, sl, accum, dp, t, sync=i == accum - 1)
        grad_norm = clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss, stopping = _step_loss_and_stop(loss_sum, stop_watch.requested())
        dt = time.perf_counter() - t0

        metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                   "world_size": world, "dp_size": dp, "grad_accum_steps": accum, "step": step,
                   **objective.step_metrics(t.tp_size)}
        recovery = {}
        if first_step:  # what a (re)start cost: set-up until the checkpoint load, the load, the first step
            recovery = {"setup_s": restore_started - started, "restore_s": restore_s, "first_step_s": dt}
            metrics.update(recovery)
            first_step = False
        if device.type == "cuda":
            metrics["mfu"] = flops_per_step / dt / (world * t.peak_tflops * 1e12)
        if t.log_sample_ids:
            ids = _gather_sample_ids(batch["sample_ids"].to(device), t.tp_size)
            if rank == 0:  # a step replayed after a failure appends again: the last record of a step counts
                _append_jsonl(samples_log, {"step": step, "world_size": world, "loss": step_loss, "lr": lr,
                                            "sample_ids": ids, "time": time.time(),
                                            **({"started": started, **recovery} if recovery else {})})
        evaluating = bool(eval_sets) and (step % t.eval_every == 0 or step == t.max_steps) and not stopping
        if evaluating:
            for eval_set in eval_sets:
                metrics.update(_eval_metrics(model, eval_set, dp_rank, dp, t))
            metrics.update(objective.extra_eval(model, dp_rank, dp, t))
        if metrics_logger and (step % t.log_every == 0 or step == t.max_steps or stopping):
            metrics_logger.log.remote({k: v for k, v in metrics.items() if k != "step"}, step, int(time.time() * 1000))
        if console is not None:
            last = step == t.max_steps or stopping
            if recovery:
                post(relay, console.start_line(step, world, recovery))
            line = console.step(step, dt, metrics, force=evaluating or last)
            if line:
                post(relay, line, wait=last)  # the last line is printed before training returns

        if step % t.checkpoint_every == 0 or step == t.max_steps or stopping:
            if metrics_logger:  # what the checkpoint covers is in MLflow first (see StepMetricsLogger)
                ray.get(metrics_logger.flush.remote())
            trainer_state = {"step": step, "loader": loader.state_dict(), "world_size": world, "tp_size": t.tp_size,
                             "seq_len": train_data.seq_len, "model_config": mcfg.model_dump(mode="json"),
                             **objective.trainer_state()}
            _report_with_checkpoint(metrics, model, optimizer, trainer_state, rank, data.tokenizer_model, t)
        if stopping:
            break
    if stop_system_metrics is not None:
        stop_system_metrics()
    if logging_rank:  # KILLED: stopped on request, resumable
        ray.get(metrics_logger.end.remote("KILLED" if step < t.max_steps else "FINISHED"))


def build_parallel_model(mcfg: ModelConfig, t: TrainConfig, device: torch.device, world: int, prepare=None):
    """The model on this rank, parallelized over the (dp, tp) mesh of all workers as the config says; `prepare`
    (the objective's: base weights, LoRA) runs on the whole model on CPU first."""
    from athanor.model.transformer import Transformer

    model = Transformer(mcfg)
    if prepare is not None:
        prepare(model)
    model = model.to(device)
    if world == 1:  # nothing to shard or synchronize: FSDP2 over one rank only adds DTensor overhead (bench_train.py)
        return parallelize(model, None, activation_checkpointing=t.activation_checkpointing, compile=t.compile)
    mesh = build_mesh(device.type, world, t.tp_size)
    # TP leaves the logits sharded by vocabulary (loss parallel); FSDP2 computes in bf16 where training does
    parallelize(model, mesh, tp=t.tp_size > 1, fsdp=t.data_parallel == "fsdp",
                activation_checkpointing=t.activation_checkpointing, compile=t.compile, loss_parallel=True,
                param_dtype=compute_dtype(t.mixed_precision, device), reduce_dtype=torch.float32)
    if t.data_parallel == "ddp":
        model = _DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that still exposes the wrapped Transformer's helpers (loss, num_params), as FSDP2's in-place wrap does."""

    def loss(self, logits, targets):
        return self.module.loss(logits, targets)

    def num_params(self) -> int:
        return self.module.num_params()


def micro_step(model, objective, batch: dict, sl: slice, accum: int, dp: int, t: TrainConfig, sync: bool):
    """One micro-batch's forward and backward; returns its loss, detached. The forward runs in the loop's precision
    (`forward_precision`, as evaluation's does), the backward outside autocast (PyTorch's AMP recipe), both under
    loss_parallel when TP shards the logits by vocabulary."""
    with _gradient_sync(model, sync), vocab_parallel(t):
        with forward_precision(model, t):
            loss = objective.micro_loss(model, batch, sl, accum, dp)
        loss.backward()
    return loss.detach()


def _gradient_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def _has_split(layout: RunLayout, split: str) -> bool:
    import json

    manifest = json.loads(layout.manifest.read_text())
    return manifest["splits"].get(split, {}).get("sequences", 0) > 0


def _report_with_checkpoint(metrics: dict, model, optimizer, trainer_state: dict, rank: int, tokenizer_model: Path,
                            t: TrainConfig) -> None:
    """Every rank writes its DCP shards to a local folder and reports it; Ray Train merges them into one checkpoint
    folder in storage (in the background when async_checkpoint) and keeps the newest keep_checkpoints of them."""
    import ray.train
    from ray.train import CheckpointUploadMode

    d = Path(tempfile.mkdtemp(prefix=f"athanor-ckpt-{trainer_state['step']}-"))
    save_checkpoint(d, model, optimizer, trainer_state, rank, tokenizer_model)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(d)),
        checkpoint_dir_name=f"checkpoint_{trainer_state['step']:08d}",
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC if t.async_checkpoint else CheckpointUploadMode.SYNC,
        delete_local_checkpoint_after_upload=True,
    )


def run_training(cfg: AthanorConfig, layout: RunLayout, mlflow_run_id: str | None, mlflow_uri: str | None,
                 objective: str = "pretrain"):
    """Build and fit the TorchTrainer; returns Ray Train's Result (its checkpoint is the latest one) and the name of
    the signal that stopped training early, or None when it ran to max_steps (see athanor.cluster.stop)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from athanor import storage
    from athanor.cluster.console import printed, start_console_relay
    from athanor.cluster.stop import start_stop_request, stop_on_signals
    from athanor.cluster.tracking import start_step_metrics_logger
    from athanor.console import ray_train_log_level, verbose

    t = cfg.train
    # Ray Train runs the workers in a folder of its own: relative input paths are the driver's, resolved here.
    sets = {name: [f if storage.is_uri(f) else str(Path(f).resolve()) for f in files]
            for name, files in t.eval_sets.items()}
    for name, files in sets.items():
        missing = [f for f in files if not storage.is_uri(f) and not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"train.eval_sets.{name}: no such file: {', '.join(missing)}")
    cfg = cfg.model_copy(update={"train": t.model_copy(update={"eval_sets": sets})})
    for world in range(t.min_workers or t.num_workers, t.num_workers + 1):
        grad_accum_steps(t, world // t.tp_size)  # fail fast on a batch that some allowed worker count cannot split
    storage.makedirs(layout.checkpoints)
    storage_path, storage_filesystem = storage.ray_storage(layout.checkpoints)  # s3:// and gs:// too
    metrics_logger = start_step_metrics_logger(mlflow_uri, mlflow_run_id) if mlflow_run_id else None
    stop_request = start_stop_request()
    relay = start_console_relay()  # rank 0's step lines, printed here (see cluster/console.py)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "workdir": str(layout.root), "objective": objective,
                           "mlflow_run_id": mlflow_run_id, "mlflow_uri": mlflow_uri,
                           "metrics_logger": metrics_logger, "stop_request": stop_request, "console": relay,
                           "verbose": verbose()},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
                                     use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=t.resize_interval_s),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(t.cpus_per_worker)}},
            logging_config=LoggingConfig(log_level=ray_train_log_level()),  # Ray Train's INFO lines: --verbose
        ),
    )
    with stop_on_signals(stop_request) as received, printed(relay):
        result = trainer.fit()
    stopped_early = received and (result.metrics or {}).get("step", t.max_steps) < t.max_steps
    return result, received[0] if stopped_early else None
