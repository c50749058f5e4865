"""KV-cache decoding gives exactly the tokens of full recomputation, on models that have learnt some real text;
batched decoding gives each prompt's own tokens, and beam search gives transformers' tokens."""

from __future__ import annotations

import copy
import re

import pytest
import sentencepiece as spm
import torch
from test_hf_export import load_hf, sp_model  # noqa: F401 - sp_model is a fixture

from athanor.config import ModelConfig
from athanor.model.generate import (
    _beam_search,
    apply_repetition_penalty,
    filter_logits,
    generate,
    generate_batch,
    truncate_at_stop,
)
from athanor.model.hf_export import export_hf
from athanor.model.transformer import KVCache, Transformer

SEQ = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def alice(data_dir) -> bytes:
    return (data_dir / "quality/high/alice29.txt").read_bytes()


@pytest.fixture(scope="module")
def trained(alice) -> Transformer:
    """A tiny byte-level model (UTF-8 bytes as tokens, vocab 256) trained for 120 steps on Alice in Wonderland."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, attention="sdpa")
    model = Transformer(cfg)
    data = torch.tensor(list(alice), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(data) - SEQ - 1, (8,), generator=g)
        chunk = torch.stack([data[s : s + SEQ + 1] for s in starts])
        loss = model.loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.7  # below log(256) = 5.55 and below unigram byte entropy (~2.9): real structure
    return model


def prompt(alice: bytes, start: int, length: int) -> list[int]:
    return list(alice[start : start + length])


def test_greedy_with_cache_equals_without(trained, alice):
    ids = prompt(alice, alice.index(b"Alice was beginning"), 30)
    cached = generate(trained, ids, 40, temperature=0, use_cache=True)
    uncached = generate(trained, ids, 40, temperature=0, use_cache=False)
    assert cached == uncached
    assert len(cached) == 40 and len(set(cached)) > 3  # not a degenerate repetition of one byte


def test_greedy_past_max_seq_len_equals_windowed_recompute(trained, alice):
    ids = prompt(alice, 5000, 100)  # 100 + 60 crosses max_seq_len = 128
    assert generate(trained, ids, 60, temperature=0) == generate(trained, ids, 60, temperature=0, use_cache=False)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(trained, alice):
    ids = torch.tensor(prompt(alice, 20000, 20))
    a = generate(trained, ids, 30, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7))
    b = generate(trained, ids, 30, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7))
    assert a == b and all(0 <= t < 256 for t in a)
    assert generate(trained, ids, 20, top_k=1) == generate(trained, ids, 20, temperature=0)
    nucleus = generate(trained, ids, 30, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert len(nucleus) == 30


def test_eos_stops_generation_and_training_mode_is_restored(trained, alice):
    ids = prompt(alice, 1000, 20)
    first = generate(trained, ids, 1, temperature=0)[0]
    trained.train()
    assert generate(trained, ids, 50, temperature=0, eos_id=first) == [first]
    assert trained.training


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).log_softmax(-1)
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # ~[0.57, 0.21, 0.13, 0.08, 0.03]
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:1].sum() < 0.7 <= probs[:2].sum()
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1


# --- Batched decoding and beam search, on a subword model that has learnt enough Alice to write phrases ---

PROMPTS = [  # lines of Alice in Wonderland, cut to different lengths
    "Alice was beginning to get very tired of sitting by her sister",
    "The Queen",
    "`and what is the use of a book,' thought Alice",
    "So she was considering in her own mind",
    "when suddenly a White Rabbit with pink eyes ran close by her.",
    "`Off with her head!' the Queen shouted",
]


@pytest.fixture(scope="module")
def lm(sp_model, data_dir):
    """(model, SentencePiece) for a 512-piece BPE model trained 300 steps on Alice: greedy text is English-like
    ("`It's the Queen,' said the Hatter"), where the 60-step export-test model only repeats spaces."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = torch.tensor(sp.encode((data_dir / "quality/high/alice29.txt").read_text()), dtype=torch.long)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        chunk = torch.stack([ids[s : s + 65] for s in starts])
        loss = model.loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.3  # log(512) = 6.2 at init
    return model.eval(), sp


@pytest.fixture(scope="module")
def prompts(lm) -> list[list[int]]:
    sp = lm[1]
    out = [[sp.bos_id(), *sp.encode(text)] for text in PROMPTS]
    assert len({len(p) for p in out}) == len(out)  # all lengths differ: every row but one is padded
    return out


