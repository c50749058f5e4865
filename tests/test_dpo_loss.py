"""Preference losses (model/preference.py) equal TRL's DPOTrainer on the same log-probs, and sequence_logps equals a
hand loop and TRL's own per-token log-probs.

TRL (>= 0.29) has no standalone `dpo_loss` any more: the losses live inside `DPOTrainer._compute_loss(model, inputs,
return_outputs)`, which runs the model's fused LM head for per-token log-probs, sums them, and reads the reference's
sums from `inputs` when they are precomputed. `trl_compute_loss` calls that unbound method with a stand-in for the
trainer (only the attributes it reads) and a stand-in model that returns given per-token log-probs, so TRL's own
code computes the loss, without a model, a tokenizer or a dataset. It returns the batch mean, so per-pair losses
come from one call per pair; the rewards come from the metrics it logs.

Which TRL loss is which of ours:
- ("sigmoid", label_smoothing 0) -> TRL "sigmoid"; ("hinge") -> TRL "hinge".
- ("ipo") on per-token *means* -> TRL "ipo" on sums: TRL divides each summed log-ratio by its completion's token
  count inside the loss. Rewards are compared on sums: TRL logs beta * summed log-ratio even for IPO.
- ("sigmoid", label_smoothing > 0), conservative DPO: TRL >= 0.29 dropped label smoothing from "sigmoid" (it
  ignores it there). The cDPO formula survives as TRL's "aot" loss, whose sorts over the batch are identities for a
  single pair, so one-pair "aot" calls give cDPO's per-pair losses: -(1-eps) logsig(b*d) - eps logsig(-b*d),
  d = (pc - pr) - (rc - rr).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from athanor.model.preference import preference_loss, sequence_logps

try:
    from trl.trainer import dpo_trainer as trl_dpo
except ImportError:  # the dev extra is not installed: the parity tests skip, the rest still run
    trl_dpo = None
needs_trl = pytest.mark.skipif(trl_dpo is None, reason="needs trl (the dev extra)")

BETAS = (0.01, 0.1, 0.5, 2.0)
# ours (loss_type, label_smoothing) -> TRL loss_type
CASES = {("sigmoid", 0.0): "sigmoid", ("sigmoid", 0.2): "aot", ("ipo", 0.0): "ipo", ("hinge", 0.0): "hinge"}
# float64: the 1e-6 asked of parity holds with room to spare. float32: the two sides differ only in the order of
# float32 operations (e.g. cDPO's (pc - pr) - (rc - rr) against our (pc - rc) - (pr - rr)); an ulp of a -50 sum is
# 4e-6, and IPO's squared margin reaches ~2500 at beta 0.01, hence a relative term.
TOL = {torch.float64: {"atol": 1e-6, "rtol": 0.0}, torch.float32: {"atol": 1e-5, "rtol": 1e-6}}


class _FusedHeadModel:
    """Stands in for a model patched by TRL's `add_fused_lm_head`: returns the given per-token log-probs (zero off
    the completion, as the fused head does) and the per-token metrics `_compute_loss` logs."""

    training = False  # "eval" metrics: skips the token counting that needs an attention mask

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        lp = self.per_token_logps
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool), aux_loss=None)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def trl_compute_loss(loss_type: str, beta: float, label_smoothing: float, policy_tokens: torch.Tensor,
                     ref_tokens: torch.Tensor, mask: torch.Tensor) -> tuple[float, dict]:
    """TRL's DPO loss (batch mean) and logged metrics for pairs given as per-token log-probs [2B, T] (rows: B chosen,
    then B rejected) and their completion mask [2B, T]; the reference's sums are passed as precomputed."""
    model = _FusedHeadModel(policy_tokens)
    trainer = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(discopop_tau=0.05),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    # the completion mask covers input_ids; its first position (a prompt token) is what the shift drops
    completion_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1).long()
    ref_chosen, ref_rejected = ref_tokens.sum(1).chunk(2)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def make_pairs(n_pairs: int, dtype: torch.dtype, seed: int = 0, max_len: int = 16):
    """Per-token log-probs of a realistic scale: responses of 2..16 tokens at -0..-5 nats each (sequence log-probs
    about -50..-5). Half the pairs have a policy close to the reference (small margins), half an unrelated one
    (margins of tens of nats), so every loss is exercised on both sides of its bend."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (2 * n_pairs,), generator=g)
    mask = (torch.arange(max_len) < lengths[:, None]).long()
    ref = -5 * torch.rand(2 * n_pairs, max_len, generator=g, dtype=torch.float64)
    near = ref + 0.3 * torch.randn(2 * n_pairs, max_len, generator=g, dtype=torch.float64)
    far = -5 * torch.rand(2 * n_pairs, max_len, generator=g, dtype=torch.float64)
    pair = torch.arange(2 * n_pairs) % n_pairs
    policy = torch.where((pair < n_pairs // 2)[:, None], near, far).clamp(max=0)
    return policy.mul(mask).to(dtype), ref.mul(mask).to(dtype), mask


@needs_trl
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=[f"{lt}-ls{ls}" for lt, ls in CASES])
def test_parity_with_trl(case, dtype):
    """Per-pair losses, chosen and rejected rewards, and the batch mean equal TRL's for every beta."""
    loss_type, ls = case
    trl_type = CASES[case]
    n_pairs = 8
    policy, ref, mask = make_pairs(n_pairs, dtype, seed=list(CASES).index(case))
    pc, pr = policy.sum(1).chunk(2)
    rc, rr = ref.sum(1).chunk(2)
    sums = (pc, pr, rc, rr)
    n_c, n_r = mask.sum(1).chunk(2)
    means = (pc / n_c, pr / n_r, rc / n_c, rr / n_r)  # what sequence_logps(..., length_normalize=True) gives
    assert pc.min() >= -80 and pc.max() <= -1 and (pc - pr).abs().max() > 10  # realistic scale, some wide margins
    for beta in BETAS:
        losses, chosen_r, rejected_r = preference_loss(*(means if loss_type == "ipo" else sums), beta=beta,
                                                       loss_type=loss_type, label_smoothing=ls)
        _, chosen_r_sums, rejected_r_sums = preference_loss(*sums, beta=beta, loss_type=loss_type,
                                                            label_smoothing=ls)
        assert losses.shape == chosen_r.shape == rejected_r.shape == (n_pairs,) and losses.dtype == dtype
        trl_losses, trl_chosen, trl_rejected = [], [], []
        for i in range(n_pairs):
            rows = torch.tensor([i, n_pairs + i])
            loss, metrics = trl_compute_loss(trl_type, beta, ls, policy[rows], ref[rows], mask[rows])
            trl_losses.append(loss)
            trl_chosen.append(metrics["rewards/chosen"])
            trl_rejected.append(metrics["rewards/rejected"])
        as_t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        torch.testing.assert_close(losses.double(), as_t(trl_losses), **TOL[dtype], msg=f"losses, beta={beta}")
        # IPO's rewards: TRL logs beta * summed log-ratio; ours, from the means IPO is given, are that over the length
        rewards = (chosen_r_sums, rejected_r_sums) if loss_type == "ipo" else (chosen_r, rejected_r)
        torch.testing.assert_close(rewards[0].double(), as_t(trl_chosen), **TOL[dtype])
        torch.testing.assert_close(rewards[1].double(), as_t(trl_rejected), **TOL[dtype])
        if loss_type == "ipo":
            torch.testing.assert_close(chosen_r, beta * (means[0] - means[2]), atol=0, rtol=0)
        if trl_type != "aot":  # aot sorts over the batch: only one-pair calls are cDPO
            batch_loss, metrics = trl_compute_loss(trl_type, beta, ls, policy, ref, mask)
            torch.testing.assert_close(losses.mean().double(), torch.tensor(batch_loss, dtype=torch.float64),
                                       **TOL[dtype])
            assert metrics["rewards/accuracies"] == pytest.approx((chosen_r_sums > rejected_r_sums).double().mean().item())


