"""Parallelism applied to a Transformer from the outside, torchtitan-style: the model code never sees the cluster.

Order matters and follows torchtitan: tensor parallelism first (it swaps parameters for DTensors), then activation
checkpointing and torch.compile per block, then FSDP2 per block and at the root.

Tensor parallelism (Megatron-style, without sequence parallelism): q/k/v and the MLP's gate/up projections are
split by output features (colwise), attention's and the MLP's output projections by input features (rowwise), so
each block does one all-reduce after attention and one after the MLP, and every rank holds n_heads / tp query heads
and n_kv_heads / tp key/value heads (Attention reshapes with -1 heads, so nothing else changes). The embedding is
split by vocabulary rows and the head by vocabulary columns, both Shard(0) of the same [vocab, dim] matrix, so a tied
embedding stays tied. With `loss_parallel` (training's choice, as torchtitan's default) the head's output stays a
DTensor sharded by vocabulary (Shard(-1)) and cross-entropy runs on the shards under
torch.distributed.tensor.parallel.loss_parallel(), which must also cover the backward: no rank ever holds the whole
vocabulary's logits (`Transformer.loss`, `token_nll`). Without it the logits are all-gathered into a plain tensor.

Mixed precision (FSDP2's MixedPrecisionPolicy, as torchtitan): the sharded parameters stay fp32 (the optimizer's
master weights), each block all-gathers them cast to `param_dtype` (bf16 in training on GPUs) and the forward and
backward compute in it; gradients are reduce-scattered in `reduce_dtype` (fp32) into fp32 sharded gradients.

LoRA (athanor.model.lora): a wrapped projection is sharded as its base would be and its adapters split to match
(`_linear_plan`). Frozen and trainable parameters may share an FSDP2 block: fully_shard all-gathers both and
reduce-scatters only the gradients that exist, and DDP hooks only parameters that require grad.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from athanor.config import ModelConfig
from athanor.model.lora import LoRALinear
from athanor.model.mlp import FeedForward, ffn_hidden_size
from athanor.model.transformer import Transformer


def parallelize(
    model: Transformer,
    mesh: DeviceMesh | None,
    tp: bool = False,
    fsdp: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
    loss_parallel: bool = False,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
) -> Transformer:
    """Apply the chosen techniques in place and return the model.

    `mesh` is 1-D for TP alone or FSDP alone, or 2-D with dims named ("dp", "tp") (each technique then uses its own
    dimension); it may be None when only activation checkpointing and/or compile are asked for. `loss_parallel`
    (with tp) leaves the logits sharded by vocabulary; `param_dtype` and `reduce_dtype` are FSDP2's mixed precision.
    """
    if (tp or fsdp) and mesh is None:
        raise ValueError("tensor parallelism and FSDP need a DeviceMesh")
    if tp and fsdp and mesh.ndim != 2:
        raise ValueError('TP together with FSDP needs a 2-D mesh with dims ("dp", "tp")')
    two_d = mesh is not None and mesh.ndim == 2
    tp_mesh = mesh["tp"] if two_d else mesh
    dp_mesh = mesh["dp"] if two_d else mesh
    if tp:
        apply_tensor_parallel(model, tp_mesh, loss_parallel)
    if activation_checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if compile:
        for block in model.layers:
            block.compile()
    if fsdp:
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for block in model.layers:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)
    return model


def check_tp_size(cfg: ModelConfig, size: int) -> None:
    """Every rank must get whole heads and an equal slice of the MLP."""
    divided = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn hidden size": ffn_hidden_size(cfg)}
    for what, n in divided.items():
        if n % size:
            raise ValueError(f"tensor parallel size {size} does not divide {what} ({n})")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool = False) -> None:
    check_tp_size(model.cfg, tp_mesh.size())
    tied = model.output.weight is model.tok_embeddings.weight
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                      use_local_output=not loss_parallel),
        },
    )
    if tied:  # both are Shard(0) DTensors of the same matrix now; make them one parameter again
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers:
        splits = {"attention.wq": True, "attention.wk": True, "attention.wv": True, "attention.wo": False}
        for name, module in block.named_modules():
            if isinstance(module, FeedForward):  # the dense MLP, or every expert of an MoE layer
                splits.update({f"{name}.w1": True, f"{name}.w3": True, f"{name}.w2": False})
        plan = {}
        for name, colwise in splits.items():
            plan.update(_linear_plan(name, block.get_submodule(name), colwise))
        parallelize_module(block, tp_mesh, plan)


def _linear_plan(name: str, module: nn.Module, colwise: bool) -> dict:
    """The TP plan of one projection; for a LoRALinear, the base as a plain one and the adapters split to match.

    Colwise (output features split): B is split by its output features the same way, so each rank adds its slice of
    B A x to its slice of W x; A sees the whole input and is replicated (r x in, small), its gradient made whole by
    the all-reduce that B's ColwiseParallel does on its input's gradient. Rowwise (input features split): A is split
    by its input features the same way and its r outputs are all-reduced, as the base's are; B is replicated. The
    rank r is never split, so it need not divide tp. Replicated adapters stay plain tensors, like the norms.

    Dropout on the replicated input of A must draw the same mask on every rank of a TP group, or the replicated A
    would drift apart: it does when every rank seeds torch alike (train.py's `torch.manual_seed(t.seed)`), the
    convention Megatron also relies on for its replicated regions. (A rowwise A's ranks then drop the same pattern
    from each slice of the input: still dropout at rate p.)
    """
    if not isinstance(module, LoRALinear):
        return {name: ColwiseParallel() if colwise else RowwiseParallel()}
    if colwise:
        return {f"{name}.base": ColwiseParallel(), f"{name}.lora_B": ColwiseParallel()}
    return {f"{name}.base": RowwiseParallel(), f"{name}.lora_A": RowwiseParallel()}


def is_parallel_param(p: torch.Tensor) -> bool:
    """True for DTensor parameters (sharded by TP or FSDP)."""
    return hasattr(p, "full_tensor")


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to a plain tensor, e.g. to save or export from rank 0."""
    return {k: (v.full_tensor() if is_parallel_param(v) else v) for k, v in module.state_dict().items()}


def build_mesh(device_type: str, world_size: int, tp_size: int) -> DeviceMesh:
    """The (dp, tp) mesh over every rank: tensor-parallel groups are consecutive ranks (the fast links of one node)."""
    if world_size % tp_size:
        raise ValueError(f"{world_size} workers cannot form tensor-parallel groups of {tp_size}")
    return init_device_mesh(device_type, (world_size // tp_size, tp_size), mesh_dim_names=("dp", "tp"))


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Clip by the global gradient norm; unlike torch's, it accepts DTensors that live on different meshes.

    Under FSDP2 x TP, the tensor-parallel weights are 2-D DTensors while norms are sharded on the dp mesh only, and
    torch.nn.utils.clip_grad_norm_ cannot stack their norms. Each group of gradients with the same mesh and placement
    gets its norm from torch, made whole with full_tensor(), and the groups combine as a root of summed squares.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if is_parallel_param(g) else None
        groups.setdefault(key, []).append(g)
    total_sq = 0.0
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group)
        total_sq += float(norm.full_tensor() if is_parallel_param(norm) else norm) ** 2
    total = total_sq**0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
