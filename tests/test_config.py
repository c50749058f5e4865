"""The typed config tree: validation names the bad field, overrides reach any field, hashes are stable."""

import pytest

from athanor.config import AthanorConfig, ConfigError, load_config


def test_demo_and_smoke_configs_load():
    for path in ("configs/demo.yaml", "configs/smoke.yaml"):
        cfg = load_config(path)
        assert cfg.curate.dedup.num_perm == cfg.curate.dedup.num_bands * cfg.curate.dedup.rows_per_band


def test_override_any_field_with_yaml_values():
    cfg = load_config("configs/smoke.yaml", ["train.max_steps=7", "curate.langid.languages=[en, de]",
                                              "cluster.address=null", "model.rope_theta=500000.0"])
    assert cfg.train.max_steps == 7
    assert cfg.curate.langid.languages == ["en", "de"]
    assert cfg.cluster.address is None
    assert cfg.model.rope_theta == 500000.0


def test_errors_name_every_bad_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\ntokenize:\n  vocab_size: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["train.lr=fast"])
    msg = str(err.value)
    assert "train.max_stpes" in msg and "train.lr" in msg and "tokenize.vocab_size" in msg


def test_model_shape_is_checked():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(None, ["model.n_heads=8", "model.n_kv_heads=3"])


def test_override_must_have_a_value_and_a_section():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["run.name=x", "run.name.y=1"])
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["run.name.y=1"])


def test_section_hash_tracks_only_its_sections():
    a = AthanorConfig()
    b = load_config(None, ["train.max_steps=1"])
    c = load_config(None, ["curate.heuristics.min_words=10"])
    assert a.section_hash("curate") == b.section_hash("curate")
    assert a.section_hash("curate") != c.section_hash("curate")
    assert a.section_hash() != b.section_hash()


def test_overrides_are_read_as_their_fields_type():
    """Not as YAML: a name that looks like a number or a boolean stays text, a float spelling reaches an int field,
    a bare value reaches a list field, and null reaches an optional one."""
    cfg = load_config("configs/smoke.yaml", ["run.name=2024", "run.seed=1e3", "data.html_dirs=data/html",
                                              "curate.langid.languages=en,de", "train.min_workers=null",
                                              "mlflow.experiment=no"])
    assert cfg.run.name == "2024" and cfg.run.seed == 1000
    assert cfg.data.html_dirs == ["data/html"] and cfg.curate.langid.languages == ["en", "de"]
    assert cfg.train.min_workers is None and cfg.mlflow.experiment == "no"
    assert load_config("configs/smoke.yaml", ["run.name=yes"]).run.name == "yes"
    with pytest.raises(ConfigError, match="run.seed"):
        load_config("configs/smoke.yaml", ["run.seed=1.5"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config("configs/smoke.yaml", ["train.max_steps=many"])


def test_a_preset_is_resolved_when_the_config_loads():
    """What MLflow logs as params is the shape that trains: configs/cluster-aws.yaml's 1b preset, not the defaults."""
    from athanor.model.presets import PRESETS

    cfg = load_config("configs/cluster-aws.yaml")
    shape = PRESETS["1b"]
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads) == (shape["dim"], shape["n_layers"],
                                                                         shape["n_kv_heads"])
    assert cfg.flat()["model.dim"] == shape["dim"] and cfg.model.vocab_size == 0  # the tokenizer's vocabulary
    explicit = load_config("configs/cluster-aws.yaml", ["model.n_layers=2"])
    assert explicit.model.n_layers == 2 and explicit.model.dim == shape["dim"]  # a field set explicitly wins
    again = AthanorConfig.model_validate(cfg.model_dump(mode="json"))  # as the training workers receive it
    assert again.model == cfg.model


def test_a_config_without_a_run_name_gets_its_files_own(tmp_path):
    """Not the demo's: a config file without run.name names its run and folder after itself."""
    (tmp_path / "mine.yaml").write_text("train:\n  max_steps: 3\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert (cfg.run.name, cfg.run.workdir) == ("mine", "runs/mine")
    (tmp_path / "other.yaml").write_text("run:\n  seed: 7\n")
    assert load_config(tmp_path / "other.yaml").run.workdir == "runs/other"
    with pytest.raises(ConfigError, match="run.name"):
        load_config(tmp_path / "mine.yaml", ["run.name=a/b"])
