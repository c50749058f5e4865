"""Token shards on disk: uncompressed Arrow IPC files, memory-mapped, with a JSON manifest of checksums.

One shard is one record batch with two columns:
  tokens      fixed_size_list<uint16 | uint32>[seq_len + 1]   one packed window per row
  doc_starts  list<int32>                                     positions in the window where a document begins
and, in fine-tuning shards, a third:
  loss_mask   fixed_size_list<uint8>[seq_len + 1]             1 where the token is to be predicted (a response)

Fixed-size rows make sequence i a zero-copy slice of one flat mmap'd buffer (O(1), no parsing); doc_starts keeps
document boundaries so document-level attention masking stays possible. The manifest records each shard's size and
sha256, so a truncated or altered file is caught by name before any step reads it. A workdir on an object store is
read through a node-local cache copy (`fetch_token_shards`), downloaded by name and checked against those sha256s.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pyarrow as pa

from athanor import storage
from athanor.layout import RunLayout
from athanor.storage import Location

MANIFEST_FORMAT = "athanor-token-shards/1"
SPLITS = ("train", "val")


class ShardIntegrityError(RuntimeError):
    """A shard or manifest on disk does not match what was written; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the bytes of every shard whenever the vocabulary fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


file_sha256 = storage.file_sha256


def fingerprint(sha256s: list[str]) -> str:
    """Identity of a dataset: the hash of its shards' hashes, in order."""
    return hashlib.sha256("\n".join(sha256s).encode()).hexdigest()


def write_shard(path: Location, windows: np.ndarray, doc_offsets: np.ndarray, doc_starts: np.ndarray,
                loss_mask: np.ndarray | None = None) -> dict:
    """Write one shard whole (storage.write_bytes) and return its manifest entry (path left absolute).

    `windows` is [n, seq_len + 1] tokens; row i's document starts are doc_starts[doc_offsets[i]:doc_offsets[i+1]];
    `loss_mask`, when given, is [n, seq_len + 1] of 0/1.
    """
    n, width = windows.shape
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), width)
    starts = pa.ListArray.from_arrays(pa.array(doc_offsets, pa.int32()), pa.array(doc_starts, pa.int32()))
    columns, names = [tokens, starts], ["tokens", "doc_starts"]
    if loss_mask is not None:
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(loss_mask.reshape(-1).astype(np.uint8)), width))
        names.append("loss_mask")
    batch = pa.record_batch(columns, names=names)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(path, data)
    return {
        "path": str(path),
        "sequences": int(n),
        "tokens": int(n * width),
        "documents": int(len(doc_starts)),  # documents that begin in this shard
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def read_manifest(workdir: str | Path) -> dict:
    path = RunLayout.from_workdir(workdir).manifest
    if not storage.is_file(path):
        raise FileNotFoundError(f"no shard manifest at {path} (run the pack stage first)")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as err:
        raise ShardIntegrityError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardIntegrityError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def check_shard(path: Path, entry: dict, verify: bool) -> None:
    """Existence and size always (a truncated file cannot be mmap'd safely); the sha256 too when `verify`."""
    if not path.is_file():
        raise ShardIntegrityError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardIntegrityError(f"{path}: {size} bytes on disk, manifest says {entry['bytes']} (truncated?)")
    if verify and (digest := file_sha256(path)) != entry["sha256"]:
        raise ShardIntegrityError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}")


