"""Preference pairs written by people: each Python FAQ question with its own answer (chosen) and the answer to a
different FAQ question (rejected).

    python scripts/build_preferences.py --data data   # -> data/preferences/python_faq.{train,heldout}.jsonl

Input: data/instructions/python_faq.{train,heldout}.jsonl, the human-written question/answer pairs that
scripts/build_instructions.py takes from Debian's python3.11-doc (PSF License); built first if missing.

Construction. For question i of a file, `chosen` is its own FAQ answer and `rejected` the answer to another
question of the SAME file (train pairs never see held-out text, nor the reverse), its length neighbour: the
questions, sorted by the length of their answers in words (ties broken by a seeded hash of the question), are
paired off in that order, and the two questions of a pair swap answers (with an odd count the last three rotate:
a takes b's answer, b c's, c a's). Two questions with the same text (the FAQ asks "What is Python?" twice) or the
same answer are never paired (a trailing three that would be takes its nearest allowed answer instead; it does not
happen on the FAQ). So every human answer is chosen exactly once and rejected exactly once, paired with
an answer of about its length: neither which text it is nor how long it is tells chosen from rejected, only
whether it answers the question does. SOURCES.json reports the length statistics (mean and median words, the share
of pairs whose chosen side is the longer and the shorter, the mean |log length ratio|).

Why this construction:
  * real text on both sides: every token the model is pushed towards or away from was written by a person;
  * no model needed: it can be built before any fine-tuning, in a second, offline, and the data is the same on
    every machine (the tests rely on it);
  * a clear, unambiguous preference: an on-topic answer over a fluent, real, well-formed but off-topic one, which
    is exactly what a DPO run has to learn first (reward accuracy and margins on held-out pairs should rise fast,
    which makes it a good check that the trainer works). It is an easy preference: it teaches relevance, not which
    of two on-topic answers is better.
The alternative the issue names, SPIN (Chen et al. 2024): rejected = the fine-tuned model's own sampled answer to
the question. That gives harder, on-policy negatives but needs a fine-tuned model first (and its samples change
with every model), so it belongs after `athanor finetune`, not in data setup; sampling the fine-tuned model's
answers to these files' prompts would give it in the same JSONL format (rejected = the sample).

Each line: {"prompt", "chosen", "rejected", "source" (chosen's FAQ page), "rejected_prompt" (the question the
rejected answer belongs to), "rejected_source"}. Idempotent and deterministic: same inputs and seed, same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

SEED = 0
SPLITS = ("train", "heldout")


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _clash(records: list[dict], i: int, j: int) -> bool:
    """i and j cannot reject each other: the same question text, or answers that are the same text."""
    a, b = records[i], records[j]
    return a["prompt"].strip() == b["prompt"].strip() or a["response"].strip() == b["response"].strip()


def assign_rejected(records: list[dict], seed: int = SEED) -> list[int]:
    """For each question i, the index of the question whose answer is i's rejected one (see the module docstring):
    length neighbours paired off in order swap answers; a trailing three rotate."""
    order = sorted(range(len(records)), key=lambda i: (_words(records[i]["response"]),
                                                       _hash(seed, records[i]["prompt"])))
    rejected: dict[int, int] = {}
    while len(order) >= 2:
        if len(order) == 3 and not any(_clash(records, order[k], order[k - 1]) for k in range(3)):
            a, b, c = order
            rejected.update({a: b, b: c, c: a})
            order = []
            break
        a = order.pop(0)
        b = next((j for j in order if not _clash(records, a, j)), None)
        if b is None:
            raise ValueError(f"no other question's answer to reject for {records[a]['prompt']!r}")
        order.remove(b)
        rejected.update({a: b, b: a})
    for a in order:  # one left over (or a three that clashed): its nearest-in-length partner's answer
        rejected[a] = min((j for j in range(len(records)) if not _clash(records, a, j)),
                          key=lambda j: (abs(_words(records[j]["response"]) - _words(records[a]["response"])),
                                         _hash(seed, records[j]["prompt"])))
    return [rejected[i] for i in range(len(records))]


def pairs_of(records: list[dict], seed: int = SEED) -> list[dict]:
    out = []
    for r, j in zip(records, assign_rejected(records, seed)):
        out.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": records[j]["response"],
                    "source": r.get("source"), "rejected_prompt": records[j]["prompt"],
                    "rejected_source": records[j].get("source")})
    return out


def length_stats(pairs: list[dict]) -> dict:
    chosen = [_words(p["chosen"]) for p in pairs]
    rejected = [_words(p["rejected"]) for p in pairs]
    ratios = [abs(math.log(c / r)) for c, r in zip(chosen, rejected)]
    return {
        "chosen_words": {"mean": round(statistics.mean(chosen), 1), "median": statistics.median(chosen)},
        "rejected_words": {"mean": round(statistics.mean(rejected), 1), "median": statistics.median(rejected)},
        "chosen_longer_fraction": round(sum(c > r for c, r in zip(chosen, rejected)) / len(pairs), 3),
        "rejected_longer_fraction": round(sum(c < r for c, r in zip(chosen, rejected)) / len(pairs), 3),
        "mean_abs_log_length_ratio": round(statistics.mean(ratios), 3),
        "distinct_rejected_answers": len({p["rejected"] for p in pairs}),
    }


def build(data: Path, out: Path, seed: int = SEED) -> dict:
    instructions = data / "instructions"
    if not all((instructions / f"python_faq.{s}.jsonl").exists() for s in SPLITS):
        script = Path(__file__).resolve().parent / "build_instructions.py"
        subprocess.run([sys.executable, str(script), "--data", str(data)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "source": "data/instructions/python_faq.*.jsonl (scripts/build_instructions.py: Debian python3.11-doc, "
                  "PSF License)",
        "construction": "chosen = the question's own FAQ answer; rejected = the answer of its length neighbour in "
                        "the same file: questions sorted by answer words (ties by a seeded hash) are paired off in "
                        "order and swap answers (a trailing three rotate), so every answer is chosen once and "
                        "rejected once",
        "seed": seed, "pairs": {}, "length": {}, "files": {},
    }
    for split in SPLITS:
        src = instructions / f"python_faq.{split}.jsonl"
        records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = pairs_of(records, seed)
        path = out / f"python_faq.{split}.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        summary["pairs"][split] = len(pairs)
        summary["length"][split] = length_stats(pairs)
        summary["files"][split] = path.name  # beside SOURCES.json
    (out / "SOURCES.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--out", type=Path, default=None, help="default: DATA/preferences")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    print(json.dumps(build(args.data, args.out or args.data / "preferences", args.seed), indent=2))


if __name__ == "__main__":
    main()
