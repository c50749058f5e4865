"""Export a trained athanor Transformer as a Hugging Face `LlamaForCausalLM` folder (config, safetensors, tokenizer).

No weight permutation is needed: athanor's RoPE already uses HF Llama's half-split (`rotate_half`) convention, and
tests/test_hf_export.py proves it by comparing logits with transformers' own implementation.

Mixture-of-experts models export as `MixtralForCausalLM` (the per-expert w1/w2/w3 layout, which transformers 4 loads
as is and transformers 5 converts on load) when Mixtral computes the same function: MoE in every layer, dropless,
top_k >= 2 (Mixtral renormalises the top-k weights; athanor keeps the raw probability for top-1). Anything else is
refused, since an export would silently change the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from athanor.config import ModelConfig
from athanor.model.mlp import ffn_hidden_size
from athanor.model.transformer import Transformer

# athanor name -> HF Llama name, per layer (prefix "layers.{i}." -> "model.layers.{i}.").
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def mixtral_incompatibility(cfg: ModelConfig) -> str | None:
    """Why this MoE config cannot be expressed as Mixtral, or None when it can."""
    if cfg.moe_every != 1:
        return f"Mixtral has experts in every layer, this model every {cfg.moe_every}"
    if cfg.moe_capacity_factor is not None:
        return "Mixtral is dropless, this model drops tokens over a capacity factor"
    if cfg.moe_top_k < 2:
        return "Mixtral renormalises the top-k weights, which for top-1 changes the output"
    return None


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename athanor parameters to HF Llama's (Mixtral's for MoE); a tied head is left out, as transformers expects."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            if not (cfg.moe_num_experts and ours.startswith("feed_forward.")):
                out[f"model.layers.{i}.{theirs}.weight"] = state[f"layers.{i}.{ours}.weight"]
        if cfg.moe_num_experts:  # Mixtral names its experts' projections w1/w2/w3 as athanor does
            ours, theirs = f"layers.{i}.feed_forward", f"model.layers.{i}.block_sparse_moe"
            out[f"{theirs}.gate.weight"] = state[f"{ours}.router.weight"]
            for e in range(cfg.moe_num_experts):
                for w in ("w1", "w2", "w3"):
                    out[f"{theirs}.experts.{e}.{w}.weight"] = state[f"{ours}.experts.{e}.{w}.weight"]
    # safetensors wants contiguous tensors that share no storage.
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    moe = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": cfg.moe_num_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "router_aux_loss_coef": cfg.moe_aux_loss_coef,
        "sliding_window": None,
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        **(moe if cfg.moe_num_experts else {}),
    }


def _tokenizer_files(tokenizer_model_path: Path, out_dir: Path, max_len: int) -> tuple[int | None, ...]:
    """Copy the SentencePiece model as tokenizer.model with a LlamaTokenizer config; return bos, eos, pad ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model_path))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    pieces = {name: sp.id_to_piece(i) for name, i in ids.items() if i >= 0}
    shutil.copyfile(tokenizer_model_path, out_dir / "tokenizer.model")
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": max_len,
        "add_bos_token": True,  # athanor packs every document as BOS tokens EOS
        "add_eos_token": False,
        "legacy": False,
        **{f"{name}_token": piece for name, piece in pieces.items()},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({f"{name}_token": piece for name, piece in pieces.items()}, indent=2)
    )
    return tuple(ids[name] if ids[name] >= 0 else None for name in ("bos", "eos", "pad"))


def export_hf(
    model_or_state: Transformer | dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_model_path: str | Path,
    out_dir: str | Path,
) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads; returns out_dir.

    `model_or_state` is a Transformer or its state_dict (e.g. from a checkpoint); the weights are written in float32.
    """
    from safetensors.torch import save_file

    if cfg.moe_num_experts and (why := mixtral_incompatibility(cfg)):
        raise ValueError(f"cannot export this mixture-of-experts model as Mixtral: {why}")
    tokenizer_model_path = Path(tokenizer_model_path)
    if not tokenizer_model_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model_path}")
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(state, cfg), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    bos, eos, pad = _tokenizer_files(tokenizer_model_path, out_dir, cfg.max_seq_len)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, bos, eos, pad), indent=2))
    return out_dir
