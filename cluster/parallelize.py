"""Parallelism applied to a Transformer from the outside, torchtitan-style: the model code never sees the cluster.

Order matters and follows torchtitan: tensor parallelism first (it swaps parameters for DTensors), then activation
checkpointing and torch.compile per block, then FSDP2 per block and at the root.

Tensor parallelism (Megatron-style, without sequence parallelism): q/k/v and the MLP's gate/up projections are
split by output features (colwise), attention's and the MLP's output projections by input features (rowwise), so
each block does one all-reduce after attention and one after the MLP, and every rank holds n_heads / tp query heads
and n_kv_heads / tp key/value heads (Attention reshapes with -1 heads, so nothing else changes). The embedding is
split by vocabulary rows and the head by vocabulary columns, both Shard(0) of the same [vocab, dim] matrix, so a tied
embedding stays tied; the logits are all-gathered so the loss sees the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from athanor.config import ModelConfig
from athanor.model.mlp import FeedForward, ffn_hidden_size
from athanor.model.transformer import Transformer


def parallelize(
    model: Transformer,
    mesh: DeviceMesh | None,
    tp: bool = False,
    fsdp: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> Transformer:
    """Apply the chosen techniques in place and return the model.

    `mesh` is 1-D for TP alone or FSDP alone, and 2-D with dims named ("dp", "tp") for both; it may be None when
    only activation checkpointing and/or compile are asked for.
    """
    if (tp or fsdp) and mesh is None:
        raise ValueError("tensor parallelism and FSDP need a DeviceMesh")
    if tp and fsdp and mesh.ndim != 2:
        raise ValueError('TP together with FSDP needs a 2-D mesh with dims ("dp", "tp")')
    tp_mesh = mesh["tp"] if tp and fsdp else mesh
    dp_mesh = mesh["dp"] if tp and fsdp else mesh
    if tp:
        apply_tensor_parallel(model, tp_mesh)
    if activation_checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if compile:
        for block in model.layers:
            block.compile()
    if fsdp:
        for block in model.layers:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def check_tp_size(cfg: ModelConfig, size: int) -> None:
    """Every rank must get whole heads and an equal slice of the MLP."""
    divided = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn hidden size": ffn_hidden_size(cfg)}
    for what, n in divided.items():
        if n % size:
            raise ValueError(f"tensor parallel size {size} does not divide {what} ({n})")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    check_tp_size(model.cfg, tp_mesh.size())
    tied = model.output.weight is model.tok_embeddings.weight
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    if tied:  # both are Shard(0) DTensors of the same matrix now; make them one parameter again
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers:
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
        }
        for name, module in block.named_modules():
            if isinstance(module, FeedForward):  # the dense MLP, or every expert of an MoE layer
                plan.update({f"{name}.w1": ColwiseParallel(), f"{name}.w3": ColwiseParallel(),
                             f"{name}.w2": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)


def is_parallel_param(p: torch.Tensor) -> bool:
    """True for DTensor parameters (sharded by TP or FSDP)."""
    return hasattr(p, "full_tensor")


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to a plain tensor, e.g. to save or export from rank 0."""
    return {k: (v.full_tensor() if is_parallel_param(v) else v) for k, v in module.state_dict().items()}
