"""The checkpoint format: one folder that is enough to resume training, generate text or export the model.

    state.pt          model, optimizer, step, loader state, model config (tensors and plain data only)
    tokenizer.model   the SentencePiece model the token ids belong to

Loading uses `torch.load(weights_only=True)`, which refuses pickled code, so a tampered file cannot run anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from athanor.config import ModelConfig

STATE_FILE = "state.pt"
TOKENIZER_FILE = "tokenizer.model"


def save_checkpoint(directory: Path, state: dict, tokenizer_model: Path) -> None:
    torch.save(state, directory / STATE_FILE)
    shutil.copyfile(tokenizer_model, directory / TOKENIZER_FILE)


def load_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint under a run's workdir or Ray Train storage folder."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    found = sorted(p.glob(f"**/checkpoint_*/{STATE_FILE}"), key=lambda f: f.parent.name)
    if not found:
        raise FileNotFoundError(f"no checkpoint ({STATE_FILE}) found in or under {p}")
    return found[-1].parent


def load_model(path: str | Path, device: str = "cpu"):
    """(model in eval mode, its ModelConfig, the checkpoint folder) from a checkpoint or a run folder."""
    from athanor.model.transformer import Transformer

    directory = find_checkpoint(path)
    state = load_state(directory)
    mcfg = ModelConfig.model_validate(state["model_config"])
    model = Transformer(mcfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), mcfg, directory
