"""Supervised fine-tuning: the chat template and its loss mask, named drops, packing, the loader's response-only
targets, packed examples computing what they compute alone, and `athanor finetune` with LoRA on the smoke model:
held-out response loss falls, a checkpoint holds only adapters, and a stopped driver relaunched on another number
of workers trains every step as the uninterrupted run did."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from cli_runner import ROOT
from training_runs import (assert_same_training, checkpoint_registered, effective_steps, finish, records, running,
                           start_train, stop_after, train_workers, wait_for)

from athanor.cluster import tracking
from athanor.config import ModelConfig, load_config
from athanor.pipelines.instructions import encode_conversation, pack, pack_instructions, prompt_ids, read_examples
from athanor.pipelines.tokenizer import Tokenizer

FT_CONFIG = "configs/finetune-smoke.yaml"
FT = load_config(ROOT / FT_CONFIG)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(smoke_run):
    return Tokenizer(smoke_run[0] / "tokenizer" / "tokenizer.model")


def test_the_template_trains_on_responses_and_their_eos_only(tok):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."},
                {"role": "user", "content": "Is it mutable?"}, {"role": "assistant", "content": "Yes."}]
    ids, mask = encode_conversation(messages, tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained.count(tok.eos_id) == 2 and ids[-1] == tok.eos_id
    answers = tok.decode([i for i in trained if i != tok.eos_id])
    assert answers == "A sequence. Yes."  # each response keeps the space its first piece encodes
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert context == "System: Answer briefly.\n\nUser: What is a list?\n\nAssistant: User: Is it mutable?\n\nAssistant:"
    # generation after fine-tuning is fed the template up to where the answer starts
    assert prompt_ids("What is a list?", tok, "Answer briefly.") == ids[: mask.index(1)]


def test_bad_rows_are_named_drops(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    long_answer = "word " * 2000
    lines = [b'{"prompt": "What is a tuple?", "response": "An immutable sequence."}',
             b'{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}',
             b"not json", b'{"prompt": "no response"}', b'{"prompt": "Why?", "response": "   "}',
             b'{"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]}',
             json.dumps({"prompt": "Long?", "response": long_answer}).encode(), b'{"prompt": "caf\xe9", "response": "x"}',
             b"", b"[1, 2]"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    examples, dropped = read_examples(path, tok, 256)
    assert [e.line for e in examples] == [1, 2]
    assert dropped == {"bad_json": 2, "missing_field": 1, "empty_response": 1, "bad_messages": 1, "too_long": 1,
                       "undecodable": 1}


def test_packing_keeps_examples_whole_and_the_loader_masks_targets(tok, faq, tmp_path):
    from athanor.cluster.loader import GlobalBatchLoader
    from athanor.pipelines.shards import TokenShards

    examples, _ = read_examples(faq[0], tok, 513)
    windows = list(pack(examples, 513, tok.pad_id))
    assert sum(len(starts) for _, _, starts in windows) == len(examples)  # every example once, none split
    for tokens, mask, starts in windows:
        assert len(tokens) == len(mask) == 513 and starts[0] == 0
        assert all(tokens[s] == tok.bos_id for s in starts)
    cfg = load_config(None, [f"finetune.train_files=[{faq[0]}]", f"finetune.val_files=[{faq[1]}]",
                             "finetune.seq_len=512", f"run.workdir={tmp_path}"])
    manifest = pack_instructions(cfg, tmp_path / "sft", tok.path)
    assert manifest["documents"]["in"] == manifest["documents"]["kept"] + sum(manifest["documents"]["dropped"].values())
    shards = TokenShards(tmp_path / "sft", "train")
    assert shards.has_loss_mask and manifest["splits"]["val"]["sequences"] == manifest["splits"]["val"]["documents"]
    loader = GlobalBatchLoader(shards, 8, seed=1, rank=0, world_size=2)
    batch = loader.next_batch()
    for row, i in enumerate(batch["sample_ids"].tolist()):
        window, mask = shards[i].astype(np.int64), shards.loss_mask(i)
        kept = batch["targets"][row] != -100
        assert kept.tolist() == mask[1:].astype(bool).tolist()
        assert batch["targets"][row][kept].tolist() == window[1:][mask[1:].astype(bool)].tolist()
        starts = shards.doc_starts(i)
        assert batch["document_ids"][row].max().item() == len(starts) - 1
    everyone = [int(shards.loss_mask(i)[1:].sum()) for i in loader._epoch_order()[:8]]
    assert int(batch["global_targets"]) == sum(everyone)  # the global batch's response tokens, on every rank


def test_packed_examples_compute_what_they_compute_alone():
    from athanor.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                    attention="sdpa")).eval()
    a, b, c = (torch.randint(4, 128, (1, n)) for n in (7, 12, 5))
    packed = torch.cat([a, b, c], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5])
    with torch.no_grad():
        alone = torch.cat([model(a), model(b), model(c)], dim=1)
        together = model(packed, document_ids=document_ids)
        leaky = model(packed)
    assert (together - alone).abs().max().item() < 1e-5
    assert (leaky - alone).abs().max().item() > 1e-2  # without the mask the later examples see the earlier ones


@pytest.fixture(scope="module")
def finetune_run(smoke_run, faq, tmp_path_factory):
    """LoRA fine-tuning of the smoke run's model, uninterrupted: (workdir, stdout)."""
    work = tmp_path_factory.mktemp("finetune")
    proc = start_train(work, f"finetune.base={smoke_run[0]}", config=FT_CONFIG, command="finetune")
    return work, finish(proc)


