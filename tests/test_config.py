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
