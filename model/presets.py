"""Named model shapes, from a CPU-test toy to Llama-2-7B.

`1b` is Llama-3.2-1B's shape and `7b` Llama-2-7B's, with their own vocabularies, so their parameter counts can be
checked against the published ones; `125m` and `350m` are the GPT-3 small/medium shapes in Llama form. The vocabulary
is a reference only: a run passes its tokenizer's size, `preset("125m", vocab_size=4096)`.
"""

from __future__ import annotations

from typing import Any

from athanor.config import MODEL_PRESETS, ModelConfig
from athanor.model.flops import param_count

PRESETS = MODEL_PRESETS  # the table lives with the config, which resolves presets when it loads


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named shape; any field can be overridden (vocab_size, attention, moe_*...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def preset_num_params(name: str, **overrides: Any) -> int:
    return param_count(preset(name, **overrides))
