"""`athanor eval`: loss, perplexity and bits per byte of a checkpoint, as Ray Data batch inference.

Two kinds of input become rows of token windows:
  - the run's packed validation shards: each sequence is one window, all of its seq_len targets scored (the same
    numbers as training's val_loss), its bytes counted from the tokenizer's per-token byte lengths;
  - any text (.txt: one document per file), JSONL or Parquet file: read by the curation reader (so a bad line is a
    named error, not a crash), each document scored as BOS + its tokens with strided sliding windows, its bytes
    counted from its UTF-8 text.
The windows go through `WindowScorer` actors (one model each); the driver sums nats, tokens and bytes per source.
Bits per byte = total nats / UTF-8 bytes / ln 2, which compares models with different tokenizers.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from athanor import storage
from athanor.config import AthanorConfig, DataConfig, EvalConfig
from athanor.layout import RunLayout
from athanor.model.scoring import bits_per_byte, perplexity, sliding_windows
from athanor.pipelines.tokenizer import Tokenizer

from .inference import ModelSource, WindowScorer, describe, map_with_model

log = logging.getLogger("athanor")

WINDOW_SCHEMA = pa.schema([
    ("source", pa.string()), ("doc_id", pa.string()), ("tokens", pa.list_(pa.int32())), ("n_scored", pa.int64()),
    ("bytes", pa.int64()), ("error", pa.string()),
])
VAL_SOURCE = "val"
SUFFIX_KINDS = {".txt": "text_files", ".text": "text_files", ".md": "text_files", ".jsonl": "jsonl_files",
                ".json": "jsonl_files", ".ndjson": "jsonl_files", ".parquet": "parquet_files"}


def input_kind(path: str) -> str:
    """The DataConfig field a file belongs to, by suffix (.gz ignored); a ValueError names an unknown one."""
    name = path[:-3] if path.endswith(".gz") else path
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIX_KINDS:
        raise ValueError(f"eval input {path}: unknown kind '{suffix}'; use .txt (one document per file), "
                         ".jsonl or .parquet")
    return SUFFIX_KINDS[suffix]


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> tuple[Tokenizer, np.ndarray]:
    """One tokenizer (and its per-token byte lengths) per worker process, however many batches it serves."""
    tok = Tokenizer(path, num_threads=1)
    return tok, tok.byte_lengths()


@functools.lru_cache(maxsize=2)
def _val_shards(workdir: str):
    from athanor.pipelines.shards import TokenShards

    return TokenShards(workdir, "val")


def document_windows(batch: pa.Table, tokenizer_path: str, context: int, stride: int) -> pa.Table:
    """Documents -> sliding windows of BOS + tokens (bytes on each document's first window); a dropped document ->
    one row with its reason in `error` and nothing to score."""
    tok, _ = _tokenizer(tokenizer_path)
    rows = []
    for source, doc_id, text, reason in zip(*(batch.column(c).to_pylist()
                                              for c in ("source", "doc_id", "text", "drop_reason"))):
        if reason is None and (text is None or not text.strip()):
            reason = "empty_text"
        if reason is not None:
            rows.append({"source": source, "doc_id": doc_id, "tokens": [], "n_scored": 0, "bytes": 0, "error": reason})
            continue
        ids = [tok.bos_id, *tok.encode([text])[0]]
        n_bytes = len(text.encode("utf-8"))
        for j, (window, n) in enumerate(sliding_windows(ids, context, stride)):
            rows.append({"source": source, "doc_id": doc_id, "tokens": window, "n_scored": n,
                         "bytes": n_bytes if j == 0 else 0, "error": None})
    return pa.Table.from_pylist(rows, schema=WINDOW_SCHEMA)


def shard_windows(batch: dict[str, np.ndarray], workdir: str, tokenizer_path: str) -> pa.Table:
    """Validation sequence indices -> their windows, every target scored, bytes from the tokenizer's byte lengths."""
    tok, byte_lengths = _tokenizer(tokenizer_path)
    shards = _val_shards(workdir)
    ids = [int(i) for i in batch["id"]]
    return pa.Table.from_pydict({
        "source": [VAL_SOURCE] * len(ids), "doc_id": [f"val:{i}" for i in ids],
        "tokens": [shards[i].astype(np.int32) for i in ids], "n_scored": [shards.seq_len] * len(ids),
        "bytes": [shards.target_bytes(i, byte_lengths, tok.adds_dummy_prefix) for i in ids],
        "error": [None] * len(ids),
    }, schema=WINDOW_SCHEMA)


def _val_windows(layout: RunLayout, source: ModelSource, context: int):
    import ray

    from athanor.pipelines.shards import TokenShards, read_manifest

    try:
        manifest = read_manifest(layout.root)
    except FileNotFoundError:
        return None
    n = manifest["splits"].get("val", {}).get("sequences", 0)
    if not n:
        return None
    if manifest["seq_len"] > context:
        raise ValueError(f"the validation shards hold windows of {manifest['seq_len']} tokens, longer than the "
                         f"model's context of {context}")
    if manifest["tokenizer"]["sha256"] != Tokenizer(source.tokenizer_path).sha256:
        raise ValueError(f"the run's shards were tokenized with another tokenizer than {source.directory}'s; "
                         "set eval.val_shards=false to score only eval.inputs")
    TokenShards(layout.root, "val")  # checks every shard against the manifest now, before Ray starts on it
    return ray.data.range(n).map_batches(shard_windows, fn_kwargs={
        "workdir": str(layout.root), "tokenizer_path": str(source.tokenizer_path)}, batch_format="numpy")


def _document_windows(cfg: AthanorConfig, inputs: list[str], source: ModelSource, context: int, stride: int):
    from athanor.pipelines.read import read_crawl

    fields: dict[str, list[str]] = {}
    for path in inputs:
        fields.setdefault(input_kind(path), []).append(path)
    data = DataConfig(**fields, text_field=cfg.data.text_field, id_field=cfg.data.id_field,
                      url_field=cfg.data.url_field, max_docs_per_source=cfg.eval.max_documents,
                      s3_endpoint_override=cfg.data.s3_endpoint_override)
    return read_crawl(data).map_batches(document_windows, fn_kwargs={
        "tokenizer_path": str(source.tokenizer_path), "context": context, "stride": stride}, batch_format="pyarrow")


def _check_room(e: EvalConfig) -> None:
    """The actor pool must leave a CPU for the read tasks, or Ray Data waits forever for one to free up."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = e.use_gpu if e.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if not gpus and e.actors * e.cpus_per_actor >= cpus and cpus:
        raise ValueError(f"eval.actors ({e.actors}) x eval.cpus_per_actor ({e.cpus_per_actor}) takes all "
                         f"{cpus:g} CPUs of the Ray cluster and leaves none to read the inputs; lower one")


def _summaries(results, labels: dict[str, str]) -> list[dict]:
    """Per source: documents, windows, tokens, bytes, loss, perplexity, bits per byte and errors by reason."""
    out = []
    for source, group in results.groupby("source", sort=True):
        ok = group[group["error"].isna()]
        nats, tokens, n_bytes = float(-ok["logprob"].sum()), int(ok["n_scored"].sum()), int(ok["bytes"].sum())
        errors = group[group["error"].notna()]["error"].value_counts().to_dict()
        out.append({
            "source": labels.get(source, source), "path": source, "documents": int(ok["doc_id"].nunique()),
            "windows": len(ok), "tokens": tokens, "bytes": n_bytes, "nats": nats,
            "loss": nats / tokens if tokens else math.nan, "perplexity": perplexity(nats, tokens),
            "bits_per_byte": bits_per_byte(nats, n_bytes),
            "errors": {str(k): int(v) for k, v in errors.items()},
        })
    return out


def _labels(inputs: list[str]) -> dict[str, str]:
    """Short metric names per input file: its stem, numbered when two files share one."""
    labels, seen = {}, {}
    for path in inputs:
        stem = Path(path[:-3] if path.endswith(".gz") else path).stem
        n = seen[stem] = seen.get(stem, 0) + 1
        labels[path] = stem if n == 1 else f"{stem}_{n}"
    return labels


def evaluate(cfg: AthanorConfig, checkpoint: str | None = None, inputs: list[str] | None = None) -> dict:
    """Score the checkpoint (default: the run's newest) on the run's validation shards and the given inputs;
    write eval/<name>/{summary.json, documents.parquet} under the workdir and return the summary."""
    e: EvalConfig = cfg.eval
    layout = RunLayout.from_workdir(cfg.run.workdir)
    source = describe(checkpoint or str(layout.checkpoints))
    context = e.context or source.context
    stride = min(e.stride or context, context)
    inputs = [*e.inputs, *(inputs or [])]
    for path in inputs:
        input_kind(path)  # an unknown kind fails before Ray starts work
    parts = [d for d in ([_val_windows(layout, source, context)] if e.val_shards else []) if d is not None]
    if inputs:
        parts.append(_document_windows(cfg, inputs, source, context, stride))
    if not parts:
        raise ValueError("nothing to evaluate: the run has no validation shards and no eval inputs were given "
                         "(pass files with --input or set eval.inputs)")
    _check_room(e)
    windows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    scored = map_with_model(windows, WindowScorer, str(source.directory), actors=e.actors, cpus=e.cpus_per_actor,
                            batch_rows=e.batch_size * 4, use_gpu=e.use_gpu, batch_size=e.batch_size)
    results = scored.select_columns(["source", "doc_id", "n_scored", "bytes", "logprob", "error"]).to_pandas()
    labels = {VAL_SOURCE: VAL_SOURCE, **_labels(inputs)}
    summary = {"checkpoint": str(source.directory), "step": source.step, "context": context, "stride": stride,
               "sources": _summaries(results, labels)}
    documents = (results.groupby(["source", "doc_id"], sort=True)
                 .agg(windows=("n_scored", "size"), tokens=("n_scored", "sum"), bytes=("bytes", "sum"),
                      logprob=("logprob", "sum"), error=("error", "first")).reset_index())
    out = layout.root / "eval" / (e.run_name or "checkpoint")
    buf = io.BytesIO()
    documents.to_parquet(buf, index=False)
    storage.write_bytes(out / "documents.parquet", buf.getvalue())
    storage.write_text(out / "summary.json", json.dumps(summary, indent=1))
    summary["output"] = str(out)
    return summary


def log_to_mlflow(cfg: AthanorConfig, summary: dict) -> str:
    """Metrics val/<source>/{loss, perplexity, bits_per_byte} at the checkpoint's step, the per-source table and
    the summary as artifacts: in the training run, or in a run named eval.run_name tagged with the training run."""
    import mlflow
    import pandas as pd

    from . import tracking

    layout = RunLayout.from_workdir(cfg.run.workdir)
    train_run = tracking.resolve_run(cfg, layout)
    run_id = train_run
    if cfg.eval.run_name:
        run_id = tracking.resolve_run(cfg, layout, cfg.eval.run_name,
                                      tags={"athanor.eval_of": train_run, "athanor.checkpoint": summary["checkpoint"]})
    metrics = {f"val/{s['source']}/{k}": s[k] for s in summary["sources"]
               for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents")
               if not (isinstance(s[k], float) and math.isnan(s[k]))}
    table = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in s.items()}
                          for s in summary["sources"]])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics, step=summary["step"] or 0)
        mlflow.log_table(table, artifact_file=f"eval/{cfg.eval.run_name or 'checkpoint'}/per_source.json")
        mlflow.log_dict(summary, f"eval/{cfg.eval.run_name or 'checkpoint'}/summary.json")
    return run_id


def format_summary(summary: dict) -> str:
    lines = [f"{'source':<24}{'docs':>7}{'tokens':>10}{'bytes':>11}{'loss':>8}{'ppl':>10}{'bpb':>7}  errors"]
    for s in summary["sources"]:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"
        lines.append(f"{s['source'][:23]:<24}{s['documents']:>7}{s['tokens']:>10}{s['bytes']:>11}{s['loss']:>8.4f}"
                     f"{s['perplexity']:>10.2f}{s['bits_per_byte']:>7.3f}  {errors}")
    return "\n".join(lines)
