"""`athanor`: the command line. Every subcommand takes a YAML config and `--set section.field=value` overrides.

    athanor run configs/demo.yaml                 curate -> tokenize -> train, one MLflow run
    athanor curate|tokenize|train CONFIG          one stage over the same working folder
    athanor quality train CONFIG                  train the fastText quality classifier alone
"""

from __future__ import annotations

import argparse
import logging
import sys

from athanor.config import ConfigError, load_config


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
                        ("tokenize", "tokenizer training and shard packing only"), ("train", "training only")]:
        _add_config_args(sub.add_parser(name, help=help_))
    quality = sub.add_parser("quality", help="the fastText quality classifier")
    qsub = quality.add_subparsers(dest="quality_command", required=True)
    _add_config_args(qsub.add_parser("train", help="train it on the config's high/low sources and report P/R"))
    return ap


def _loss_endpoints(report) -> tuple[float, float] | None:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(report.tracking_uri).get_metric_history(report.run_id, "loss")
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


def _dispatch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "quality":
        from athanor.layout import RunLayout
        from athanor.pipelines.quality import train_quality_classifier

        report = train_quality_classifier(cfg, RunLayout.from_workdir(cfg.run.workdir))
        import json

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
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, UserError, FileNotFoundError) as err:
        print(f"athanor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
