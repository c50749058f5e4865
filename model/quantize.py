"""Weight-only post-training quantization of a trained Transformer: int8 and int4 round-to-nearest, GPTQ, AWQ.

Why: a decoder's time per token at small batch is spent reading weights, so storing them in 8 or 4 bits (with a
float scale per output row or per group of input columns) makes decoding cheaper and the checkpoint smaller.
Round-to-nearest (RTN) is free but loses accuracy at 4 bits; GPTQ (Frantar et al. 2022) quantizes one column at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
of the layer's inputs; AWQ (Lin et al. 2023) scales up the input channels that carry large activations before
rounding and folds the inverse scale into the preceding norm or projection, so the float function is unchanged.

Conventions (fixed: model/quant_export.py writes them out as compressed-tensors):
- symmetric: q int8 in [-(2^(b-1)-1), 2^(b-1)-1], no zero point, w = q * scale;
- asymmetric: q uint8 in [0, 2^b-1], zero uint8 [out, n_groups], w = (q - zero) * scale;
- scale float32 [out, n_groups]; a group is `group_size` consecutive input columns (per-channel: one group a row).
Asymmetric ranges always include 0 (min(w, 0), max(w, 0), as GPTQ's quantizer does), so 0 is exact, the zero point
needs no clamping and every weight is within scale / 2 of its grid point.

`quantize_model` swaps every block projection (wq wk wv wo w1 w3 w2) for a `QuantizedLinear` in place. GPTQ and AWQ
calibrate sequentially, block by block, as both papers do: each block sees the outputs of the already quantized
blocks before it. Only dense models are supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("int8", "int4", "gptq", "awq")
SUPPORTED_BITS = {"int8": (8,), "int4": (4,), "gptq": (4, 8), "awq": (4, 8)}
# Projection groups of a block, in the order calibration quantizes them ("true sequential" GPTQ): each group's
# inputs are collected after the groups before it are quantized.
ATTENTION_GROUPS = (("wq", "wk", "wv"), ("wo",))
MLP_GROUPS = (("w1", "w3"), ("w2",))
PER_CHANNEL = "channel"  # QuantSpec.for_method's spelling of group_size=None (one group per output row)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what aten's CPU int4 kernel accepts


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: method, bits, group_size (None = one group per output row), symmetric, and method knobs."""

    method: str
    bits: int
    group_size: int | None
    symmetric: bool
    damp: float = 0.01  # GPTQ: damp * mean(diag H) is added to H's diagonal
    block_size: int = 128  # GPTQ: columns quantized between lazy batch updates
    act_order: bool = False  # GPTQ: quantize columns in order of descending diag(H)
    grid: int = 20  # AWQ: alphas 0, 1/grid, ..., (grid-1)/grid

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        allowed = SUPPORTED_BITS[self.method]
        if self.bits not in allowed:
            raise ValueError(f"{self.method} supports {' or '.join(map(str, allowed))} bits, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be at least 1 (or None for per-channel), got {self.group_size}")
        if self.damp < 0 or self.block_size < 1 or self.grid < 1:
            raise ValueError(f"need damp >= 0, block_size >= 1, grid >= 1; got {self.damp}, {self.block_size}, "
                             f"{self.grid}")

    @classmethod
    def for_method(cls, method: str, bits: int | None = None, group_size: int | str | None = None,
                   symmetric: bool | None = None, **knobs) -> QuantSpec:
        """Defaults: int8 = 8-bit symmetric per-channel; int4, gptq, awq = 4-bit asymmetric, groups of 128.

        None keeps a default; group_size="channel" asks for one group per output row whatever the method.
        """
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
        if group_size == PER_CHANNEL:
            group = None
        elif group_size is None:
            group = None if method == "int8" else 128
        elif isinstance(group_size, int):
            group = group_size
        else:
            raise ValueError(f"group size must be an int or {PER_CHANNEL!r}, got {group_size!r}")
        default_bits, default_symmetric = (8, True) if method == "int8" else (4, False)
        return cls(method, default_bits if bits is None else bits, group,
                   default_symmetric if symmetric is None else symmetric, **knobs)

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")