@pytest.mark.slow
def test_lora_finetuning_lowers_held_out_response_loss_and_checkpoints_adapters_only(finetune_run, smoke_run):
    from mlflow.tracking import MlflowClient

    from athanor.cluster.checkpoint import SafeFileSystemReader, find_checkpoint, load_model

    work, _ = finetune_run
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name(FT.mlflow.experiment).experiment_id])
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/val_loss")}
    assert sorted(val) == [0, 20, 40]  # step 0: the base model
    assert val[40] < val[0] - 0.05, val
    params = run.data.params
    assert 0 < int(params["model.trainable_params"]) < int(params["model.total_params"]) / 5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    counts = tracking.curation_table(run.info.run_id, client).set_index(["stage", "status", "reason"])["documents"]
    assert counts["finetune_data", "kept", ""] > 100
    checkpoint = find_checkpoint(work)
    keys = SafeFileSystemReader(checkpoint).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys[:5]
    tuned, _, _ = load_model(work)  # the adapters on their base, merged: a plain model again
    base, _, _ = load_model(smoke_run[0])
    x = torch.randint(4, 1000, (1, 32))
    with torch.no_grad():
        assert (tuned(x) - base(x)).abs().max().item() > 1e-3


@pytest.mark.slow
def test_finetune_survives_a_killed_worker_and_a_stop_resumed_on_one_worker(finetune_run, smoke_run, tmp_path):
    """Two interruptions of one run, each resumed as if uninterrupted: a worker killed mid-run is replaced by Ray
    Train from the last checkpoint (the base reloaded, adapters and their optimizer state restored); then SIGTERM
    stops the 2-worker run with a checkpoint, and the relaunch on 1 worker reshards it. Every step trains in effect
    once, on the samples and with the loss of the uninterrupted run."""
    baseline, _ = finetune_run
    work = tmp_path / "run"
    base = f"finetune.base={smoke_run[0]}"
    every = FT.train.checkpoint_every
    with running(start_train(work, base, config=FT_CONFIG, command="finetune")) as proc:
        wait_for(lambda: max(effective_steps(work), default=0) >= every + 3
                 and checkpoint_registered(work, FT.run.name, every), proc, 400, "steps past a checkpoint")
        workers = wait_for(lambda: train_workers(proc.pid), proc, 60, "a training worker to kill")
        workers[-1].send_signal(signal.SIGKILL)
        wait_for(lambda: sum("started" in r for r in records(work)) == 2, proc, 400, "the replaced worker group")
    stopped_at = stop_after(work, proc, 2 * every + 2, "steps past the second checkpoint")
    finish(start_train(work, base, "train.num_workers=1", config=FT_CONFIG, command="finetune"))
    starts = [(r["step"], r["world_size"]) for r in records(work) if "started" in r]
    assert starts == [(1, 2), (every + 1, 2), (stopped_at + 1, 1)], starts
    assert len(records(work)) > len(effective_steps(work)), "no step was replayed: the kill did not interrupt training"
    assert_same_training(work, baseline)
