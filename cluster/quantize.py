"""`athanor quantize`: a checkpoint's block projections to int8 / int4 (round-to-nearest, GPTQ or AWQ), measured.

The driver loads the full-precision model once, draws calibration sequences from the run's own training shards
(GPTQ and AWQ need activations; RTN does not), quantizes in this process (model/quantize.py, block by block), and
writes an HF folder in the compressed-tensors layout (model/quant_export.py) that transformers loads and that
`athanor eval`, `athanor generate` and the lm-eval adapter load like any model. Then it scores the full-precision
and the quantized model on the run's validation shards through the same Ray Data path as `athanor eval`, and logs
method, bits, group size, perplexity and bits per byte before and after, and the size on disk, to the model's
training run in MLflow under quantize/<tag>/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from athanor import storage
from athanor.config import AthanorConfig, QuantizeConfig
from athanor.layout import RunLayout
from athanor.pipelines.tokenizer import Tokenizer

from .inference import ModelSource, describe, load_weights


def spec_for(q: QuantizeConfig):
    """The QuantSpec a config asks for (errors name the quantize.* field)."""
    from athanor.model.quantize import PER_CHANNEL, QuantSpec

    group = PER_CHANNEL if q.group_size == -1 else q.group_size
    return QuantSpec.for_method(q.method, bits=q.bits, group_size=group, damp=q.damp, act_order=q.act_order)


def tag_of(spec) -> str:
    """A folder and metric name per setting: int8-w8-channel, gptq-w4-g128, ..."""
    group = f"g{spec.group_size}" if spec.group_size else "channel"
    return f"{spec.method}-w{spec.bits}-{group}"


def calibration_tokens(cfg: AthanorConfig, source: ModelSource, n: int) -> torch.Tensor:
    """`n` training windows [n, seq_len] of the run named by quantize.calibration_from (default: this run), drawn
    without replacement by a generator seeded with run.seed, so the same command calibrates on the same text."""
    from athanor.pipelines.shards import TokenShards, read_manifest

    root = RunLayout.from_workdir(cfg.quantize.calibration_from or cfg.run.workdir).root
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        raise ValueError(f"no calibration data: {root} has no tokenized shards (manifest.json); run `athanor "
                         "tokenize` there, or set quantize.calibration_from to a run workdir that has them") from None
    if manifest["tokenizer"]["sha256"] != Tokenizer(source.tokenizer_path).sha256:
        raise ValueError(f"the shards under {root} were tokenized with another tokenizer than {source.directory}'s; "
                         "set quantize.calibration_from to the run the model was trained on")
    shards = TokenShards(root, "train")
    if len(shards) == 0:
        raise ValueError(f"no calibration data: {root}'s train split is empty")
    rng = np.random.Generator(np.random.PCG64(cfg.run.seed))
    ids = np.sort(rng.choice(len(shards), size=min(n, len(shards)), replace=False))
    return torch.from_numpy(np.stack([shards[int(i)] for i in ids]).astype(np.int64))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's saved tensors, each once (a tied head shares the embedding's)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files alone (what quantization shrinks; the tokenizer and configs are the same)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def quantize(cfg: AthanorConfig, checkpoint: str | None = None) -> dict:
    """Quantize the checkpoint (default: the run's newest) and write the folder; returns what was done (no eval)."""
    from athanor.model.quant_export import save_quantized
    from athanor.model.quantize import check_quantizable, quantize_model

    q = cfg.quantize
    spec = spec_for(q)
    layout = RunLayout.from_workdir(cfg.run.workdir)
    source = describe(checkpoint or str(layout.checkpoints))
    calibration = calibration_tokens(cfg, source, q.calibration) if spec.needs_calibration else None
    model, _ = load_weights(source)
    check_quantizable(model, spec, q.include_head)  # before any work is written
    if not q.output and layout.remote:
        raise ValueError(f"run.workdir is {layout.root}: set quantize.output to a local folder (a quantized model "
                         "is written and loaded as a local Hugging Face folder)")
    out = Path(q.output) if q.output else layout.root / "quantized" / tag_of(spec)
    full_precision_bytes = tensor_bytes(model)  # before quantization: what `athanor export` writes, less headers
    layers = quantize_model(model, spec, calibration, include_head=q.include_head)
    metadata = {
        "method": spec.method, "bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
        "act_order": spec.act_order if spec.method == "gptq" else None, "include_head": q.include_head,
        "source": str(source.directory), "step": source.step, "seq_len": source.context,
        "calibration": None if calibration is None else {
            "sequences": len(calibration), "seq_len": calibration.shape[1],
            "from": str(RunLayout.from_workdir(q.calibration_from or cfg.run.workdir).root), "seed": cfg.run.seed},
    }
    storage.delete_tree(out)
    save_quantized(model, source.tokenizer_path, out, metadata)
    summary = {**metadata, "tag": tag_of(spec), "output": str(out), "layers": layers,
               "bytes": weight_bytes(out), "full_precision_bytes": full_precision_bytes}
    return summary


def measure(cfg: AthanorConfig, summary: dict) -> dict:
    """Perplexity and bits per byte of the full-precision and the quantized model on the validation shards."""
    from .evaluate import VAL_SOURCE, evaluate

    e = cfg.eval.model_copy(update={"inputs": [], "val_shards": True})
    for side, path in (("full_precision", summary["source"]), ("quantized", summary["output"])):
        e = e.model_copy(update={"run_name": f"quantize-{summary['tag']}-{side}"})
        found = evaluate(cfg.model_copy(update={"eval": e}), path)
        [val] = [s for s in found["sources"] if s["source"] == VAL_SOURCE]
        summary[side] = {k: val[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes")}
    fp, qz = summary["full_precision"], summary["quantized"]
    summary["perplexity_change"] = qz["perplexity"] / fp["perplexity"] - 1
    summary["bits_per_byte_change"] = qz["bits_per_byte"] - fp["bits_per_byte"]
    return summary


def log_to_mlflow(cfg: AthanorConfig, summary: dict) -> str:
    """In the model's training run: quantize/<tag>/{method, bits, group_size} as params; perplexity and bits per
    byte before and after, their change, and sizes as metrics val/quantized/<tag>/* at the checkpoint's step (under
    val/, after the training curves: see athanor.cluster.tracking); the summary as quantize/<tag>/summary.json."""
    import mlflow

    from . import tracking

    run_id = tracking.resolve_run(cfg, RunLayout.from_workdir(cfg.run.workdir))
    prefix = f"quantize/{summary['tag']}"
    mprefix = f"val/quantized/{summary['tag']}"
    metrics = {f"{mprefix}/size_mb": summary["bytes"] / 2**20,
               f"{mprefix}/size_ratio": summary["bytes"] / summary["full_precision_bytes"]}
    for side in ("full_precision", "quantized"):
        for k in ("perplexity", "bits_per_byte"):
            if side in summary and not math.isnan(summary[side][k]):
                metrics[f"{mprefix}/{side}_{k}"] = summary[side][k]
    if "perplexity_change" in summary:
        metrics[f"{mprefix}/perplexity_change"] = summary["perplexity_change"]
        metrics[f"{mprefix}/bits_per_byte_change"] = summary["bits_per_byte_change"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params({f"{prefix}/method": summary["method"], f"{prefix}/bits": summary["bits"],
                           f"{prefix}/group_size": summary["group_size"] or "channel"})
        mlflow.log_metrics(metrics, step=summary["step"] or 0)
        mlflow.log_dict(summary, f"{prefix}/summary.json")
    return run_id


def format_summary(summary: dict) -> str:
    lines = [f"{summary['tag']}: {summary['output']}",
             f"  weights {summary['bytes'] / 2**20:.2f} MiB (full precision {summary['full_precision_bytes'] / 2**20:.2f}"
             f" MiB, {summary['bytes'] / summary['full_precision_bytes']:.2f}x)"]
    if "quantized" in summary:
        fp, qz = summary["full_precision"], summary["quantized"]
        lines.append(f"  validation perplexity {fp['perplexity']:.3f} -> {qz['perplexity']:.3f} "
                     f"({summary['perplexity_change']:+.2%}), bits per byte {fp['bits_per_byte']:.4f} -> "
                     f"{qz['bits_per_byte']:.4f}")
    return "\n".join(lines)


def write_summary(summary: dict) -> Path:
    path = Path(summary["output"]) / "athanor_quantization_report.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path
