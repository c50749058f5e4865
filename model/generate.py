"""Autoregressive decoding from a Transformer with a KV cache, for one prompt or a left-padded batch of them.

Greedy, temperature, top-k, top-p (nucleus), Hugging Face's repetition penalty, per-prompt seeds, EOS and stop
strings ending each row on its own, and beam search step for step as transformers does it, so an exported model
gives the same tokens in both libraries.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from athanor.model.transformer import KVCache, Transformer

# transformers' beam search ranks excluded candidates last by adding this; the same float32 rounding breaks ties alike.
_EXCLUDED = -1.0e9


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: each token already in the row (seen [B, vocab] True) has its
    logit divided by `penalty` when positive and multiplied when negative, so penalty > 1 always makes it rarer."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to, not including, the earliest occurrence of any stop string (all of it when none occurs)."""
    return text[: min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generators: list) -> torch.Tensor:
    """One token per row of logits [n, vocab]: argmax at temperature 0, else a draw from each row's own generator."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokens [B, P] with the prompts aligned on the right, and the mask of real tokens (None when none is padded)."""
    width = max(map(len, prompts))
    tokens = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    if all(len(p) == width for p in prompts):
        return tokens, None  # the unmasked fast path, exactly as in training
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return tokens, mask


def _seen(prompts: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[B, vocab] True at each prompt's tokens: the repetition penalty's memory, without the pads."""
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        seen[row, torch.tensor(p, device=device)] = True
    return seen


def _hits_stop(decode, ids: list[int], stop: list[str] | None) -> bool:
    return bool(stop) and any(s in decode(ids) for s in stop)


@contextmanager
def _eval_mode(model: Transformer):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _sample(model, prompts, max_new_tokens, temperature, top_k, top_p, penalty, eos_id, pad_id, generators, stop,
            decode) -> list[list[int]]:
    """Greedy or sampled decoding of a left-padded batch. A row that ends (EOS, a stop string) leaves the batch and
    the cache, so each step costs only the rows still going."""
    device = model.rope_cos.device
    tokens, mask = _left_pad(prompts, pad_id, device)
    cache = KVCache(model.cfg.n_layers, tokens.shape[1] + max_new_tokens)
    seen = _seen(prompts, model.cfg.vocab_size, device) if penalty != 1.0 else None
    rows = list(range(len(prompts)))  # the prompt each batch row belongs to
    out: list[list[int]] = [[] for _ in prompts]
    logits = model(tokens, cache, attention_mask=mask, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        if step:
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits = model(token[:, None], cache, attention_mask=mask, last_only=True)[:, -1]
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, penalty)
        token = _pick(logits, temperature, top_k, top_p, [generators[r] for r in rows])
        if seen is not None:
            seen[torch.arange(len(rows), device=device), token] = True
        live = []
        for j, (r, t) in enumerate(zip(rows, token.tolist())):
            out[r].append(t)
            if t != eos_id and not _hits_stop(decode, out[r], stop):
                live.append(j)
        if not live or step + 1 == max_new_tokens:
            break
        if len(live) < len(rows):
            index = torch.tensor(live, device=device)
            cache.reorder(index)
            rows, token = [rows[j] for j in live], token[index]
            mask = mask[index] if mask is not None else None
            seen = seen[index] if seen is not None else None
    return out


def _beam_search(model, prompts, max_new_tokens, num_beams, length_penalty, early_stopping, penalty, eos_id, pad_id,
                 stop, decode) -> list[list[int]]:
    """transformers' `_beam_search` (5.x, do_sample=False), step for step, over B * num_beams cache rows.

    Each prompt keeps num_beams running and num_beams finished hypotheses. A step scores all beams x vocab
    continuations by summed log-probability and keeps the best 2 * num_beams: those that end (EOS, a stop string, or
    the last step) and rank in the first num_beams become finished, scored sum / new_length ** length_penalty; the
    best num_beams others run on. A prompt stops adding finished ones once its best running beam, scored at the
    current length (at max_new_tokens for early_stopping="never" with length_penalty > 0), cannot beat its worst
    finished one, or with early_stopping=True once it has num_beams of them. The batch stops when every prompt has.
    """
    device = model.rope_cos.device
    b, k = len(prompts), num_beams
    tokens, mask = _left_pad(prompts, pad_id, device)
    cache = KVCache(model.cfg.n_layers, tokens.shape[1] + max_new_tokens)
    # one prefill per prompt, then copied to its beams
    logits = model(tokens, cache, attention_mask=mask, last_only=True)[:, -1]
    expand = torch.arange(b, device=device).repeat_interleave(k)
    cache.reorder(expand)
    logits, mask = logits[expand], (mask[expand] if mask is not None else None)
    seen = _seen(prompts, model.cfg.vocab_size, device)[expand] if penalty != 1.0 else None

    keep = 2 * k  # transformers keeps max(2, 1 + number of EOS ids) * num_beams, with one EOS id at most here
    first_k = torch.arange(keep, device=device) < k
    running = torch.full((b, k, max_new_tokens), pad_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = _EXCLUDED  # all beams start equal: expand only the first
    done, done_scores = running.clone(), torch.full((b, k), _EXCLUDED, device=device)
    done_len = torch.zeros(b, k, dtype=torch.long, device=device)
    is_done = torch.zeros(b, k, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    row_offset = torch.arange(b, device=device)[:, None] * k

    for step in range(max_new_tokens):
        if step:
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
            logits = model(running[:, :, step - 1].reshape(-1, 1), cache, attention_mask=mask,
                           last_only=True)[:, -1]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        if seen is not None:  # transformers applies its logits processors to the log-probabilities here
            logprobs = apply_repetition_penalty(logprobs, seen, penalty)
        vocab = logprobs.shape[-1]
        scores = (logprobs.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
        top_scores, top_index = scores.topk(keep)
        parent, token = top_index // vocab, top_index % vocab
        cand = running.gather(1, parent[:, :, None].expand(-1, -1, max_new_tokens))
        cand[:, :, step] = token
        if step + 1 == max_new_tokens:
            ends = torch.ones_like(token, dtype=torch.bool)
        else:
            ends = token == eos_id if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
            if stop:
                hits = [[_hits_stop(decode, c[: step + 1], stop) for c in beams] for beams in cand.tolist()]
                ends |= torch.tensor(hits, device=device)

        # The best num_beams candidates that go on.
        live_scores = top_scores + ends.to(torch.float32) * _EXCLUDED
        nxt = live_scores.topk(k).indices
        running = cand.gather(1, nxt[:, :, None].expand(-1, -1, max_new_tokens))
        running_scores, parent = live_scores.gather(1, nxt), parent.gather(1, nxt)

        # Finished candidates among the first num_beams join the finished ones when they score better.
        just_done = ends & first_k
        final = top_scores / ((step + 1) ** length_penalty)
        final += (is_done.all(dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * _EXCLUDED
        final += (~improvable).to(torch.float32) * _EXCLUDED
        final += (~just_done) * _EXCLUDED
        best = torch.cat([done_scores, final], dim=1).topk(k).indices
        done = torch.cat([done, cand], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
        done_scores = torch.cat([done_scores, final], dim=1).gather(1, best)
        done_len = torch.cat([done_len, torch.full_like(token, step + 1)], dim=1).gather(1, best)
        is_done = torch.cat([is_done, just_done], dim=1).gather(1, best)

        flat_parent = (parent + row_offset).view(-1)
        cache.reorder(flat_parent)  # the mask needs no reordering: a prompt's beams share its padding
        if seen is not None:
            seen = seen[flat_parent]
            seen[torch.arange(b * k, device=device), running[:, :, step].reshape(-1)] = True

        length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
        best_running = running_scores[:, :1] / (length**length_penalty)
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, _EXCLUDED)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        if not improvable.any() or (is_done.all() and early_stopping is True) or ends.all():
            break
    return [done[i, 0, : done_len[i, 0]].tolist() for i in range(b)]


def _check(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams,
           early_stopping, seeds, stop, decode) -> None:
    """Refuse bad arguments up front, with the reason, rather than fail (or quietly misbehave) mid-generation."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 means none), got {repetition_penalty}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search is deterministic here: sampling beams is not supported, use temperature=0 "
                         f"with num_beams={num_beams}, or num_beams=1 to sample")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds must give one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
    if stop and decode is None:
        raise ValueError("stop strings need `decode` (token ids -> text) to be found")
    if stop and any(not s for s in stop):
        raise ValueError("stop strings must not be empty (an empty string is in every text)")
    max_len, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; it needs at least one token (e.g. the BOS id)")
        if len(p) > max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's max_seq_len of {max_len}")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"max_seq_len of {max_len}; shorten the prompt or ask for fewer tokens")
        if not all(0 <= t < vocab for t in p):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_id: int | None = None,
    pad_id: int = 0,
    seeds: list[int] | None = None,
    stop: list[str] | None = None,
    decode=None,
) -> list[list[int]]:
    """Continue many prompts of different lengths at once; returns each prompt's new token ids (EOS kept).

    The prompts are left-padded into one KV-cache batch. Temperature 0 is greedy; above it, each row samples with
    its own generator seeded from `seeds` (torch's global one without), so a prompt's output does not depend on its
    batch mates; top_k and top_p shape sampling only. The repetition penalty (transformers' semantics) counts the
    row's prompt and new tokens, not its pads. A row ends at `eos_id` or once `decode(new_ids)` contains a stop
    string (the caller cuts the text: `truncate_at_stop`); the batch ends when every row has. num_beams > 1 runs
    transformers' beam search (deterministic; length_penalty and early_stopping as there, a stop string ends a beam
    as EOS does). Every prompt plus max_new_tokens must fit in model.cfg.max_seq_len: that is an error, not a
    silent clamp, since RoPE positions cannot slide under a cache (the one-prompt `generate` can window instead).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams, early_stopping,
           seeds, stop, decode)
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    with _eval_mode(model):
        if num_beams > 1:
            return _beam_search(model, prompts, max_new_tokens, num_beams, length_penalty, early_stopping,
                                repetition_penalty, eos_id, pad_id, stop, decode)
        device = model.rope_cos.device
        generators = ([None] * len(prompts) if seeds is None
                      else [torch.Generator(device=device).manual_seed(int(s)) for s in seeds])
        return _sample(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, pad_id,
                       generators, stop, decode)


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

    The batched path does the work while prompt + output fit in max_seq_len. RoPE positions are absolute, so the
    cache cannot slide: past that point (or with use_cache=False) each step recomputes the last max_seq_len tokens,
    as nanoGPT does.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if not ids:
        raise ValueError("generate needs a prompt of at least one token (e.g. the BOS id)")
    max_len = model.cfg.max_seq_len
    device = model.rope_cos.device
    with _eval_mode(model):
        cached = min(max_new_tokens, max_len - len(ids)) if use_cache else 0
        new = []
        if cached > 0:
            new = _sample(model, [ids], cached, temperature, top_k, top_p, 1.0, eos_id, 0, [generator], None, None)[0]
        ids = ids + new
        while len(new) < max_new_tokens and not (new and new[-1] == eos_id):
            logits = model(torch.tensor([ids[-max_len:]], device=device))[:, -1].float()
            token = int(_pick(logits, temperature, top_k, top_p, [generator])[0])
            new.append(token)
            ids.append(token)
    return new
