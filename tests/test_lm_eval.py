"""lm-evaluation-harness on athanor models: the `athanor` lm_eval model against hand computations and transformers,
the local tasks built from real text, lm_eval's evaluator and CLI end to end, and the Ray Data scoring path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from athanor.cluster.checkpoint import save_model  # noqa: E402
from athanor.cluster.lm_eval_adapter import AthanorLM  # noqa: E402 - registers "athanor"
from athanor.config import ModelConfig  # noqa: E402
from athanor.model.generate import generate  # noqa: E402
from athanor.model.transformer import Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "configs" / "lm_eval"
BUILD = ROOT / "scripts" / "build_eval_tasks.py"
CONTEXT = 64  # the tiny model's training length: the adapter's default max_length

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("DISABLE_MULTIPROC", "1")  # lm_eval's bootstrap stderr: no process pool forked from the tests
        yield


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
    """A SentencePiece BPE and a tiny decoder trained 60 steps on Alice (sequence length 64), saved as an athanor
    checkpoint: (checkpoint folder, model, tokenizer path, Alice's text)."""
    text = (data_dir / "quality/high/alice29.txt").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=blob, model_type="bpe", vocab_size=512, byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, num_threads=1, minloglevel=2,
    )
    root = tmp_path_factory.mktemp("lm_eval")
    sp_path = root / "tokenizer.model"
    sp_path.write_bytes(blob.getvalue())
    ids = torch.tensor(spm.SentencePieceProcessor(model_file=str(sp_path)).encode(text), dtype=torch.long)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (8,), generator=g)
        chunk = torch.stack([ids[s : s + CONTEXT + 1] for s in starts])
        loss = model.loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ckpt = save_model(root / "checkpoint_000060", model, cfg, sp_path, step=60, seq_len=CONTEXT)
    return ckpt, model, sp_path, text


@pytest.fixture(scope="module")
def lm(tiny):
    return AthanorLM(checkpoint=str(tiny[0]), batch_size=8, device="cpu")  # fp32, as the hand computations


@pytest.fixture(scope="module")
def eval_data(data_dir):
    """data/eval/*.jsonl, built from data/ by scripts/build_eval_tasks.py when missing (idempotent)."""
    if not all((data_dir / "eval" / f).is_file() for f in ("athanor_cloze.jsonl", "athanor_choice.jsonl")):
        subprocess.run([sys.executable, str(BUILD), "--data", str(data_dir)], check=True, capture_output=True)
    return data_dir / "eval"


