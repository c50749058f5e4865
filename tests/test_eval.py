"""Evaluation: sliding windows, perplexity against transformers on the HF export, HF folders loaded back, and
`athanor eval` over real text with bad rows counted, through Ray Data and into MLflow."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli
from test_hf_export import load_hf, sp_model, trained_model  # noqa: F401 - sp_model is a fixture

from athanor.cluster.checkpoint import save_model
from athanor.config import load_config
from athanor.model.hf_export import export_hf
from athanor.model.hf_import import load_hf_folder
from athanor.model.scoring import score_windows, sliding_windows

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n,context,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 3), (50, 16, 1), (17, 4, 4)])
def test_sliding_windows_score_every_target_once_within_the_context(n, context, stride):
    ids = list(range(100, 100 + n + 1))  # n targets
    windows = sliding_windows(ids, context, stride)
    scored = []
    for window, k in windows:
        assert 1 <= k <= len(window) - 1 and len(window) - 1 <= context
        start = ids.index(window[0])
        assert window == ids[start : start + len(window)]
        scored += window[len(window) - k :]  # the targets it scores, by value (ids are distinct)
    assert scored == ids[1:]
    if stride < context and n > context:  # later windows keep a full context before what they score
        assert all(len(w) - 1 == context for w, _ in windows[1:])


def test_sliding_windows_refuse_a_stride_beyond_the_context():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows([1, 2, 3], 4, 5)


@pytest.fixture(scope="module")
def tiny(sp_model, data_dir, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The Alice-trained tiny model as an athanor checkpoint and as its HF export."""
    model, cfg = trained_model(sp_model, data_dir)
    root = tmp_path_factory.mktemp("tiny")
    ckpt = save_model(root / "checkpoint_00000060", model, cfg, sp_model, step=60, seq_len=64)
    hf_dir = export_hf(model, cfg, sp_model, root / "hf")
    return model, cfg, ckpt, hf_dir


def _paragraph(data_dir, chars=1500) -> str:
    text = (data_dir / "quality/high/lcet10.txt").read_text()
    start = text.index("The Workshop on Electronic Texts (1)")  # a held-out book: never in the tiny model's training text
    return text[start : start + chars]


