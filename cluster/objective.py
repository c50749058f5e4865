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

import numpy as np
import torch

from athanor.config import AthanorConfig, ModelConfig
from athanor.layout import RunLayout
from athanor.model.transformer import IGNORE_INDEX, token_nll
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

    def dataset(self, root: Location, split: str):
        """What the loader draws samples from: token windows (pretraining, fine-tuning) or pairs (DPO)."""
        from athanor.pipelines.shards import TokenShards

        return TokenShards(root, split)

    def step_metrics(self, tp_size: int) -> dict[str, float]:
        """Metrics of the step beyond the loss, reduced over the ranks; every rank calls it after every step."""
        return {}

    def extra_eval(self, model, dp_rank: int, dp: int, t) -> dict[str, float]:
        """Evaluation beyond the loss and bits per byte of the eval sets; a collective, on every rank."""
        return {}


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
        ce = token_nll(logits, batch["targets"][sl], "sum")
        return ce * dp / max(int(batch["global_targets"]), 1)

    def trainer_state(self) -> dict:
        ft = self.cfg.finetune
        return {"objective": self.name,
                "finetune": {"base": ft.base, "method": ft.method, "rank": ft.rank, "alpha": ft.alpha,
                             "dropout": ft.dropout, "target_modules": list(ft.target_modules), "rslora": ft.rslora}}




