"""Parallelism plans give the single-process logits and gradients: two CPU processes over gloo, no Ray.

Also the precision policy: FSDP2's bf16 MixedPrecisionPolicy against one process with the same bf16 parameters,
loss-parallel TP (vocabulary-sharded logits) against no TP, and training's loss against evaluation's on one batch.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray_head import free_port
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from athanor.cluster.objective import Pretraining
from athanor.cluster.parallelize import check_tp_size, full_state, parallelize
from athanor.cluster.train import EvalSet, evaluate, micro_step
from athanor.config import AthanorConfig, ModelConfig, TrainConfig
from athanor.model.preference import sequence_logps
from athanor.model.scoring import _argmax
from athanor.model.transformer import Transformer

CASES = {
    "tp2": dict(mesh=((2,), ("tp",)), tp=True),
    "tp2_moe_untied": dict(mesh=((2,), ("tp",)), tp=True, model=dict(moe_num_experts=4, tie_embeddings=False)),
    "fsdp2_ac": dict(mesh=((2,), ("dp",)), fsdp=True, activation_checkpointing=True),
    "dp1_tp2_fsdp_ac": dict(mesh=((1, 2), ("dp", "tp")), tp=True, fsdp=True, activation_checkpointing=True),
    # training's layouts: the logits stay sharded by vocabulary, cross-entropy runs on the shards
    "tp2_loss_parallel": dict(mesh=((2,), ("tp",)), tp=True, loss_parallel=True),
    "dp1_tp2_fsdp_loss_parallel_moe": dict(mesh=((1, 2), ("dp", "tp")), tp=True, fsdp=True, loss_parallel=True,
                                           model=dict(moe_num_experts=4, tie_embeddings=False)),
    # bf16 parameters all-gathered, fp32 gradient reduction; each rank takes half the batch
    "fsdp2_bf16": dict(mesh=((2,), ("dp",)), fsdp=True, param_dtype=torch.bfloat16, split=True),
    "dp1_tp2_fsdp_bf16_loss_parallel": dict(mesh=((1, 2), ("dp", "tp")), tp=True, fsdp=True, loss_parallel=True,
                                            param_dtype=torch.bfloat16),
}
FP32 = dict(atol=1e-5, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, attention="sdpa")
    return ModelConfig(**{**fields, **overrides})


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.replace("_checkpoint_wrapped_module.", "")] = grad
    return out


def _bf16_tolerance(want: torch.Tensor) -> dict:
    """Within a few bf16 roundings of the tensor's own scale (gradients near zero come from cancelling sums)."""
    return dict(rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def _worker(rank: int, port: int, text: bytes) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        data = torch.tensor(list(text[:4000]), dtype=torch.long).view(-1, 50)[:4]
        x, y = data[:, :-1], data[:, 1:]
        for name, case in CASES.items():
            torch.manual_seed(0)
            reference = Transformer(_cfg(**case.get("model", {})))
            model = copy.deepcopy(reference)
            bf16 = case.get("param_dtype") == torch.bfloat16
            if bf16:  # one process under the same policy: bf16 parameters (the RoPE tables stay fp32, as FSDP2's)
                for p in reference.parameters():
                    p.data = p.data.to(torch.bfloat16)
            ref_logits = reference(x)
            ref_loss = reference.loss(ref_logits, y)
            ref_loss.backward()

            shape, names = case["mesh"]
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            flags = {k: case.get(k, False) for k in ("tp", "fsdp", "activation_checkpointing", "loss_parallel")}
            parallelize(model, mesh, **flags, param_dtype=case.get("param_dtype", torch.float32))
            seen = []  # the dtype of the weights a projection computes with: FSDP2's all-gathered parameters
            hook = model.layers[0].attention.wq.register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype))
            rows = slice(2 * rank, 2 * rank + 2) if case.get("split") else slice(None)
            with loss_parallel() if case.get("loss_parallel") else nullcontext():  # forward and backward
                logits = model(x[rows])
                loss = model.loss(logits, y[rows])
                loss.backward()
            hook.remove()

            tol = _bf16_tolerance if bf16 else lambda _: FP32
            if case.get("loss_parallel"):  # sharded by vocabulary: each rank holds half the logits of every token
                assert logits.placements[-1] == Shard(2) and logits.to_local().shape[-1] == 256 // 2, name
                logits = logits.full_tensor()
            assert not hasattr(loss, "to_local") and loss.dtype == torch.float32, name  # a plain fp32 number
            torch.testing.assert_close(logits, ref_logits[rows], **tol(ref_logits), msg=lambda m: f"{name}: {m}")  # noqa: B023
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= 2
            torch.testing.assert_close(mean_loss if case.get("split") else loss, ref_loss, **tol(ref_loss))
            assert set(seen) == {case.get("param_dtype", torch.float32)}, name  # (twice with checkpointing)
            want, got = _grads(reference), _grads(model)
            assert got.keys() == want.keys(), name
            for key in want:
                assert got[key].dtype == torch.float32, name  # reduced in fp32 into the fp32 sharded gradients
                torch.testing.assert_close(
                    got[key].to(want[key].dtype), want[key], **tol(want[key]), msg=lambda m: f"{name} {key}: {m}"  # noqa: B023
                )
            if case.get("loss_parallel"):
                _check_sharded_scoring(name, model, x, y)
            if not case.get("split") and "model" not in case:  # (an MoE's training loss adds its balancing loss)
                _check_train_and_eval_loss_agree(name, model, case, x, y)
            if bf16:
                continue  # the parameters stayed fp32, the reference's did not
            state = full_state(model)  # plain names: the checkpoint wrapper strips its prefix from state_dict
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(state[key], value, msg=lambda m: f"{name} {key}: {m}")  # noqa: B023
            if case.get("fsdp"):
                assert all(hasattr(p, "full_tensor") for p in model.parameters()), name
            if "tp" in names and not case.get("fsdp"):
                assert model.layers[0].attention.wq.weight.to_local().shape[0] == 64 // 2  # two of four heads here
    finally:
        dist.destroy_process_group()


