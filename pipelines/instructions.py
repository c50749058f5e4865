"""Instruction data for supervised fine-tuning: JSONL examples -> chat-templated token ids with a loss mask.

Input lines are `{"prompt": ..., "response": ...}` or `{"messages": [{"role": "system"|"user"|"assistant",
"content": ...}, ...]}`. The chat template uses the tokenizer's BOS and EOS and plain-text role markers (a
pretrained SentencePiece vocabulary has no chat tokens, and adding some would leave their embeddings untrained):

    <BOS>User: {user}\\n\\nAssistant: {assistant}<EOS><BOS>User: {user 2}\\n\\nAssistant: {assistant 2}<EOS>

A system message goes first, as `System: {system}\\n\\n` after the first BOS. Each part is encoded on its own and
the ids are concatenated, so the boundary between prompt and response is exact. Only the assistant's tokens and
the EOS after them are trained on (`mask` 1); everything a user or system wrote is context (`mask` 0).

Bad lines are named drops, as curation names them: `undecodable` (not UTF-8), `bad_json`, `missing_field` (no
prompt/response or messages), `empty_response`, `bad_messages` (roles out of order, no assistant turn last),
`too_long` (more tokens than a training window holds).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from athanor import storage
from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.pipelines.shards import MANIFEST_FORMAT, SPLITS, fingerprint, token_dtype, write_shard
from athanor.pipelines.tokenizer import Tokenizer
from athanor.storage import Location

USER, ASSISTANT, SYSTEM = "User: ", "\n\nAssistant:", "System: "
TURN_SEPARATOR = "\n\n"


@dataclass
class Example:
    line: int
    ids: list[int]
    mask: list[int]  # 1 where the token is a response token (or its EOS): predicted and trained on


def conversation(record: object) -> list[dict] | str:
    """The record's turns as [{role, content}], or the name of what is wrong with it."""
    if not isinstance(record, dict):
        return "bad_json"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                      and m.get("role") in ("system", "user", "assistant")
                                                      for m in messages):
            return "bad_messages"
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        return "missing_field"
    turns = [m for m in messages if m["role"] != "system"]
    if messages and messages[0]["role"] == "system":
        if any(m["role"] == "system" for m in messages[1:]):
            return "bad_messages"
    elif any(m["role"] == "system" for m in messages):
        return "bad_messages"
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or len(turns) % 2 or [m["role"] for m in turns] != expected:
        return "bad_messages"
    if any(not m["content"].strip() for m in turns[1::2]):
        return "empty_response"
    return messages


