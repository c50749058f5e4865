"""`athanor`: the command line. Every subcommand takes a YAML config and `--set section.field=value` overrides.

    athanor run configs/demo.yaml                 curate -> tokenize -> train, one MLflow run
    athanor curate|tokenize|train CONFIG          one stage over the same working folder
    athanor finetune CONFIG                       fine-tune finetune.base on instruction data (LoRA or full)
    athanor dpo CONFIG                            align finetune.base with DPO on preference pairs
    athanor quality train CONFIG                  train the fastText quality classifier alone
    athanor eval CONFIG [--checkpoint PATH] [--input FILE]  loss, perplexity, bits per byte (Ray Data batch inference)
    athanor generate --checkpoint PATH --prompt "..."       continue one prompt (KV cache)
    athanor generate --checkpoint PATH --input P.jsonl --output OUT.jsonl   many prompts, batched, on Ray Data
    athanor lm-eval --model athanor --model_args checkpoint=PATH --tasks ...   lm-evaluation-harness on a checkpoint
    athanor quantize [CONFIG] --checkpoint PATH --method int8|int4|gptq|awq   weight-only quantization, measured
    athanor export --checkpoint PATH --format hf --out DIR  a LlamaForCausalLM folder for transformers
    athanor submit CONFIG --address http://HEAD:8265        the same run as a Ray job on a cluster
    athanor jobs status|logs|stop|list [JOB_ID]             follow and control submitted jobs

Every command takes -v/--verbose: Ray's and MLflow's INFO lines, hidden by default (see athanor/console.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from athanor import console
from athanor.config import ConfigError, load_config

from .stop import TrainingStopped


class UserError(Exception):
    """An error whose message is the whole story: printed without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--force", action="store_true", help="re-run stages even if their output is up to date")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="athanor", description="Raw web crawl to a trained language model on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "run every stage end to end"), ("curate", "curation only"),
                        ("tokenize", "tokenizer training and shard packing only"), ("train", "training only"),
                        ("finetune", "supervised fine-tuning (LoRA or full) of finetune.base on instruction data"),
                        ("dpo", "direct preference optimization of finetune.base on preference pairs")]:
        _add_config_args(sub.add_parser(name, help=help_))
    quality = sub.add_parser("quality", help="the fastText quality classifier")
    qsub = quality.add_subparsers(dest="quality_command", required=True)
    _add_config_args(qsub.add_parser("train", help="train it on the config's high/low sources and report P/R"))

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint (Ray Data batch inference)")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", default=None,
                    help="a checkpoint folder, a run workdir (newest checkpoint) or an HF Llama folder "
                         "(default: the config's run)")
    ev.add_argument("--input", dest="inputs", action="append", default=[], metavar="FILE",
                    help="also score this .txt (one document), .jsonl or .parquet file (repeatable)")

    gen = sub.add_parser("generate", help="continue prompts with a trained checkpoint or HF Llama folder")
    gen.add_argument("--checkpoint", required=True, help="a checkpoint folder, a run workdir (newest checkpoint) "
                                                         "or an HF Llama folder")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt, answered in this process")
    what.add_argument("--input", help="a JSONL file of {\"prompt\": ...} lines, answered by a Ray Data actor pool")
    gen.add_argument("--output", help="where --input's completions go (JSONL, one line per input line)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--num-beams", type=int, default=1, help="beam search when > 1 (deterministic)")
    gen.add_argument("--length-penalty", type=float, default=1.0)
    gen.add_argument("--early-stopping", action="store_true")
    gen.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--actors", type=int, default=1, help="--input: model copies in the actor pool")
    gen.add_argument("--batch-size", type=int, default=32, help="--input: prompts per batch")

    qz = sub.add_parser("quantize", help="weight-only quantization (int8, int4 RTN, GPTQ, AWQ) of a checkpoint into "
                                         "a compressed-tensors HF folder, with its perplexity cost")
    qz.add_argument("config", nargs="?", default=None,
                    help="YAML config (default: the config.resolved.yaml of the checkpoint's run)")
    qz.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config field, e.g. --set quantize.damp=0.05 (repeatable)")
    qz.add_argument("--checkpoint", default=None,
                    help="a checkpoint folder, a run workdir (newest checkpoint) or an HF Llama folder "
                         "(default: the config's run)")
    for flag, field, kind in (("--method", "method", str), ("--bits", "bits", int), ("--group-size", "group_size", int),
                              ("--calibration", "calibration", int), ("--output", "output", str)):
        qz.add_argument(flag, dest=f"quantize.{field}", type=kind, default=None, metavar=field.upper(),
                        help=f"quantize.{field} (see QuantizeConfig in athanor/config.py)")

    sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with the athanor model registered (main() hands "
                                   "every later argument to lm_eval)", add_help=False)

    sub.add_parser("presets", help="the model presets with their parameter counts and FLOPs per token")

    exp = sub.add_parser("export", help="export a checkpoint for other tools")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run workdir (newest checkpoint)")
    exp.add_argument("--format", choices=["hf", "peft"], default="hf",
                     help="hf: a LlamaForCausalLM folder (a LoRA fine-tune merged into it); peft: a LoRA fine-tune's "
                          "adapter folder for peft.PeftModel.from_pretrained")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--base-export", default=None,
                     help="--format peft: the base model's HF folder, recorded as base_model_name_or_path")

    from .submit import add_parsers

    add_parsers(sub)
    _add_verbose(ap)
    return ap


