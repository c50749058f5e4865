"""Preference pairs for DPO: JSONL {prompt, chosen, rejected} -> two chat-templated, masked token rows per pair.

Input lines take either form:

    {"prompt": "question", "chosen": "better answer", "rejected": "worse answer"}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}, ..., {"role": "user", ...}],     (TRL's conversational
     "chosen": [{"role": "assistant", "content": ...}] or str, "rejected": the same}              form)

and, as TRL also accepts, the implicit-prompt form {"chosen": [messages], "rejected": [messages]} whose two
conversations differ only in their last (assistant) turn. Other fields are ignored. The conversational prompt
follows `instructions.conversation`'s rules: a system message first if any, then user/assistant turns ending with
a user turn.

Each side is the whole conversation, prompt turns plus that answer, encoded with `instructions.encode_conversation`
(the template `athanor finetune` trains on), so the chosen and rejected rows share their prompt tokens exactly and
differ from the answer on. The mask is 1 on the final answer's tokens and its EOS only: assistant turns inside a
multi-turn prompt are context here (the same tokens on both sides, they would cancel in DPO's log-ratio difference
anyway, but not under length normalisation).

Bad lines are named drops: `undecodable` (not UTF-8), `bad_json` (not JSON, or not an object), `missing_field` (no
prompt/chosen/rejected, or not a string or list), `bad_messages` (turns out of order, a prompt not ending with a
user turn, an answer list that is not one assistant message, implicit-prompt conversations with different prompts),
`empty_completion` (either answer blank), `identical_pair` (chosen equals rejected after stripping whitespace: no
preference to learn), `prompt_too_long` (the prompt's tokens alone fill the window: no room for any answer),
`too_long` (either side, prompt plus answer plus EOS, longer than the window).

`pack_pairs` writes the pairs in the fine-tuning shard format (tokens, doc_starts, loss_mask), ONE example per
window padded with PAD, row 2i = pair i's chosen and row 2i+1 = its rejected, shards split at pair boundaries.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.pipelines.instructions import (clear_shards, conversation, counts, encode_conversation, pack,
                                            read_splits, write_manifest, write_split)
from athanor.pipelines.shards import SPLITS, token_dtype
from athanor.pipelines.tokenizer import Tokenizer
from athanor.storage import Location

ROW_LAYOUT = "pairs/1"  # manifest "rows": row 2i is pair i's chosen answer, row 2i+1 its rejected one


@dataclass
class Pair:
    line: int
    chosen_ids: list[int]
    chosen_mask: list[int]  # 1 on the chosen answer's tokens and its EOS
    rejected_ids: list[int]
    rejected_mask: list[int]

    @property
    def prompt_length(self) -> int:
        """Tokens before the answer (the same on both sides)."""
        return self.chosen_mask.index(1)


def _answer(value: object) -> str:
    """An answer's text; raises ValueError with the drop reason."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if (len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant"
                and isinstance(value[0].get("content"), str)):
            return value[0]["content"]
        raise ValueError("bad_messages")
    raise ValueError("missing_field")


