"""DPO's preference pairs: both input forms encode as the fine-tuning template with the loss on the answer only, bad
rows are named drops, pack_pairs writes row 2i / 2i+1 = pair i's chosen / rejected in whole-pair shards with a
seeded, deterministic split, and scripts/build_preferences.py pairs every FAQ question's own answer with another
question's, deterministically."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
from cli_runner import ROOT
from test_hf_export import sp_model  # noqa: F401 - sp_model is a fixture

from athanor.config import AthanorConfig, DPOConfig, RunConfig
from athanor.pipelines.instructions import encode_conversation, split_of
from athanor.pipelines.preferences import ROW_LAYOUT, pack_pairs, read_pairs
from athanor.pipelines.shards import TokenShards
from athanor.pipelines.tokenizer import Tokenizer


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_preferences", ROOT / "scripts" / "build_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_preferences = _load_builder()


@pytest.fixture(scope="module")
def tok(sp_model):  # noqa: F811 - the fixture imported above
    return Tokenizer(sp_model)


@pytest.fixture(scope="module")
def faq_pairs(data_dir, tmp_path_factory):
    """The preference files built from the Python FAQ into a fresh folder (the instructions built first if missing)."""
    out = tmp_path_factory.mktemp("preferences")
    build_preferences.build(data_dir, out)
    return out


def _write(path, rows) -> str:
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return str(path)


def _answer(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m and i != tok.eos_id])


def test_both_forms_encode_the_chat_template_with_the_loss_on_the_answer_only(tok, tmp_path):
    system = {"role": "system", "content": "Answer briefly."}
    user = {"role": "user", "content": "What is a list?"}
    path = _write(tmp_path / "forms.jsonl", [
        {"prompt": "What is a list?", "chosen": "A mutable sequence.", "rejected": "A white rabbit.", "id": 7},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "A mutable sequence."}],
         "rejected": [{"role": "assistant", "content": "A white rabbit."}]},
        {"prompt": [user], "chosen": "A mutable sequence.", "rejected": "A white rabbit."},
        {"chosen": [user, {"role": "assistant", "content": "A mutable sequence."}],  # TRL's implicit prompt
         "rejected": [user, {"role": "assistant", "content": "A white rabbit."}]},
        {"prompt": [system, user, {"role": "assistant", "content": "A sequence."},
                    {"role": "user", "content": "Is it mutable?"}],
         "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": "No."},
    ])
    pairs, dropped = read_pairs(path, tok, 256)
    assert not dropped and [p.line for p in pairs] == [1, 2, 3, 4, 5]
    for p in pairs:
        assert len(p.chosen_ids) == len(p.chosen_mask) and len(p.rejected_ids) == len(p.rejected_mask)
        assert p.chosen_ids[-1] == p.rejected_ids[-1] == tok.eos_id and p.chosen_mask[-1] == p.rejected_mask[-1] == 1
        n = p.prompt_length  # the two sides share their prompt tokens exactly; the mask is one run to the end
        assert p.chosen_ids[:n] == p.rejected_ids[:n] and p.rejected_mask.index(1) == n
        assert p.chosen_mask == [0] * n + [1] * (len(p.chosen_ids) - n)
        assert p.rejected_mask == [0] * n + [1] * (len(p.rejected_ids) - n)
    # the plain and conversational forms are the same conversation, as athanor finetune templates it
    first = pairs[0]
    full, mask = encode_conversation([user, {"role": "assistant", "content": "A mutable sequence."}], tok)
    assert (first.chosen_ids, first.chosen_mask) == (full, mask)
    for p in pairs[1:4]:
        assert (p.chosen_ids, p.rejected_ids, p.rejected_mask) == (first.chosen_ids, first.rejected_ids,
                                                                     first.rejected_mask)
    assert _answer(tok, first.chosen_ids, first.chosen_mask) == "A mutable sequence."
    assert _answer(tok, first.rejected_ids, first.rejected_mask) == "A white rabbit."
    # a multi-turn prompt: its assistant turn is context, only the final answer is trained on
    last = pairs[4]
    assert _answer(tok, last.chosen_ids, last.chosen_mask) == "Yes."
    assert _answer(tok, last.rejected_ids, last.rejected_mask) == "No."
    assert last.chosen_ids.count(tok.eos_id) == 2 and sum(last.chosen_mask) == len(tok.encode(["Yes."])[0]) + 1
    context = tok.decode([i for i, m in zip(last.chosen_ids, last.chosen_mask) if not m])
    assert context == ("System: Answer briefly.\n\nUser: What is a list?\n\nAssistant: A sequence. User: "
                       "Is it mutable?\n\nAssistant:")


def test_bad_rows_are_named_drops(tok, tmp_path):
    user = {"role": "user", "content": "Why?"}
    path = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "What is a tuple?", "chosen": "An immutable sequence.", "rejected": "A kind of cake."},  # kept
        b"not json", b"[1, 2]",  # bad_json x2
        b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}',  # undecodable
        {"prompt": "Why?", "chosen": "Because."},  # missing_field
        {"prompt": 3, "chosen": "a", "rejected": "b"},  # missing_field
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},  # bad_messages
        {"prompt": [user, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},  # ends assistant
        {"prompt": [user], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},  # bad_messages
        {"chosen": [user, {"role": "assistant", "content": "a"}],  # implicit prompts that differ: bad_messages
         "rejected": [{"role": "user", "content": "How?"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "Why?", "chosen": "  ", "rejected": "Because."},  # empty_completion
        {"prompt": [user], "chosen": "Because.", "rejected": [{"role": "assistant", "content": ""}]},  # empty
        {"prompt": "Why?", "chosen": "Because.", "rejected": " Because.\n"},  # identical_pair
        {"prompt": "word " * 400, "chosen": "Yes.", "rejected": "No."},  # prompt_too_long
        {"prompt": "Why?", "chosen": "Yes.", "rejected": "word " * 400},  # too_long (one side)
        b"",
        {"prompt": "Who?", "chosen": [{"role": "assistant", "content": "Alice."}], "rejected": "The Queen."},  # kept
    ])
    pairs, dropped = read_pairs(path, tok, 128)
    assert [p.line for p in pairs] == [1, 17]
    assert dropped == {"bad_json": 2, "undecodable": 1, "missing_field": 2, "bad_messages": 4, "empty_completion": 2,
                       "identical_pair": 1, "prompt_too_long": 1, "too_long": 1}


def _config(seq_len=256, **dpo) -> AthanorConfig:
    return AthanorConfig(run=RunConfig(seed=7), dpo=DPOConfig(seq_len=seq_len, **dpo))


def test_pack_pairs_writes_chosen_then_rejected_rows_in_whole_pair_shards(tok, sp_model, faq_pairs,  # noqa: F811
                                                                            tmp_path):
    train = str(faq_pairs / "python_faq.train.jsonl")
    cfg = _config(train_files=[train], val_fraction=0.25, shard_sequences=5)  # odd: shards hold 4 rows
    manifest = pack_pairs(cfg, tmp_path / "dpo", sp_model)
    pairs, dropped = read_pairs(train, tok, cfg.dpo.seq_len + 1)
    expected = {s: [p for p in pairs if split_of(p, train, 0.25, 7) == s] for s in ("train", "val")}
    assert expected["train"] and expected["val"] and dropped  # the FAQ's long answers do not all fit 256 tokens
    assert manifest["documents"] == {"in": len(pairs) + sum(dropped.values()), "kept": len(pairs),
                                     "dropped": dict(sorted(dropped.items()))}
    assert manifest["documents"]["in"] == 148 and manifest["rows"] == ROW_LAYOUT
    assert manifest["pairs"] == {s: len(expected[s]) for s in ("train", "val")}
    assert manifest["seq_len"] == 256 and manifest["config"]["dpo"]["beta"] == cfg.dpo.beta
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["sequences"] == 2 * len(expected[split]) == entry["documents"]
        assert all(s["sequences"] % 2 == 0 and s["sequences"] <= 4 for s in entry["shards"])
        shards = TokenShards(tmp_path / "dpo", split)
        assert shards.has_loss_mask and len(shards) == 2 * len(expected[split])
        for i, p in enumerate(expected[split]):
            for row, ids, mask in ((2 * i, p.chosen_ids, p.chosen_mask), (2 * i + 1, p.rejected_ids, p.rejected_mask)):
                window, loss = shards[row], shards.loss_mask(row)
                assert window.tolist() == ids + [tok.pad_id] * (257 - len(ids))
                assert loss.tolist() == mask + [0] * (257 - len(mask))
                assert shards.doc_starts(row).tolist() == [0]
    # the chosen row of a pair holds its own FAQ answer, the rejected one another question's
    records = [json.loads(line) for line in open(train)]
    shards = TokenShards(tmp_path / "dpo", "train")
    p = expected["train"][0]
    record = records[p.line - 1]
    assert _answer(tok, shards[0].tolist(), shards.loss_mask(0).tolist()) == record["chosen"].strip()
    assert _answer(tok, shards[1].tolist(), shards.loss_mask(1).tolist()) == record["rejected"].strip()
    # deterministic: the same config writes the same shards; val_files send every pair of theirs to val
    assert pack_pairs(cfg, tmp_path / "again", sp_model)["fingerprint"] == manifest["fingerprint"]
    heldout = str(faq_pairs / "python_faq.heldout.jsonl")
    both = pack_pairs(_config(train_files=[train], val_files=[heldout]), tmp_path / "both", sp_model)
    assert both["pairs"] == {"train": len(pairs), "val": len(read_pairs(heldout, tok, 257)[0])}
    assert both["documents"]["in"] == 148 + 27


def test_pack_pairs_names_a_missing_file_and_refuses_no_usable_pair(sp_model, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="dpo.train_files"):
        pack_pairs(_config(train_files=[str(tmp_path / "nope.jsonl")]), tmp_path / "dpo", sp_model)
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "Why?", "chosen": "Same.", "rejected": "Same."}])
    with pytest.raises(ValueError, match="identical_pair"):
        pack_pairs(_config(train_files=[bad]), tmp_path / "dpo", sp_model)


def test_build_preferences_is_deterministic_and_rejects_another_questions_answer(data_dir, faq_pairs, tmp_path):
    again = tmp_path / "again"
    summary = build_preferences.build(data_dir, again)
    for name in ("python_faq.train.jsonl", "python_faq.heldout.jsonl", "SOURCES.json"):
        assert (again / name).read_bytes() == (faq_pairs / name).read_bytes()
    assert summary["pairs"] == {"train": 148, "heldout": 27}
    for split in ("train", "heldout"):
        source = [json.loads(line) for line in (data_dir / "instructions" / f"python_faq.{split}.jsonl").open()]
        pairs = [json.loads(line) for line in (faq_pairs / f"python_faq.{split}.jsonl").open()]
        assert [(p["prompt"], p["chosen"]) for p in pairs] == [(r["prompt"], r["response"]) for r in source]
        answers_of = {}
        for r in source:
            answers_of.setdefault(r["response"], set()).add(r["prompt"])
        for p in pairs:
            # the rejected answer is a real answer of the same file, to a different question, and not the chosen one
            assert p["rejected"] in answers_of and p["prompt"] not in answers_of[p["rejected"]]
            assert p["rejected_prompt"] in answers_of[p["rejected"]] and p["rejected"].strip() != p["chosen"].strip()
        # every answer is rejected exactly once, so its text alone says nothing about which side it is on
        assert Counter(p["rejected"] for p in pairs) == Counter(p["chosen"] for p in pairs)
        stats = summary["length"][split]
        assert stats["chosen_words"]["mean"] == stats["rejected_words"]["mean"]
        assert abs(stats["chosen_longer_fraction"] - stats["rejected_longer_fraction"]) < 0.1
