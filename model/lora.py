"""LoRA (Hu et al. 2021): frozen base projections plus a trained low-rank update, W x + (alpha / r) B A x.

`apply_lora` swaps the chosen projections of every block for `LoRALinear` in place and freezes everything else
(embeddings, norms, the head, MoE routers), so only the adapters train. The base layer stays an nn.Linear at
`<name>.base`, which is what lets cluster/parallelize.py shard it exactly as it shards a plain projection and split
the adapters to match (see `_linear_plan` there). Initialisation and scaling follow peft, so an adapter
exported by model/peft_export.py is the same function in peft: A is kaiming-uniform(a=sqrt(5)), B is zero (training
starts from the base model's outputs), scaling is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).

Names: the target `layers.0.attention.wq` becomes `layers.0.attention.wq.base.weight` (frozen) and
`...wq.lora_A.weight` [r, in], `...wq.lora_B.weight` [out, r]. Load the base weights first, into the plain
Transformer, and apply LoRA afterwards; for a model built with LoRA already (e.g. on the meta device),
`base_key_map` renames a plain state dict's keys to the wrapped ones. After `Transformer.init_weights()` on a LoRA
model (it draws every Linear from normal(0, init_std), adapters included) call `reset_lora_parameters`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from athanor.model.mlp import FeedForward

# Target short name -> Linear name inside each Attention, or inside each FeedForward (dense MLP or MoE expert).
ATTENTION_TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}
MLP_TARGETS = {"gate": "w1", "up": "w3", "down": "w2"}
TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS)


class LoRALinear(nn.Module):
    """base(x) + lora_B(lora_A(dropout(x))) * scaling, with `base` frozen. Holds no weight of its own."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # see adapters_disabled
        self.reset_lora_parameters()
        base.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `.weight` of a projection (Transformer.init_weights) still works."""
        return self.base.weight

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's default init: the update B A starts at zero, and A's scale is nn.Linear's own."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A: the single Linear weight that computes this module (dropout aside)."""
        return self.base.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"


def target_paths(model: nn.Module, targets=TARGETS) -> list[str]:
    """Dotted names of the Linear layers the short target names pick, in every block (MLP ones in every expert)."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be some of {', '.join(TARGETS)}; got {list(targets)}")
    paths = []
    for i, block in enumerate(model.layers):
        paths += [f"layers.{i}.attention.{ATTENTION_TARGETS[t]}" for t in TARGETS if t in targets and
                  t in ATTENTION_TARGETS]
        for name, module in block.named_modules():
            if isinstance(module, FeedForward):  # the dense MLP, or every expert of an MoE layer
                paths += [f"layers.{i}.{name}.{MLP_TARGETS[t]}" for t in TARGETS if t in targets and t in MLP_TARGETS]
    return paths


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=TARGETS,
               rslora: bool = False) -> nn.Module:
    """Wrap the targets of every block in LoRALinear and freeze every other parameter; in place, returns the model.

    Call it on the plain, single-device model with its base weights loaded, before cluster.parallelize (whose plans
    recognise LoRALinear). In MoE layers the MLP targets adapt every expert; the router stays frozen.
    """
    paths = target_paths(model, targets)
    model.requires_grad_(False)
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has LoRA")
        if type(base) is not nn.Linear:
            raise TypeError(f"LoRA wraps nn.Linear; {path} is a {type(base).__name__} (apply LoRA before parallelize)")
        setattr(parent, child, LoRALinear(base, rank, alpha, dropout, rslora))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear by its dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_key(key: str) -> bool:
    """True for an adapter's state-dict key (`...lora_A.weight`, `...lora_B.weight`)."""
    return ".lora_A." in key or ".lora_B." in key


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only: what a LoRA fine-tune adds to its base."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def base_key_map(model: nn.Module) -> dict[str, str]:
    """Plain checkpoint key -> this LoRA model's key for every wrapped weight (`x.wq.weight` -> `x.wq.base.weight`);
    other keys are unchanged: `{key_map.get(k, k): v for k, v in base_state.items()}`. Keys are state-dict names as
    `get_state_dict` gives them, without the prefixes of the checkpoint, compile and DDP wrappers."""
    names = [n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") for n in lora_modules(model)]
    names = [n.removeprefix("module.") for n in names]
    return {f"{name}.weight": f"{name}.base.weight" for name in names}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every LoRALinear computes its base alone: the model before fine-tuning, which is DPO's reference,
    without a second copy of the weights."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False


def reset_lora_parameters(model: nn.Module) -> None:
    """Re-initialise every adapter (B = 0): needed after Transformer.init_weights() on a model that has LoRA."""
    for m in lora_modules(model).values():
        m.reset_lora_parameters()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain Transformer state dict with every adapter folded into its base weight; the model is not changed."""
    modules = lora_modules(model)
    state = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    for name, m in modules.items():
        del state[f"{name}.base.weight"]
        state[f"{name}.weight"] = m.merged_weight()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and put that Linear back in place: a plain Transformer again, same
    function (without dropout), same names as before apply_lora. In place; for a single-device model."""
    for name, m in lora_modules(model).items():
        m.base.weight.copy_(m.merged_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each parameter once (a tied head is the embedding); sharded parameters
    (DTensors) count at their full size, so every rank reports the model's numbers."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
