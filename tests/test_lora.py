"""LoRA: the wrapper computes base + scaled low-rank update, trains only the adapters, keeps its logits and gradients
under every parallel layout (two gloo processes), merges exactly, and exports to what peft and transformers load."""

from __future__ import annotations

import copy
import json

import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray_head import free_port
from test_hf_export import SENTENCE, load_hf, sp_model, trained_model  # noqa: F401 - sp_model is a fixture
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh

from athanor.cluster.parallelize import parallelize
from athanor.config import ModelConfig
from athanor.model.lora import (
    LoRALinear,
    apply_lora,
    base_key_map,
    is_lora_key,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    reset_lora_parameters,
    trainable_parameters,
)
from athanor.model.peft_export import export_merged_hf, export_peft_adapter
from athanor.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, attention="sdpa")
    return ModelConfig(**{**fields, **overrides})


@torch.no_grad()
def _random_b(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """B starts at zero, where A gets no gradient and the adapter changes nothing: make both visible to the tests."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def _tokens(seed: int = 0, shape=(2, 32)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the wrapper, single process


def test_apply_lora_wraps_the_targets_freezes_the_rest_and_starts_at_the_base_model():
    torch.manual_seed(0)
    base = Transformer(_cfg())
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    x = _tokens()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0: the same function, bit for bit

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{proj}.{ab}.weight" for i in range(2)
                         for proj in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                      "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
                         for ab in ("lora_A", "lora_B")}
    wq = model.layers[0].attention.wq
    assert wq.lora_A.weight.shape == (4, 64) and wq.lora_B.weight.shape == (64, 4) and wq.scaling == 2.0
    assert wq.weight is wq.base.weight  # Transformer.init_weights reads .weight of the projections
    # dim 64, kv 32, ffn hidden 192: per layer A+B = 4 * (in + out), summed over q k v o gate up down
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 192) + (192 + 64))
    assert trainable_parameters(model) == (2 * per_layer, base.num_params() + 2 * per_layer)
    assert set(lora_state_dict(model)) == trainable

    model.loss(model(x), x).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_targets_scaling_and_refusals():
    model = apply_lora(Transformer(_cfg()), rank=16, alpha=8, targets=("q", "down"), rslora=True)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"layers.0.attention.wq", "layers.1.attention.wq",
                       "layers.0.feed_forward.w2", "layers.1.feed_forward.w2"}
    assert model.layers[0].attention.wq.scaling == 8 / 4  # rsLoRA: alpha / sqrt(r)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8, targets=("q",))
    with pytest.raises(ValueError, match="must be some of q, k, v, o, gate, up, down"):
        apply_lora(Transformer(_cfg()), rank=4, alpha=8, targets=("wq",))


def test_moe_adapts_every_expert_and_leaves_the_router_frozen():
    model = apply_lora(Transformer(_cfg(moe_num_experts=4)), rank=4, alpha=8, targets=("gate", "up", "down"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(wrapped) == 2 * 4 * 3 and "layers.1.feed_forward.experts.3.w2" in wrapped
    assert not model.layers[0].feed_forward.router.weight.requires_grad
    _random_b(model)
    x = _tokens()
    model.loss(model(x), x).backward()
    assert model.layers[0].feed_forward.experts[0].w1.lora_A.weight.grad.abs().sum() > 0


def test_merge_folds_the_adapters_in_with_the_same_logits():
    torch.manual_seed(0)
    model = apply_lora(Transformer(_cfg(tie_embeddings=False)), rank=4, alpha=8, targets=("q", "v", "o", "up"))
    _random_b(model)
    x = _tokens()
    want = model(x).detach()

    plain = Transformer(model.cfg)
    plain.load_state_dict(merged_state_dict(model), strict=True)  # plain names, nothing left over
    torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)

    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)


def test_base_weights_load_into_a_model_built_with_lora():
    """Building with LoRA first (e.g. on the meta device) works: init_weights, reset the adapters, rename, load."""
    torch.manual_seed(0)
    base = Transformer(_cfg())
    with torch.device("meta"):
        model = apply_lora(Transformer(_cfg()), rank=4, alpha=8)
    model.to_empty(device="cpu")
    model.init_weights()  # draws the adapters from normal(0, init_std) too ...
    reset_lora_parameters(model)  # ... so put them back: B = 0
    assert not model.layers[0].attention.wq.lora_B.weight.any()
    key_map = base_key_map(model)
    assert key_map["layers.0.attention.wq.weight"] == "layers.0.attention.wq.base.weight"
    result = model.load_state_dict({key_map.get(k, k): v for k, v in base.state_dict().items()}, strict=False)
    assert not result.unexpected_keys and all(is_lora_key(k) for k in result.missing_keys)
    x = _tokens()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    wrapped = parallelize(model, None, activation_checkpointing=True)  # names as get_state_dict gives them
    assert set(base_key_map(wrapped).values()) == {k for k in wrapped.state_dict() if k.endswith(".base.weight")}


# ---------------------------------------------------------------- parallel layouts, two gloo processes

LAYOUTS = {
    "tp2": dict(mesh=((2,), ("tp",)), tp=True),
    "tp2_moe_rslora": dict(mesh=((2,), ("tp",)), tp=True, model=dict(moe_num_experts=4, tie_embeddings=False),
                           lora=dict(targets=("q", "v", "gate", "down"), rslora=True)),
    "fsdp2_ac": dict(mesh=((2,), ("dp",)), fsdp=True, activation_checkpointing=True, split=True),
    "dp1_tp2_fsdp": dict(mesh=((1, 2), ("dp", "tp")), tp=True, fsdp=True),
    "ddp": dict(ddp=True, split=True),
}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").removeprefix("module.")


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        data = _tokens(seed=3, shape=(4, 33))
        x, y = data[:, :-1], data[:, 1:]
        for name, case in LAYOUTS.items():
            torch.manual_seed(0)
            reference = apply_lora(Transformer(_cfg(**case.get("model", {}))), rank=4, alpha=8,
                                   **case.get("lora", {}))
            _random_b(reference)
            model = copy.deepcopy(reference)
            ref_logits = reference(x)
            reference.loss(ref_logits, y).backward()

            # dp layouts: each rank takes half the batch, and the averaged gradients must be the whole batch's
            rows = slice(2 * rank, 2 * rank + 2) if case.get("split") else slice(None)
            if case.get("ddp"):
                model = torch.nn.parallel.DistributedDataParallel(model)
                loss_fn = model.module.loss
            else:
                mesh = init_device_mesh("cpu", case["mesh"][0], mesh_dim_names=case["mesh"][1])
                flags = {k: case.get(k, False) for k in ("tp", "fsdp", "activation_checkpointing")}
                parallelize(model, mesh, **flags)
                loss_fn = model.loss
            logits = model(x[rows])
            loss_fn(logits, y[rows]).backward()

            def msg(m, key=""):
                return f"{name} {key}: {m}"  # noqa: B023

            torch.testing.assert_close(logits, ref_logits[rows], atol=1e-5, rtol=1e-4, msg=msg)
            want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
            got = {_plain_name(n): _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
            assert got.keys() == want.keys(), name
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4,
                                           msg=lambda m: msg(m, key))  # noqa: B023
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            assert frozen and all(p.grad is None for p in model.parameters() if not p.requires_grad), name
            if case.get("fsdp"):
                assert all(hasattr(p, "full_tensor") for p in model.parameters()), name
                # what a checkpoint of the adapters only holds: torch keeps a tied head (named_parameters skips
                # the duplicate), so filter with is_lora_key
                optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
                model_sd, optim_sd = get_state_dict(model, optim, options=StateDictOptions(ignore_frozen_params=True))
                assert {k for k in model_sd if is_lora_key(k)} == set(want), name
                assert set(model_sd) - set(want) <= {"output.weight"}, name
                assert set(optim_sd["param_groups"][0]["params"]) == set(want), name
            if case.get("tp") and not case.get("fsdp") and "lora" not in case:  # default targets: wq and wo
                wq, wo = model.layers[0].attention.wq, model.layers[0].attention.wo
                assert wq.base.weight.to_local().shape == (32, 64) and wq.lora_B.weight.to_local().shape == (32, 4)
                assert not hasattr(wq.lora_A.weight, "full_tensor")  # replicated as a plain tensor
                assert wo.lora_A.weight.to_local().shape == (4, 32) and not hasattr(wo.lora_B.weight, "full_tensor")

        # Dropout under TP: every rank seeds alike, so the replicated A draws one mask and gets one gradient.
        torch.manual_seed(0)
        model = apply_lora(Transformer(_cfg()), rank=4, alpha=8, dropout=0.5)
        _random_b(model)
        parallelize(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), tp=True)
        model.loss(model(x), y).backward()
        grad = model.layers[1].attention.wq.lora_A.weight.grad
        gathered = [torch.empty_like(grad) for _ in range(2)]
        dist.all_gather(gathered, grad)
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lora_logits_and_gradients_match_single_process_under_tp_fsdp_and_ddp():
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)


# ---------------------------------------------------------------- export: peft adapter and merged folder

@pytest.fixture(scope="module")
def base_export(sp_model, data_dir, tmp_path_factory):  # noqa: F811
    """The Alice-trained base model and its export_hf folder, shared by the export tests."""
    from athanor.model.hf_export import export_hf

    model, cfg = trained_model(sp_model, data_dir)
    folder = export_hf(model, cfg, sp_model, tmp_path_factory.mktemp("base"))
    return model, cfg, folder


def _fine_tune(base: Transformer, data_dir, sp_path, steps: int = 8, **lora) -> Transformer:
    """A few AdamW steps of the adapters on Alice: B moves off zero, the base weights must not move at all."""
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, **lora).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if not is_lora_key(k)}
    ids = torch.tensor(spm.SentencePieceProcessor(model_file=str(sp_path)).encode(
        (data_dir / "quality/high/alice29.txt").read_text()[50_000:80_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen parameters have no grad: AdamW skips them
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (4,), generator=g)
        chunk = torch.stack([ids[s : s + 65] for s in starts])
        loss = model.loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        if not is_lora_key(k):
            assert torch.equal(v, before[k]), k
    return model.eval()


def _ids(sp_path) -> torch.Tensor:
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    return torch.tensor([[sp.bos_id(), *sp.encode(SENTENCE)]])


@pytest.mark.parametrize("lora", [dict(), dict(targets=("q", "v"), rslora=True)], ids=["all", "qv_rslora"])
def test_peft_loads_the_adapter_with_athanors_logits(base_export, sp_model, data_dir, tmp_path, monkeypatch, lora):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, cfg, base_dir = base_export
    model = _fine_tune(base, data_dir, sp_model, **lora)
    x = _ids(sp_model)
    with torch.no_grad():
        ours = model(x)
        assert (ours - base(x)).abs().max() > 1e-2  # the adapter changed the model: the comparison below means it
    export_peft_adapter(model, cfg, tmp_path / "adapter", base_model_path=base_dir)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    hf_targets = ["q_proj", "v_proj"] if lora else ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                     "up_proj", "v_proj"]
    assert config["target_modules"] == hf_targets and config["use_rslora"] is bool(lora)

    hf, _ = load_hf(base_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", local_files_only=True).eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_merged_export_loads_in_transformers_with_the_same_logits(base_export, sp_model, data_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, cfg, _ = base_export
    model = _fine_tune(base, data_dir, sp_model, steps=4, targets=("k", "o", "up", "down"))
    export_merged_hf(model, cfg, sp_model, tmp_path)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # exporting did not merge the model itself
    hf, _ = load_hf(tmp_path)
    x = _ids(sp_model)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_peft_export_refuses_moe_experts(tmp_path):
    cfg = _cfg(moe_num_experts=4)
    model = apply_lora(Transformer(cfg), rank=4, alpha=8, targets=("q", "up"))
    with pytest.raises(ValueError, match="export_merged_hf"):
        export_peft_adapter(model, cfg, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_peft_adapter(Transformer(cfg), cfg, tmp_path)
