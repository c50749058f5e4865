"""Preference-optimisation losses on sequence log-probabilities: DPO, conservative DPO, IPO and SLiC's hinge.

Every loss here compares how much more the policy prefers the chosen response over the rejected one than a frozen
reference does. With per-pair sequence log-probs (policy pc, pr; reference rc, rr) the implicit reward of a response
is beta * (policy - reference) (Rafailov et al. 2023, "Direct Preference Optimization", eq. 5), and every loss is a
function of the reward margin's logit

    logits = (pc - rc) - (pr - rr)   (== (pc - pr) - (rc - rr); computed in this order, as current TRL does: a
                                      policy and its reference score the same text alike, and the difference of
                                      floats within a factor of two is exact, whereas pc - pr need not be)

Loss types, as TRL's DPOTrainer defines them (tests/test_dpo_loss.py checks parity with TRL 1.16 on the same tensors):

- "sigmoid": DPO, -log sigmoid(beta * logits); with `label_smoothing` eps, conservative DPO (cDPO, Mitchell 2023):
  -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits), i.e. each label is taken to be flipped
  with probability eps, so the loss stops pushing once the margin reaches log((1 - eps) / eps) / beta. (TRL <= 0.28
  applies label_smoothing this way in "sigmoid"; TRL >= 0.29 ignores it there, and cDPO is its one-pair "aot".)
- "ipo": IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
  eq. 17), (logits - 1 / (2 * beta))**2: a squared loss towards a finite margin 1/(2 beta) (beta is the paper's tau),
  so it does not drive the margin to infinity on deterministic preferences as DPO does. On per-token *mean*
  log-probs, as TRL computes it (its comment: confirmed with the IPO authors; sums would make the squared loss
  scale with length): pass `sequence_logps(..., length_normalize=True)` for all four inputs. TRL >= 0.29 divides
  each summed log-ratio by its completion's token count inside the loss, the same number; TRL <= 0.28 averaged
  the log-probs in its forward pass, as the caller does here.
- "hinge": SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"), a hinge on the
  normalised likelihood margin, relu(1 - beta * logits), with 1/beta playing the role of SLiC's margin delta.

The losses are per pair and unreduced: the caller chooses the reduction (TRL takes the batch mean; summing and
dividing by the global batch's pair count keeps the gradient independent of how the batch is split, as
cluster/objective.py does for token losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-probability of `targets` under `logits`, over the positions where `mask` is set.

    logits [B, T, V] predict targets [B, T] position by position (already shifted, as `Transformer.loss` takes
    them); targets where mask is 0 are never read (IGNORE_INDEX = -100 or anything else). Computed in float32
    (float64 logits stay float64) whatever the logits' dtype: a sum of a few hundred bf16 log-probs would lose the
    small policy/reference differences the preference losses live on. Returns (logps [B], n_tokens [B]): sums, or
    means over the masked tokens when `length_normalize` (IPO's inputs; a row with no token gives 0).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must both be "
                         f"{tuple(logits.shape[:2])}, the logits' [batch, seq]")
    mask = mask.bool()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    index = targets.masked_fill(~mask, 0).long().unsqueeze(-1)  # a valid row index where the target is not read
    if hasattr(logits, "to_local"):  # a DTensor sharded by vocabulary (loss-parallel TP): cross-entropy on the shards
        from athanor.model.transformer import token_nll

        token_logps = -token_nll(logits, index.squeeze(-1))
    else:
        token_logps = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    logps = torch.where(mask, token_logps, 0.0).sum(-1)
    n_tokens = mask.sum(-1)
    if length_normalize:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses from per-pair sequence log-probs [B] of the policy and the frozen reference.

    The inputs are sums over each response's tokens (`sequence_logps`), or per-token means for "ipo" (see the
    module docstring). Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards are the implicit
    DPO rewards beta * (policy - reference), detached, for logging (reward margins and accuracies).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies only to loss_type 'sigmoid' (conservative DPO), "
                         f"not {loss_type!r}; got {label_smoothing}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the probability that a preference label is flipped and must be "
                         f"in [0, 0.5), got {label_smoothing}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape, got {sorted(shapes)}")

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
