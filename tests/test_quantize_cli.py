"""`athanor quantize` as a user runs it: GPTQ calibrated on the run's own training shards, an HF folder that
`athanor generate` loads, the perplexity cost measured by the eval path and logged to the model's MLflow run; bad
settings and a run without shards fail before any work with one line naming the problem."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_runner import run_cli
from training_runs import fresh_training_dir

from athanor.cluster.checkpoint import find_checkpoint
from athanor.cluster.inference import base_state_dict
from athanor.config import ConfigError, load_config


@pytest.fixture(scope="module")
def run_copy(smoke_run, tmp_path_factory):
    """The smoke run's shards and tokenizer in a folder of its own (tests must not write into the smoke run)."""
    return fresh_training_dir(smoke_run[0], tmp_path_factory.mktemp("quantize") / "run")


@pytest.mark.slow
def test_gptq_writes_a_loadable_folder_and_logs_its_cost(smoke_run, run_copy):
    from mlflow.tracking import MlflowClient

    checkpoint = find_checkpoint(smoke_run[0])
    proc = run_cli("quantize", "configs/smoke.yaml", "--set", f"run.workdir={run_copy}", "--checkpoint",
                   str(checkpoint), "--method", "gptq", "--group-size", "32", "--calibration", "16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = run_copy / "quantized" / "gptq-w4-g32"
    report = json.loads((out / "athanor_quantization_report.json").read_text())
    assert report["calibration"]["sequences"] == 16 and report["step"] == int(checkpoint.name.split("_")[-1])
    assert len(report["layers"]) == 7 * 2 and all(r["output_error"] < 0.05 for r in report["layers"])
    fp, qz = report["full_precision"], report["quantized"]
    assert fp["tokens"] == qz["tokens"] > 0  # both sides scored the same validation windows
    assert abs(report["perplexity_change"]) < 0.01, report  # 4-bit GPTQ costs under 1% perplexity here
    assert report["bytes"] < 0.6 * report["full_precision_bytes"]

    client = MlflowClient(f"sqlite:///{run_copy}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("athanor-smoke").experiment_id])
    assert run.data.params["quantize/gptq-w4-g32/method"] == "gptq"
    assert run.data.params["quantize/gptq-w4-g32/group_size"] == "32"
    metrics = run.data.metrics
    assert metrics["val/quantized/gptq-w4-g32/perplexity_change"] == pytest.approx(report["perplexity_change"])
    assert metrics["val/quantized/gptq-w4-g32/quantized_bits_per_byte"] == pytest.approx(qz["bits_per_byte"])

    with pytest.raises(ValueError, match="fine-tune the full-precision checkpoint"):
        base_state_dict(out)  # fine-tuning would silently start from dequantized integers
    gen = run_cli("generate", "--checkpoint", str(out), "--prompt", "The government said", "--max-new-tokens", "8")
    assert gen.returncode == 0 and gen.stdout.startswith("The government said"), gen.stderr[-2000:]


def test_a_group_size_that_does_not_divide_fails_in_one_line_writing_nothing(smoke_run, tmp_path):
    proc = run_cli("quantize", "--checkpoint", str(find_checkpoint(smoke_run[0])), "--method", "int4",
                   "--group-size", "7", "--set", f"quantize.output={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "group size 7 does not divide" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["quantize.method=int4", "quantize.bits=3"], "quantize.bits"),
    (["quantize.method=int8", "quantize.bits=4"], "method int8 quantizes to 8 bits"),
    (["quantize.group_size=0"], "group_size must be -1 (per channel) or at least 1"),
])
def test_bad_settings_are_named_at_load(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_calibration_needs_the_runs_shards(smoke_run, tmp_path):
    from athanor.cluster.inference import describe
    from athanor.cluster.quantize import calibration_tokens

    cfg = load_config(None, ["quantize.method=gptq", f"quantize.calibration_from={tmp_path}"])
    with pytest.raises(ValueError, match="no calibration data"):
        calibration_tokens(cfg, describe(smoke_run[0]), 8)
    cfg = load_config(None, [f"quantize.calibration_from={smoke_run[0]}", "run.seed=3"])
    windows = calibration_tokens(cfg, describe(smoke_run[0]), 8)  # 64-token windows and their next token
    assert windows.shape == (8, 65) and torch.equal(windows, calibration_tokens(cfg, describe(smoke_run[0]), 8))
