"""Named model shapes, from a CPU-test toy to Llama-2-7B.

`1b` is Llama-3.2-1B's shape and `7b` Llama-2-7B's, with their own vocabularies, so their parameter counts can be
checked against the published ones; `125m` and `350m` are the GPT-3 small/medium shapes in Llama form. The vocabulary
is a reference only: a run passes its tokenizer's size, `preset("125m", vocab_size=4096)`.
"""

from __future__ import annotations

from typing import Any

from athanor.config import ModelConfig
from athanor.model.flops import param_count

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=256),
    "350m": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, multiple_of=256),
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
               rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    "7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
               max_seq_len=4096, tie_embeddings=False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named shape; any field can be overridden (vocab_size, attention, moe_*...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def preset_num_params(name: str, **overrides: Any) -> int:
    return param_count(preset(name, **overrides))