def encode_conversation(messages: list[dict], tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and its loss mask (see the module docstring)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"]
    ids: list[int] = []
    mask: list[int] = []
    for i in range(0, len(turns), 2):
        context = (f"{SYSTEM}{system}{TURN_SEPARATOR}" if system is not None and i == 0 else "")
        context += f"{USER}{turns[i]['content']}{ASSISTANT}"
        prompt_ids, response_ids = tok.encode([context, turns[i + 1]["content"]])
        ids += [tok.bos_id, *prompt_ids, *response_ids, tok.eos_id]
        mask += [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
    return ids, mask


def prompt_ids(prompt: str, tok: Tokenizer, system: str | None = None) -> list[int]:
    """What generation after fine-tuning is fed: the template up to where the assistant's answer begins."""
    context = (f"{SYSTEM}{system}{TURN_SEPARATOR}" if system else "") + f"{USER}{prompt}{ASSISTANT}"
    return [tok.bos_id, *tok.encode([context])[0]]


def read_examples(path: str | Path, tok: Tokenizer, max_tokens: int) -> tuple[list[Example], Counter]:
    """Every example of a JSONL file that fits in `max_tokens`, and the drops by reason (blank lines are skipped)."""
    examples, dropped = [], Counter()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            reason = None
            try:
                messages = conversation(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                reason = "undecodable"
            except ValueError:
                reason = "bad_json"
            else:
                if isinstance(messages, str):
                    reason = messages
                else:
                    ids, mask = encode_conversation(messages, tok)
                    if len(ids) > max_tokens:
                        reason = "too_long"
                    else:
                        examples.append(Example(number, ids, mask))
            if reason:
                dropped[reason] += 1
    return examples, dropped


def pack(examples: list[Example], width: int, pad_id: int) -> Iterator[tuple[list[int], list[int], list[int]]]:
    """Windows of `width` tokens, each holding whole examples in file order (a new window when the next one does
    not fit), padded with PAD (mask 0): (tokens, mask, example start positions)."""
    tokens: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    for ex in examples:
        if len(tokens) + len(ex.ids) > width:
            yield _padded(tokens, mask, starts, width, pad_id)
            tokens, mask, starts = [], [], []
        starts.append(len(tokens))
        tokens += ex.ids
        mask += ex.mask
    if tokens:
        yield _padded(tokens, mask, starts, width, pad_id)


def _padded(tokens, mask, starts, width, pad_id):
    pad = width - len(tokens)
    return tokens + [pad_id] * pad, mask + [0] * pad, starts


def counts(kept: int, dropped: Counter) -> dict:
    """in = kept + sum(dropped), as every curation stage reports it."""
    return {"in": kept + sum(dropped.values()), "kept": kept, "dropped": dict(sorted(dropped.items()))}


def split_of(example: Example, path: str, val_fraction: float, seed: int) -> str:
    """A seeded hash of (file, line) puts val_fraction of the examples into val, whatever else the file holds."""
    key = hashlib.sha256(f"{seed}:{path}:{example.line}".encode()).digest()
    return "val" if int.from_bytes(key[:8], "big") / 2**64 < val_fraction else "train"


def write_split(layout: RunLayout, split: str, windows: list[tuple[list[int], list[int], list[int]]],
                shard_sequences: int, dtype: np.dtype, examples: int) -> dict:
    """Windows (tokens, mask, example starts) as shards of `shard_sequences` rows under shards/<split>, in order;
    returns the split's manifest entry (`examples`: how many examples the windows hold)."""
    shards = []
    for n, first in enumerate(range(0, len(windows), shard_sequences)):
        part = windows[first : first + shard_sequences]
        tokens = np.asarray([w[0] for w in part], dtype=dtype)
        mask = np.asarray([w[1] for w in part], dtype=np.uint8)
        offsets = np.cumsum([0] + [len(w[2]) for w in part])
        starts = np.asarray([s for w in part for s in w[2]], dtype=np.int64)
        path = layout.shards(split) / f"shard-{n:05d}.arrow"
        entry = write_shard(path, tokens, offsets, starts, mask)
        entry["path"] = f"shards/{split}/{path.name}"
        entry["documents"] = len(starts)
        shards.append(entry)
    return {"sequences": sum(s["sequences"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "documents": examples, "response_tokens": int(sum(sum(w[1]) for w in windows)),
            "fingerprint": fingerprint([s["sha256"] for s in shards]), "shards": shards}


def read_splits(section, name: str, reader, tok: Tokenizer, seed: int, what: str) -> tuple[dict[str, list], Counter]:
    """The usable items of `<name>.train_files` and `val_files` by split (val_files, or else a seeded val_fraction
    of the train files), read by `reader(path, tok, max_tokens)`, and the drops by reason. `what` says what a line
    holds, for the errors."""
    if not section.train_files:
        raise ValueError(f"{name}.train_files: name at least one JSONL file of {what}")
    for field in ("train_files", "val_files"):
        for path in getattr(section, field):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name}.{field}: no such file: {path}")
    items: dict[str, list] = {"train": [], "val": []}
    dropped: Counter = Counter()
    for field, split in (("train_files", "train"), ("val_files", "val")):
        for path in getattr(section, field):
            found, bad = reader(path, tok, section.seq_len + 1)
            dropped += bad
            for item in found:
                fixed = split == "val" or section.val_files
                items[split if fixed else split_of(item, path, section.val_fraction, seed)].append(item)
    if not items["train"]:
        raise ValueError(f"{name}.train_files: nothing usable (dropped: {dict(dropped)})")
    return items, dropped


def clear_shards(layout: RunLayout) -> None:
    """A re-run must not leave stale shards beside new ones; the manifest goes first so no reader sees a mix."""
    storage.delete(layout.manifest)
    for split in SPLITS:
        storage.makedirs(layout.shards(split))
        for old in storage.glob(layout.shards(split), "*.arrow"):
            storage.delete(old)


def write_manifest(layout: RunLayout, tok: Tokenizer, seq_len: int, dtype: np.dtype, splits: dict, **fields) -> dict:
    """The shard manifest of a fine-tuning or preference data set (the pretraining format, the chat template named),
    with a copy of the tokenizer beside it; `fields` add config, documents and whatever the set reports."""
    storage.write_bytes(layout.tokenizer_model, storage.read_bytes(tok.path))
    manifest = {
        "format": MANIFEST_FORMAT, "seq_len": seq_len, "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id},
        "tokenizer": {"path": "tokenizer/" + layout.tokenizer_model.name, "sha256": tok.sha256},
        "template": "athanor-chat/1", "splits": splits,
        "fingerprint": fingerprint([s["sha256"] for split in SPLITS for s in splits[split]["shards"]]), **fields,
    }
    storage.write_text(layout.manifest, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def pack_instructions(cfg: AthanorConfig, root: Location, tokenizer_path: str | Path) -> dict:
    """Templated, masked examples of `finetune.train_files` (and val_files) packed into token shards under `root`,
    in the pretraining shard format plus a loss_mask column, with a manifest and a copy of the tokenizer; returns
    the manifest. Training windows hold as many whole examples as fit; validation windows one example each, so
    scoring them needs no document masking."""
    ft = cfg.finetune
    layout = RunLayout(root)
    tok = Tokenizer(tokenizer_path)
    width = ft.seq_len + 1
    chosen, dropped = read_splits(ft, "finetune", read_examples, tok, cfg.run.seed,
                                  "{prompt, response} or {messages}")
    clear_shards(layout)
    dtype = token_dtype(tok.vocab_size)
    splits = {
        "train": write_split(layout, "train", list(pack(chosen["train"], width, tok.pad_id)), ft.shard_sequences,
                             dtype, len(chosen["train"])),
        "val": write_split(layout, "val", [w for ex in chosen["val"] for w in pack([ex], width, tok.pad_id)],
                           ft.shard_sequences, dtype, len(chosen["val"])),
    }
    return write_manifest(layout, tok, ft.seq_len, dtype, splits,
                          config={"finetune": ft.model_dump(mode="json"), "seed": cfg.run.seed},
                          documents=counts(len(chosen["train"]) + len(chosen["val"]), dropped))