def preference(record: object) -> tuple[list[dict], str, str] | str:
    """(prompt messages, chosen text, rejected text), or the name of what is wrong with the record."""
    if not isinstance(record, dict):
        return "bad_json"
    if "chosen" not in record or "rejected" not in record:
        return "missing_field"
    chosen, rejected = record["chosen"], record["rejected"]
    try:
        if "prompt" not in record:  # implicit prompt: two whole conversations sharing all but the last turn
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                return "missing_field"
            if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
                return "bad_messages"
            prompt, chosen, rejected = chosen[:-1], _answer(chosen[-1:]), _answer(rejected[-1:])
        else:
            prompt = record["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            elif not isinstance(prompt, list):
                return "missing_field"
            chosen, rejected = _answer(chosen), _answer(rejected)
    except ValueError as err:
        return str(err)
    # the prompt's turns checked as instructions checks a conversation: one placeholder answer makes it whole
    checked = conversation({"messages": [*prompt, {"role": "assistant", "content": "."}]})
    if isinstance(checked, str):
        return "bad_messages"  # empty_response here is a blank assistant turn inside the prompt
    if not chosen.strip() or not rejected.strip():
        return "empty_completion"
    if chosen.strip() == rejected.strip():
        return "identical_pair"
    return prompt, chosen, rejected


def encode_side(prompt: list[dict], answer: str, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The templated conversation prompt + answer, masked on the answer's tokens and EOS only."""
    ids, mask = encode_conversation([*prompt, {"role": "assistant", "content": answer}], tok)
    context = len(mask) - mask[::-1].index(0)  # the final answer and its EOS: the trailing run of ones
    return ids, [0] * context + mask[context:]


def read_pairs(path: str | Path, tok: Tokenizer, max_tokens: int) -> tuple[list[Pair], Counter]:
    """Every pair of a JSONL file whose two sides fit in `max_tokens`, and the drops by reason (blank lines are
    skipped)."""
    pairs, dropped = [], Counter()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                parsed = preference(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                parsed = "undecodable"
            except ValueError:
                parsed = "bad_json"
            if isinstance(parsed, str):
                dropped[parsed] += 1
                continue
            prompt, chosen, rejected = parsed
            chosen_ids, chosen_mask = encode_side(prompt, chosen, tok)
            rejected_ids, rejected_mask = encode_side(prompt, rejected, tok)
            if chosen_mask.index(1) >= max_tokens:
                dropped["prompt_too_long"] += 1
            elif max(len(chosen_ids), len(rejected_ids)) > max_tokens:
                dropped["too_long"] += 1
            else:
                pairs.append(Pair(number, chosen_ids, chosen_mask, rejected_ids, rejected_mask))
    return pairs, dropped


def pair_windows(pairs: list[Pair], width: int, pad_id: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(tokens, mask, [0]) per row, padded to `width`: chosen then rejected for each pair."""
    windows = []
    for p in pairs:
        for ids, mask in ((p.chosen_ids, p.chosen_mask), (p.rejected_ids, p.rejected_mask)):
            windows += pack([_Side(ids, mask)], width, pad_id)
    return windows


@dataclass
class _Side:  # what instructions.pack reads of an example
    ids: list[int]
    mask: list[int]


def pack_pairs(cfg: AthanorConfig, root: Location, tokenizer_path: str | Path) -> dict:
    """The pairs of `dpo.train_files` (and val_files; none: a seeded val_fraction of the train pairs) as token shards
    under `root`: one example per window, row 2i chosen and 2i+1 rejected, shards holding whole pairs, with a
    manifest and a copy of the tokenizer; returns the manifest."""
    dpo = cfg.dpo
    layout = RunLayout(root)
    tok = Tokenizer(tokenizer_path)
    width = dpo.seq_len + 1
    kept, dropped = read_splits(dpo, "dpo", read_pairs, tok, cfg.run.seed, "{prompt, chosen, rejected}")
    clear_shards(layout)
    dtype = token_dtype(tok.vocab_size)
    rows_per_shard = max(2, dpo.shard_sequences - dpo.shard_sequences % 2)  # whole pairs in every shard
    splits = {}
    for split in SPLITS:
        windows = pair_windows(kept[split], width, tok.pad_id)
        splits[split] = write_split(layout, split, windows, rows_per_shard, dtype, len(windows))
        splits[split]["pairs"] = len(kept[split])
    return write_manifest(layout, tok, dpo.seq_len, dtype, splits,
                          config={"dpo": dpo.model_dump(mode="json"), "seed": cfg.run.seed},
                          documents=counts(len(kept["train"]) + len(kept["val"]), dropped),
                          rows=ROW_LAYOUT, pairs={split: len(kept[split]) for split in SPLITS})