def _add_verbose(parser: argparse.ArgumentParser, seen: set | None = None) -> None:
    """-v/--verbose on the parser and every subcommand's, before or after the subcommand (`athanor -v run C`,
    `athanor run C -v`); a subcommand's leaves the top level's value alone unless given."""
    seen = set() if seen is None else seen
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if seen else False,
                        help="also show Ray's and MLflow's INFO lines (Ray Data's execution plans, Ray Train's "
                             "worker groups and checkpoints, autoscaler events)")
    seen.add(id(parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if id(child) not in seen:
                    _add_verbose(child, seen)


def _loss_endpoints(report) -> tuple[float, float] | None:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(report.tracking_uri).get_metric_history(report.run_id, "train/loss")
    if not history:
        return None
    history.sort(key=lambda m: m.step)
    return history[0].value, history[-1].value


def _print_summary(report) -> None:
    if report.curation:
        print("\ncuration (documents in -> kept, dropped by reason):")
        for s in report.curation["stages"]:
            dropped = ", ".join(f"{k}={v}" for k, v in sorted(s.get("dropped", {}).items())) or "-"
            print(f"  {s['stage']:<12} {s['in']:>7} -> {s['kept']:>7}   {dropped}")
    if report.manifest:
        m = report.manifest
        for split, info in m["splits"].items():
            print(f"shards/{split}: {info['sequences']} sequences, {info['tokens']} tokens "
                  f"(seq_len {m['seq_len']}, vocab {m['vocab_size']})")
    losses = _loss_endpoints(report) if "train" in report.stages else None
    if losses:
        print(f"training loss: first {losses[0]:.4f} -> last {losses[1]:.4f}")
    if report.stages:
        print("stage seconds: " + ", ".join(f"{k}={v:.1f}" for k, v in report.stages.items()))
    print(f"\nMLflow run id: {report.run_id}")
    print(f"Open it with:  {report.ui_command}")


def _load_checkpoint(path: str):
    """(model, model config, folder) of a checkpoint, or a one-line error (missing, tampered, unreadable)."""
    from athanor.cluster.checkpoint import CheckpointError, load_model

    try:
        return load_model(path)
    except CheckpointError as err:
        raise UserError(str(err)) from None


def _generation_settings(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "num_beams": args.num_beams,
            "length_penalty": args.length_penalty, "early_stopping": args.early_stopping, "stop": args.stop,
            "seed": args.seed}


def _generate(args: argparse.Namespace) -> int:
    if args.input:
        return _generate_file(args)
    from athanor.cluster.inference import TextGenerator

    try:
        generator = TextGenerator(args.checkpoint, _generation_settings(args), cpus=None)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    out = generator({"prompt": [args.prompt]})
    if out["error"][0]:
        raise UserError(out["error"][0])
    print(args.prompt + out["completion"][0])
    return 0


def _generate_file(args: argparse.Namespace) -> int:
    import ray

    from athanor.cluster.generation import generate_file

    if not args.output:
        raise UserError("--input needs --output (the JSONL file the completions go to)")
    if not ray.is_initialized():
        ray.init(address=None if "RAY_ADDRESS" in os.environ else "local", include_dashboard=False,
                 logging_level=console.ray_logging_level())
        console.quiet_ray_data()
    try:
        counts = generate_file(args.checkpoint, args.input, args.output, _generation_settings(args),
                               actors=args.actors, batch_rows=args.batch_size)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    print(f"wrote {sum(counts.values())} lines to {args.output}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from athanor.cluster.checkpoint import CheckpointError
    from athanor.cluster.driver import init_ray
    from athanor.cluster.evaluate import evaluate, format_summary, log_to_mlflow

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg)
    try:
        summary = evaluate(cfg, args.checkpoint, args.inputs)
    except (ValueError, CheckpointError) as err:
        raise UserError(str(err)) from None
    run_id = log_to_mlflow(cfg, summary)
    print(f"checkpoint {summary['checkpoint']} (step {summary['step']}), context {summary['context']}, "
          f"stride {summary['stride']}")
    print(format_summary(summary))
    print(f"per-document results: {summary['output']}\nMLflow run id: {run_id}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from athanor.cluster.checkpoint import TOKENIZER_FILE, CheckpointError, load_model
    from athanor.model.hf_export import export_hf

    if args.format == "peft":
        from athanor.model.peft_export import export_peft_adapter

        try:
            model, mcfg, directory = load_model(args.checkpoint, merge=False)
            out = export_peft_adapter(model, mcfg, args.out, base_model_path=args.base_export)
        except (CheckpointError, ValueError) as err:  # not a LoRA fine-tune, or adapters PEFT cannot name
            raise UserError(str(err)) from None
        print(f"exported the LoRA adapter of {directory} as a PEFT folder: {out}")
        return 0
    model, mcfg, directory = _load_checkpoint(args.checkpoint)
    try:
        out = export_hf(model, mcfg, directory / TOKENIZER_FILE, args.out)
    except ValueError as err:  # e.g. an MoE layout Mixtral cannot express
        raise UserError(str(err)) from None
    print(f"exported {directory} as a Hugging Face LlamaForCausalLM folder: {out}"
          + (" (LoRA adapters merged into the weights)" if _is_lora(directory) else ""))
    return 0


def _is_lora(directory) -> bool:
    from athanor.cluster.checkpoint import read_trainer_state

    return (read_trainer_state(directory).get("finetune") or {}).get("method") == "lora"


def _quantize_config(args: argparse.Namespace):
    """The named config, or the run's own config.resolved.yaml above the checkpoint; flags become overrides."""
    from pathlib import Path

    flags = [f"{k}={v}" for k, v in vars(args).items() if k.startswith("quantize.") and v is not None]
    path = args.config
    if path is None:
        if not args.checkpoint:
            raise UserError("quantize needs a CONFIG or --checkpoint")
        found = [p / "config.resolved.yaml" for p in (Path(args.checkpoint), *Path(args.checkpoint).parents)]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise UserError(f"no config.resolved.yaml in {args.checkpoint} or above it: name the run's CONFIG")
    return load_config(path, [*args.overrides, *flags])


def _quantize(args: argparse.Namespace) -> int:
    from athanor.cluster.checkpoint import CheckpointError
    from athanor.cluster.driver import init_ray
    from athanor.cluster.quantize import format_summary, log_to_mlflow, measure, quantize, write_summary

    cfg = _quantize_config(args)
    try:
        summary = quantize(cfg, args.checkpoint)
        if cfg.quantize.evaluate:
            init_ray(cfg)
            summary = measure(cfg, summary)
    except (ValueError, CheckpointError) as err:
        raise UserError(str(err)) from None
    write_summary(summary)
    run_id = log_to_mlflow(cfg, summary)
    print(format_summary(summary))
    print(f"MLflow run id: {run_id} (quantize/{summary['tag']}/*)")
    return 0


def _presets() -> int:
    from athanor.model.flops import flops_per_token, param_count
    from athanor.model.presets import PRESETS, preset

    print(f"{'preset':<8}{'dim':>6}{'layers':>7}{'heads':>6}{'kv':>4}{'vocab':>8}{'params':>15}"
          f"{'non-emb':>15}{'GFLOP/tok@2k':>14}")
    for name in PRESETS:
        m = preset(name)
        print(f"{name:<8}{m.dim:>6}{m.n_layers:>7}{m.n_heads:>6}{m.n_kv_heads:>4}{m.vocab_size:>8}"
              f"{param_count(m):>15,}{param_count(m, exclude_embeddings=True):>15,}"
              f"{flops_per_token(m, 2048) / 1e9:>14.2f}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "presets":
        return _presets()
    if args.command == "generate":
        return _generate(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        return _export(args)
    if args.command == "quantize":
        return _quantize(args)
    if args.command in ("submit", "jobs"):
        from .submit import SubmitError, run_command

        try:
            return run_command(args)
        except SubmitError as err:
            raise UserError(str(err)) from None
    cfg = load_config(args.config, args.overrides)
    from .preflight import check

    check(cfg, args.command)  # before Ray and MLflow start: a missing input is one line, not a task's traceback
    if args.command == "quality":
        from athanor import storage
        from athanor.layout import RunLayout
        from athanor.pipelines.quality import REPORT_FILE, model_is_current, train_quality_classifier

        layout = RunLayout.from_workdir(cfg.run.workdir)
        if not args.force and model_is_current(cfg, layout):  # as every stage: up to date unless forced
            report = storage.read_json(layout.quality_dir / REPORT_FILE)
            print("quality classifier: up to date, not retrained (use --force)", file=sys.stderr)
        else:
            report = train_quality_classifier(cfg, layout)
        print(json.dumps(report, indent=2))
        return 0

    from .driver import Driver

    driver = Driver(cfg, force=args.force)
    if args.command == "run":
        driver.run_all()
    else:
        getattr(driver, args.command)()
    _print_summary(driver.report)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every later argument is lm_eval's, --help included
        from .lm_eval_adapter import main as lm_eval_main

        console.configure()

        return lm_eval_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    console.configure(args.verbose)  # before Ray or MLflow is imported
    try:
        return _dispatch(args)
    except (ConfigError, UserError, FileNotFoundError) as err:
        print(f"athanor: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"athanor: {stopped}", file=sys.stderr)
        return stopped.exit_code


if __name__ == "__main__":
    sys.exit(main())