# ---------------------------------------------------------------------------------------------------------------
# Tensor functions


def _qmax(bits: int, symmetric: bool) -> int:
    """Largest q: 2^(b-1)-1 symmetric (q in [-qmax, qmax]), 2^b-1 asymmetric (q in [0, qmax])."""
    return (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1


def _check_groups(in_features: int, group_size: int | None, name: str) -> int:
    group = in_features if group_size is None else group_size
    if in_features % group:
        raise ValueError(f"{name}: group size {group} does not divide its {in_features} input features")
    return group


def _check_all_groups(widths: dict[str, int], group_size: int | None) -> None:
    """Every layer's input width against the group size; the error names a power-of-two group that fits them all."""
    for name, width in widths.items():
        if group_size is not None and width % group_size:
            common = math.gcd(*widths.values())
            fits = max((2**k for k in range(1, 11) if common % 2**k == 0 and 2**k <= group_size), default=None)
            hint = f"group size {fits} divides every layer" if fits else "use per-channel scales"
            raise ValueError(f"{name}: group size {group_size} does not divide its {width} input features ({hint})")


def _params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and integer zero point (float, or None) of each row of w [..., n] over its last dimension."""
    qmax = _qmax(bits, symmetric)
    if symmetric:
        scale = w.abs().amax(-1) / qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool):
    """Integer grid points (as float) of w, with scale and zero broadcast against it."""
    qmax = _qmax(bits, symmetric)
    if symmetric:
        return torch.round(w / scale).clamp(-qmax, qmax)
    return (torch.round(w / scale) + zero).clamp(0, qmax)


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, symmetric: bool):
    """Float grid points and params -> the stored dtypes (int8 / uint8 q, float32 scale, uint8 zero)."""
    q = q.to(torch.int8 if symmetric else torch.uint8)
    return q, scale.float().contiguous(), None if zero is None else zero.to(torch.uint8).contiguous()


def quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "weight"):
    """Round-to-nearest: w [out, in] -> (q [out, in], scale [out, n_groups], zero [out, n_groups] or None)."""
    out, cols = w.shape
    group = _check_groups(cols, spec.group_size, name)
    grouped = w.detach().float().reshape(out, cols // group, group)
    scale, zero = _params(grouped, spec.bits, spec.symmetric)
    q = _round(grouped, scale[..., None], None if zero is None else zero[..., None], spec.bits, spec.symmetric)
    return _pack(q.reshape(out, cols), scale, zero, spec.symmetric)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None):
    """(q - zero) * scale per group of `group_size` input columns, as float32 [out, in]."""
    out, cols = q.shape
    group = cols if group_size is None else group_size
    grouped = q.float().reshape(out, cols // group, group)
    if zero is not None:
        grouped = grouped - zero.float()[..., None]
    return (grouped * scale.float()[..., None]).reshape(out, cols)


# ---------------------------------------------------------------------------------------------------------------
# The module


class QuantizedLinear(nn.Module):
    """A bias-free Linear whose weight is stored quantized; computes x @ dequantized_weight().T.

    On CPU with bfloat16 inputs it calls aten's weight-only kernels (what gpt-fast and torchao use):
    `_weight_int8pack_mm` for 8-bit symmetric per-channel weights, `_weight_int4pack_mm_for_cpu` for 4-bit groups
    of 32..256 (out_features a multiple of 16). In torch 2.13 on CPU both are vectorised only for bfloat16; with
    float32 inputs they are slower than dequantizing, so every other case dequantizes and calls F.linear.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group_size: int, symmetric: bool):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits, self.group_size, self.symmetric = bits, int(group_size), symmetric
        if self.in_features % self.group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {self.in_features}")
        if symmetric != (zero is None):
            raise ValueError("a symmetric QuantizedLinear has no zero point; an asymmetric one needs one")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self._kernel_cache: tuple | None = None  # (key, tensors) for the aten kernels; rebuilt when buffers change

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedLinear:
        """Round-to-nearest quantization of a float weight [out, in]."""
        return cls.from_quantized(quantize_weight(w, spec, name), spec, w.shape[1])

    @classmethod
    def from_quantized(cls, qsz: tuple, spec: QuantSpec, in_features: int) -> QuantizedLinear:
        q, scale, zero = qsz
        group = in_features if spec.group_size is None else spec.group_size
        return cls(q, scale, zero, spec.bits, group, spec.symmetric)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero, self.group_size).to(dtype)

    def kernel(self) -> str | None:
        """Which aten kernel `kernel_forward` uses for this layout: "int8", "int4", or None (dequantize)."""
        if self.bits == 8 and self.symmetric and self.group_size == self.in_features:
            return "int8"
        if self.bits == 4 and self.group_size in INT4_KERNEL_GROUPS and self.out_features % 16 == 0:
            return "int4"
        return None

    def _kernel_tensors(self, dtype: torch.dtype) -> tuple:
        key = (self.kernel(), dtype, self.qweight.device, self.qweight._version, self.scale._version,
               None if self.zero is None else self.zero._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, self._build_kernel_tensors(dtype))
        return self._kernel_cache[1]

    def _build_kernel_tensors(self, dtype: torch.dtype) -> tuple:
        if self.kernel() == "int8":
            return self.qweight.contiguous(), self.scale[:, 0].to(dtype).contiguous()
        # aten's int4 layout: w = (u - 8) * scale + offset with u in [0, 15], so u = q + 8 and offset = 0 for
        # symmetric q, u = q and offset = (8 - zero) * scale for asymmetric (q, zero).
        if self.symmetric:
            u, offset = self.qweight.to(torch.int32) + 8, torch.zeros_like(self.scale)
        else:
            u, offset = self.qweight.to(torch.int32), (8 - self.zero.float()) * self.scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        scale_zero = torch.stack([self.scale, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return packed, scale_zero

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through the aten kernel (any float dtype it accepts; fast for bfloat16 on CPU)."""
        x2d = x.reshape(-1, self.in_features).contiguous()
        if self.kernel() == "int8":
            q, scale = self._kernel_tensors(x.dtype)
            y = torch._weight_int8pack_mm(x2d, q, scale)
        else:
            packed, scale_zero = self._kernel_tensors(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, self.group_size, scale_zero)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.kernel() is not None:
            return self.kernel_forward(x)
        return F.linear(x, self.dequantized_weight(x.dtype))

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}")


# ---------------------------------------------------------------------------------------------------------------
# GPTQ


def _group_params(w: torch.Tensor, spec: QuantSpec):
    """(scale [out, 1], zero [out, 1] or None) of the columns w [out, n], as GPTQ's find_params."""
    scale, zero = _params(w, spec.bits, spec.symmetric)
    return scale[:, None], None if zero is None else zero[:, None]


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, as fasterquant computes it."""
    H = H.clone()
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, name: str = "weight"):
    """GPTQ of w [out, in] given H [in, in] (2/n sum x x^T of its inputs) -> (q, scale, zero) in the original order.

    Follows IST-DASLab's `fasterquant`. With act_order and groups it uses static groups (`static_groups=True`
    there): each group's scale and zero come from the original weights of its contiguous columns, in the original
    column order, before any error update. Groups then stay contiguous runs of input columns, which is the layout
    QuantizedLinear, the aten kernels and compressed-tensors store; dynamic groups under act_order would gather
    columns scattered by the permutation and need a per-column group index (g_idx) that none of them carries.
    """
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    cols = W.shape[1]
    group = _check_groups(cols, spec.group_size, name)
    n_groups = cols // group
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = torch.zeros(W.shape[0], n_groups, device=W.device)
    zeros = None if spec.symmetric else torch.zeros_like(scales)
    static = spec.act_order or spec.group_size is None
    if static:  # params fixed up front, from the original weights
        grouped = W.reshape(W.shape[0], n_groups, group)
        s, z = _params(grouped, spec.bits, spec.symmetric)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
    perm = torch.argsort(torch.diag(H), descending=True) if spec.act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_cholesky(H, spec.damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, spec.block_size):
        i2 = min(i1 + spec.block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group
            if not static and col % group == 0:
                # Group params from the current, error-updated weights: the rest of this block is current in W1;
                # columns past the block still owe this block's updates so far.
                current = W1[:, i:i + group]
                if current.shape[1] < group:
                    ahead = W[:, i2:] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:]
                    current = torch.cat([current, ahead], dim=1)[:, :group]
                s, z = _group_params(current, spec)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            s = scales[:, g:g + 1]
            z = None if zeros is None else zeros[:, g:g + 1]
            wcol = W1[:, i:i + 1]
            q = _round(wcol, s, z, spec.bits, spec.symmetric)
            Q[:, i1 + i] = q[:, 0]
            deq = (q if z is None else q - z) * s
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return _pack(Q, scales, zeros, spec.symmetric)


# ---------------------------------------------------------------------------------------------------------------
# AWQ


def _rtn_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w after a round trip through quantize_weight / dequantize."""
    q, scale, zero = quantize_weight(w, spec)
    return dequantize(q, scale, zero, spec.group_size).to(w.dtype)


def _awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so max(s) * min(s) = 1 as in llm-awq."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search(x: torch.Tensor, linears: list[nn.Linear], inspect, spec: QuantSpec) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale s for `linears` (which all read x [..., C]) and its relative output MSE.

    For each alpha on the grid, every linear gets the weight RTN(W * s) / s (the folded form, seen from x), and
    `inspect(x)` (the module those linears feed, e.g. the whole attention) is compared with its float output.
    Alpha 0 is s = 1, plain RTN, so the search never does worse than RTN on the calibration inputs.
    """
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    originals = [lin.weight.detach().clone() for lin in linears]
    reference = inspect(x)
    norm = reference.float().pow(2).mean().clamp(min=1e-30)
    best = (float("inf"), torch.ones_like(x_mean))
    try:
        for i in range(spec.grid):
            s = _awq_scales(x_mean, i / spec.grid)
            for lin, w in zip(linears, originals):
                lin.weight.copy_(_rtn_weight(w * s, spec) / s)
            loss = ((inspect(x).float() - reference.float()).pow(2).mean() / norm).item()
            if loss < best[0]:
                best = (loss, s)
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best[1], best[0]


@torch.no_grad()
def _fold(s: torch.Tensor, before: nn.Module, after: list[nn.Linear]) -> None:
    """Divide what produces the channels by s (a norm's weight, or a Linear's rows) and scale the readers' columns."""
    if isinstance(before, nn.Linear):
        before.weight.div_(s[:, None].to(before.weight.dtype))
    else:
        before.weight.div_(s.to(before.weight.dtype))
    for lin in after:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def _capture_inputs(block: nn.Module, module: nn.Module, x, cos, sin) -> torch.Tensor:
    """The input of `module` while `block` runs on x."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        _run_block(block, x, cos, sin)
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def awq_block(block: nn.Module, x: torch.Tensor, cos, sin, spec: QuantSpec) -> dict[str, float]:
    """Search and fold AWQ's scales into one float block (its function is unchanged); returns each group's loss.

    Groups as AutoAWQ: (wq, wk, wv) after attention_norm, judged on the attention's output; wo after wv, only when
    wv's rows are wo's columns (n_kv_heads == n_heads; skipped under GQA); (w1, w3) after ffn_norm, judged on the
    MLP's output; w2 after w3's rows.
    """
    att, ffn = block.attention, block.feed_forward
    losses = {}
    h = _capture_inputs(block, att.wq, x, cos, sin)
    s, losses["attention.wq,wk,wv"] = awq_search(h, [att.wq, att.wk, att.wv], lambda t: _chunked(
        lambda c, a, b: att(c, a, b), t, cos, sin), spec)
    _fold(s, block.attention_norm, [att.wq, att.wk, att.wv])
    if att.wv.out_features == att.wo.in_features:
        h = _capture_inputs(block, att.wo, x, cos, sin)
        s, losses["attention.wo"] = awq_search(h, [att.wo], att.wo, spec)
        _fold(s, att.wv, [att.wo])
    h = _capture_inputs(block, ffn.w1, x, cos, sin)
    s, losses["feed_forward.w1,w3"] = awq_search(h, [ffn.w1, ffn.w3], ffn, spec)
    _fold(s, block.ffn_norm, [ffn.w1, ffn.w3])
    h = _capture_inputs(block, ffn.w2, x, cos, sin)
    s, losses["feed_forward.w2"] = awq_search(h, [ffn.w2], ffn.w2, spec)
    _fold(s, ffn.w3, [ffn.w2])
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Whole model

CHUNK = 8  # calibration sequences per forward pass


def _chunked(fn, x: torch.Tensor, cos, sin) -> torch.Tensor:
    return torch.cat([fn(x[i:i + CHUNK], cos, sin) for i in range(0, x.shape[0], CHUNK)])


def _run_block(block: nn.Module, x: torch.Tensor, cos, sin) -> torch.Tensor:
    return _chunked(lambda c, a, b: block(c, a, b), x, cos, sin)


def _hessians(block: nn.Module, linears: dict[str, nn.Module], x, cos, sin) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T (n tokens, float32) of each linear's inputs, accumulated chunk by chunk by forward hooks."""
    sums = {name: torch.zeros(m.in_features, m.in_features, device=x.device) for name, m in linears.items()}
    def hook(name):
        def add(module, args, out):
            inp = args[0].detach().reshape(-1, module.in_features).float()
            sums[name].addmm_(inp.T, inp)
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        _run_block(block, x, cos, sin)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0] * x.shape[1]
    return {name: 2 * s / n for name, s in sums.items()}


