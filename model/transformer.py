"""A Llama-style decoder-only Transformer: pre-norm blocks of RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.

Module names follow torchtitan (tok_embeddings, layers.N.attention.wq, feed_forward.w1, norm, output) so the
parallelism plans in athanor.cluster.parallelize can address them. RoPE uses the half-split (`rotate_half`)
convention of Hugging Face Llama, so export needs no permutation of the q/k weights.

Initialisation: every Linear and the embedding draw from normal(0, init_std); the projections that write into the
residual stream (attention.wo and the MLPs' w2) are further scaled by 1/sqrt(2 * n_layers), as in GPT-2 and OLMo,
so the residual variance does not grow with depth. RMSNorm weights start at 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from athanor.config import ModelConfig
from athanor.model.attention import causal_attention, check_backend, document_mask, padding_mask
from athanor.model.mlp import FeedForward, ffn_hidden_size
from athanor.model.moe import MoE

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of `targets` [B, T] under `logits` [B, T, vocab], in fp32 whatever the logits' dtype (targets
    of IGNORE_INDEX count 0): per token [B, T] ("none"), or "sum" / "mean". The one loss computation of training,
    evaluation and scoring, so that `loss` and `val_loss` are the same number on the same batch.

    Logits sharded by vocabulary (a DTensor: loss-parallel tensor parallelism) need
    torch.distributed.tensor.parallel.loss_parallel() around this call and its backward; cross-entropy then runs on
    the shards. The result is a plain tensor either way (each tensor-parallel rank holds the whole value).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction=reduction)
    if hasattr(ce, "to_local"):  # a DTensor (not imported here: torch.distributed.tensor takes seconds to import)
        ce = ce.to_local()  # replicated over the tensor-parallel ranks
    return ce.view(targets.shape) if reduction == "none" else ce


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq_len, head_dim] in float32, each frequency repeated over both halves (HF layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by position; pairs are (i, i + D/2). Computed in float32.

    cos, sin are [T, D] (every row at the same positions) or [B, T, D] (per-row positions, e.g. left padding).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of every layer, preallocated up to max_len on first use; `pos` tokens are filled."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, T, Hkv, D] and return all of them so far."""
        if self.keys[layer] is None:
            b, _, h, d = k.shape
            self.keys[layer] = k.new_zeros(b, self.max_len, h, d)
            self.values[layer] = v.new_zeros(b, self.max_len, h, d)
        end = self.pos + k.shape[1]
        self.keys[layer][:, self.pos : end] = k
        self.values[layer][:, self.pos : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index`, in that order: beam search follows its surviving beams (rows may repeat),
        and batched decoding drops finished rows."""
        for store in (self.keys, self.values):
            for layer, t in enumerate(store):
                if t is None:
                    continue
                if len(index) == t.shape[0]:  # beam search, every step: copy only the filled part
                    t[:, : self.pos] = t[index, : self.pos]
                else:
                    store[layer] = t.index_select(0, index)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.dim // cfg.n_heads
        self.backend = cfg.attention
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q = apply_rope(self.wq(x).view(b, t, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = causal_attention(q, k, v, self.backend, mask)
        return self.wo(out.reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        is_moe = cfg.moe_num_experts > 0 and (layer_id + 1) % cfg.moe_every == 0
        self.feed_forward = MoE(cfg) if is_moe else FeedForward(cfg.dim, ffn_hidden_size(cfg))

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is 0 until the tokenizer has been trained)")
        check_backend(cfg.attention)
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: derived from the config, so checkpoints do not carry them.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise parameters and RoPE tables in place; call after `to_empty()` when built on the meta device."""
        cfg = self.cfg
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, device)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for block in self.layers:
            nn.init.normal_(block.attention.wo.weight, mean=0.0, std=residual_std)
            for module in block.feed_forward.modules():
                if isinstance(module, FeedForward):
                    nn.init.normal_(module.w2.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. With a cache, tokens continue the cached positions.

        For left-padded batches, `attention_mask` [B, T_total] covers every position so far, cached ones included
        (1 = real token, 0 = pad, as in Hugging Face), and `positions` [B, T] are each row's RoPE positions; they
        default to the count of real tokens before each one, so a row's real tokens get the positions they would
        have unpadded. Without either, training's path is unchanged: shared positions, the kernels' own causal mask.

        For windows that pack several examples (fine-tuning), `document_ids` [B, T] says which example each token
        belongs to: a token attends only within its example, and positions restart at each example's first token,
        so a packed example computes what it would alone.

        `last_only` returns the logits of the last position alone [B, 1, vocab]: decoding needs no others, and the
        output projection over every prompt position was a third of a batched prefill.
        """
        start = cache.pos if cache is not None else 0
        end = start + tokens.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if document_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("document_ids is for whole packed windows: no cache, no attention_mask")
            mask, doc_positions = document_mask(document_ids)
            positions = doc_positions if positions is None else positions
        if attention_mask is not None:
            if attention_mask.shape != (tokens.shape[0], end):
                raise ValueError(f"attention_mask must be [batch, {end}] (all positions so far), "
                                 f"got {list(attention_mask.shape)}")
            mask = padding_mask(attention_mask, tokens.shape[1])
            if positions is None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        if positions is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mask)
        if cache is not None:
            cache.pos = end
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward (unweighted); 0 for a dense model."""
        losses = [m.last_aux_loss for m in self.modules() if isinstance(m, MoE) and m.last_aux_loss is not None]
        if not losses:
            return torch.zeros((), device=self.rope_cos.device)
        return torch.stack(losses).sum()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy (targets of -100 ignored; `token_nll`, vocabulary-sharded logits too), plus
        moe_aux_loss_coef * aux_loss() for MoE models."""
        ce = token_nll(logits, targets, "mean")
        if self.cfg.moe_num_experts:
            ce = ce + self.cfg.moe_aux_loss_coef * self.aux_loss()
        return ce

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied head shares the embedding); optionally without the embedding table."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total
