"""Decontamination: drop training documents that share a word 13-gram with an evaluation task (GPT-3's overlap test).

Texts on both sides are normalized as GPT-3 and DataTrove's NGramsDecont* do: lowercased, digit runs made `0`,
punctuation and symbols made spaces, diacritics removed, split on whitespace. The evaluation side is every doc of the
lm-eval task files (curate.decontam.task_files): a cloze doc's `text` (context and target word), and for a
multiple-choice doc the `query` followed by each of its `choices` in turn: n-grams of the query alone, of every
choice (the distractors are real text too) and the ones that run from the query into a choice, which is what
DataTrove's find_query_ngrams + find_overlap_ngrams index (lm-eval's own decontamination query is the query alone).
A task doc shorter than n words gives no n-gram, and so does a training document.

Each n-gram is a 64-bit hash: a 64-bit xxh3 hash per word, chained as a polynomial over the n words (wrapping
uint64 arithmetic, vectorized over a whole batch with numpy). A training document with any n-gram hash in the
evaluation set is dropped as `contaminated`; signal `contaminated_ngrams`, how many of its n-gram positions matched.

Distribution. The evaluation set is the small side: one uint64 per distinct n-gram, about one per task word (the
tasks here: 77 k distinct 13-grams, 0.6 MB; a suite of a few million task words stays in the tens of MB). It is
built once on the driver and passed to the Ray Data map in fn_kwargs, which Ray puts in the object store once per
map operator (with the UDF), so each worker fetches it once; every block of training documents is then checked
where it lies, with no shuffle. The join that exact dedup does (a groupby on the hash) would instead shuffle one row
per word of the whole corpus to meet a set that fits in any worker's memory: orders of magnitude more traffic than
the broadcast it saves. (DataTrove's NGramsDecontFilter, too, loads the whole index in every worker.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash

from athanor import storage
from athanor.config import DecontamConfig
from athanor.pipelines.stats import mark

DROP_REASONS = ("contaminated",)
SIGNAL = "contaminated_ngrams"
_NUMBER = r"\p{Nd}+(?:[.,]\p{Nd}+)?"  # DataTrove's norm_numbers: one `0` per number
_NOT_WORD = r"[\p{P}\p{S}]+"
_MARK = r"\p{Mn}+"  # combining marks, once NFD has split accents off their letters
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial n-gram hash


def normalized_words(texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """One list of normalized words per text (pyarrow's RE2 kernels: no per-row Python)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = pc.fill_null(texts.cast(pa.string()), "")
    text = pc.replace_substring_regex(pc.utf8_lower(texts), _NUMBER, "0")
    text = pc.replace_substring_regex(text, _NOT_WORD, " ")
    text = pc.replace_substring_regex(pc.utf8_normalize(text, "NFD"), _MARK, "")
    return pc.utf8_split_whitespace(text)


def _word_hashes(words: pa.Array) -> np.ndarray:
    """xxh3-64 of each word, hashed once per distinct word of the batch."""
    encoded = pc.dictionary_encode(words)
    distinct = np.array([xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in encoded.dictionary.to_pylist()],
                        dtype=np.uint64)
    return distinct[encoded.indices.to_numpy(zero_copy_only=False)]


def ngram_hashes(words: pa.ListArray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, row): every word n-gram of every list, hashed, with the index of the list it comes from."""
    flat = words.flatten()
    nonempty = pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)  # "" from a text's ends
    parent = pc.list_parent_indices(words).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(parent[nonempty], minlength=len(words)))])
    flat = flat.filter(pa.array(nonempty))
    if len(flat) < n:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    h = _word_hashes(flat)
    starts = len(h) - n + 1
    grams = np.zeros(starts, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            grams = grams * _BASE + h[k:k + starts]
    row = np.searchsorted(offsets, np.arange(starts), side="right") - 1  # the list each start position lies in
    whole = np.arange(starts) + n <= offsets[row + 1]  # the n-gram ends inside that same list
    return grams[whole], row[whole]


def task_texts(records: Iterable[dict], source: str) -> Iterable[str]:
    """The evaluation text of each lm-eval doc: `text`, or `query` followed by each of `choices`."""
    for i, rec in enumerate(records):
        if "text" in rec:
            yield rec["text"]
        elif "query" in rec and "choices" in rec:
            for choice in rec["choices"]:
                yield f"{rec['query']} {choice}"
        else:
            raise ValueError(f"{source}: doc {i} has neither `text` nor `query` and `choices`")


def eval_ngrams(cfg: DecontamConfig) -> np.ndarray:
    """The sorted distinct n-gram hashes of every task file."""
    texts: list[str] = []
    for path in cfg.task_files:
        where = storage.location(path)
        if not storage.is_file(where):
            raise FileNotFoundError(f"curate.decontam.task_files: no {path} (build the tasks with "
                                    "scripts/build_eval_tasks.py, `make data`; or set curate.decontam.enabled=false)")
        lines = storage.read_text(where).splitlines()
        texts += task_texts((json.loads(line) for line in lines if line.strip()), path)
    grams, _ = ngram_hashes(normalized_words(pa.array(texts, type=pa.string())), cfg.n)
    return np.unique(grams)


def task_files_digest(cfg: DecontamConfig) -> bytes:
    """What the stage's output depends on besides the config: the task files' bytes (for the run key)."""
    return b"".join(storage.read_bytes(storage.location(p)) for p in cfg.task_files
                    if storage.is_file(storage.location(p)))


def mark_contaminated(batch: pa.Table, eval_hashes: np.ndarray, n: int) -> pa.Table:
    """Ray Data UDF: `contaminated_ngrams` per row, and `contaminated` where it is above zero."""
    grams, row = ngram_hashes(normalized_words(batch["text"]), n)
    hit = np.isin(grams, eval_hashes, assume_unique=False)
    counts = np.bincount(row[hit], minlength=batch.num_rows).astype(np.int64)
    out = batch.append_column(SIGNAL, pa.array(counts, type=pa.int64()))
    return mark(out, ["contaminated" if c else None for c in counts.tolist()])


def decontaminate(ds: ray.data.Dataset, cfg: DecontamConfig) -> ray.data.Dataset:
    """The Ray stage: the evaluation n-grams built on the driver, every block checked by a map task."""
    hashes = eval_ngrams(cfg)
    return ds.map_batches(mark_contaminated, fn_kwargs={"eval_hashes": hashes, "n": cfg.n}, batch_format="pyarrow")
