"""Export a trained athanor Transformer as a Hugging Face `LlamaForCausalLM` folder: config.json, safetensors, tokenizer.

No weight permutation is needed: athanor's RoPE already uses HF Llama's half-split (`rotate_half`) convention, and
tests/test_hf_export.py proves it by comparing logits with transformers' own implementation. Mixture-of-experts
models are refused: athanor's router (top-1 without renormalisation, optional capacity, MoE every n-th layer) is
not what Mixtral computes, so an export would silently change the model.
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


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename athanor parameters to HF Llama's; a tied head is left out, as transformers expects."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            out[f"model.layers.{i}.{theirs}.weight"] = state[f"layers.{i}.{ours}.weight"]
    # safetensors wants contiguous tensors that share no storage.
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
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
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads; returns out_dir."""
    from safetensors.torch import save_file

    if cfg.moe_num_experts:
        raise ValueError(
            "cannot export a mixture-of-experts model to Hugging Face: athanor's MoE routing does not match Mixtral's "
            "(top-1 weights are not renormalised, capacity may drop tokens, MoE may skip layers); export dense models"
        )
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
