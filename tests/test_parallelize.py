"""Parallelism plans give the single-process logits and gradients: two CPU processes over gloo, no Ray."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray_head import free_port
from torch.distributed.device_mesh import init_device_mesh

from athanor.cluster.parallelize import check_tp_size, full_state, parallelize
from athanor.config import ModelConfig
from athanor.model.transformer import Transformer

CASES = {
    "tp2": dict(mesh=((2,), ("tp",)), tp=True),
    "tp2_moe_untied": dict(mesh=((2,), ("tp",)), tp=True, model=dict(moe_num_experts=4, tie_embeddings=False)),
    "fsdp2_ac": dict(mesh=((2,), ("dp",)), fsdp=True, activation_checkpointing=True),
    "dp1_tp2_fsdp_ac": dict(mesh=((1, 2), ("dp", "tp")), tp=True, fsdp=True, activation_checkpointing=True),
}


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
            ref_logits = reference(x)
            reference.loss(ref_logits, y).backward()

            shape, names = case["mesh"]
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            flags = {k: case.get(k, False) for k in ("tp", "fsdp", "activation_checkpointing")}
            parallelize(model, mesh, **flags)
            logits = model(x)
            model.loss(logits, y).backward()

            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")  # noqa: B023
            want, got = _grads(reference), _grads(model)
            assert got.keys() == want.keys(), name
            for key in want:
                torch.testing.assert_close(
                    got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {key}: {m}"  # noqa: B023
                )
            state = full_state(model)  # plain names: the checkpoint wrapper strips its prefix from state_dict
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(state[key], value, msg=lambda m: f"{name} {key}: {m}")  # noqa: B023
            if case.get("fsdp"):
                assert all(hasattr(p, "full_tensor") for p in model.parameters()), name
            if "tp" in names and not case.get("fsdp"):
                assert model.layers[0].attention.wq.weight.to_local().shape[0] == 64 // 2  # two of four heads here
    finally:
        dist.destroy_process_group()


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
