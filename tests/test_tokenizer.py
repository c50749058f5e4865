"""SentencePiece training on a deterministic Ray Data sample of real curated text."""

from __future__ import annotations

import hashlib

import pytest
from real_corpus import real_documents, write_curated

from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.pipelines.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    TokenizerTrainingError,
    sample_documents,
    train_tokenizer,
)


def _config(**tokenize) -> AthanorConfig:
    tokenize = {"vocab_size": 800, "sample_docs": 300, **tokenize}
    return AthanorConfig.model_validate({"run": {"seed": 7}, "tokenize": tokenize})


@pytest.fixture(scope="module")
def docs(data_dir):
    return real_documents(data_dir)


def test_training_is_byte_reproducible_whatever_the_file_layout(ray_local, docs, tmp_path):
    cfg = _config()
    models = []
    for files in (2, 3):  # a different split into Parquet files gives Ray a different block order
        layout = RunLayout.from_workdir(tmp_path / f"run{files}")
        write_curated(layout.curated("final"), docs, files=files)
        models.append(train_tokenizer(cfg, layout))
    assert models[0].read_bytes() == models[1].read_bytes()
    assert models[0].with_suffix(".vocab").read_bytes() == models[1].with_suffix(".vocab").read_bytes()

    tok = Tokenizer(models[0])
    assert tok.vocab_size == 800
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert tok.sha256 == hashlib.sha256(models[0].read_bytes()).hexdigest()
    assert len(models[0].with_suffix(".vocab").read_text().splitlines()) == 800

    texts = [text for _, text in docs[:50]]
    ids = tok.encode(texts)
    assert all(tok.decode(x) == t for x, t in zip(ids, texts))  # identity normalization: lossless
    assert sum(map(len, ids)) < sum(map(len, texts)) / 2  # it learned real subwords, not characters
    # Byte fallback: characters never seen in training still round-trip, without UNK.
    odd = "Le café coûte 3€ — 東京 🚀"
    assert tok.decode(tok.encode([odd])[0]) == odd
    assert UNK_ID not in tok.encode([odd])[0]


def test_sample_is_seeded_and_independent_of_block_order(ray_local, docs, tmp_path):
    a = write_curated(tmp_path / "a", docs, files=1)
    b = write_curated(tmp_path / "b", docs, files=4)
    sample_a = sample_documents(a, 100, seed=7)
    assert len(sample_a) == 100
    assert sample_documents(b, 100, seed=7) == sample_a
    assert sample_documents(a, 100, seed=8) != sample_a
    assert len(sample_documents(a, 10_000, seed=7)) == len({t for _, t in docs})  # capped at the corpus


def test_vocab_too_large_for_the_corpus_is_a_clear_error(ray_local, docs, tmp_path):
    layout = RunLayout.from_workdir(tmp_path)
    write_curated(layout.curated("final"), docs[:5], files=1)
    with pytest.raises(TokenizerTrainingError, match="vocab_size=8000 on 5 documents"):
        train_tokenizer(_config(vocab_size=8000), layout)
    assert not layout.tokenizer_model.exists()


def test_missing_corpus_is_a_clear_error(ray_local, tmp_path):
    with pytest.raises(TokenizerTrainingError, match="no curated Parquet files"):
        train_tokenizer(_config(), RunLayout.from_workdir(tmp_path))