@pytest.fixture(scope="module")
def hf_lm(lm, sp_model, tmp_path_factory):
    """transformers' LlamaForCausalLM and tokenizer from `export_hf` of the same model (local files only)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        return load_hf(export_hf(lm[0], lm[0].cfg, sp_model, tmp_path_factory.mktemp("hf")))


def test_batched_greedy_equals_one_prompt_at_a_time(lm, prompts):
    model, sp = lm
    batched = generate_batch(model, prompts, 24)
    assert batched == [generate(model, p, 24, temperature=0) for p in prompts]
    assert all(len(new) == 24 for new in batched)
    assert len({tuple(new) for new in batched}) >= 4 and any(len(set(new)) > 8 for new in batched)  # real text
    period = sp.piece_to_id(".")  # an EOS that comes early in some rows and never in others: rows leave the batch
    ended = generate_batch(model, prompts, 24, eos_id=period)
    assert ended == [generate(model, p, 24, temperature=0, eos_id=period) for p in prompts]
    assert any(len(new) < 24 for new in ended) and any(len(new) == 24 for new in ended)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_a_left_padded_row_has_its_unpadded_logits(lm, prompts, backend):
    model = copy.deepcopy(lm[0])
    for block in model.layers:
        block.attention.backend = backend
    short, long = prompts[1], prompts[0]
    pad = len(long) - len(short)
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        alone = model(torch.tensor([short]))[0]
        for filler in (0, 77):  # what sits under the pads must not matter
            tokens = torch.tensor([[filler] * pad + short, long])
            logits = model(tokens, attention_mask=mask)
            assert torch.isfinite(logits).all()  # pad queries too: a NaN there would leak through the cache
            assert (logits[0, pad:] - alone).abs().max().item() <= 1e-5
            assert (logits[1] - model(torch.tensor([long]))[0]).abs().max().item() <= 1e-5
        # Without the mask the pads are read as text, and the short row's logits change.
        assert (model(tokens)[0, pad:] - alone).abs().max().item() > 1e-2

        # The same through the cache: prefill, then one token per step with per-row positions.
        cache = KVCache(model.cfg.n_layers, 64)
        model(tokens, cache, attention_mask=mask)
        nxt = torch.tensor([[5], [6]])
        step = model(nxt, cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        full = model(torch.tensor([short + [5]]))[0, -1]
        assert (step[0, -1] - full).abs().max().item() <= 1e-5


def test_rope_positions_are_gathered_per_row(lm, prompts):
    model = lm[0]
    tokens = torch.tensor([prompts[0][:10], prompts[2][:10]])
    spread = torch.stack([torch.arange(10), torch.arange(10) * 3])  # row 1: positions 0, 3, 6, ...
    with torch.no_grad():
        both = model(tokens, positions=spread)
        assert (both[0] - model(tokens[:1])[0]).abs().max().item() <= 1e-5
        assert (both[1] - model(tokens[1:], positions=spread[1:])[0]).abs().max().item() <= 1e-5
        assert (both[1] - model(tokens[1:])[0]).abs().max().item() > 1e-2


def test_kv_cache_reorder_follows_beams_and_drops_rows():
    cache = KVCache(n_layers=1, max_len=8)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 2, 1, 4).clone()  # row i holds the value i
    cache.update(0, k, k + 10)
    cache.pos = 2
    cache.reorder(torch.tensor([2, 0, 0]))  # beam search: same batch size, rows repeat
    assert cache.keys[0][:, :2, 0, 0].tolist() == [[2, 2], [0, 0], [0, 0]]
    assert cache.values[0][:, :2, 0, 0].tolist() == [[12, 12], [10, 10], [10, 10]]
    cache.reorder(torch.tensor([0]))  # a finished row leaves
    assert cache.keys[0].shape == (1, 8, 1, 4) and cache.keys[0][0, :2, 0, 0].tolist() == [2, 2]


def test_beam_search_with_one_beam_is_greedy(lm, prompts):
    model, sp = lm
    period = sp.piece_to_id(".")
    greedy = generate_batch(model, prompts, 20, eos_id=period)
    assert any(len(new) < 20 for new in greedy)  # EOS candidates take the finished-hypothesis path
    with torch.inference_mode():
        assert _beam_search(model, prompts, 20, 1, 1.0, False, 1.0, period, 0, None, None) == greedy


# Common pieces stand in for EOS so that hypotheses finish early. Each case was chosen because dropping one rule of
# transformers' algorithm changes its tokens: the cap on finished beams with early_stopping=True, the stop on
# prompts that cannot improve, the max-length estimate of early_stopping="never".
@pytest.mark.parametrize("eos, options", [
    (".", dict(num_beams=4)),
    (".", dict(num_beams=4, early_stopping=True)),
    (".", dict(num_beams=4, length_penalty=0.6, early_stopping=True)),
    ("'", dict(num_beams=3, length_penalty=1.5)),
    ("'", dict(num_beams=4, early_stopping="never")),
    ("\u2581and", dict(num_beams=2, length_penalty=1.5, repetition_penalty=1.3)),
], ids=["4-beams", "early-stop", "early-stop-lp0.6", "lp1.5", "never", "lp1.5-repetition"])
def test_beam_search_gives_transformers_tokens(lm, prompts, hf_lm, eos, options):
    model, sp = lm
    hf, tokenizer = hf_lm
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)] == prompts
    eos_id, width = sp.piece_to_id(eos), batch.input_ids.shape[1]
    with torch.no_grad():
        theirs = hf.generate(**batch, do_sample=False, max_new_tokens=20, eos_token_id=eos_id,
                             pad_token_id=sp.pad_id(), **options)[:, width:].tolist()
    ours = generate_batch(model, prompts, 20, eos_id=eos_id, pad_id=sp.pad_id(), **options)
    for new, hf_new in zip(ours, theirs):
        assert hf_new[: len(new)] == new  # transformers fills the tail after an earlier EOS with pad or EOS ids
        assert set(hf_new[len(new) :]) <= {eos_id, sp.pad_id()}
    assert any(new[-1] == eos_id for new in ours)  # some beams finished on EOS, with a length-penalised score


def test_repetition_penalty_is_transformers(lm, prompts, hf_lm):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 12), generator=g)  # repeats included
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7), want)
    assert not torch.equal(want, logits)

    model, sp = lm  # end to end, greedy over a left-padded batch
    hf, tokenizer = hf_lm
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.generate(**batch, do_sample=False, max_new_tokens=20, repetition_penalty=1.5,
                             eos_token_id=None, pad_token_id=sp.pad_id())[:, batch.input_ids.shape[1] :].tolist()
    ours = generate_batch(model, prompts, 20, repetition_penalty=1.5)
    assert ours == theirs
    assert ours != generate_batch(model, prompts, 20)


def test_a_seeded_sample_does_not_depend_on_its_batch(lm, prompts):
    model, _ = lm
    options = dict(temperature=0.9, top_k=100, top_p=0.95)
    seeds = [11, 12, 13, 14, 15, 16]
    batched = generate_batch(model, prompts, 20, seeds=seeds, **options)
    alone = [generate_batch(model, [p], 20, seeds=[s], **options)[0] for p, s in zip(prompts, seeds)]
    assert batched == alone
    reordered = generate_batch(model, prompts[::-1], 20, seeds=seeds[::-1], **options)
    assert reordered == batched[::-1]
    assert generate_batch(model, prompts, 20, seeds=[s + 100 for s in seeds], **options) != batched
    assert batched != generate_batch(model, prompts, 20)  # sampled, not greedy


def test_eos_ends_one_row_while_the_others_go_on(lm, prompts):
    model, _ = lm
    free = generate_batch(model, prompts, 20)
    # An EOS id that one row writes after a few tokens and the others never write.
    row, eos = next((r, t) for r, new in enumerate(free) for t in new[3:]
                    if not any(t in other for other in free[:r] + free[r + 1 :]))
    model.train()
    ended = generate_batch(model, prompts, 20, eos_id=eos)
    assert model.training  # restored
    assert ended[row] == free[row][: free[row].index(eos) + 1] and len(ended[row]) < 20
    assert ended[:row] + ended[row + 1 :] == free[:row] + free[row + 1 :]


def test_a_stop_string_ends_its_row(lm, prompts):
    model, sp = lm
    free = generate_batch(model, prompts, 24)
    texts = [sp.decode(new) for new in free]
    # A stop string in the middle of one row's text that no other row writes.
    row, stop = next((r, text[i : i + 3]) for r, text in enumerate(texts) for i in range(4, len(text) - 3)
                     if text[i : i + 3].strip() and not any(text[i : i + 3] in t for t in texts[:r] + texts[r + 1 :]))
    out = generate_batch(model, prompts, 24, stop=[stop], decode=sp.decode)
    assert stop in sp.decode(out[row]) and stop not in sp.decode(out[row][:-1]) and len(out[row]) < 24
    assert out[row] == free[row][: len(out[row])] and out[:row] + out[row + 1 :] == free[:row] + free[row + 1 :]
    assert truncate_at_stop(sp.decode(out[row]), [stop]) == texts[row][: texts[row].index(stop)]

    beams = generate_batch(model, prompts, 24, num_beams=3)
    cut = generate_batch(model, prompts, 24, num_beams=3, stop=["' said"], decode=sp.decode)
    assert sum("' said" in sp.decode(new) for new in beams) >= 2
    for new in cut:  # a beam ends as soon as it writes a stop string, as it would on EOS
        assert "' said" not in sp.decode(new[:-1])


def test_truncate_at_stop():
    assert truncate_at_stop("Hello. World!", ["!", ". "]) == "Hello"
    assert truncate_at_stop("Hello", ["!"]) == "Hello"


@pytest.mark.parametrize("change, message", [
    (dict(prompts=[[2, 5], []]), "prompt 1 is empty"),
    (dict(prompts=[[5] * 129]), "more than the model's max_seq_len of 128"),
    (dict(prompts=[[5] * 120], max_new_tokens=9), "exceed the model's max_seq_len of 128"),
    (dict(prompts=[[5, 512]]), "outside the vocabulary"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, temperature=0.7), "sampling beams is not supported"),
    (dict(early_stopping="sometimes"), "early_stopping must be"),
    (dict(seeds=[1, 2]), "one seed per prompt"),
    (dict(stop=["."]), "stop strings need `decode`"),
    (dict(stop=[""], decode=str), "must not be empty"),
])
def test_bad_arguments_are_refused(lm, change, message):
    args = {"prompts": [[2, 5, 6]], "max_new_tokens": 4, **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_batch(lm[0], **args)
