"""Train a SentencePiece tokenizer on a deterministic sample of the curated corpus, and load it once for encoding.

The sample is chosen by a seeded hash of `doc_id` (the `sample_docs` smallest hashes), so the same corpus and
config select the same documents whatever the Parquet files' block order; SentencePiece then trains single-threaded
on them in hash order, which makes the model file byte-for-byte reproducible.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import sentencepiece as spm
import xxhash

from athanor import storage
from athanor.config import AthanorConfig, ConfigError
from athanor.console import say
from athanor.layout import RunLayout
from athanor.storage import Location

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Lines longer than this (bytes) are skipped by SentencePiece; curated paragraphs are far shorter.
MAX_SENTENCE_BYTES = 1 << 16
# Slack over the expected sample size when pre-filtering by hash, in standard deviations of the binomial count.
_SAMPLE_SLACK_SIGMAS = 6


class TokenizerTrainingError(ConfigError):
    """The corpus cannot train the requested tokenizer (empty, or too small for vocab_size): a config or input
    problem, so the CLI reports it in one line."""


class Tokenizer:
    """A trained SentencePiece model, loaded once; `sha256` identifies the exact model file.

    `num_threads` is for batch encoding: -1 uses every core, 1 suits a Ray actor that holds one CPU.
    """

    def __init__(self, model_path: str | Path, num_threads: int = -1):
        self.path = storage.location(model_path)  # local or s3://: the model is read as bytes, never as a file
        try:
            blob = storage.read_bytes(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model not found: {self.path} (run the tokenizer stage first)") from None
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=blob, num_threads=num_threads)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (packing adds them)."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def decode_continuation(self, prefix: list[int], new: list[int]) -> str:
        """The text `new` adds after `prefix`. Decoding `new` alone would lose the space SentencePiece keeps in its
        first piece ("▁be" after "would" decodes as "be"), so the two are decoded together and the prefix cut off."""
        prefix = [int(i) for i in prefix]
        head = self.decode(prefix)
        full = self.decode(prefix + [int(i) for i in new])
        return full[len(head):] if full.startswith(head) else self.decode(new)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for: control tokens 0, byte-fallback pieces 1, '▁' a space.

        With it, the bytes behind any run of token ids is a sum, which bits per byte needs for packed shards whose
        text is not at hand. SentencePiece's dummy prefix (the '▁' it puts before a document's first word) is
        counted here; `document_bytes` takes it off at each document start."""
        sp = self._sp
        out = np.zeros(sp.vocab_size(), dtype=np.int64)
        for i in range(sp.vocab_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    @property
    def adds_dummy_prefix(self) -> bool:
        """Whether encoding puts a '▁' before the first word (SentencePiece's default, which athanor keeps)."""
        return self._sp.encode("a", out_type=str)[0].startswith("\u2581")


def sample_key(doc_id: str, seed: int) -> int:
    """Seeded 64-bit hash of a document id: the sample is the documents with the smallest keys."""
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed)


def _keep_below(batch: pa.Table, threshold: int, seed: int) -> pa.Table:
    doc_ids = batch.column("doc_id").to_pylist()
    texts = batch.column("text").to_pylist()
    keys, kept_ids, kept_texts = [], [], []
    for doc_id, text in zip(doc_ids, texts):
        if doc_id is None or not text or not text.strip():
            continue
        key = sample_key(doc_id, seed)
        if key < threshold:
            keys.append(key)
            kept_ids.append(doc_id)
            kept_texts.append(text)
    return pa.table(
        {
            "key": pa.array(keys, pa.uint64()),
            "doc_id": pa.array(kept_ids, pa.string()),
            "text": pa.array(kept_texts, pa.string()),
        }
    )


def sample_documents(curated_dir: Location, sample_docs: int, seed: int) -> list[str]:
    """Texts of the `sample_docs` documents with the smallest seeded doc_id hash, in hash order.

    Ray Data filters by a hash threshold that lets through a few more than the sample needs (so only about
    `sample_docs` texts reach the driver); the driver then takes the exact smallest keys.
    """
    files = storage.glob(curated_dir, "*.parquet")
    if not files:
        raise TokenizerTrainingError(f"no curated Parquet files in {curated_dir} (run curation first)")
    ds = storage.read_parquet(files).select_columns(["doc_id", "text"])
    total = ds.count()
    expected = sample_docs + _SAMPLE_SLACK_SIGMAS * np.sqrt(sample_docs) + 100
    fraction = min(1.0, expected / max(total, 1))
    while True:
        threshold = 2**64 if fraction >= 1.0 else int(fraction * 2**64)
        rows = ds.map_batches(
            _keep_below, fn_kwargs={"threshold": threshold, "seed": seed}, batch_format="pyarrow"
        ).take_all()
        if len(rows) >= sample_docs or fraction >= 1.0:
            break
        fraction = min(1.0, fraction * 2)  # an unlucky hash draw: widen the filter and try again
    rows.sort(key=lambda r: (r["key"], r["doc_id"]))
    return [r["text"] for r in rows[:sample_docs]]


def _training_lines(texts: list[str]):
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _vocab_text(model_proto: bytes) -> str:
    """The `.vocab` file SentencePiece writes beside a model: one `piece<TAB>score` per line."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


def train_tokenizer(cfg: AthanorConfig, layout: RunLayout) -> Location:
    """Train SentencePiece on a deterministic sample of `curated/final`; write tokenizer.model and .vocab.

    Byte fallback means no text is ever out of vocabulary; ids 0-3 are PAD, UNK, BOS, EOS. Normalization is
    `identity` (no NFKC, whitespace kept) so decode(encode(text)) == text. The vocabulary limit is hard: a
    corpus too small for `vocab_size` is an error that says so, rather than a silently smaller vocabulary.
    """
    tc = cfg.tokenize
    t0 = time.perf_counter()
    texts = sample_documents(layout.curated("final"), tc.sample_docs, cfg.run.seed)
    if not texts:
        raise TokenizerTrainingError(f"no documents with text in {layout.curated('final')}")
    log.info("training %s tokenizer (vocab %d) on %d sampled documents", tc.model_type, tc.vocab_size, len(texts))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts),
            model_writer=model,
            model_type=tc.model_type,
            vocab_size=tc.vocab_size,
            character_coverage=tc.character_coverage,
            byte_fallback=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=0,  # use every line: no random sub-sampling inside SentencePiece
            shuffle_input_sentence=False,
            max_sentence_length=MAX_SENTENCE_BYTES,
            hard_vocab_limit=True,
            num_threads=1,  # recorded in the model file; BPE training is no faster with more threads
            minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerTrainingError(
            f"cannot train a {tc.model_type} tokenizer with vocab_size={tc.vocab_size} on {len(texts)} documents "
            f"from {layout.curated('final')}: {err}. Lower tokenize.vocab_size or curate more text."
        ) from None
    storage.write_bytes(layout.tokenizer_model, model.getvalue())
    storage.write_bytes(layout.tokenizer_dir / "tokenizer.vocab", _vocab_text(model.getvalue()).encode("utf-8"))
    say(f"tokenizer: {tc.model_type}, vocab {tc.vocab_size:,}, trained on {len(texts):,} sampled documents, "
        f"{time.perf_counter() - t0:.1f} s")
    return layout.tokenizer_model
