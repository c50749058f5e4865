"""DCP checkpoints: saved from a 2-D (dp=2 x tp=2) FSDP2 + TP mesh, they load into one process and into two DDP
ranks with the same weights and optimizer state as a single-process run; a tampered checkpoint does not run code.
Real processes over gloo, no Ray."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray_head import free_port

from athanor.cluster.checkpoint import CheckpointError, load_checkpoint, load_model, read_trainer_state, save_checkpoint
from athanor.cluster.parallelize import build_mesh, clip_grad_norm_, parallelize
from athanor.cluster.train import build_optimizer, build_parallel_model
from athanor.config import ModelConfig, TrainConfig
from athanor.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = TrainConfig(lr=1e-2, grad_clip=0.5)
# Adam's first step moves each weight by about lr * g / (|g| + eps): for gradients near zero, float rounding between
# layouts shows in the update, so weights agree to ~1% of one step (lr), not to float epsilon.
WEIGHT_ATOL = 2e-2 * TRAIN.lr
GLOBAL_BATCH = 4


def _cfg() -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, attention="sdpa")


def _batch(text: bytes) -> torch.Tensor:
    return torch.tensor(list(text[:GLOBAL_BATCH * 49]), dtype=torch.long).view(GLOBAL_BATCH, 49)


def _train_step(model, optimizer, seqs) -> float:
    model.loss(model(seqs[:, :-1]), seqs[:, 1:]).backward()
    norm = clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    return norm


def _save_2d(rank: int, port: int, text: bytes, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = parallelize(Transformer(_cfg()), build_mesh("cpu", 4, 2), tp=True, fsdp=True)
        optimizer = build_optimizer(model, TRAIN)
        dp_rank = rank // 2  # tensor-parallel peers share a slice of the global batch
        seqs = _batch(text)[dp_rank * 2:(dp_rank + 1) * 2]
        norm = _train_step(model, optimizer, seqs)
        state = {"step": 1, "grad_norm": norm, "model_config": _cfg().model_dump(mode="json")}
        save_checkpoint(Path(out), model, optimizer, state, rank, tokenizer_model=None)
    finally:
        dist.destroy_process_group()


def _load_ddp(rank: int, port: int, ckpt: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
        t = TRAIN.model_copy(update={"data_parallel": "ddp"})
        model = build_parallel_model(_cfg(), t, torch.device("cpu"), world=2)
        optimizer = build_optimizer(model, t)
        state = load_checkpoint(ckpt, model, optimizer, rank)
        if rank == 0:
            names = [n for n, _ in model.module.named_parameters()]
            exp_avg = {n: optimizer.state[p]["exp_avg"] for n, p in zip(names, model.module.parameters())}
            torch.save({"step": state["step"], "exp_avg": exp_avg,
                        "weights": dict(model.module.named_parameters())}, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(data_dir):
    """One AdamW step of the same model on the whole global batch in one process."""
    text = (data_dir / "quality/high/alice29.txt").read_bytes()
    torch.manual_seed(0)
    model = Transformer(_cfg())
    optimizer = build_optimizer(model, TRAIN)
    norm = _train_step(model, optimizer, _batch(text))
    exp_avg = {n: optimizer.state[p]["exp_avg"] for n, p in model.named_parameters()}
    return text, model, norm, exp_avg


@pytest.fixture(scope="module")
def checkpoint_2d(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt2d")
    mp.spawn(_save_2d, args=(free_port(), reference[0], str(out)), nprocs=4, join=True)
    return out


@pytest.mark.slow
def test_2d_checkpoint_loads_whole_in_one_process(reference, checkpoint_2d):
    _, ref_model, ref_norm, _ = reference
    assert sorted(p.name for p in checkpoint_2d.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert read_trainer_state(checkpoint_2d)["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    model, mcfg, directory = load_model(checkpoint_2d)
    assert directory == checkpoint_2d and mcfg == _cfg()
    for name, value in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.mark.slow
def test_2d_checkpoint_reshards_into_two_ddp_ranks_with_optimizer_state(reference, checkpoint_2d, tmp_path):
    _, ref_model, _, ref_exp_avg = reference
    out = tmp_path / "loaded.pt"
    mp.spawn(_load_ddp, args=(free_port(), str(checkpoint_2d), str(out)), nprocs=2, join=True)
    loaded = torch.load(out, weights_only=True)
    assert loaded["step"] == 1
    ref_weights = dict(ref_model.named_parameters())
    for name, value in loaded["weights"].items():
        torch.testing.assert_close(value, ref_weights[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
    for name, value in loaded["exp_avg"].items():
        torch.testing.assert_close(value, ref_exp_avg[name], atol=1e-6, rtol=1e-4, msg=name)


class _Payload:
    """What an attacker would put in a pickle: a call made while unpickling."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_tampered_metadata_is_refused_without_running_it(checkpoint_2d, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint_2d, tampered)
    marker = tmp_path / "pwned"
    (tampered / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="refers to posix.system, which is not DCP metadata"):
        load_model(tampered)
    assert not marker.exists()


def test_a_checkpoint_of_other_data_is_refused_before_training_starts(smoke_run, tmp_path):
    """What a restart cannot fix is found on the driver, before any worker starts: resuming on re-tokenized shards
    (another fingerprint) or another sequence length, which would otherwise fail every restart of the worker group."""
    import json

    from athanor.cluster.checkpoint import newest_trainer_state, resume_problem

    work, _ = smoke_run
    state = newest_trainer_state(work / "checkpoints")
    manifest = json.loads((work / "manifest.json").read_text())
    assert state["step"] == max(read_trainer_state(d)["step"] for d in (work / "checkpoints").glob("*/checkpoint_0*"))
    assert resume_problem(state, manifest) is None
    retokenized = json.loads(json.dumps(manifest))
    retokenized["splits"]["train"]["fingerprint"] = "0" * 64
    assert "re-tokenized" in resume_problem(state, retokenized)
    assert "sequences of" in resume_problem(state, {**manifest, "seq_len": manifest["seq_len"] * 2})
    assert newest_trainer_state(tmp_path) is None and newest_trainer_state(tmp_path / "absent") is None