def fetch_token_shards(workdir: str | Path) -> Path:
    """The node-local copy of a workdir's manifest, tokenizer and token shards (the workdir itself when local).

    Each file is fetched by name into the cache unless the copy there already has the manifest's sha256, and what
    came down is checked against it, so a stale or damaged copy is never memory-mapped.
    """
    layout = RunLayout.from_workdir(workdir)
    if not layout.remote:
        return layout.root
    manifest = read_manifest(layout.root)
    local = RunLayout(storage.cached(layout.root))
    wanted = [(manifest["tokenizer"]["path"], manifest["tokenizer"]["sha256"])]
    wanted += [(e["path"], e["sha256"]) for split in SPLITS for e in manifest["splits"][split]["shards"]]
    for name, sha256 in wanted:
        copy = storage.fetch(layout.root / name, sha256)
        if (digest := storage.file_sha256(copy)) != sha256:
            raise ShardIntegrityError(f"{layout.root / name}: sha256 {digest} does not match the manifest's {sha256}")
    storage.write_text(local.manifest, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return local.root


class TokenShards:
    """Random access to one split's packed sequences, memory-mapped: `shards[i]` is a (seq_len + 1,) array."""

    def __init__(self, workdir: str | Path, split: str = "train", verify: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = fetch_token_shards(workdir)
        manifest = read_manifest(root)
        self.split = split
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["vocab_size"]
        self.dtype = np.dtype(manifest["dtype"])
        self.fingerprint: str = manifest["splits"][split]["fingerprint"]
        self._tokens: list[np.ndarray] = []
        self._starts: list[tuple[np.ndarray, np.ndarray]] = []
        self._masks: list[np.ndarray | None] = []
        self._first: list[int] = []  # global index of each shard's first sequence
        total = 0
        for entry in manifest["splits"][split]["shards"]:
            path = root / entry["path"]
            check_shard(path, entry, verify)
            tokens, offsets, starts, mask = self._map(path)
            if tokens.shape != (entry["sequences"], self.seq_len + 1) or tokens.dtype != self.dtype:
                raise ShardIntegrityError(
                    f"{path}: holds {tokens.shape} {tokens.dtype} tokens, manifest says "
                    f"({entry['sequences']}, {self.seq_len + 1}) {self.dtype}"
                )
            self._first.append(total)
            self._tokens.append(tokens)
            self._starts.append((offsets, starts))
            self._masks.append(mask)
            total += entry["sequences"]
        self._len = total
        if len({m is None for m in self._masks}) > 1:
            raise ShardIntegrityError(f"{root}: some {split} shards have a loss_mask column and some do not")
        self.has_loss_mask = bool(self._masks) and self._masks[0] is not None

    @staticmethod
    def _map(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        try:
            batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardIntegrityError(f"{path}: not a readable Arrow IPC shard ({err})") from None
        tokens = batch.column("tokens")
        flat = tokens.values.to_numpy(zero_copy_only=True)  # a view into the mmap, no copy
        starts = batch.column("doc_starts")
        mask = None
        if "loss_mask" in batch.schema.names:
            mask = batch.column("loss_mask").values.to_numpy(zero_copy_only=True).reshape(len(tokens), -1)
        return (
            flat.reshape(len(tokens), tokens.type.list_size),
            starts.offsets.to_numpy(zero_copy_only=True),
            starts.values.to_numpy(zero_copy_only=True),
            mask,
        )

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._len:
            raise IndexError(f"sequence {i} out of range for {self._len} {self.split} sequences")
        shard = bisect_right(self._first, i) - 1
        return shard, i - self._first[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        shard, row = self._locate(int(i))
        return self._tokens[shard][row]

    def doc_starts(self, i: int) -> np.ndarray:
        """Positions in sequence i where a document begins (its BOS); a window may also open mid-document."""
        shard, row = self._locate(int(i))
        offsets, starts = self._starts[shard]
        return starts[offsets[row] : offsets[row + 1]]

    def loss_mask(self, i: int) -> np.ndarray:
        """Sequence i's 0/1 mask of tokens to predict (fine-tuning shards); all ones for pretraining shards."""
        shard, row = self._locate(int(i))
        mask = self._masks[shard]
        return np.ones(self.seq_len + 1, dtype=np.uint8) if mask is None else mask[row]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence i of a one-example-per-window split (fine-tuning validation, preference pairs) without its
        padding: the tokens up to the answer's EOS, and the 0/1 mask over their targets (tokens 1..)."""
        mask = self.loss_mask(i)
        end = int(np.flatnonzero(mask).max()) + 1
        return self[i][:end], mask[1:end]

    def target_bytes(self, i: int, byte_lengths: np.ndarray, dummy_prefix: bool) -> int:
        """UTF-8 bytes of the text behind sequence i's targets (tokens 1..seq_len), for bits per byte.

        `byte_lengths` is `Tokenizer.byte_lengths()`; a document's first piece carries SentencePiece's dummy-prefix
        space, which is not in the text, so one byte comes off for each document whose first piece is a target."""
        window = self[i]
        total = int(byte_lengths[window[1:]].sum())
        if dummy_prefix:
            firsts = self.doc_starts(i).astype(np.int64) + 1  # a document's first piece follows its BOS
            firsts = firsts[firsts <= self.seq_len]
            total -= int(np.count_nonzero(byte_lengths[window[firsts]] > 0))
        return total