def hand_logprobs(model, window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(window[t+1] | window[:t+1]), argmax hit) for every t, one unbatched forward."""
    x = torch.tensor([window])
    with torch.no_grad():
        logits = model(x[:, :-1])[0].double()
    lp = F.log_softmax(logits, dim=-1).gather(-1, x[0, 1:, None]).squeeze(-1)
    return lp, logits.argmax(-1) == x[0, 1:]


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_log_softmax_by_hand(lm, tiny):
    _, model, sp_path, text = tiny
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    long_context = " ".join(text.split()[200:400])  # far more than max_length tokens: truncated from the left
    pairs = [("Alice was beginning to get very tired of sitting by her", " sister"),
             ("the White ", "Rabbit"),  # trailing space: lm_eval moves it to the continuation
             ("", "Alice"),  # empty context: BOS alone conditions
             (long_context, " and the Queen said nothing at all"),
             ("'Off with her", " head!'")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context.endswith(" "):
            context, continuation = context.rstrip(" "), " " + continuation
        whole = [sp.bos_id(), *sp.encode(context + continuation)]
        n_context = len(sp.encode(context)) + 1 if context else 1
        n = len(whole) - n_context
        window = whole[-(CONTEXT + 1):]
        lp, hits = hand_logprobs(model, window)
        assert logprob == pytest.approx(lp[-n:].sum().item(), abs=1e-5)
        assert greedy == bool(hits[-n:].all())
    assert len(lm.tok_encode(long_context)) > CONTEXT + 1


def test_rolling_loglikelihood_windows_and_transformers(lm, tiny, tmp_path):
    """Every token once: by hand over lm_eval's own rolling windows (its hf model's), through transformers'
    LlamaForCausalLM on the exported folder, and with a shorter stride by hand over overlapping windows."""
    transformers = pytest.importorskip("transformers")
    from athanor.model.hf_export import export_hf

    _, model, sp_path, text = tiny
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    doc = " ".join(text.split()[1000:1150])
    tokens = sp.encode(doc)
    assert len(tokens) > 3 * CONTEXT
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", doc)])

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, sp.bos_id(), CONTEXT, 1)]
    ours = theirs = 0.0
    export_hf(model, model.cfg, sp_path, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    for context, predicted in windows:
        window = context + predicted
        ours += hand_logprobs(model, window)[0][-len(predicted):].sum().item()
        with torch.no_grad():
            logits = hf(torch.tensor([window[:-1]])).logits[0].double()
        theirs += F.log_softmax(logits, -1)[-len(predicted):].gather(-1, torch.tensor(predicted)[:, None]).sum().item()
    assert total == pytest.approx(ours, abs=1e-4)
    assert total == pytest.approx(theirs, abs=1e-3)
    # The exported HF folder loads through the same adapter and gives the same number.
    (from_hf,) = AthanorLM(checkpoint=str(tmp_path), max_length=CONTEXT, device="cpu").loglikelihood_rolling(
        [request("loglikelihood_rolling", doc)])
    assert from_hf == pytest.approx(total, abs=1e-4)

    # stride 16: windows overlap, each token still scored once, with more history.
    strided = AthanorLM(checkpoint=str(tiny[0]), stride=16, device="cpu")
    (total16,) = strided.loglikelihood_rolling([request("loglikelihood_rolling", doc)])
    ids, by_hand, scored_end = [sp.bos_id(), *tokens], 0.0, 0
    while scored_end < len(ids) - 1:
        end = min(CONTEXT if scored_end == 0 else scored_end + 16, len(ids) - 1)
        window = ids[max(0, end - CONTEXT) : end + 1]
        by_hand += hand_logprobs(model, window)[0][-(end - scored_end):].sum().item()
        scored_end = end
    assert total16 == pytest.approx(by_hand, abs=1e-4)
    assert total16 != pytest.approx(total, abs=1e-3)  # more history, another number


def test_generate_until_stops_at_until_and_matches_greedy(lm, tiny):
    _, model, sp_path, _ = tiny
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    prompts = ["Alice was beginning to get very tired of", "'Off with her head!' the Queen", "The Rabbit"]
    free = lm.generate_until([request("generate_until", p, {"until": [], "max_gen_toks": 24}) for p in prompts])
    for prompt, out in zip(prompts, free):
        ids = [sp.bos_id(), *sp.encode(prompt)]
        new = generate(model, ids, 24, temperature=0)
        assert out == sp.decode(ids[1:] + new)[len(sp.decode(ids[1:])):]  # greedy, decoded after the prompt
    stop = ["e", ","]
    cut = lm.generate_until([request("generate_until", p, {"until": stop, "max_gen_toks": 24, "do_sample": False})
                             for p in prompts])
    for full, out in zip(free, cut):
        first = min((i for s in stop if (i := full.find(s)) >= 0), default=len(full))
        assert out == full[:first] and not any(s in out for s in stop)
    # Sampling is seeded per request: the same requests give the same text.
    kw = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    sampled = [lm.generate_until([request("generate_until", p, kw) for p in prompts]) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_build_eval_tasks_is_deterministic_and_well_formed(data_dir, eval_data, tmp_path):
    outs = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(BUILD), "--data", str(data_dir), "--out", str(tmp_path / name)],
                       check=True, capture_output=True)
        outs.append({f.name: f.read_bytes() for f in (tmp_path / name).iterdir()})
    assert outs[0] == outs[1]
    assert outs[0]["athanor_cloze.jsonl"] == (eval_data / "athanor_cloze.jsonl").read_bytes()
    manifest = json.loads(outs[0]["manifest.json"])
    cloze = [json.loads(line) for line in outs[0]["athanor_cloze.jsonl"].splitlines()]
    choice = [json.loads(line) for line in outs[0]["athanor_choice.jsonl"].splitlines()]
    assert manifest["tasks"]["athanor_cloze"]["items"] == len(cloze) >= 300
    assert manifest["tasks"]["athanor_choice"]["items"] == len(choice) >= 300
    assert {i["source"] for i in cloze} == {"news", "alice", "lcet10", "paradise_lost"}
    for item in cloze:
        words = item["text"].split(" ")
        assert 40 <= len(words) <= 120 and words[-1].isalpha() and len(words[-1]) >= 3
        assert "gutenberg" not in item["text"].lower() and "  " not in item["text"]
    for item in choice:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        assert all(c[-1] in ".!?'\")" for c in item["choices"])
    assert len({i["label"] for i in choice}) == 4


def test_simple_evaluate_runs_the_local_tasks(tiny, eval_data, tmp_path, monkeypatch):
    """lm_eval's evaluator end to end, from another working directory: the task YAMLs find data/eval."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    results = lm_eval.simple_evaluate(
        model="athanor", model_args=f"checkpoint={tiny[0]}", tasks=["athanor_cloze", "athanor_choice"],
        task_manager=TaskManager(include_path=str(INCLUDE), include_defaults=False), limit=120, batch_size=16,
        device="cpu", bootstrap_iters=100, log_samples=True,
    )
    cloze, choice = results["results"]["athanor_cloze"], results["results"]["athanor_choice"]
    assert 0 <= cloze["acc,none"] <= 1 and cloze["acc_stderr,none"] >= 0  # the tiny model may guess no word
    for m in ("acc", "acc_norm"):
        assert 0 <= choice[f"{m},none"] <= 1 and choice[f"{m}_stderr,none"] > 0
    assert cloze["perplexity,none"] > 1
    assert 0.05 < choice["acc,none"] < 0.6  # four choices, a tiny model: about chance
    sample = results["samples"]["athanor_cloze"][0]
    ((context, target),) = sample["arguments"]
    assert context + target == sample["doc"]["text"] and target == " " + sample["doc"]["text"].split(" ")[-1]
    assert results["config"]["athanor_step"] == 60 and results["n-samples"]["athanor_choice"]["effective"] == 120
    print({t: {k: v for k, v in r.items() if "," in k} for t, r in results["results"].items()})