def test_perplexity_equals_transformers_on_the_export(tiny, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, cfg, _, hf_dir = tiny
    hf, tokenizer = load_hf(hf_dir)
    ids = tokenizer(_paragraph(data_dir))["input_ids"]  # BOS + pieces, as athanor encodes a document
    assert len(ids) > 200
    windows = sliding_windows(ids, 48, 16)
    ours = score_windows(model, [w for w, _ in windows], [k for _, k in windows], batch_size=3)
    theirs_nats, n_tokens = 0.0, 0
    with torch.no_grad():
        for window, k in windows:  # the loop of HF's perplexity guide: labels -100 on the context
            x = torch.tensor([window])
            labels = x.clone()
            labels[:, : len(window) - k] = -100
            out = hf(x, labels=labels)
            theirs_nats += out.loss.item() * k
            n_tokens += k
    ours_nats = -sum(s.logprob for s in ours)
    assert n_tokens == len(ids) - 1 == sum(s.n_scored for s in ours)
    ppl_ours, ppl_theirs = math.exp(ours_nats / n_tokens), math.exp(theirs_nats / n_tokens)
    assert abs(ppl_ours - ppl_theirs) / ppl_theirs <= 1e-4, (ppl_ours, ppl_theirs)


def test_hf_folder_loads_back_with_the_same_logits(tiny):
    model, cfg, _, hf_dir = tiny
    loaded, loaded_cfg = load_hf_folder(hf_dir)
    assert (loaded_cfg.dim, loaded_cfg.n_layers, loaded_cfg.n_kv_heads) == (cfg.dim, cfg.n_layers, cfg.n_kv_heads)
    x = torch.randint(4, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_a_non_llama_folder_is_refused_naming_the_field(tiny, tmp_path):
    _, _, _, hf_dir = tiny
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    config = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        load_hf_folder(tmp_path)


def _bad_inputs(tmp_path):
    bad = tmp_path / "mixed.jsonl"
    bad.write_bytes(b'{"text": "Alice opened the door and looked into the garden."}\n'
                    b'not json at all\n'
                    b'{"text": ""}\n'
                    b'{"body": "no text field"}\n'
                    b'{"text": "caf\xe9"}\n')
    return bad


@pytest.mark.slow
def test_eval_scores_documents_through_ray_data_and_counts_bad_rows(tiny, data_dir, tmp_path, ray_local):
    from athanor.cluster.evaluate import evaluate

    _, _, ckpt, hf_dir = tiny
    book = data_dir / "quality/high/alice29.txt"
    cfg = load_config(None, [f"run.workdir={tmp_path / 'run'}", "eval.batch_size=8", "eval.stride=32"])
    inputs = [str(book), str(_bad_inputs(tmp_path))]
    from_ckpt = evaluate(cfg, str(ckpt), inputs)
    # the HF export's own context is its max_position_embeddings (128); give it the checkpoint's training length
    from_hf = evaluate(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"context": 64})}), str(hf_dir),
                       inputs)
    by_source = {s["source"]: s for s in from_ckpt["sources"]}
    assert set(by_source) == {"alice29", "mixed"}  # no shards in this workdir: documents only
    alice, mixed = by_source["alice29"], by_source["mixed"]
    assert alice["bytes"] == len(book.read_bytes()) and alice["documents"] == 1
    assert mixed["documents"] == 1 and mixed["errors"] == {"bad_json": 1, "empty_text": 1, "missing_text": 1,
                                                          "undecodable": 1}
    assert from_ckpt["context"] == 64 and from_ckpt["stride"] == 32
    assert 1.0 < alice["bits_per_byte"] < 8.0
    assert math.isclose(alice["perplexity"], math.exp(alice["loss"]))
    # the HF export of the same weights gives the same numbers
    for ours, theirs in zip(from_ckpt["sources"], from_hf["sources"]):
        assert (ours["source"], ours["bytes"], ours["tokens"]) == (theirs["source"], theirs["bytes"], theirs["tokens"])
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    docs = pq.read_table(tmp_path / "run" / "eval" / "checkpoint" / "documents.parquet").to_pandas()
    assert len(docs) == 6 and docs["error"].notna().sum() == 4  # every input row accounted for


@pytest.mark.slow
def test_eval_cli_logs_val_shards_and_inputs_to_a_linked_mlflow_run(smoke_run, data_dir, tmp_path):
    """`athanor eval` on the smoke run's shards and newest checkpoint, into an eval run tagged with the training run."""
    from mlflow.tracking import MlflowClient

    from athanor.cluster.checkpoint import find_checkpoint
    from training_runs import fresh_training_dir

    smoke, _ = smoke_run
    work = fresh_training_dir(smoke, tmp_path / "run")
    proc = run_cli("eval", "configs/smoke.yaml", "--set", f"run.workdir={work}", "--set", "eval.run_name=smoke-eval",
                   "--checkpoint", str(find_checkpoint(smoke)), "--input", str(data_dir / "quality/high/alice29.txt"),
                   "--input", str(_bad_inputs(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "eval" / "smoke-eval" / "summary.json").read_text())
    val = next(s for s in summary["sources"] if s["source"] == "val")
    manifest = json.loads((work / "manifest.json").read_text())
    assert val["tokens"] == manifest["splits"]["val"]["sequences"] * manifest["seq_len"]
    assert 0 < val["bytes"] < val["tokens"] * 16 and 0.5 < val["bits_per_byte"] < 6
    assert "bad_json=1" in proc.stdout and "undecodable=1" in proc.stdout
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("athanor-smoke")
    runs = {r.data.tags["athanor.run_name"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"smoke", "smoke-eval"}
    eval_run = runs["smoke-eval"]
    assert eval_run.data.tags["athanor.eval_of"] == runs["smoke"].info.run_id
    assert eval_run.data.metrics["val/val/bits_per_byte"] == pytest.approx(val["bits_per_byte"])
    assert client.get_metric_history(eval_run.info.run_id, "val/alice29/loss")[0].step == summary["step"] == 300
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id, "eval/smoke-eval")}
    assert "eval/smoke-eval/per_source.json" in artifacts