def _relative_output_error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor | None) -> tuple[str, float]:
    """||X (W - Wq)^T||^2 / ||X W^T||^2 from H = 2/n X^T X (exact, no activations kept), or the weights' own."""
    d = (w.float() - deq)
    if H is None:
        return "weight_error", (d.pow(2).sum() / w.float().pow(2).sum().clamp(min=1e-30)).item()
    num = torch.einsum("oi,ij,oj->", d, H, d)
    den = torch.einsum("oi,ij,oj->", w.float(), H, w.float())
    return "output_error", (num / den.clamp(min=1e-30)).item()


def _replace(parent: nn.Module, child: str, path: str, spec: QuantSpec, H: torch.Tensor | None) -> dict:
    """Quantize parent.child (GPTQ when spec says and H is known, else RTN), swap it in, return its stats."""
    lin = getattr(parent, child)
    w = lin.weight.detach()
    if spec.method == "gptq" and H is not None:
        qsz = gptq_quantize(w, H, spec, path)
    else:
        qsz = quantize_weight(w, spec, path)
    new = QuantizedLinear.from_quantized(qsz, spec, w.shape[1]).to(w.device)
    key, err = _relative_output_error(w, new.dequantized_weight(), H)
    setattr(parent, child, new)
    return {"name": path, "method": spec.method, "bits": spec.bits, "group_size": new.group_size, key: err}


