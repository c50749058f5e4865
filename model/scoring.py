"""Log-likelihood of token windows: the one computation behind perplexity, bits per byte, lm-eval's loglikelihood
tasks, DPO's reference log-probs and the perplexity cost of quantization.

A window is a list of token ids; its targets are window[1:], and only the last `n_scored` of them count (the rest are
context). Documents longer than the model's context are cut into strided sliding windows (`sliding_windows`), as in
Hugging Face's perplexity guide: every token is scored exactly once, with up to `context` tokens before it, and a
stride below the context gives each scored token more history at the cost of more forward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from athanor.model.transformer import token_nll

LN2 = math.log(2)


def sliding_windows(ids: list[int], context: int, stride: int) -> list[tuple[list[int], int]]:
    """(window, n_scored) pairs that score each of ids[1:] once, each window at most `context` inputs long.

    The first window scores all its targets; each later one advances the scored end by `stride` targets and reaches
    back as far as the context allows, so its first `len(window) - 1 - n_scored` targets are context only.
    """
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride ({stride}) <= context ({context})")
    n_targets = len(ids) - 1
    out, scored_end = [], 0
    while scored_end < n_targets:
        end = min(context if scored_end == 0 else scored_end + stride, n_targets)
        begin = max(0, end - context)
        out.append((ids[begin : end + 1], end - scored_end))
        scored_end = end
    return out


@dataclass
class WindowScore:
    logprob: float  # sum of log p(target) over the scored targets, in nats (negative)
    n_scored: int
    greedy: bool  # every scored target was the argmax: lm-eval's `is_greedy`


def _batch_logprobs(model: torch.nn.Module, windows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded forward of a batch: (target log-probs [B, T], argmax hits [B, T]). Causal attention means the
    padding after a window changes nothing before it, so no mask is needed. The log-probs are the training loss's
    own computation (`token_nll`); logits sharded by vocabulary (the training loop's evaluation under loss-parallel
    tensor parallelism, inside loss_parallel()) are never gathered."""
    width = max(len(w) for w in windows)
    tokens = torch.full((len(windows), width), pad_id, dtype=torch.long)
    for i, w in enumerate(windows):
        tokens[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
    tokens = tokens.to(device)
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    target_lp = -token_nll(logits, targets)
    hits = _argmax(logits) == targets
    return target_lp.cpu(), hits.cpu()


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1); on logits sharded by vocabulary (a DTensor on a 1-D mesh) without gathering them: each
    rank's first maximum, then the first rank holding the largest (the ranks' slices are consecutive, so that is the
    first maximum overall, as argmax takes it)."""
    if not hasattr(logits, "to_local"):
        return logits.argmax(-1)
    import torch.distributed as dist

    group = logits.device_mesh.get_group()
    n = dist.get_world_size(group)
    value, index = logits.to_local().max(-1)
    values, indices = [torch.empty_like(value) for _ in range(n)], [torch.empty_like(index) for _ in range(n)]
    dist.all_gather(values, value, group=group)
    dist.all_gather(indices, index, group=group)
    offsets = -(-logits.shape[-1] // n) * torch.arange(n, device=index.device)  # Shard(-1) slices as torch.chunk's
    best = torch.stack(values).argmax(0, keepdim=True)
    return (torch.stack(indices) + offsets[:, None, None]).gather(0, best)[0]


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: list[list[int]], n_scored: list[int], pad_id: int = 0,
                  batch_size: int = 16, target_masks: list[list[int]] | None = None) -> list[WindowScore]:
    """Sum of log-probs of each window's last n_scored targets, batched `batch_size` windows per forward pass.

    `target_masks` (one 0/1 per target) narrows that to the targets marked 1: the responses of a fine-tuning
    example, wherever they sit. Windows are sorted by length inside the call so each forward pads little; results
    come back in input order.
    """
    if len(windows) != len(n_scored):
        raise ValueError(f"{len(windows)} windows but {len(n_scored)} n_scored values")
    for w, n in zip(windows, n_scored):
        if not 1 <= n <= len(w) - 1:
            raise ValueError(f"a window of {len(w)} tokens cannot score {n} targets")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    out: list[WindowScore | None] = [None] * len(windows)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lp, hits = _batch_logprobs(model, [windows[i] for i in idx], pad_id, device)
            for row, i in enumerate(idx):
                stop = len(windows[i]) - 1
                keep = torch.zeros(stop, dtype=torch.bool)
                keep[stop - n_scored[i] :] = True
                if target_masks is not None:
                    keep &= torch.as_tensor(target_masks[i], dtype=torch.bool)
                out[i] = WindowScore(float(lp[row, :stop][keep].double().sum()), int(keep.sum()),
                                     bool(hits[row, :stop][keep].all()))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood in nats over UTF-8 bytes, in bits: comparable across tokenizers."""
    return nats / n_bytes / LN2 if n_bytes else float("nan")


def perplexity(nats: float, n_tokens: int) -> float:
    """exp(mean nats per token); inf past what a float holds (an untrained model on a hard set)."""
    if not n_tokens:
        return float("nan")
    return math.exp(nats / n_tokens) if nats / n_tokens < 709 else float("inf")