def test_loss_formulas_and_gradients():
    """The closed forms at a known margin, the label-smoothed loss's finite minimum, and which outputs carry
    gradients: the losses do, the rewards (for logging) do not."""
    pc = torch.tensor([-10.0, -20.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-14.0, -18.0]), torch.tensor([-11.0, -20.0]), torch.tensor([-13.0, -19.0])
    logits = (pc - rc).detach() - (pr - rr)
    assert logits.tolist() == [2.0, -1.0]
    beta = 0.5
    losses, chosen_r, rejected_r = preference_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(beta * logits))
    torch.testing.assert_close(chosen_r, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.5, 0.5]))
    assert losses.requires_grad and not chosen_r.requires_grad and not rejected_r.requires_grad
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss
    ipo, _, _ = preference_loss(pc.detach(), pr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([1.0, 4.0]))  # (logits - 1 / (2 beta))**2, target margin 1
    hinge, _, _ = preference_loss(pc.detach(), pr, rc, rr, beta=beta, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.0, 1.5]))  # relu(1 - beta * logits)
    # cDPO with eps: minimised at the margin log((1 - eps) / eps) / beta, not at infinity
    eps = 0.2
    margins = torch.linspace(-10, 20, 3001)
    z = torch.zeros_like(margins)
    cdpo, _, _ = preference_loss(margins, z, z, z, beta=1.0, label_smoothing=eps)
    assert margins[cdpo.argmin()].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.01)