def test_a_continuation_keeps_the_space_its_first_piece_encodes(sp_model):  # noqa: F811
    """`athanor generate --prompt "...the government would"` once printed "wouldbe": decoding the new ids alone
    drops the space SentencePiece keeps in the first new piece."""
    from athanor.pipelines.tokenizer import Tokenizer

    tok = Tokenizer(sp_model)
    prompt = [tok.bos_id, *tok.encode(["Alice said the Queen would"])[0]]
    new = tok.encode(["Alice said the Queen would be very cross"])[0][len(prompt) - 1 :]
    assert tok.decode(new) == "be very cross"  # what the old code printed after the prompt
    assert tok.decode_continuation(prompt, new) == " be very cross"


@pytest.mark.slow
def test_generate_file_answers_every_line_in_order_and_names_bad_ones(tiny, tmp_path, ray_local):
    from athanor.cluster.generation import generate_file
    from athanor.model.generate import generate
    from athanor.pipelines.tokenizer import Tokenizer

    model, cfg, ckpt, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    long_prompt = "Alice " * 200  # more tokens than the model's context of 128
    prompts.write_bytes(
        b'{"id": "a", "prompt": "Alice was beginning to get very tired"}\n'
        b'{"prompt": "The Queen said", "max_new_tokens": 5}\n'
        b'\n'
        b'{"prompt": 42}\n'
        b'this is not json\n'
        + json.dumps({"prompt": long_prompt}).encode() + b'\n'
        b'{"prompt": "caf\xe9"}\n'
        b'{"prompt": "   "}\n'
        b'{"prompt": "Down the rabbit hole", "stop": ["."]}\n'
    )
    out = tmp_path / "out.jsonl"
    counts = generate_file(str(ckpt), str(prompts), str(out), {"max_new_tokens": 12}, batch_rows=4)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in lines] == [1, 2, 4, 5, 6, 7, 8, 9]  # the blank line 3 is not a prompt
    errors = {r["line"]: r["error"] for r in lines if r["error"]}
    assert errors[4].startswith("missing_prompt") and errors[5].startswith("bad_json")
    assert errors[6].startswith("prompt_too_long") and errors[7].startswith("undecodable")
    assert errors[8].startswith("empty_prompt") and f"{prompts}:5" in errors[5]
    assert counts["error"] == 5 and sum(counts.values()) == 8
    first, second = lines[0], lines[1]
    assert first["id"] == "a" and second["tokens_generated"] <= 5
    tok = Tokenizer(ckpt / "tokenizer.model")
    ids = [tok.bos_id, *tok.encode([first["prompt"]])[0]]
    expected = generate(model, ids, 12, temperature=0, eos_id=tok.eos_id)  # the one-prompt path, greedy
    assert first["completion"] == tok.decode_continuation(ids, [t for t in expected if t != tok.eos_id])
    assert "." not in lines[-1]["completion"]  # cut at the stop string
    clean = tmp_path / "clean.jsonl"  # no bad line: Ray Data types the all-None error column as null (NaN)
    clean.write_text('{"prompt": "Alice was beginning"}\n{"prompt": "The Queen said"}\n')
    counts = generate_file(str(ckpt), str(clean), str(tmp_path / "clean.out.jsonl"), {"max_new_tokens": 4})
    assert counts == {"length": 2}, counts
