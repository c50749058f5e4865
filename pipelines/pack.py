"""Encode `curated/final` in Ray Data tasks and pack it into fixed windows of seq_len + 1 tokens.

Each document becomes `BOS tokens EOS`: EOS teaches the model where a document ends, and BOS gives every document
the same opening context it will see at inference (Llama-style prompts start with BOS). Documents are concatenated
in doc_id order and cut into non-overlapping windows (inputs = w[:-1], targets = w[1:]), so the same corpus and
config give byte-identical shards however Ray scheduled the work. Train and validation are split by a seeded hash of
doc_id, so no document lands in both. Only each split's final partial window is dropped, and its tokens are counted.

Curation writes `curated/final` already in doc_id order (each part sorted, part-i holding the i-th doc_id range), so
the encoded stream is put in order by reading the files in name order, not by a global sort: the sort's shuffle cost
more than the encoding itself. The order is checked on the doc_id column first; any other input is sorted. Each
encoding task reads the Parquet row groups it encodes, so no read task needs a CPU of its own and encoding can
hold every core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import xxhash

from athanor import storage
from athanor.config import AthanorConfig
from athanor.console import Progress, say, stage_line
from athanor.layout import RunLayout
from athanor.pipelines.shards import MANIFEST_FORMAT, SPLITS, fingerprint, token_dtype, write_shard
from athanor.pipelines.tokenizer import Tokenizer
from athanor.storage import Location

log = logging.getLogger(__name__)


def is_validation(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Seeded hash split; salted so it is independent of the tokenizer's sample, which hashes doc_id unsalted."""
    return xxhash.xxh64_intdigest(b"split\0" + doc_id.encode("utf-8"), seed=seed) < val_fraction * 2**64


# Documents per encoded batch: large enough that Ray's per-batch cost vanishes beside SentencePiece's.
ENCODE_BATCH_DOCS = 1024