def _hand_logps(logits, targets, mask):
    out = []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for t in range(logits.shape[1]):
            if mask[b, t]:
                total += torch.log_softmax(logits[b, t].double(), -1)[targets[b, t]].item()
                n += 1
        out.append((total, n))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sequence_logps_matches_hand_loop(dtype):
    """Sums and means over the masked targets; -100 targets off the mask are never read; an empty row gives 0;
    bf16 logits are scored in float32."""
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 9, 50, generator=g)).to(dtype)
    targets = torch.randint(0, 50, (4, 9), generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.4
    mask[2] = False  # a row without response tokens
    targets = targets.masked_fill(~mask, -100)
    expected = _hand_logps(logits.float(), targets, mask)
    sums, n = sequence_logps(logits, targets, mask)
    means, n2 = sequence_logps(logits, targets, mask.long(), length_normalize=True)
    assert sums.dtype == means.dtype == torch.float32 and sums.shape == n.shape == (4,)
    assert n.tolist() == n2.tolist() == [k for _, k in expected]
    torch.testing.assert_close(sums.double(), torch.tensor([s for s, _ in expected], dtype=torch.float64),
                               atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(means.double(), torch.tensor([s / max(k, 1) for s, k in expected],
                                                            dtype=torch.float64), atol=1e-6, rtol=1e-6)
    assert sums[2].item() == means[2].item() == 0.0


@needs_trl
def test_sequence_logps_matches_trl_fused_lm_head():
    """On a tiny random Llama, sequence_logps on the model's logits (shifted as athanor's loss takes them) equals the
    per-token log-probs of TRL's fused LM head summed, the log-probs TRL's DPO losses are computed from."""
    transformers = pytest.importorskip("transformers")
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    add_fused_lm_head(model)
    input_ids = torch.randint(0, 61, (4, 12))
    completion_mask = torch.zeros(4, 12, dtype=torch.long)
    completion_mask[:, 5:] = 1  # a 5-token prompt, then the response
    completion_mask[1, 9:] = 0  # a shorter response, then padding
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        trl_lp = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True,
                       labels=input_ids.masked_fill(completion_mask == 0, -100)).log_probs
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    sums, n = sequence_logps(logits[:, :-1], targets, completion_mask[:, 1:])
    means, _ = sequence_logps(logits[:, :-1], targets, completion_mask[:, 1:], length_normalize=True)
    assert n.tolist() == [7, 4, 7, 7]
    torch.testing.assert_close(sums, trl_lp.sum(1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(means, trl_lp.sum(1) / n, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_type": "kto"}, "loss_type must be one of"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "only to loss_type 'sigmoid'"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "only to loss_type 'sigmoid'"),
    ({"label_smoothing": 0.5}, r"in \[0, 0.5\)"),
    ({"label_smoothing": -0.1}, r"in \[0, 0.5\)"),
    ({"beta": 0.0}, "beta must be positive"),
    ({"beta": -0.1, "loss_type": "ipo"}, "beta must be positive"),
])
def test_preference_loss_rejects_bad_arguments(kwargs, match):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=match):
        preference_loss(x, x, x, x, **kwargs)


def test_shape_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="one shape"):
        preference_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[batch, seq, vocab\]"):
        sequence_logps(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(ValueError, match="must both be"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
