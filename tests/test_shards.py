"""Packing real curated text into Arrow token shards: conservation of tokens, the split, determinism, the reader."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from real_corpus import PACK_CONFIG, packed_run, real_documents, write_curated

from athanor.config import AthanorConfig
from athanor.layout import RunLayout
from athanor.pipelines.megatron import export_megatron
from athanor.pipelines.pack import in_doc_id_order, is_validation, pack_shards
from athanor.pipelines.shards import TokenShards, file_sha256, fingerprint, token_dtype
from athanor.pipelines.tokenizer import BOS_ID, EOS_ID, Tokenizer

SEQ_LEN = PACK_CONFIG["tokenize"]["seq_len"]
SEED = PACK_CONFIG["run"]["seed"]


@pytest.fixture(scope="module")
def workdir(ray_local, tmp_path_factory, data_dir):
    return packed_run(tmp_path_factory.getbasetemp(), data_dir)


@pytest.fixture(scope="module")
def corpus(workdir):
    """doc_id -> text of the curated documents the shards were packed from."""
    table = pq.read_table(RunLayout(workdir).curated("final"))
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))


def test_manifest_counts_checksums_and_schema(workdir, corpus):
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["seq_len"] == SEQ_LEN and manifest["vocab_size"] == 800 and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == file_sha256(workdir / manifest["tokenizer"]["path"])
    assert manifest["config"]["tokenize"]["shard_sequences"] == 500
    assert manifest["documents"] == {"in": len(corpus), "kept": len(corpus), "dropped": {}}
    all_sha = []
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert len(info["shards"]) >= 2  # several shards, the last one shorter
        assert all(s["sequences"] == 500 for s in info["shards"][:-1]) and info["shards"][-1]["sequences"] <= 500
        assert info["sequences"] == sum(s["sequences"] for s in info["shards"])
        assert info["tokens"] == info["sequences"] * (SEQ_LEN + 1)
        for s in info["shards"]:
            path = workdir / s["path"]
            assert path.suffix == ".arrow" and path.parent == RunLayout(workdir).shards(split)
            assert file_sha256(path) == s["sha256"] and path.stat().st_size == s["bytes"]
        assert info["fingerprint"] == fingerprint([s["sha256"] for s in info["shards"]])
        all_sha += [s["sha256"] for s in info["shards"]]
    assert manifest["fingerprint"] == fingerprint(all_sha)
    assert not list(workdir.glob("shards/*/.*.tmp"))  # every temp file was renamed into place

    with pa.memory_map(str(workdir / manifest["splits"]["train"]["shards"][0]["path"])) as source:
        schema = pa.ipc.open_file(source).schema
    assert schema.field("tokens").type == pa.list_(pa.uint16(), SEQ_LEN + 1)
    assert token_dtype(800) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_every_kept_token_is_packed_once_in_doc_id_order(workdir, corpus):
    """The train stream is exactly BOS doc EOS for each train document in doc_id order, minus the dropped tail."""
    manifest = json.loads((workdir / "manifest.json").read_text())
    tok = Tokenizer(workdir / manifest["tokenizer"]["path"])
    for split in ("train", "val"):
        ids = sorted(d for d in corpus if is_validation(d, SEED, 0.1) == (split == "val"))
        expected = np.concatenate([[BOS_ID, *t, EOS_ID] for t in tok.encode([corpus[d] for d in ids])])
        shards = TokenShards(workdir, split)
        packed = np.concatenate([shards[i] for i in range(len(shards))])
        info = manifest["splits"][split]
        assert info["documents"] == len(ids)
        assert len(expected) == len(packed) + info["dropped_tail_tokens"]
        assert info["dropped_tail_tokens"] < SEQ_LEN + 1
        np.testing.assert_array_equal(packed, expected[: len(packed)])
    assert 0 < manifest["splits"]["val"]["documents"] < manifest["splits"]["train"]["documents"]


def test_reader_is_zero_copy_and_keeps_document_boundaries(workdir):
    shards = TokenShards(workdir, "train")
    assert shards.seq_len == SEQ_LEN and shards.vocab_size == 800
    first = shards[0]
    assert first.shape == (SEQ_LEN + 1,) and first.dtype == np.uint16
    assert not first.flags.owndata and not first.flags.writeable  # a view into the memory-mapped file
    assert first[0] == BOS_ID
    total_starts = 0
    for i in range(len(shards)):
        seq, starts = shards[i], shards.doc_starts(i)
        np.testing.assert_array_equal(starts, np.flatnonzero(seq == BOS_ID))
        total_starts += len(starts)
    info = json.loads((workdir / "manifest.json").read_text())["splits"]["train"]
    assert total_starts == sum(s["documents"] for s in info["shards"])
    assert info["documents"] - 1 <= total_starts <= info["documents"]  # a BOS may sit in the dropped tail
    with pytest.raises(IndexError):
        shards[len(shards)]


def test_repacking_is_byte_identical_and_names_every_drop(workdir, data_dir, tmp_path):
    """A different file layout plus rows the packer must drop, by name, yields the very same shards."""
    layout = RunLayout.from_workdir(tmp_path)
    write_curated(layout.curated("final"), real_documents(data_dir), files=3)
    first = pq.read_table(layout.curated("final") / "part-000.parquet").slice(0, 1)
    bad = pa.table(
        {
            "doc_id": [first.column("doc_id")[0].as_py(), "empty-page", "blank-page", None],
            "text": [first.column("text")[0].as_py(), None, "  \n ", "An orphan paragraph without an id."],
            "source": ["news_html"] * 4,
        }
    )
    pq.write_table(bad, layout.curated("final") / "part-bad.parquet")
    layout.tokenizer_dir.mkdir(parents=True)
    shutil.copy(workdir / "tokenizer" / "tokenizer.model", layout.tokenizer_model)

    manifest = pack_shards(AthanorConfig.model_validate(PACK_CONFIG), layout)
    reference = json.loads((workdir / "manifest.json").read_text())
    assert manifest["fingerprint"] == reference["fingerprint"]
    assert manifest["splits"] == reference["splits"]
    assert manifest["documents"]["dropped"] == {"duplicate_doc_id": 1, "empty_text": 2, "missing_doc_id": 1}
    assert manifest["documents"]["in"] == reference["documents"]["in"] + 4
    assert manifest["documents"]["in"] == manifest["documents"]["kept"] + sum(manifest["documents"]["dropped"].values())



def test_files_in_curation_order_pack_without_a_sort_to_the_same_bytes(workdir, tmp_path):
    """Files as curation writes them (each sorted, consecutive doc_id ranges) are encoded in file order with no
    global sort, one row group per task; the shards equal, byte for byte, those the sort made from round-robin files."""
    reference_files = sorted(RunLayout(workdir).curated("final").glob("*.parquet"))
    table = pq.read_table(reference_files).sort_by("doc_id")
    layout = RunLayout.from_workdir(tmp_path)
    layout.curated("final").mkdir(parents=True)
    cuts = [0, 300, 301, table.num_rows]  # one part holds a single document
    for k, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        pq.write_table(table.slice(start, stop - start), layout.curated("final") / f"part-{k:05d}.parquet",
                       row_group_size=128)
    files = sorted(layout.curated("final").glob("*.parquet"))
    assert in_doc_id_order(files)
    assert not in_doc_id_order(files[::-1]) and not in_doc_id_order(reference_files)  # the reference was sorted
    assert not in_doc_id_order([files[0], files[0]])  # a repeated doc_id needs the sort's tie-break
    layout.tokenizer_dir.mkdir(parents=True)
    shutil.copy(workdir / "tokenizer" / "tokenizer.model", layout.tokenizer_model)

    manifest = pack_shards(AthanorConfig.model_validate(PACK_CONFIG), layout)
    reference = json.loads((workdir / "manifest.json").read_text())
    assert manifest["splits"] == reference["splits"] and manifest["fingerprint"] == reference["fingerprint"]
    assert manifest["documents"] == reference["documents"]

def _read_megatron(prefix) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An independent reader of Megatron's documented MMIDIDX index: (tokens, lengths, pointers, doc indices)."""
    raw = (prefix.parent / f"{prefix.name}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1 and code == 8  # uint16
    offset = 9 + 8 + 1 + 8 + 8
    lengths = np.frombuffer(raw, np.int32, n_seq, offset)
    pointers = np.frombuffer(raw, np.int64, n_seq, offset + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, offset + 12 * n_seq)
    assert len(raw) == offset + 12 * n_seq + 8 * n_doc
    tokens = np.fromfile(prefix.parent / f"{prefix.name}.bin", dtype=np.uint16)
    return tokens, lengths, pointers, docs


def test_megatron_export_holds_one_whole_document_per_sequence(workdir, corpus, tmp_path):
    bin_path, idx_path = export_megatron(workdir, "val", tmp_path / "val_text_document")
    assert bin_path.name == "val_text_document.bin" and idx_path.name == "val_text_document.idx"
    tokens, lengths, pointers, docs = _read_megatron(tmp_path / "val_text_document")
    shards = TokenShards(workdir, "val")
    np.testing.assert_array_equal(tokens, np.concatenate([shards[i] for i in range(len(shards))]))
    np.testing.assert_array_equal(docs, np.arange(len(lengths) + 1))
    np.testing.assert_array_equal(pointers, np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]))

    tok = Tokenizer(workdir / "tokenizer" / "tokenizer.model")
    val_ids = sorted(d for d in corpus if is_validation(d, SEED, 0.1))
    for k, doc_id in enumerate(val_ids[:-1]):  # the last document may run into the dropped tail
        seq = tokens[pointers[k] // 2 : pointers[k] // 2 + lengths[k]]
        assert seq[0] == BOS_ID and seq[-1] == EOS_ID
        assert tok.decode(seq[1:-1].tolist()) == corpus[doc_id]