class EncodeDocuments:
    """Loads the tokenizer once (per worker process, see encode_pieces), then reads and encodes Parquet row group after
    row group (rows of `path`, `row_group`), yielding their documents in file order, ENCODE_BATCH_DOCS at a time."""

    def __init__(self, model_path: str, seed: int, val_fraction: float):
        self.tokenizer = Tokenizer(model_path, num_threads=1)  # the task holds one CPU
        self.dtype = token_dtype(self.tokenizer.vocab_size)  # the shards' dtype: half the bytes to ship for uint16
        self.seed = seed
        self.val_fraction = val_fraction

    def __call__(self, pieces: pa.Table) -> Iterator[pa.Table]:
        for path, row_group in zip(pieces.column("path").to_pylist(), pieces.column("row_group").to_pylist()):
            with pq.ParquetFile(storage.open_input(storage.location(path))) as parquet:
                for batch in parquet.iter_batches(
                    ENCODE_BATCH_DOCS, row_groups=[row_group], columns=["doc_id", "text"], use_threads=False
                ):
                    yield self.encode(batch)

    def encode(self, batch: pa.RecordBatch) -> pa.Table:
        doc_ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        reasons = [
            "missing_doc_id" if d is None else "empty_text" if t is None or not t.strip() else None
            for d, t in zip(doc_ids, texts)
        ]
        encoded = self.tokenizer.encode([t if r is None else "" for t, r in zip(texts, reasons)])
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(chain.from_iterable(encoded), dtype=self.dtype, count=int(offsets[-1]))
        return pa.table(
            {
                "doc_id": pa.array([d or "" for d in doc_ids], pa.string()),
                # Breaks ties between equal doc_ids by content, so even duplicates sort the same every run.
                "text_hash": pa.array([xxhash.xxh64_hexdigest((t or "").encode("utf-8")) for t in texts], pa.string()),
                "split": pa.array(
                    [None if r else "val" if is_validation(d, self.seed, self.val_fraction) else "train"
                     for d, r in zip(doc_ids, reasons)],
                    pa.string(),
                ),
                "drop_reason": pa.array(reasons, pa.string()),
                "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            }
        )


class _Packer:
    """Streams `BOS doc EOS` sequences into windows of `width` tokens, writing a shard every `shard_sequences`."""

    def __init__(self, root: Location, split: str, width: int, shard_sequences: int, dtype: np.dtype, bos: int,
                 eos: int):
        self.root, self.split, self.width, self.shard_sequences = root, split, width, shard_sequences
        self.dtype, self.bos, self.eos = dtype, bos, eos
        self.out_dir = RunLayout(root).shards(split)
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # document starts, as positions in the buffered stream
        self._buffered = 0
        self.documents = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        doc = np.empty(len(tokens) + 2, dtype=self.dtype)
        doc[0], doc[1:-1], doc[-1] = self.bos, tokens, self.eos
        self._starts.append(self._buffered)
        self._chunks.append(doc)
        self._buffered += len(doc)
        self.documents += 1
        while self._buffered >= self.width * self.shard_sequences:
            self._write(self.shard_sequences)

    def _write(self, n: int) -> None:
        stream = np.concatenate(self._chunks)
        cut = n * self.width
        starts = np.asarray(self._starts, dtype=np.int64)
        inside = starts[starts < cut]
        offsets = np.searchsorted(inside // self.width, np.arange(n + 1), side="left")
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        entry = write_shard(path, stream[:cut].reshape(n, self.width), offsets, inside % self.width)
        entry["path"] = f"shards/{self.split}/{path.name}"  # relative to the workdir
        self.shards.append(entry)
        self._chunks = [stream[cut:]]
        self._starts = (starts[starts >= cut] - cut).tolist()
        self._buffered -= cut

    def finish(self) -> dict:
        """Write the last, shorter shard of whole windows; the final partial window is dropped and counted."""
        if self._buffered >= self.width:
            self._write(self._buffered // self.width)
        sha256s = [s["sha256"] for s in self.shards]
        return {
            "sequences": sum(s["sequences"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": self.documents,
            "dropped_tail_tokens": self._buffered,
            "fingerprint": fingerprint(sha256s),
            "shards": self.shards,
        }


_ENCODERS: dict[tuple, EncodeDocuments] = {}  # this worker process's loaded tokenizer, by model and split


def encode_pieces(pieces: pa.Table, model_path: str, model_sha256: str, seed: int, val_fraction: float
                  ) -> Iterator[pa.Table]:
    """Ray Data task UDF: EncodeDocuments for this model (by content) and split, built on this worker process's
    first row group and kept for the rest. Tasks run on Ray's already started workers, where an actor pool first
    starts a process per actor: on a small corpus that start-up was most of Ray's overhead over bare SentencePiece."""
    key = (model_path, model_sha256, seed, val_fraction)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = EncodeDocuments(model_path, seed, val_fraction)
    yield from _ENCODERS[key](pieces)


def encode_pool_size(requested: int, spare_cpu: bool) -> int:
    """At most one actor per CPU; `spare_cpu` leaves one for the sort's shuffle tasks (a pool holding every CPU can
    starve Ray Data's other tasks)."""
    if not ray.is_initialized():
        ray.init()
    return max(1, min(requested, int(ray.cluster_resources().get("CPU", 1)) - spare_cpu))


def in_doc_id_order(files: list[Location]) -> bool:
    """Whether reading `files` one after another yields strictly increasing doc_ids (none missing).

    Reads only the doc_id column, one file at a time. Strictly increasing means no duplicate ids either, so this
    order is exactly the one the sort by (doc_id, text hash) would produce.
    """
    last = None
    for path in files:
        ids = pq.read_table(storage.open_input(path), columns=["doc_id"]).column("doc_id").combine_chunks()
        if ids.null_count:
            return False
        if len(ids) == 0:
            continue
        if last is not None and not ids[0].as_py() > last:
            return False
        if len(ids) > 1 and not pc.all(pc.greater(ids[1:], ids[:-1])).as_py():
            return False
        last = ids[-1].as_py()
    return True


def encode_in_order(
    files: list[Location], model_path: Location, seed: int, val_fraction: float, actors: int
) -> ray.data.Dataset:
    """The encoded documents of `files` (see EncodeDocuments.encode), as a Ray Dataset that iterates in (doc_id,
    text hash) order: file order when `in_doc_id_order(files)`, else a global sort."""
    pieces = [{"path": str(f), "row_group": g} for f in files
              for g in range(pq.read_metadata(storage.open_input(f)).num_row_groups)]
    in_order = in_doc_id_order(files)
    model_sha256 = hashlib.sha256(storage.read_bytes(storage.location(model_path))).hexdigest()
    encoded = ray.data.from_items(pieces, override_num_blocks=max(1, len(pieces))).map_batches(
        encode_pieces,
        fn_kwargs={"model_path": str(model_path), "model_sha256": model_sha256, "seed": seed,
                   "val_fraction": val_fraction},
        # At most one task per CPU; tasks hand their CPU back, so the sort cannot starve.
        compute=ray.data.TaskPoolStrategy(size=encode_pool_size(actors, spare_cpu=False)),
        batch_format="pyarrow",
        batch_size=1,  # one row group per task: idle workers take row groups as they free up
    )
    if in_order:
        ordered = encoded
        # One map feeding the driver's packer. Ray Data's per-operator reservation (it shares CPUs between operators)
        # held the pool to one task for the first second, and its downstream-capacity backpressure (at 2x what the
        # packer had taken) idled a core between row groups: 2 cores encoded 0.75x as fast as bare SentencePiece.
        # At 8x the run-ahead stays bounded by what the packer takes.
        encoded.context.op_resource_reservation_enabled = False
        encoded.context.downstream_capacity_backpressure_ratio = 8.0
    else:
        encoded.context.default_hash_shuffle_parallelism = len(files)  # one sort partition per curated file
        ordered = encoded.sort(["doc_id", "text_hash"])
    ordered.context.execution_options.preserve_order = True  # stream blocks to the packer in key order
    return ordered


def _clear_previous(layout: RunLayout) -> None:
    """A re-run must not leave stale shards beside new ones; the manifest goes first so no reader sees a mix."""
    storage.delete(layout.manifest)
    for split in SPLITS:
        out = layout.shards(split)
        storage.makedirs(out)
        for old in [*storage.glob(out, "*.arrow"), *storage.glob(out, ".*.tmp")]:
            storage.delete(old)


def _write_json_atomic(path: Location, payload: dict) -> None:
    storage.write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _num_rows(file: Location) -> int:
    """Rows of a Parquet file, from its footer (the file is closed again: on S3 each is an open connection)."""
    with storage.open_input(file) as f:
        return pq.read_metadata(f).num_rows


def pack_shards(cfg: AthanorConfig, layout: RunLayout) -> dict:
    """Tokenize `curated/final` into train/val Arrow shards and write the manifest; returns the manifest."""
    tc = cfg.tokenize
    t0 = time.perf_counter()
    tokenizer = Tokenizer(layout.tokenizer_model)
    files = storage.glob(layout.curated("final"), "*.parquet")
    if not files:
        raise FileNotFoundError(f"no curated Parquet files in {layout.curated('final')} (run curation first)")
    ordered = encode_in_order(files, layout.tokenizer_model, cfg.run.seed, tc.val_fraction, tc.encode_actors)

    _clear_previous(layout)
    dtype = token_dtype(tokenizer.vocab_size)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    packers = {s: _Packer(layout.root, s, tc.seq_len + 1, tc.shard_sequences, dtype, bos, eos) for s in SPLITS}
    seen, dropped = 0, Counter()
    previous: tuple[str, str] | None = None
    progress = Progress("tokenize", sum(_num_rows(f) for f in files))
    for batch in ordered.iter_batches(batch_format="pyarrow", batch_size=None):
        progress.update(seen)
        doc_ids = batch.column("doc_id").to_pylist()
        hashes = batch.column("text_hash").to_pylist()
        splits = batch.column("split").to_pylist()
        reasons = batch.column("drop_reason").to_pylist()
        tokens = batch.column("tokens").combine_chunks()
        offsets = tokens.offsets.to_numpy()
        flat = tokens.values.to_numpy()
        for i, (doc_id, text_hash, split, reason) in enumerate(zip(doc_ids, hashes, splits, reasons)):
            seen += 1
            key = (doc_id, text_hash)
            if previous is not None and key < previous:
                raise RuntimeError(f"documents reached the packer out of doc_id order ({key} after {previous})")
            if reason is None and previous is not None and doc_id == previous[0]:
                reason = "duplicate_doc_id"  # the first copy by (doc_id, text hash) is kept
            previous = key
            if reason is not None:
                dropped[reason] += 1
                continue
            packers[split].add(flat[offsets[i] : offsets[i + 1]])

    splits = {split: packer.finish() for split, packer in packers.items()}
    kept = sum(s["documents"] for s in splits.values())
    manifest = {
        "format": MANIFEST_FORMAT,
        "seq_len": tc.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "special_ids": {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id, "bos": tokenizer.bos_id,
                        "eos": tokenizer.eos_id},
        "tokenizer": {"path": "tokenizer/" + layout.tokenizer_model.name, "sha256": tokenizer.sha256},
        "config": {"tokenize": tc.model_dump(mode="json"), "seed": cfg.run.seed},
        "documents": {"in": seen, "kept": kept, "dropped": dict(sorted(dropped.items()))},
        "splits": splits,
        "fingerprint": fingerprint([s["sha256"] for split in SPLITS for s in splits[split]["shards"]]),
    }
    _write_json_atomic(layout.manifest, manifest)
    say(stage_line("tokenize", seen, kept, time.perf_counter() - t0))
    log.info(
        "packed %d documents into %d train / %d val sequences of %d tokens (%s dropped)",
        kept, splits["train"]["sequences"], splits["val"]["sequences"], tc.seq_len + 1, dict(dropped),
    )
    return manifest