def test_cli_main_is_lm_evals_cli_with_athanor_registered(tiny, eval_data, tmp_path):
    """`athanor lm-eval`: lm_eval's own command line with the athanor model registered, the include path added by
    default, in a fresh process from another directory."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_MULTIPROC="1")
    proc = subprocess.run(
        [sys.executable, "-m", "athanor.cluster.cli", "lm-eval", "--model", "athanor", "--model_args",
         f"checkpoint={tiny[0]}", "--tasks", "athanor_cloze", "--limit", "8", "--batch_size", "8", "--device", "cpu",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "athanor_cloze" in proc.stdout and "perplexity" in proc.stdout
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert len(saved) == 1 and "athanor_cloze" in json.loads(saved[0].read_text())["results"]


def test_ray_data_actor_pool_scores_the_same(lm, tiny, ray_local):
    """actors=1: the windows go through a Ray Data pool of WindowScorer actors; the numbers are the in-process ones."""
    pairs = [("Alice was beginning to get very tired of", " sitting"), ("the White", " Rabbit"),
             ("Down the", " Rabbit-Hole")]
    requests = [request("loglikelihood", c, x) for c, x in pairs]
    pooled = AthanorLM(checkpoint=str(tiny[0]), actors=1, batch_size=2, device="cpu")
    assert pooled._inference is None  # the model is loaded by the actor only
    got, want = pooled.loglikelihood(requests), lm.loglikelihood(requests)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
