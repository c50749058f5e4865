"""Pure pieces of the training loop: learning-rate schedule, gradient accumulation, vocabulary resolution."""

import pytest

from athanor.cluster.schedule import lr_at
from athanor.cluster.train import grad_accum_steps, model_config_for
from athanor.config import load_config


def test_warmup_then_cosine_to_min_lr():
    t = load_config(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10", "train.max_steps=110"]).train
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, t) == pytest.approx(0.1)
    lrs = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_global_batch_is_invariant_across_worker_counts():
    t = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=4"]).train
    for world, accum in [(1, 8), (2, 4), (4, 2), (8, 1)]:
        assert grad_accum_steps(t, world) * t.micro_batch_size * world == 32
        assert grad_accum_steps(t, world) == accum
    with pytest.raises(ValueError, match="global_batch_size"):
        grad_accum_steps(t, 3)


def test_vocab_comes_from_tokenizer_unless_set():
    cfg = load_config(None, ["tokenize.seq_len=4096"])
    m = model_config_for(cfg, 1000)
    assert m.vocab_size == 1000 and m.max_seq_len == 4096
    cfg = load_config(None, ["model.vocab_size=512"])
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        model_config_for(cfg, 1000)


def test_preset_supplies_the_shape_and_explicit_fields_win():
    cfg = load_config(None, ["model.preset=350m", "model.n_layers=6", "tokenize.seq_len=512"])
    m = model_config_for(cfg, 4096)
    assert (m.dim, m.n_heads, m.n_layers, m.vocab_size) == (1024, 16, 6, 4096)
    assert m.max_seq_len >= 512


def test_warmup_stable_decay_holds_then_decays_linearly():
    t = load_config(None, ["train.schedule=wsd", "train.lr=1.0", "train.min_lr=0.0", "train.warmup_steps=10",
                           "train.max_steps=110", "train.decay_fraction=0.5"]).train
    assert lr_at(4, t) == pytest.approx(0.5)
    assert [lr_at(s, t) for s in (10, 30, 54)] == [1.0, 1.0, 1.0]  # stable until step 55 = 110 - 55
    assert lr_at(55, t) == pytest.approx(1.0)
    assert lr_at(82, t) == pytest.approx(0.5, abs=0.01)
    assert lr_at(110, t) == pytest.approx(0.0)
    with pytest.raises(Exception, match="decay_fraction"):
        load_config(None, ["train.decay_fraction=0"])


def test_tensor_parallel_size_must_divide_the_worker_range():
    with pytest.raises(Exception, match="num_workers .3. must be a multiple of tp_size .2."):
        load_config(None, ["train.num_workers=3", "train.tp_size=2"])
    with pytest.raises(Exception, match="needs data_parallel: fsdp"):
        load_config(None, ["train.num_workers=2", "train.tp_size=2", "train.data_parallel=ddp"])
