"""Autoregressive sampling from a Transformer, with a KV cache: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch

from athanor.model.transformer import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability reaches top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """One token id from the last position's logits [vocab]; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt; returns only the new token ids (an `eos_id`, when sampled, ends the list and is kept).

    With the cache, the prompt is run once and each later step feeds a single token. RoPE positions are absolute, so
    the cache cannot slide: once prompt + output reach max_seq_len, generation goes on without it over the last
    max_seq_len tokens, as nanoGPT does.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if not ids:
        raise ValueError("generate needs a prompt of at least one token (e.g. the BOS id)")
    max_len = model.cfg.max_seq_len
    device = model.rope_cos.device
    was_training = model.training
    model.eval()
    cache = KVCache(model.cfg.n_layers, max_len) if use_cache and len(ids) < max_len else None
    new: list[int] = []
    feed = ids[-max_len:]
    try:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([feed], device=device), cache)[0, -1]
            token = next_token(logits, temperature, top_k, top_p, generator)
            new.append(token)
            ids.append(token)
            if token == eos_id:
                break
            if cache is not None and cache.pos < max_len:
                feed = [token]
            else:
                cache = None
                feed = ids[-max_len:]
    finally:
        model.train(was_training)
    return new
