"""Mixture-of-experts MLP: a softmax router sends each token to its top-k SwiGLU experts (Switch, GShard, Mixtral).

Dropless by default (every routed token is computed). With a capacity factor, each expert takes at most
ceil(capacity_factor * tokens * top_k / num_experts) tokens, first come first served in sequence order as in
GShard; a dropped assignment contributes nothing and the token passes on through the residual stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from athanor.config import ModelConfig
from athanor.model.mlp import FeedForward, ffn_hidden_size


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e.

    f_e is the fraction of token->expert assignments that went to expert e (not differentiable), P_e the mean router
    probability of e (differentiable). It is 1 when routing is uniform and grows as load concentrates.
    """
    counts = torch.bincount(chosen.flatten(), minlength=num_experts).to(probs.dtype)
    fraction = counts / chosen.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.moe_num_experts
        self.top_k = cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.router = nn.Linear(cfg.dim, cfg.moe_num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg.dim, ffn_hidden_size(cfg)) for _ in range(cfg.moe_num_experts))
        self.last_aux_loss: torch.Tensor | None = None  # set by every forward, read by Transformer.aux_loss()

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [N, E] in float32, and each token's top-k weights and expert ids [N, k].

        The top-k weights are renormalised to sum to 1 as in Mixtral, except for top-1 where that would make every
        weight 1 and leave the router without a gradient from the language-model loss (Switch keeps the raw prob).
        """
        probs = self.router(x).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, chosen = self.route(x)
        self.last_aux_loss = load_balancing_loss(probs, chosen, self.num_experts)
        capacity = self.capacity(x.shape[0])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # Row-major nonzero keeps tokens in sequence order, which is the GShard priority for the capacity cut.
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if capacity is not None:
                token, slot = token[:capacity], slot[:capacity]
            # An expert with no tokens still runs on an empty batch, so its weights get (zero) gradients and DDP
            # does not stall waiting for unused parameters.
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(shape)