@dataclass
class PreferenceOptimization(FineTuning):
    """DPO (`athanor dpo`): pairs of answers to one prompt, the chosen one to be made likelier than the rejected
    one relative to a reference model (the base). The reference's log-probs come precomputed with the pairs
    (cluster/reference.py), or live: the base with LoRA's adapters off, or a frozen copy of the base for full DPO.

    A sample is a pair; its two answers are rows 2i and 2i+1 of the batch. The loss is the mean over the global
    batch's pairs, whatever the number of workers, and every step logs TRL's metrics: rewards/chosen,
    rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
    """

    name = "dpo"

    def __post_init__(self):
        self._stats = None
        self._reference_model = None
        self._val = None

    @property
    def _normalize(self) -> bool:
        return self.cfg.dpo.length_normalize or self.cfg.dpo.loss_type == "ipo"

    def data_root(self, layout: RunLayout) -> Location:
        return layout.root / "dpo"

    def dataset(self, root: Location, split: str):
        from athanor.pipelines.shards import TokenShards

        from .loader import PairShards
        from .reference import load_reference_logps

        self._root = root
        reference = None
        if self.cfg.dpo.reference == "precomputed":
            found = load_reference_logps(root, split)
            if found is None:
                raise ValueError(f"no committed reference log-probs for the {split} pairs under {root}; "
                                 "`athanor dpo` computes them before training")
            logps, counts = found
            reference = logps / np.maximum(counts, 1) if self._normalize else logps
        return PairShards(TokenShards(root, split), reference)

    def prepare(self, model: torch.nn.Module) -> None:
        super().prepare(model)
        if self.cfg.dpo.reference == "live" and self.cfg.finetune.method == "full":
            from athanor.model.transformer import Transformer

            from .inference import base_state_dict

            self._reference_model = Transformer(model.cfg).requires_grad_(False).eval()
            self._reference_model.load_state_dict(base_state_dict(self.cfg.finetune.base))

    def _logps(self, model, input_ids, targets) -> torch.Tensor:
        from athanor.model.preference import sequence_logps

        logps, _ = sequence_logps(model(input_ids), targets, targets != IGNORE_INDEX, self._normalize)
        return logps.view(-1, 2)

    def _live_reference(self, model, input_ids, targets) -> torch.Tensor:
        """The reference's log-probs of these rows: the base with the adapters off, or the frozen copy."""
        from athanor.model.lora import adapters_disabled

        from .inference import training_precision

        with torch.no_grad():
            if self._reference_model is not None:  # a plain model: the loop's precision as a model without FSDP2 has it
                self._reference_model.to(input_ids.device)
                with training_precision(input_ids.device, self.cfg.train.mixed_precision):
                    return self._logps(self._reference_model, input_ids, targets)
            with adapters_disabled(model):
                return self._logps(model, input_ids, targets)

    def micro_loss(self, model, batch: dict, sl: slice, accum: int, dp: int) -> torch.Tensor:
        from athanor.model.preference import preference_loss

        d = self.cfg.dpo
        rows = slice(2 * sl.start, 2 * sl.stop)
        input_ids, targets = batch["input_ids"][rows], batch["targets"][rows]
        policy = self._logps(model, input_ids, targets)
        ref = (batch["reference"][sl].to(policy.dtype) if "reference" in batch
               else self._live_reference(model, input_ids, targets))
        losses, chosen, rejected = preference_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=d.beta,
                                                   loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        stats = torch.stack([losses.sum(), chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                             policy[:, 0].sum(), policy[:, 1].sum(), torch.tensor(float(len(losses)))]).detach()
        self._stats = stats if self._stats is None else self._stats + stats
        return losses.sum() * dp / self.cfg.train.global_batch_size

    def step_metrics(self, tp_size: int) -> dict[str, float]:
        """This step's pair statistics over every rank (a collective: every rank calls it after every step)."""
        import torch.distributed as dist

        stats, self._stats = self._stats.double(), None
        if dist.is_available() and dist.is_initialized():
            stats = stats / tp_size  # tensor-parallel peers computed the same pairs
            dist.all_reduce(stats)
        _, chosen, rejected, wins, logp_chosen, logp_rejected, n = (float(x) for x in stats)
        return {"rewards/chosen": chosen / n, "rewards/rejected": rejected / n,
                "rewards/margins": (chosen - rejected) / n, "rewards/accuracies": wins / n,
                "logps/chosen": logp_chosen / n, "logps/rejected": logp_rejected / n}

    def extra_eval(self, model, dp_rank: int, dp: int, t) -> dict[str, float]:
        """Held-out pairs (the first eval_batches x micro_batch_size): TRL's reward accuracy, where a tie (the
        policy still equal to the reference, as at step 0) counts half, the mean reward margin and the DPO loss."""
        import torch.distributed as dist

        from athanor.model.lora import adapters_disabled
        from athanor.model.preference import preference_loss
        from athanor.model.scoring import score_windows

        from .inference import training_precision
        from .train import forward_precision, rank_share, vocab_parallel

        if self._val is None:  # memory-mapped once, with its reference log-probs
            self._val = self.dataset(self._root, "val")
        val = self._val
        n = min(len(val), t.eval_batches * t.micro_batch_size)
        if not n:
            return {}
        mine, padded = rank_share(n, dp_rank, dp)
        windows, masks = [], []
        for pair in padded:
            for row in (2 * pair, 2 * pair + 1):
                tokens, mask = val.rows.example(row)
                windows.append(tokens.astype(np.int64).tolist())
                masks.append(mask.astype(int).tolist())

        def logps(m) -> torch.Tensor:
            scores = score_windows(m, windows, [len(w) - 1 for w in windows], batch_size=t.micro_batch_size,
                                   target_masks=masks)
            values = torch.tensor([s.logprob / (s.n_scored if self._normalize else 1) for s in scores])
            return values.view(-1, 2).double()

        device = next(model.parameters()).device
        with forward_precision(model, t), vocab_parallel(t):  # the training step's forward
            policy = logps(model)
            if val.reference is not None:
                ref = torch.from_numpy(val.reference[padded]).double()
            elif self._reference_model is not None:  # a plain model: the loop's precision without FSDP2, as the
                with training_precision(device, t.mixed_precision):  # stored reference was scored (WindowScorer)
                    ref = logps(self._reference_model.to(device))
            else:
                with adapters_disabled(model):
                    ref = logps(model)
        d = self.cfg.dpo
        losses, chosen, rejected = preference_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=d.beta,
                                                   loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        margin = (chosen - rejected)[: len(mine)]
        tie = margin.abs() <= d.beta * 1e-3  # below a thousandth of a nat of preference: float noise between the
        wins = (margin > 0).double() * ~tie + 0.5 * tie.double()  # reference's and the loop's sums, not a choice
        total = torch.stack([wins.sum(), margin.sum(), losses[: len(mine)].sum(), torch.tensor(float(len(mine)))])
        if dist.is_available() and dist.is_initialized():
            total /= t.tp_size
            dist.all_reduce(total)
        wins, margin, loss, count = (float(x) for x in total)
        return {"val_reward_accuracy": wins / count, "val_reward_margin": margin / count, "val_dpo_loss": loss / count}

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "objective": self.name, "dpo": self.cfg.dpo.model_dump(mode="json")}


def objective_for(cfg: AthanorConfig, name: str) -> Pretraining:
    return {"pretrain": Pretraining, "finetune": FineTuning, "dpo": PreferenceOptimization}[name](cfg)
