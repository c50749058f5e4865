"""The network: shapes, causality, RoPE, init, loss, meta-device init, learning on real text; presets and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from athanor.config import ModelConfig
from athanor.model.flops import flops_per_token, param_count
from athanor.model.moe import MoE
from athanor.model.presets import preset, preset_num_params
from athanor.model.transformer import Transformer, apply_rope, rope_tables


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, attention="sdpa")
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def alice_bytes(data_dir) -> torch.Tensor:
    """Alice in Wonderland as UTF-8 bytes: real text with a 256-token vocabulary and no tokenizer needed."""
    return torch.tensor(list((data_dir / "quality/high/alice29.txt").read_bytes()), dtype=torch.long)


def batches(data: torch.Tensor, steps: int, batch: int = 16, seq: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s : s + seq + 1] for s in starts])
        yield chunk[:, :-1], chunk[:, 1:]


def test_forward_shapes_and_initial_loss_near_uniform(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=False))
    x, y = next(batches(alice_bytes, 1))
    logits = model(x)
    assert logits.shape == (16, 64, 256) and logits.dtype == torch.float32
    assert abs(model.loss(logits, y).item() - math.log(256)) < 0.1


def test_loss_ignores_minus_100(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(tiny())
    x, y = next(batches(alice_bytes, 1))
    logits = model(x)
    masked = y.clone()
    masked[:, 32:] = -100
    want = torch.nn.functional.cross_entropy(logits[:, :32].reshape(-1, 256), y[:, :32].reshape(-1))
    torch.testing.assert_close(model.loss(logits, masked), want)


def test_future_tokens_do_not_change_past_logits(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(tiny())
    x, _ = next(batches(alice_bytes, 1, batch=2))
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 7) % 256
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(16, 64, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i, j):
        return (apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = tiny(dim=256, n_heads=8, n_layers=8, n_kv_heads=8)
    model = Transformer(cfg)
    block = model.layers[0]
    assert block.attention.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert block.attention.wo.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.equal(block.attention_norm.weight, torch.ones(cfg.dim))


def test_tied_and_untied_parameter_counts():
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 256 * 64
    assert tied.num_params() - tied.num_params(exclude_embeddings=True) == 256 * 64
    assert sum(p.numel() for p in tied.state_dict().values()) > tied.num_params()  # shared tensor listed twice


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        model = Transformer(tiny())
    assert model.tok_embeddings.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    reference = Transformer(tiny())
    torch.testing.assert_close(model.rope_cos, reference.rope_cos)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert "rope_cos" not in model.state_dict()
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all()


def test_refuses_missing_vocab_and_too_long_input():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny(vocab_size=0))
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny(max_seq_len=16))(torch.zeros(1, 17, dtype=torch.long))


def test_learns_real_text_in_fp32_and_runs_under_bf16_autocast(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for x, y in batches(alice_bytes, 30, batch=8):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.5, losses
    x, y = next(batches(alice_bytes, 1, seed=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model.loss(logits, y)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert abs(loss.item() - losses[-1]) < 0.5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "125m", "350m", "1b", "7b"])
def test_preset_param_count_matches_instantiated_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == param_count(cfg)
    assert model.num_params(exclude_embeddings=True) == param_count(cfg, exclude_embeddings=True)


def test_presets_reproduce_published_llama_sizes():
    assert preset_num_params("1b") == 1_235_814_400  # Llama-3.2-1B
    assert preset_num_params("7b") == 6_738_415_616  # Llama-2-7B
    assert 100e6 < preset_num_params("125m") < 135e6 and 300e6 < preset_num_params("350m") < 380e6
    assert preset("125m", vocab_size=4096).vocab_size == 4096
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("13b")


@pytest.mark.parametrize("moe", [{}, dict(moe_num_experts=4, moe_top_k=2, moe_every=2, tie_embeddings=False)])
def test_flops_per_token_equals_counted_flops_of_a_training_step(moe):
    """torch's FlopCounterMode counts every matmul of forward + backward; the math backend makes attention matmuls."""
    cfg = preset("tiny", attention="math", **moe)
    model = Transformer(cfg)
    if moe:
        assert param_count(cfg) == model.num_params()
    x = torch.randint(0, 256, (2, 128))
    with FlopCounterMode(display=False) as counter:
        model.loss(model(x), x).backward()
    assert counter.get_total_flops() / x.numel() == flops_per_token(cfg, 128)


def moe_cfg(**overrides) -> ModelConfig:
    return tiny(**{"moe_num_experts": 4, "moe_top_k": 2, **overrides})


def per_token_reference(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """The definition, one token at a time: sum over its top-k experts of weight * expert(token)."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, chosen = moe.route(flat)
    taken = [0] * moe.num_experts
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(moe.top_k):
            e = int(chosen[t, slot])
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            out[t] += weights[t, slot] * moe.experts[e](flat[t : t + 1])[0]
    return out.view(x.shape)


def test_moe_layers_follow_moe_every():
    model = Transformer(moe_cfg(n_layers=4, moe_every=2))
    assert [isinstance(b.feed_forward, MoE) for b in model.layers] == [False, True, False, True]


def test_moe_trains_on_real_text_with_finite_aux_loss(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(moe_cfg())
    x, y = next(batches(alice_bytes, 1, batch=4))
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss = model.loss(logits, y)
    aux = model.aux_loss()
    assert torch.isfinite(aux) and aux.item() >= 0.0
    torch.testing.assert_close(loss, ce + model.cfg.moe_aux_loss_coef * aux)
    loss.backward()
    router = model.layers[0].feed_forward.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_aux_loss_is_at_its_minimum_for_uniform_routing(alice_bytes):
    model = Transformer(moe_cfg())
    for block in model.layers:
        torch.nn.init.zeros_(block.feed_forward.router.weight)  # every expert equally likely for every token
    model(next(batches(alice_bytes, 1, batch=2))[0])
    torch.testing.assert_close(model.aux_loss(), torch.tensor(float(model.cfg.n_layers)))  # 1 per MoE layer


def test_dropless_moe_equals_per_token_loop(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(moe_cfg(moe_top_k=2))
    x = model.tok_embeddings(next(batches(alice_bytes, 1, batch=2, seq=16))[0]).detach()
    moe = model.layers[0].feed_forward
    torch.testing.assert_close(moe(x), per_token_reference(moe, x), atol=1e-6, rtol=1e-5)


def test_capacity_factor_drops_overflow_first_come_first_served(alice_bytes):
    torch.manual_seed(0)
    model = Transformer(moe_cfg(moe_top_k=1, moe_capacity_factor=0.5))
    x = model.tok_embeddings(next(batches(alice_bytes, 1, batch=2, seq=16))[0]).detach()
    moe = model.layers[0].feed_forward
    capacity = moe.capacity(32)
    assert capacity == 4  # ceil(0.5 * 32 tokens * top-1 / 4 experts)
    out = moe(x)
    torch.testing.assert_close(out, per_token_reference(moe, x, capacity), atol=1e-6, rtol=1e-5)
    dropped = (out.reshape(-1, 64).abs().sum(-1) == 0).sum().item()
    assert dropped >= 32 - capacity * moe.num_experts
