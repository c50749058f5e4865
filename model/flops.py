"""Parameter and FLOP counts from a ModelConfig alone (no model needed), for sizing presets and computing MFU.

Training FLOPs per token (PaLM appendix B, as in nanoGPT and torchtitan):

    flops_per_token = 6 * N_matmul + 12 * n_layers * dim * seq_len

N_matmul is the number of weights every token multiplies through: all attention and MLP projections, the router and
the top_k active experts of MoE layers, and the output head (which counts even when tied to the embedding: the
head is a matmul, the embedding lookup is not). Factor 6 = 2 (multiply-add) * 3 (forward + backward for inputs and
weights). The second term is attention itself: QK^T and AV cost 2 * 2 * seq_len * dim per layer forward, times 3
for training; it is not halved for the causal mask, by the same convention, so MFU numbers stay comparable.
"""

from __future__ import annotations

from athanor.config import ModelConfig
from athanor.model.mlp import ffn_hidden_size


def _is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return cfg.moe_num_experts > 0 and (layer + 1) % cfg.moe_every == 0


def _attention_weights(cfg: ModelConfig) -> int:
    head_dim = cfg.dim // cfg.n_heads
    return 2 * cfg.dim * cfg.n_heads * head_dim + 2 * cfg.dim * cfg.n_kv_heads * head_dim


def param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """What Transformer(cfg).num_params(exclude_embeddings) returns, computed from the shapes."""
    mlp = 3 * cfg.dim * ffn_hidden_size(cfg)
    total = 0
    for layer in range(cfg.n_layers):
        experts = mlp * cfg.moe_num_experts + cfg.dim * cfg.moe_num_experts if _is_moe_layer(cfg, layer) else mlp
        total += _attention_weights(cfg) + experts + 2 * cfg.dim  # + two RMSNorm weights
    total += cfg.dim  # final norm
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * cfg.dim
    if not exclude_embeddings:
        total += cfg.vocab_size * cfg.dim
    return total


def active_matmul_params(cfg: ModelConfig) -> int:
    """N_matmul above: weights each token multiplies through (top_k experts only, head included)."""
    mlp = 3 * cfg.dim * ffn_hidden_size(cfg)
    total = cfg.vocab_size * cfg.dim
    for layer in range(cfg.n_layers):
        active = mlp * cfg.moe_top_k + cfg.dim * cfg.moe_num_experts if _is_moe_layer(cfg, layer) else mlp
        total += _attention_weights(cfg) + active
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at this sequence length; MFU = flops_per_token * tokens_per_s / peak_flops."""
    return float(6 * active_matmul_params(cfg) + 12 * cfg.n_layers * cfg.dim * seq_len)
