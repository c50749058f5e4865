"""The global-index loader: resuming on a different number of ranks replays exactly the uninterrupted order."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from real_corpus import PACK_CONFIG, packed_run

from athanor.cluster.loader import GlobalBatchLoader
from athanor.pipelines.shards import ShardIntegrityError, TokenShards

GLOBAL_BATCH = 64
SEED = 5


@pytest.fixture(scope="module")
def workdir(ray_local, tmp_path_factory, data_dir):
    return packed_run(tmp_path_factory.getbasetemp(), data_dir)


@pytest.fixture(scope="module")
def shards(workdir):
    return TokenShards(workdir, "train")


def _global_steps(loaders: list[GlobalBatchLoader], steps: int) -> list[np.ndarray]:
    """Sample ids of each global step: the ranks' slices concatenated in rank order."""
    return [np.concatenate([ld.next_batch()["sample_ids"].numpy() for ld in loaders]) for _ in range(steps)]


def test_resume_on_other_world_sizes_replays_the_uninterrupted_order(shards):
    per_epoch = len(shards) // GLOBAL_BATCH
    total = per_epoch + 40  # long enough to cross into the second epoch
    reference = _global_steps([GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, 0, 1)], total)

    one = GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, rank=0, world_size=1)
    resumed = _global_steps([one], 50)
    two = [GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, r, 2, state=one.state_dict()) for r in (0, 1)]
    resumed += _global_steps(two, per_epoch - 50 + 10)  # crosses the epoch boundary on two ranks
    assert two[0].state_dict() == two[1].state_dict()
    assert two[0].state_dict()["epoch"] == 1
    again = GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, 0, 1, state=two[1].state_dict())
    resumed += _global_steps([again], total - len(resumed))

    assert len(resumed) == len(reference)
    for step, (got, want) in enumerate(zip(resumed, reference)):
        np.testing.assert_array_equal(got, want, err_msg=f"global step {step}")

    first_epoch = np.concatenate(reference[:per_epoch])
    assert len(np.unique(first_epoch)) == per_epoch * GLOBAL_BATCH  # nothing repeated within an epoch
    assert len(shards) - len(first_epoch) < GLOBAL_BATCH  # only the short tail was dropped
    assert not np.array_equal(np.concatenate(reference[per_epoch:]), first_epoch[: 40 * GLOBAL_BATCH])


def test_batches_hold_the_shifted_windows_of_their_sample_ids(shards):
    batch = GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, rank=1, world_size=4).next_batch()
    seq_len = PACK_CONFIG["tokenize"]["seq_len"]
    assert batch["input_ids"].shape == batch["targets"].shape == (GLOBAL_BATCH // 4, seq_len)
    assert batch["input_ids"].dtype == batch["targets"].dtype == batch["sample_ids"].dtype == torch.long
    for row, sample in enumerate(batch["sample_ids"].tolist()):
        window = torch.from_numpy(shards[sample].astype(np.int64))
        assert torch.equal(batch["input_ids"][row], window[:-1])
        assert torch.equal(batch["targets"][row], window[1:])


def test_state_from_another_dataset_or_seed_is_rejected(shards):
    state = GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, 0, 1).state_dict()
    with pytest.raises(ValueError, match="saved for dataset"):
        GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, 0, 1, state={**state, "fingerprint": "0" * 64})
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchLoader(shards, GLOBAL_BATCH, SEED + 1, 0, 1, state=state)
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchLoader(shards, GLOBAL_BATCH, SEED, 0, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchLoader(shards, len(shards) + 1, SEED, 0, 1)


def test_corrupt_or_truncated_shard_stops_the_loader_naming_the_file(workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir / "shards", copy / "shards")
    shutil.copy(workdir / "manifest.json", copy / "manifest.json")
    victim = sorted((copy / "shards" / "train").glob("*.arrow"))[1]
    original = victim.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    victim.write_bytes(bytes(flipped))
    with pytest.raises(ShardIntegrityError, match=f"{victim}: sha256"):
        GlobalBatchLoader(TokenShards(copy, "train", verify=True), GLOBAL_BATCH, SEED, 0, 1)

    victim.write_bytes(original[:-100])
    for verify in (True, False):  # a size mismatch is caught even without hashing
        with pytest.raises(ShardIntegrityError, match=f"{victim}: .* bytes on disk.*truncated"):
            GlobalBatchLoader(TokenShards(copy, "train", verify=verify), GLOBAL_BATCH, SEED, 0, 1)

    victim.unlink()
    with pytest.raises(ShardIntegrityError, match=f"{victim}: shard listed in the manifest is missing"):
        TokenShards(copy, "train")

    victim.write_bytes(original)
    assert len(TokenShards(copy, "train", verify=True)) == len(TokenShards(workdir, "train"))
