"""Load a Hugging Face Llama folder (config.json, safetensors, tokenizer.model) as an athanor Transformer.

The inverse of `hf_export`: the project's own exports, and Llama-architecture folders from elsewhere whose tokenizer
is SentencePiece, become models that `athanor eval`, `athanor generate` and lm-eval can load. RoPE needs no
permutation (both use the half-split convention). Checkpoints with features athanor's decoder does not compute
(biases, rope scaling, sliding windows) are refused with the field that says so, rather than loaded wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from athanor.config import ModelConfig
from athanor.model.hf_export import _LAYER_NAMES
from athanor.model.transformer import Transformer

HF_CONFIG = "config.json"


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / HF_CONFIG).is_file() and any(p.glob("*.safetensors"))


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of a LlamaForCausalLM config.json; ValueError naming the field athanor cannot honour."""
    arch = (hf.get("architectures") or ["?"])[0]
    if hf.get("model_type") != "llama":
        raise ValueError(f"{HF_CONFIG}: model_type {hf.get('model_type')!r} ({arch}); only Llama folders load")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ValueError(f"{HF_CONFIG}: {field} is true; athanor's decoder has no biases")
    rope = hf.get("rope_scaling") or {}
    params = hf.get("rope_parameters") or {}
    if rope or params.get("rope_type", "default") != "default":
        raise ValueError(f"{HF_CONFIG}: rope scaling {rope or params} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{HF_CONFIG}: hidden_act {hf['hidden_act']!r}; athanor's MLP is SwiGLU (silu)")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", dim // heads) != dim // heads:
        raise ValueError(f"{HF_CONFIG}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=params.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        init_std=hf.get("initializer_range", 0.02),
    )


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def athanor_state(theirs: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> dict[str, torch.Tensor]:
    """HF Llama tensors renamed to athanor's state_dict keys (the head tied when the config says so)."""
    ours = {"tok_embeddings.weight": theirs.pop("model.embed_tokens.weight"),
            "norm.weight": theirs.pop("model.norm.weight")}
    head = theirs.pop("lm_head.weight", None)
    if not cfg.tie_embeddings and head is None:
        raise ValueError(f"{folder}: tie_word_embeddings is false but there is no lm_head.weight")
    ours["output.weight"] = ours["tok_embeddings.weight"] if cfg.tie_embeddings else head
    for i in range(cfg.n_layers):
        for mine, hf_name in _LAYER_NAMES.items():
            ours[f"layers.{i}.{mine}.weight"] = theirs.pop(f"model.layers.{i}.{hf_name}.weight")
    leftover = [k for k in theirs if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{folder}: weights athanor's decoder has no place for: {leftover[:5]}")
    return ours


def load_hf_folder(folder: str | Path) -> tuple[Transformer, ModelConfig]:
    """(model in eval mode, its config) from an HF Llama folder; weights are kept in float32.

    A compressed-tensors quantized folder (`athanor quantize`) loads with QuantizedLinear projections.
    """
    folder = Path(folder)
    hf = json.loads((folder / HF_CONFIG).read_text())
    if "quantization_config" in hf:
        from athanor.model.quant_export import load_quantized

        return load_quantized(folder)
    cfg = model_config_from_hf(hf)
    ours = athanor_state(_read_safetensors(folder), cfg, folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables; every parameter is overwritten below
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    return model.eval(), cfg