def _block_parts(block: nn.Module) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    groups = [(block.attention, "attention", g) for g in ATTENTION_GROUPS]
    return groups + [(block.feed_forward, "feed_forward", g) for g in MLP_GROUPS]


@torch.no_grad()
def quantize_block(block: nn.Module, index: int, spec: QuantSpec, x: torch.Tensor | None = None,
                   cos=None, sin=None) -> tuple[list[dict], torch.Tensor | None]:
    """Quantize one block in place; with calibration inputs x [n, T, dim], returns (stats, its quantized output)."""
    stats = []
    awq_losses = awq_block(block, x, cos, sin, spec) if spec.method == "awq" and x is not None else {}
    for parent, prefix, group in _block_parts(block):
        linears = {name: getattr(parent, name) for name in group}
        hessians = _hessians(block, linears, x, cos, sin) if x is not None else {}
        for name in group:
            path = f"layers.{index}.{prefix}.{name}"
            stats.append(_replace(parent, name, path, spec, hessians.get(name)))
    for row in stats:
        for key, loss in awq_losses.items():
            if row["name"].split(".", 2)[2] in _expand(key):
                row["awq_search_error"] = loss
    return stats, None if x is None else _run_block(block, x, cos, sin)


def _expand(key: str) -> list[str]:
    """'attention.wq,wk,wv' -> ['attention.wq', 'attention.wk', 'attention.wv']."""
    prefix, names = key.split(".")
    return [f"{prefix}.{n}" for n in names.split(",")]


