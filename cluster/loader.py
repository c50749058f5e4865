"""Global-index data loading (as in OLMo-core): every rank derives the same batch from (seed, epoch, consumed).

Each epoch is a permutation of all sequence indices seeded by (seed, epoch). Global step s takes the next
`global_batch_size` indices of that permutation, and rank r reads its contiguous slice of them. The state is only
where the run is in that global order, so a run can resume on a different number of ranks and still see every
sample once per epoch, in the same order, none skipped or repeated.
"""

from __future__ import annotations

import numpy as np
import torch

from athanor.pipelines.shards import TokenShards


def example_batch(shards: TokenShards, ids: np.ndarray) -> dict[str, torch.Tensor]:
    """For windows of packed examples: targets ignored (-100) outside the loss mask, and each input token's
    `document_ids` (which example it belongs to) so attention and RoPE positions restart at every example."""
    from athanor.model.transformer import IGNORE_INDEX

    seq_len = shards.seq_len
    targets = torch.from_numpy(np.stack([shards[i][1:] for i in ids]).astype(np.int64))
    mask = torch.from_numpy(np.stack([shards.loss_mask(i)[1:] for i in ids]).astype(bool))
    targets[~mask] = IGNORE_INDEX
    document_ids = torch.zeros(len(ids), seq_len, dtype=torch.long)
    for row, i in enumerate(ids):
        starts = shards.doc_starts(i).astype(np.int64)
        starts = starts[(starts > 0) & (starts < seq_len)]
        document_ids[row, torch.from_numpy(starts)] = 1
    return {"targets": targets, "document_ids": document_ids.cumsum(dim=1)}


class PairShards:
    """Preference pairs over token shards whose row 2i is pair i's chosen answer and row 2i+1 its rejected one
    (pipelines/preferences.py), with the reference model's log-probs of both when they were precomputed.

    To the loader a sample is a pair: the global order, resume state and fingerprint are over pairs."""

    def __init__(self, shards: TokenShards, reference: np.ndarray | None = None):
        if len(shards) % 2:
            raise ValueError(f"preference shards hold {len(shards)} rows; pairs need an even number")
        if reference is not None and reference.shape != (len(shards) // 2, 2):
            raise ValueError(f"reference log-probs have shape {reference.shape}, expected ({len(shards) // 2}, 2)")
        self.rows, self.reference = shards, reference
        self.split, self.seq_len, self.fingerprint = shards.split, shards.seq_len, shards.fingerprint
        self.vocab_size = shards.vocab_size
        self.rows_per_sample = 2

    def __len__(self) -> int:
        return len(self.rows) // 2

    def batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """input_ids and targets [2b, seq_len] (chosen, rejected, chosen, ...; targets -100 outside the answers),
        and `reference` [b, 2] when precomputed."""
        from athanor.model.transformer import IGNORE_INDEX

        rows = np.stack([2 * ids, 2 * ids + 1], axis=1).reshape(-1)
        windows = torch.from_numpy(np.stack([self.rows[r] for r in rows]).astype(np.int64))
        mask = torch.from_numpy(np.stack([self.rows.loss_mask(r)[1:] for r in rows]).astype(bool))
        targets = windows[:, 1:].clone()
        targets[~mask] = IGNORE_INDEX
        out = {"input_ids": windows[:, :-1], "targets": targets}
        if self.reference is not None:
            out["reference"] = torch.from_numpy(self.reference[ids].astype(np.float64))
        return out


class GlobalBatchLoader:
    """Yields this rank's share of each global batch; the tail of an epoch shorter than a global batch is dropped."""

    def __init__(
        self,
        shards: TokenShards | PairShards,
        global_batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        state: dict | None = None,
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(shards) < global_batch_size:
            raise ValueError(
                f"the {shards.split} split has {len(shards)} sequences, fewer than one global batch "
                f"({global_batch_size}); pack more text or lower the batch size"
            )
        self.shards = shards
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.consumed = 0, 0
        self._order: np.ndarray | None = None
        if state is not None:
            self.load_state_dict(state)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.shards) // self.global_batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._order = rng.permutation(len(self.shards))
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's slice of the next global batch: input_ids and targets [b, seq_len], sample_ids [b]."""
        if self.consumed + self.global_batch_size > len(self.shards):
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        start = self.consumed + self.rank * self.local_batch_size
        ids = self._epoch_order()[start : start + self.local_batch_size]
        global_ids = self._epoch_order()[self.consumed : self.consumed + self.global_batch_size]
        self.consumed += self.global_batch_size
        if isinstance(self.shards, PairShards):
            return {**self.shards.batch(ids), "sample_ids": torch.from_numpy(ids.astype(np.int64))}
        windows = torch.from_numpy(np.stack([self.shards[i] for i in ids]).astype(np.int64))
        batch = {
            "input_ids": windows[:, :-1],
            "targets": windows[:, 1:],
            "sample_ids": torch.from_numpy(ids.astype(np.int64)),
        }
        if self.shards.has_loss_mask:  # fine-tuning: loss on responses only, examples kept apart
            batch.update(example_batch(self.shards, ids))
            batch["global_targets"] = torch.tensor(sum(int(self.shards.loss_mask(i)[1:].sum()) for i in global_ids))
        return batch

    def state_dict(self) -> dict:
        """Where the run is in the global order; the same on every rank and independent of the world size."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "fingerprint": self.shards.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.shards.fingerprint:
            raise ValueError(
                f"loader state was saved for dataset {state['fingerprint'][:16]}..., but the {self.shards.split} "
                f"shards are {self.shards.fingerprint[:16]}...; resuming would silently change the data order"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.consumed, self._order = int(state["epoch"]), int(state["consumed"]), None
