"""`athanor generate --input prompts.jsonl --output out.jsonl`: many prompts through the `TextGenerator` actor pool.

Each input line is a JSON object with a `prompt` and, optionally, an `id` and per-prompt settings (any of
`inference.GENERATION_DEFAULTS`: max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams,
length_penalty, early_stopping, stop, seed). A line that is not UTF-8, not JSON, not an object, or has no string
prompt becomes an output line with an `error` naming the reason and the line number; so does a prompt longer than
the model's context. Every input line has exactly one output line, in input order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .inference import GENERATION_DEFAULTS, TextGenerator, map_with_model

OUTPUT_FIELDS = ("line", "id", "prompt", "completion", "finish_reason", "tokens_generated", "error")


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """One row per non-blank line: its number (1-based), prompt, settings, or an `error`."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row: dict[str, Any] = {"line": number, "id": None, "prompt": None, "error": None}
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                row["error"] = "undecodable: not UTF-8"
            except ValueError as err:
                row["error"] = f"bad_json: {err}"
            else:
                if not isinstance(record, dict):
                    row["error"] = "bad_json: not an object"
                elif not isinstance(record.get("prompt"), str):
                    row["error"] = "missing_prompt: no string field 'prompt'"
                elif not record["prompt"].strip():
                    row["error"] = "empty_prompt"
                else:
                    row["prompt"] = record["prompt"]
                    row["id"] = None if record.get("id") is None else str(record["id"])
                    row.update({k: record[k] for k in GENERATION_DEFAULTS if k in record})
            if row["error"]:
                row["error"] = f"{row['error']} ({path}:{number})"
            rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[dict]:
    """The same keys in every row (Ray Data infers one schema per block); per-prompt settings stay None if unset,
    and stop lists are JSON so a column never mixes strings and lists."""
    keys = [k for k in GENERATION_DEFAULTS if any(k in r for r in rows)]
    out = []
    for r in rows:
        row = {k: r.get(k) for k in ("line", "id", "prompt", "error")}
        for k in keys:
            v = r.get(k)
            row[k] = json.dumps(v) if k == "stop" and v is not None else v
        out.append(row)
    return out


def generate_file(checkpoint: str, input_path: str, output_path: str, settings: dict[str, Any], *, actors: int = 1,
                  batch_rows: int = 32, cpus: int = 1, use_gpu: bool | None = None) -> dict[str, int]:
    """Generate for every prompt of `input_path` into `output_path` (JSONL); returns counts by outcome."""
    import ray

    rows = read_prompts(input_path)
    if not rows:
        raise ValueError(f"{input_path}: no prompts (the file is empty)")
    ds = ray.data.from_items(_columns(rows))
    out = map_with_model(ds, TextGenerator, checkpoint, actors=actors, batch_rows=batch_rows, cpus=cpus,
                         use_gpu=use_gpu, defaults=settings)
    results = sorted(out.select_columns(list(OUTPUT_FIELDS)).take_all(), key=lambda r: r["line"])
    counts: dict[str, int] = {}
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w") as f:
        for r in results:
            key = "error" if r["error"] else r["finish_reason"]
            counts[key] = counts.get(key, 0) + 1
            record = {k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in OUTPUT_FIELDS}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return counts