def _check_sharded_scoring(name: str, model, x, y) -> None:
    """Evaluation's greedy argmax and DPO's log-probs on vocabulary-sharded logits (never gathered) are those of the
    same logits gathered."""
    with torch.no_grad(), loss_parallel():
        logits = model(x)
        full = logits.full_tensor()
        assert torch.equal(_argmax(logits), full.argmax(-1)), name
        mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) < 0.7
        for normalize in (False, True):
            got, want = sequence_logps(logits, y, mask, normalize), sequence_logps(full, y, mask, normalize)
            assert not hasattr(got[0], "to_local"), name
            torch.testing.assert_close(got, want, **FP32, msg=lambda m: f"{name}: {m}")  # noqa: B023
        # ties: argmax takes the first maximum, here in the first rank's half of the vocabulary and in the second's
        tied = torch.zeros(1, 2, 256)
        tied[0, 0, [3, 200]] = 1.0
        tied[0, 1, [130, 250]] = 1.0
        sharded = distribute_tensor(tied, logits.device_mesh, [Shard(2)])
        assert _argmax(sharded).tolist() == [[3, 130]], name


def _check_train_and_eval_loss_agree(name: str, model, case: dict, x, y) -> None:
    """The loop's micro-step loss and evaluate()'s val loss on the same batch and weights: one computation."""
    tp = 2 if case.get("tp") else 1
    t = TrainConfig(num_workers=2, tp_size=tp, mixed_precision="bf16" if case.get("param_dtype") else "fp32",
                    micro_batch_size=len(x))
    windows = torch.cat([x, y[:, -1:]], dim=1).tolist()
    # every rank scores every window (dp 1): the all-reduce in evaluate() scales nats and tokens alike
    val = evaluate(model, EvalSet("val", windows, [1] * len(windows)), 0, 1, t)["loss"]
    train = micro_step(model, Pretraining(AthanorConfig()), {"input_ids": x, "targets": y}, slice(None), 1, 1, t,
                       sync=True)
    torch.testing.assert_close(val, float(train), rtol=1e-6, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_tp_fsdp_and_checkpointing_match_single_process(data_dir):
    text = (data_dir / "quality/high/alice29.txt").read_bytes()
    mp.spawn(_worker, args=(free_port(), text), nprocs=2, join=True)


def test_tp_refuses_sizes_that_do_not_divide_the_heads():
    check_tp_size(_cfg(n_heads=4, n_kv_heads=2), 2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        check_tp_size(_cfg(n_heads=4, n_kv_heads=1), 2)


@pytest.mark.slow
def test_compile_and_checkpointing_without_a_mesh_keep_the_logits(data_dir):
    text = (data_dir / "quality/high/alice29.txt").read_bytes()
    x = torch.tensor(list(text[1000:1256]), dtype=torch.long).view(4, 64)
    torch.manual_seed(0)
    reference = Transformer(_cfg())
    model = parallelize(copy.deepcopy(reference), None, activation_checkpointing=True, compile=True)
    logits = model(x)
    torch.testing.assert_close(logits, reference(x), atol=1e-5, rtol=1e-4)
    model.loss(logits, x).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_train_and_eval_loss_take_the_same_precision_path(device, data_dir):
    """One worker under bf16 autocast: the loop's loss and val_loss on the same batch and weights are one number (the
    forward of both under autocast, the backward outside it), and not the fp32 number."""
    text = (data_dir / "quality/high/alice29.txt").read_bytes()
    data = torch.tensor(list(text[2000:2260]), dtype=torch.long).view(4, 65).to(device)
    x, y = data[:, :-1], data[:, 1:]
    torch.manual_seed(0)
    model = Transformer(_cfg(init_std=0.2)).to(device)  # logits far from uniform, so that bf16 shows
    losses = {}
    for precision in ("bf16", "fp32"):
        t = TrainConfig(num_workers=1, mixed_precision=precision, micro_batch_size=4)
        val = evaluate(model, EvalSet("val", data.tolist(), [1] * 4), 0, 1, t)["loss"]
        train = micro_step(model, Pretraining(AthanorConfig()), {"input_ids": x, "targets": y}, slice(None), 1, 1, t,
                           sync=True)
        assert train.dtype == torch.float32
        torch.testing.assert_close(val, float(train), rtol=1e-6, atol=0)
        losses[precision] = val
    assert abs(losses["bf16"] - losses["fp32"]) > 1e-3  # the precision path matters, a thousand times the agreement
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)  # fp32 weights, fp32 gradients