def check_quantizable(model: nn.Module, spec: QuantSpec | None = None, include_head: bool = False) -> None:
    """A plain dense athanor Transformer whose block projections are all nn.Linear (and, given a spec, whose input
    widths its group size divides), or a ValueError saying why not."""
    from athanor.model.moe import MoE
    from athanor.model.transformer import Transformer

    if not isinstance(model, Transformer):
        raise ValueError(f"quantize needs a plain athanor Transformer, got {type(model).__name__} (unwrap it first)")
    for i, block in enumerate(model.layers):
        if isinstance(block.feed_forward, MoE):
            raise ValueError(f"layers.{i} is a mixture-of-experts layer: MoE experts are not supported by athanor "
                             "quantize (dense models only)")
        for parent, prefix, group in _block_parts(block):
            for name in group:
                kind = type(getattr(parent, name)).__name__
                if type(getattr(parent, name)) is not nn.Linear:
                    raise ValueError(f"layers.{i}.{prefix}.{name} is a {kind}, not a plain nn.Linear: quantize a "
                                     "plain Transformer (merge LoRA first; a quantized model cannot be re-quantized)")
    if spec is not None:
        widths = {f"layers.{i}.{prefix}.{name}": getattr(parent, name).in_features
                  for i, block in enumerate(model.layers)
                  for parent, prefix, group in _block_parts(block) for name in group}
        if include_head:
            widths["output"] = model.cfg.dim
        _check_all_groups(widths, spec.group_size)


