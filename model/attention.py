"""Causal attention kernels behind one call: flash-attn, PyTorch SDPA, or a plain math reference.

All three take q [B, Tq, H, D] and k, v [B, Tk, Hkv, D] (flash-attn's layout) with H a multiple of Hkv (grouped-query
attention) and return [B, Tq, H, D]. When Tq < Tk (decoding with a KV cache) the causal mask is aligned to the
bottom-right corner, so query i sees keys up to Tk - Tq + i, which is what flash-attn does natively.

Left-padded batches (batched generation) pass instead a boolean `mask` [B, 1, Tq, Tk] from `padding_mask`, which
already holds the causal part. Training passes none and keeps the unmasked fast paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # the `gpu` extra; absent on CPU machines
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

BACKENDS = ("auto", "flash", "sdpa", "math")


def flash_available() -> bool:
    return flash_attn_func is not None and torch.cuda.is_available()


def check_backend(name: str) -> None:
    """Fail at model construction, not at the first step, when a backend cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choose one of {BACKENDS}")
    if name == "flash" and not flash_available():
        why = "the flash-attn package is not installed" if flash_attn_func is None else "CUDA is not available"
        raise RuntimeError(
            f"model.attention='flash' but {why}; install `athanor[gpu]` on a CUDA machine or use 'sdpa'/'auto'"
        )


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """`auto` takes flash-attn where it can run (CUDA, half precision), else SDPA."""
    if name != "auto":
        return name
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "sdpa"


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention; `mask` (True = may attend, causality included) replaces the built-in causal mask."""
    backend = resolve_backend(backend, q)
    if backend == "flash" and mask is not None:
        backend = "sdpa"  # flash_attn_func takes no padding mask (its varlen API would need unpadding): use SDPA
    if backend == "flash":
        return _flash(q, k, v)
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    if backend == "math":
        return _math(q, k, v, mask)
    raise ValueError(f"unknown attention backend '{backend}'")


def padding_mask(key_mask: torch.Tensor, tq: int) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] from a key mask [B, Tk] (1 = real token, 0 = pad): causal and real keys only.

    Every query may also see its own key, so a pad query is never fully masked: SDPA gives NaN for such a row, and a
    NaN in a pad's output would reach real tokens in the next layer (0 attention weight * NaN is still NaN).
    """
    tk = key_mask.shape[1]
    q_idx = torch.arange(tk - tq, tk, device=key_mask.device)[:, None]
    k_idx = torch.arange(tk, device=key_mask.device)[None, :]
    allowed = ((k_idx <= q_idx) & key_mask.bool()[:, None, :]) | (k_idx == q_idx)
    return allowed[:, None]


def document_mask(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal mask [B, 1, T, T] of packed examples (document_ids [B, T], non-decreasing along T),
    and each token's position inside its example [B, T]."""
    b, t = document_ids.shape
    same = document_ids[:, :, None] == document_ids[:, None, :]
    mask = same & _causal_mask(t, t, document_ids.device)
    index = torch.arange(t, device=document_ids.device).expand(b, t)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(first, index, torch.zeros_like(index)).cummax(dim=1).values
    return mask[:, None], index - start


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Boolean [Tq, Tk], True where attention is allowed (bottom-right aligned)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def _flash(q, k, v):
    if flash_attn_func is None:
        raise RuntimeError("attention backend 'flash' requested but the flash-attn package is not installed")
    return flash_attn_func(q, k, v, causal=True)


def _sdpa(q, k, v, mask=None):
    tq, tk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
    if mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    elif tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # is_causal would align top-left; give the bottom-right mask explicitly
        mask = _causal_mask(tq, tk, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def _math(q, k, v, mask=None):
    """The textbook definition, in float32; the reference the fused kernels are tested against."""
    dtype = q.dtype
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).to(dtype)
