"""Export a split's packed shards as a Megatron-LM indexed dataset (`.bin` + `.idx`, the MMIDIDX format).

Megatron packs documents itself, so each exported sequence is one document exactly as athanor packed it
(`BOS tokens EOS`); the `.bin` is therefore the split's token stream unchanged, and only the index is new.
Index layout (little-endian): b"MMIDIDX\\x00\\x00", u64 version 1, u8 dtype code, u64 sequence count,
u64 document-index count, i32 lengths[sequences], i64 byte pointers[sequences], i64 document_indices[documents + 1].
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from athanor import storage
from athanor.pipelines.shards import TokenShards
from athanor.storage import Location

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's DType codes; it has no uint32, so larger vocabularies are written as int32.
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def export_megatron(workdir: str | Path, split: str, prefix: str | Path) -> tuple[Location, Location]:
    """Write `<prefix>.bin` and `<prefix>.idx` for one split (checksums verified first); returns both paths.

    Workdir and prefix may be s3:// or gs:// URIs: the files are written in the node-local cache, then uploaded.

    A document cut by a window boundary is whole again here, since windows are consecutive slices of one stream;
    only the document that ran into the split's dropped tail ends early.
    """
    shards = TokenShards(workdir, split, verify=True)
    if len(shards) == 0:
        raise ValueError(f"the {split} split of {workdir} has no sequences to export")
    dtype = np.dtype(np.uint16) if shards.dtype == np.uint16 else np.dtype(np.int32)
    targets = storage.location(f"{prefix}.bin"), storage.location(f"{prefix}.idx")
    bin_path, idx_path = map(storage.cached, targets)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    width = shards.seq_len + 1

    starts = []
    tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp")
    with open(tmp_bin, "wb") as out:
        for i in range(len(shards)):
            out.write(shards[i].astype(dtype, copy=False).tobytes())
            starts.extend((i * width + shards.doc_starts(i)).tolist())
    total = len(shards) * width
    bounds = np.asarray([*starts, total], dtype=np.int64)
    lengths = np.diff(bounds).astype(np.int32)
    pointers = bounds[:-1] * dtype.itemsize
    document_indices = np.arange(len(lengths) + 1, dtype=np.int64)

    tmp_idx = idx_path.with_name(f".{idx_path.name}.tmp")
    with open(tmp_idx, "wb") as out:
        out.write(INDEX_HEADER)
        out.write(struct.pack("<Q", INDEX_VERSION))
        out.write(struct.pack("<B", DTYPE_CODES[dtype]))
        out.write(struct.pack("<Q", len(lengths)))
        out.write(struct.pack("<Q", len(document_indices)))
        out.write(lengths.tobytes())
        out.write(pointers.tobytes())
        out.write(document_indices.tobytes())
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    for local, target in zip((bin_path, idx_path), targets):
        storage.upload(local, target)
    return targets
