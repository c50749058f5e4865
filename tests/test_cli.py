"""The CLI turns user mistakes into one clear line and exit code 2, never a traceback."""

import os

from cli_runner import run_cli as _cli


def test_missing_config_file():
    p = _cli("run", "configs/does-not-exist.yaml")
    assert p.returncode == 2
    assert "config file not found" in p.stderr and "Traceback" not in p.stderr


def test_bad_field_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: 4\n")
    p = _cli("train", str(cfg), "--set", "train.micro_batch_size=0")
    assert p.returncode == 2
    assert "model.n_layer" in p.stderr and "train.micro_batch_size" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_inputs_are_one_line_before_ray_starts(tmp_path):
    """Checked at load (cluster/preflight.py): each is one line naming the field or file, within seconds, and no Ray
    session is started for it."""
    work = f"run.workdir={tmp_path / 'run'}"
    cases = [
        (("train", "configs/smoke.yaml", "--set", work), "no token shards"),
        (("tokenize", "configs/smoke.yaml", "--set", work), "no curated documents"),
        (("curate", "configs/smoke.yaml", "--set", work, "--set", f"data.html_dirs={tmp_path / 'nope'}"),
         "data.html_dirs: no such folder"),
        (("curate", "configs/smoke.yaml", "--set", work, "--set", "data.warc_files=[]", "--set", "data.html_dirs=[]",
          "--set", "data.jsonl_files=[]", "--set", "data.parquet_files=[]", "--set", "data.text_files=[]"),
         "no input"),
        (("run", "configs/smoke.yaml", "--set", work, "--set", "curate.quality.low=[]"), "curate.quality.low is empty"),
        (("finetune", "configs/finetune-smoke.yaml", "--set", work, "--set", f"finetune.base={tmp_path / 'nope'}"),
         "finetune.base: no such checkpoint"),
    ]
    for args, message in cases:
        p = _cli(*args)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr[-500:])
        assert "Traceback" not in p.stderr and "Started a local Ray instance" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_every_stage():
    p = _cli("--help")
    assert p.returncode == 0
    for cmd in ("run", "curate", "tokenize", "train", "quality", "generate", "export", "presets"):
        assert cmd in p.stdout


def test_verbose_is_accepted_before_or_after_any_subcommand(monkeypatch):
    from athanor import console
    from athanor.cluster.cli import build_parser

    p = build_parser()
    assert p.parse_args(["run", "c.yaml"]).verbose is False
    for argv in (["-v", "run", "c.yaml"], ["run", "c.yaml", "--verbose"], ["quality", "train", "c.yaml", "-v"],
                 ["generate", "--checkpoint", "x", "--prompt", "hi", "--verbose"], ["presets", "-v"]):
        assert p.parse_args(argv).verbose is True, argv
    quiet = {k: v for k, v in os.environ.items()
             if k not in (console.VERBOSE_ENV, "RAY_LOG_TO_DRIVER_EVENT_LEVEL", "MLFLOW_LOGGING_LEVEL")}
    monkeypatch.setattr(os, "environ", dict(quiet))  # this process's real environment stays as it was
    console.configure(False)  # quiet: autoscaler events and MLflow below WARNING hidden
    assert not console.verbose() and console.ray_train_log_level() == "WARNING"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING" == os.environ["RAY_LOG_TO_DRIVER_EVENT_LEVEL"]
    monkeypatch.setattr(os, "environ", dict(quiet))
    console.configure(True)
    assert console.verbose() and console.ray_train_log_level() == "INFO"
    assert "RAY_LOG_TO_DRIVER_EVENT_LEVEL" not in os.environ


def test_quality_train_is_skipped_when_up_to_date_unless_forced(tmp_path):
    work = f"run.workdir={tmp_path}"
    first = _cli("quality", "train", "configs/smoke.yaml", "--set", work)
    assert first.returncode == 0, first.stderr[-2000:]
    model = tmp_path / "quality" / "quality.bin"
    trained_at = model.stat().st_mtime_ns
    again = _cli("quality", "train", "configs/smoke.yaml", "--set", work)
    assert again.returncode == 0 and "up to date" in again.stderr and model.stat().st_mtime_ns == trained_at
    assert '"fingerprint"' in again.stdout  # the report is still printed
    forced = _cli("quality", "train", "configs/smoke.yaml", "--set", work, "--force")
    assert forced.returncode == 0 and model.stat().st_mtime_ns != trained_at
