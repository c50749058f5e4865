"""What the one training loop optimises: its data, its model's starting point and its loss.

`cluster/train.py` is the loop for every kind of training: elastic Ray Train workers, the global-index loader, DCP
checkpoints, one MLflow run. An objective fills in the rest:

- `Pretraining`: packed web-text shards at the workdir, a freshly initialised model, the mean next-token loss.
- `FineTuning` (`athanor finetune`): packed instruction windows at `<workdir>/sft` (pipelines/instructions.py), the
  base model's weights, optionally wrapped with LoRA (only the adapters train, and a checkpoint holds only them and
  their optimizer state), and the next-token loss on response tokens only, with examples packed side by side that
  do not attend to each other. The loss is normalised by the response tokens of the whole global batch, so its
  gradient does not depend on how many workers share the batch or how it is split into micro-batches: an elastic
  resize trains the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from athanor.config import AthanorConfig, ModelConfig
from athanor.layout import RunLayout
from athanor.model.transformer import IGNORE_INDEX
from athanor.storage import Location


@dataclass
class Pretraining:
    cfg: AthanorConfig
    name = "pretrain"
    measures_start = False  # evaluate before the first step (a fine-tune's base model), logged as step 0

    def data_root(self, layout: RunLayout) -> Location:
        return layout.root

    def model_config(self, vocab_size: int) -> ModelConfig:
        from .train import model_config_for

        return model_config_for(self.cfg, vocab_size)

    def prepare(self, model: torch.nn.Module) -> None:
        """The model as built: Transformer.__init__ already drew its initial weights."""

    def micro_loss(self, model, batch: dict, sl: slice, accum: int, dp: int) -> torch.Tensor:
        """What one micro-batch backpropagates: its mean token loss over the accumulation steps."""
        return model.loss(model(batch["input_ids"][sl]), batch["targets"][sl]) / accum

    def trainer_state(self) -> dict:
        return {"objective": self.name}


@dataclass
class FineTuning(Pretraining):
    name = "finetune"
    measures_start = True

    def data_root(self, layout: RunLayout) -> Location:
        return layout.root / "sft"

    def model_config(self, vocab_size: int) -> ModelConfig:
        from .inference import describe

        mcfg = describe(self.cfg.finetune.base).model_config()
        if mcfg.vocab_size != vocab_size:
            raise ValueError(f"finetune.base has a vocabulary of {mcfg.vocab_size}, the fine-tuning shards "
                             f"{vocab_size}: they were tokenized with another tokenizer")
        if mcfg.max_seq_len < self.cfg.finetune.seq_len:
            mcfg = mcfg.model_copy(update={"max_seq_len": self.cfg.finetune.seq_len})
        return mcfg

    def prepare(self, model: torch.nn.Module) -> None:
        """The base model's weights, then LoRA on the chosen projections (everything else frozen)."""
        from .inference import base_state_dict

        model.load_state_dict(base_state_dict(self.cfg.finetune.base))
        ft = self.cfg.finetune
        if ft.method == "lora":
            from athanor.model.lora import apply_lora

            apply_lora(model, ft.rank, ft.alpha, ft.dropout, tuple(ft.target_modules), ft.rslora)

    def micro_loss(self, model, batch: dict, sl: slice, accum: int, dp: int) -> torch.Tensor:
        """Summed response-token loss of this micro-batch over the global batch's response tokens, times dp
        (data parallelism averages gradients over dp ranks): the global batch's mean response-token loss."""
        logits = model(batch["input_ids"][sl], document_ids=batch["document_ids"][sl])
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"][sl].flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum")
        return ce * dp / max(int(batch["global_targets"]), 1)

    def trainer_state(self) -> dict:
        ft = self.cfg.finetune
        return {"objective": self.name,
                "finetune": {"base": ft.base, "method": ft.method, "rank": ft.rank, "alpha": ft.alpha,
                             "dropout": ft.dropout, "target_modules": list(ft.target_modules), "rslora": ft.rslora}}


def objective_for(cfg: AthanorConfig, name: str) -> Pretraining:
    return {"pretrain": Pretraining, "finetune": FineTuning}[name](cfg)
