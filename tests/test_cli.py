"""The CLI turns user mistakes into one clear line and exit code 2, never a traceback."""

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


def test_help_lists_every_stage():
    p = _cli("--help")
    assert p.returncode == 0
    for cmd in ("run", "curate", "tokenize", "train", "quality", "generate", "export", "presets"):
        assert cmd in p.stdout
