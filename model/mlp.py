"""The SwiGLU feed-forward block (Shazeer 2020) used by Llama, and its hidden width."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from athanor.config import ModelConfig


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """cfg.ffn_hidden, or 8/3 * dim rounded up to multiple_of: the same parameter count as a 4*dim GELU MLP."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.dim / 3)
    return cfg.multiple_of * -(-hidden // cfg.multiple_of)


class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection, w2 the down projection (torchtitan names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