def _check_calibration(calibration: torch.Tensor, model: nn.Module) -> None:
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(f"calibration must be a LongTensor [n, seq] of token ids, got {calibration.dtype} "
                         f"{list(calibration.shape)}")
    if calibration.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"calibration sequences of {calibration.shape[1]} tokens exceed model.max_seq_len="
                         f"{model.cfg.max_seq_len}")


@torch.no_grad()
def _quantize_head(model: nn.Module, spec: QuantSpec, h: torch.Tensor | None) -> dict:
    """Quantize the output head (GPTQ on the final norm's outputs when calibrated), untying it from the embedding."""
    if model.output.weight is model.tok_embeddings.weight:
        model.cfg = model.cfg.model_copy(update={"tie_embeddings": False})
    H = None
    if h is not None:
        feats = model.norm(h).reshape(-1, model.cfg.dim).float()
        H = 2 * feats.T @ feats / feats.shape[0]
    return _replace(model, "output", "output", spec, H)


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, calibration: torch.Tensor | None = None,
                   include_head: bool = False) -> list[dict]:
    """Replace every block's wq wk wv wo w1 w3 w2 with a QuantizedLinear, in place; returns per-layer stats.

    Embeddings, norms and the head stay in full precision (include_head=True quantizes the head too, untied from
    the embedding: model.cfg.tie_embeddings becomes False). gptq and awq need `calibration`, token ids [n, seq];
    the other methods use it only to report output errors. Each stats row has the layer's name and either
    `output_error` (relative squared error of its outputs on its calibration inputs) or `weight_error`.
    """
    check_quantizable(model, spec, include_head)  # every layer's shape first, so no model is left half quantized
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"{spec.method} needs calibration data: token ids [n, seq] (e.g. --calibration <text>)")
    was_training = model.training
    model.eval()
    h = cos = sin = None
    if calibration is not None:
        _check_calibration(calibration, model)
        calibration = calibration.to(model.tok_embeddings.weight.device)
        T = calibration.shape[1]
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        h = model.tok_embeddings(calibration)
    stats = []
    for i, block in enumerate(model.layers):
        block_stats, h = quantize_block(block, i, spec, h, cos, sin)
        stats += block_stats
    if include_head:
        stats.append(_quantize_head(model, spec, h))
    model.train(was_training)
    return stats
