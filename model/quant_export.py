"""Save a quantized athanor model as a Hugging Face folder in compressed-tensors' `pack-quantized` layout, and load it.

One artifact serves everyone: vLLM and llm-compressor read compressed-tensors checkpoints natively, transformers
loads them on CPU (decompressing to dense weights), and athanor's own `eval`/`generate` read them back through
`hf_import.load_hf_folder` with the very same integers, scales and zero points (as `QuantizedLinear` modules).

Everything that is not quantized (embeddings, norms, head, tokenizer, the Llama config) comes from `hf_export`.
Each `QuantizedLinear` is stored as compressed-tensors' `PackedQuantizationCompressor` stores a weight:

- `weight_packed` int32 [out, ceil(in * bits / 32)]: the signed values (q - 2^(bits-1) for athanor's unsigned
  asymmetric q) packed by compressed-tensors' own `pack_to_int32`, 32 / bits per word along the input dimension;
- `weight_scale` float32 [out, n_groups] ([out, 1] for strategy `channel`);
- `weight_zero_point` (asymmetric only) int32: the signed zero points (zero - 2^(bits-1)) packed along dim 0;
- `weight_shape` int64 [2]: (out, in).

`pack-quantized` is used for 8 bits too: it is the format compressed-tensors infers for weight-only int schemes
(its `int-quantized` compressor only claims schemes that quantize activations, W8A8) and the one vLLM's
weight-only (WNA16) kernels accept. The athanor side (method, source checkpoint, calibration...) goes to
`athanor_quantization.json` beside config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from athanor.config import ModelConfig
from athanor.model.hf_export import _LAYER_NAMES, _tokenizer_files, hf_config, hf_state_dict
from athanor.model.hf_import import HF_CONFIG, _read_safetensors, athanor_state, model_config_from_hf
from athanor.model.quantize import QuantizedLinear
from athanor.model.transformer import Transformer

METADATA_FILE = "athanor_quantization.json"
FORMAT = "pack-quantized"
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_HF_NAMES = {theirs: ours for ours, theirs in _LAYER_NAMES.items()}


def _hf_prefix(path: str) -> str:
    """HF module name of a projection: layers.0.attention.wq -> model.layers.0.self_attn.q_proj, output -> lm_head."""
    if path == "output":
        return "lm_head"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"cannot export quantized module {path!r}: only dense projections have an HF name")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def _athanor_path(prefix: str) -> str:
    """Inverse of `_hf_prefix`."""
    if prefix == "lm_head":
        return "output"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", prefix)
    if not m or m.group(2) not in _HF_NAMES:
        raise ValueError(f"quantized weight {prefix!r} has no place in athanor's decoder")
    return f"layers.{m.group(1)}.{_HF_NAMES[m.group(2)]}"


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def _strategy(lin: QuantizedLinear) -> tuple[int, bool, int | None]:
    """(bits, symmetric, group_size or None for one group per output channel): the key of a config group."""
    return lin.bits, lin.symmetric, None if lin.group_size >= lin.in_features else lin.group_size


def _scheme(key: tuple[int, bool, int | None], targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, symmetric, group = key
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
                               strategy="channel" if group is None else "group", group_size=group)
    return QuantizationScheme(targets=targets, weights=weights, format=FORMAT)


def quantization_config(linears: dict[str, QuantizedLinear], unquantized: list[str]):
    """compressed-tensors' QuantizationConfig: one config group per distinct (bits, symmetric, group) setting.

    A single group targets every `Linear` and ignores the rest (`lm_head` unless the head is quantized too), as
    llm-compressor writes it; mixed settings name their modules.
    """
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[tuple, list[str]] = {}
    for prefix, lin in linears.items():
        groups.setdefault(_strategy(lin), []).append(prefix)
    single = len(groups) == 1
    config_groups = {f"group_{i}": _scheme(key, ["Linear"] if single else names)
                     for i, (key, names) in enumerate(groups.items())}
    return QuantizationConfig(config_groups=config_groups, format=FORMAT, quantization_status="compressed",
                              ignore=sorted(unquantized))


def compress_linear(lin: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors' pack-quantized format stores for one Linear (local names)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = _offset(lin.bits)
    signed = lin.qweight if lin.symmetric else (lin.qweight.to(torch.int16) - offset).to(torch.int8)
    out = {
        "weight_packed": pack_to_int32(signed.cpu(), lin.bits),
        "weight_scale": lin.scale.detach().to("cpu", torch.float32),
        "weight_shape": torch.tensor([lin.out_features, lin.in_features], dtype=torch.int64),
    }
    if not lin.symmetric:
        zero = (lin.zero.to(torch.int16) - offset).to(torch.int8).cpu()
        out["weight_zero_point"] = pack_to_int32(zero, lin.bits, packed_dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def _hf_linears(cfg: ModelConfig) -> list[str]:
    """Every nn.Linear of the exported LlamaForCausalLM, by HF module name."""
    projections = [name for ours, name in _LAYER_NAMES.items() if "norm" not in ours]
    return ["lm_head", *(f"model.layers.{i}.{p}" for i in range(cfg.n_layers) for p in projections)]


def save_quantized(model: Transformer, tokenizer_path: str | Path, out_dir: str | Path, metadata: dict) -> Path:
    """Write `model` (QuantizedLinear projections, the rest float) as a compressed-tensors HF folder; returns it.

    `metadata` (method, bits, group size, source checkpoint, step, seq_len, calibration...) goes to
    athanor_quantization.json.
    """
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    cfg = model.cfg
    if cfg.moe_num_experts:
        raise ValueError("quantized export of mixture-of-experts models is not supported")
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path}")
    linears = {_hf_prefix(n): m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not linears:
        raise ValueError("the model has no QuantizedLinear modules; use `athanor export` for a float model")
    # hf_state_dict renames everything; the quantized projections go in as empty placeholders and come out packed.
    paths = {_athanor_path(p) for p in linears}
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in paths}
    state.update({f"{path}.weight": torch.empty(0) for path in paths})
    tensors = hf_state_dict(state, cfg)
    for prefix, lin in linears.items():
        del tensors[f"{prefix}.weight"]
        tensors.update({f"{prefix}.{k}": v for k, v in compress_linear(lin).items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    bos, eos, pad = _tokenizer_files(tokenizer_path, out_dir, cfg.max_seq_len)
    (out_dir / HF_CONFIG).write_text(json.dumps(hf_config(cfg, bos, eos, pad), indent=2))
    qconfig = quantization_config(linears, [n for n in _hf_linears(cfg) if n not in linears])
    ModelCompressor(quantization_config=qconfig).update_config(str(out_dir))  # as llm-compressor writes it
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    return out_dir


def quantization_metadata(folder: str | Path) -> dict | None:
    """athanor_quantization.json of a quantized folder, or None when there is none."""
    path = Path(folder) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _refuse(folder: Path, why: str):
    raise ValueError(f"{folder / HF_CONFIG}: quantization_config {why}; athanor loads compressed-tensors "
                     f"{FORMAT} weight-only int checkpoints")


def read_quantization_config(hf: dict, folder: Path):
    """The validated compressed-tensors QuantizationConfig of config.json; ValueError naming what athanor can't load."""
    raw = hf["quantization_config"]
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        _refuse(folder, f"has quant_method {method!r}")
    from compressed_tensors.quantization import QuantizationConfig

    qconfig = QuantizationConfig.model_validate(raw)
    if raw.get("sparsity_config") or raw.get("transform_config") or qconfig.kv_cache_scheme:
        _refuse(folder, "has sparsity, transforms or a kv-cache scheme")
    for name, scheme in qconfig.config_groups.items():
        w = scheme.weights
        fmt = scheme.format or qconfig.format
        if fmt != FORMAT:
            _refuse(folder, f"group {name} has format {fmt!r}")
        if w is None or scheme.input_activations or scheme.output_activations:
            _refuse(folder, f"group {name} is not weight-only")
        if w.type != "int" or w.strategy not in ("group", "channel") or w.actorder or w.dynamic:
            _refuse(folder, f"group {name} quantizes weights as {w.type}/{w.strategy} (actorder {w.actorder})")
    return qconfig


