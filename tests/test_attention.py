"""The attention backends agree with the textbook definition, forward and backward, including GQA and decoding."""

from __future__ import annotations

import pytest
import torch

from athanor.model import attention
from athanor.model.attention import causal_attention, check_backend


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(b=2, tq=12, tk=12, h=4, hkv=2, d=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(b, tk, hkv, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(b, tk, hkv, d, generator=g).to(device, dtype).requires_grad_()
    return q, k, v


def _forward_backward(backend, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v, backend)
    # A fixed random cotangent so every output element matters to the gradients.
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    (out * cot).sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_math_forward_and_backward(h, hkv):
    q, k, v = _qkv(h=h, hkv=hkv)
    for got, want in zip(_forward_backward("sdpa", q, k, v), _forward_backward("math", q, k, v), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_sdpa_matches_math_when_decoding_with_fewer_queries_than_keys():
    q, k, v = _qkv(tq=3, tk=10)
    for got, want in zip(_forward_backward("sdpa", q, k, v), _forward_backward("math", q, k, v), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_attention_is_causal():
    q, k, v = _qkv()
    out = causal_attention(q, k, v, "math")
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, 6:] += 1.0
    v2[:, 6:] -= 1.0
    out2 = causal_attention(q, k2, v2, "math")
    torch.testing.assert_close(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_auto_picks_sdpa_on_cpu():
    q, _, _ = _qkv()
    assert attention.resolve_backend("auto", q) == "sdpa"


def test_flash_requested_without_flash_attn_fails_clearly():
    if attention.flash_available():
        pytest.skip("flash-attn is usable here")
    with pytest.raises(RuntimeError, match="model.attention='flash'"):
        check_backend("flash")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "sdpa"])
def test_gpu_backends_match_math_in_bf16(backend):
    if backend == "flash" and not attention.flash_available():
        pytest.skip("flash-attn not installed")
    q, k, v = _qkv(tq=64, tk=64, h=8, hkv=2, d=64, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(_forward_backward(backend, q, k, v), _forward_backward("math", q, k, v), strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
