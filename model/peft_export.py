"""Export a LoRA fine-tune for the Hugging Face stack: a PEFT adapter folder, or a merged model folder.

The adapter folder (adapter_config.json, adapter_model.safetensors) is what peft writes with `save_pretrained`, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)` loads it on top of the base model's
`export_hf` folder (tests/test_lora.py checks the logits). Keys follow peft's saved layout,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, and peft's LoRA computes the same function:
W x + scaling * B A x with scaling alpha / r (alpha / sqrt(r) with use_rslora), dropout on A's input.

The merged folder folds the adapters into the weights and is a plain LlamaForCausalLM (Mixtral for MoE) export.

Both expect a single-device model (plain tensors): gather a parallelized one into a fresh single-process LoRA model
first (e.g. load its checkpoint there).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from athanor.config import ModelConfig
from athanor.model.hf_export import _LAYER_NAMES, export_hf
from athanor.model.lora import lora_modules, merged_state_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the *ForCausalLM, whose decoder is `model.`


def _hf_module_name(name: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj` (the module's name inside LlamaForCausalLM)."""
    _, layer, rest = name.split(".", 2)
    if rest not in _LAYER_NAMES:
        raise ValueError(f"peft cannot address {name}: the experts of a Mixtral model are fused in transformers 5, "
                         "so LoRA on MoE MLPs exports only merged (export_merged_hf); or adapt attention only")
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def export_peft_adapter(model: nn.Module, cfg: ModelConfig, out_dir: str | Path,
                        base_model_path: str | Path | None = None) -> Path:
    """Write a PEFT LoRA adapter folder for `model` (a Transformer after apply_lora); returns out_dir.

    `base_model_path` goes into adapter_config.json as base_model_name_or_path (the base's export_hf folder or hub
    id); PeftModel.from_pretrained does not need it when given the base model itself.
    """
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    settings = {(m.rank, m.alpha, m.rslora, getattr(m.lora_dropout, "p", 0.0)) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"peft's adapter config has one rank, alpha, rslora and dropout; this model mixes {settings}")
    (rank, alpha, rslora, dropout), = settings
    hf_names = {name: _hf_module_name(name) for name in modules}
    targets = sorted({hf.split(".")[-1] for hf in hf_names.values()})  # q_proj, ..., as peft names them
    # peft applies target_modules to every layer, so the adapters must be on every layer alike.
    expected = {f"model.layers.{i}.{hf}" for i in range(cfg.n_layers) for hf in _LAYER_NAMES.values()
                if hf.split(".")[-1] in targets}
    if expected != set(hf_names.values()):
        raise ValueError("peft's target_modules apply to every layer; this model's adapters are on some layers only")
    tensors = {}
    for name, m in modules.items():
        prefix = PEFT_PREFIX + hf_names[name]
        for part in ("lora_A", "lora_B"):
            weight = getattr(m, part).weight
            tensors[f"{prefix}.{part}.weight"] = weight.detach().to("cpu", torch.float32).contiguous().clone()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def export_merged_hf(model: nn.Module, cfg: ModelConfig, tokenizer_model_path: str | Path,
                     out_dir: str | Path) -> Path:
    """`export_hf` of the model with its adapters folded into the weights (the model itself is left as it is)."""
    return export_hf(merged_state_dict(model), cfg, tokenizer_model_path, out_dir)