def _scheme_for(qconfig, prefix: str, folder: Path):
    from compressed_tensors.utils.match import match_name

    for scheme in qconfig.config_groups.values():
        if any(t == "Linear" or match_name(prefix, t) for t in scheme.targets):
            return scheme
    raise ValueError(f"{folder}: {prefix} is stored quantized but no config group targets it")


def decompress_linear(tensors: dict[str, torch.Tensor], scheme) -> QuantizedLinear:
    """A QuantizedLinear from one module's pack-quantized tensors (local names), with athanor's conventions."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, symmetric = scheme.weights.num_bits, scheme.weights.symmetric
    out_features, in_features = (int(d) for d in tensors["weight_shape"])
    scale = tensors["weight_scale"].float()
    q = unpack_from_int32(tensors["weight_packed"], bits, torch.Size([out_features, in_features]))
    zero = None
    if not symmetric:
        zero = unpack_from_int32(tensors["weight_zero_point"], bits, scale.shape, packed_dim=0)
        zero, q = ((t.to(torch.int16) + _offset(bits)).to(torch.uint8) for t in (zero, q))
    group = scheme.weights.group_size if scheme.weights.strategy == "group" else in_features
    return QuantizedLinear(q.contiguous(), scale.contiguous(), zero, bits, group, symmetric)


def load_quantized(folder: str | Path) -> tuple[Transformer, ModelConfig]:
    """(model in eval mode, its config) from a compressed-tensors folder; projections are QuantizedLinear."""
    folder = Path(folder)
    hf = json.loads((folder / HF_CONFIG).read_text())
    cfg = model_config_from_hf(hf)
    qconfig = read_quantization_config(hf, folder)
    theirs = _read_safetensors(folder)
    linears: dict[str, QuantizedLinear] = {}
    for key in [k for k in theirs if k.endswith(".weight_packed")]:
        prefix = key.removesuffix(".weight_packed")
        local = {s: theirs.pop(f"{prefix}.{s}") for s in _SUFFIXES if f"{prefix}.{s}" in theirs}
        linears[_athanor_path(prefix)] = decompress_linear(local, _scheme_for(qconfig, prefix, folder))
        theirs[f"{prefix}.weight"] = torch.empty(0)  # placeholder, so athanor_state's renaming sees every weight
    ours = {k: v.float() for k, v in athanor_state(theirs, cfg, folder).items()}
    for path in linears:
        del ours[f"{path}.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables; every parameter is overwritten or replaced below
    for path, lin in linears.items():
        model.set_submodule(path, lin)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    quantized = {f"{path}.{name}" for path, lin in linears.items() for name, _ in lin.named_buffers()}
    if unexpected or set(missing) - quantized:
        raise ValueError(f"{folder}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg
