"""Batches of same-size triplets, so full-size training images stack without crop or padding.

Per epoch: triplets are grouped by their (H, W) after that epoch's augmentation, shuffled inside
each group (seed, epoch), cut into batches of `batch_size` (a group's last batch may be partial;
dropped when drop_last), then the batch order is shuffled and dealt round-robin to the ranks.

Equal steps on every rank: when the number of batches is not a multiple of world_size, drop_last
drops the surplus batches; otherwise ranks that are one batch short repeat their own first batch
(so ranks never share an index; a rank with no batch at all repeats the first batch of the epoch).
With drop_last=False and a batch count divisible by world_size, every triplet appears exactly once
per epoch across ranks.

Call dataset.set_epoch(e) and sampler.set_epoch(e) before len() or iter(): the batches of an epoch
are built once, on first use, from shape_fn.

Resume: set_epoch(epoch, start_step) skips the first start_step batches of this rank, so a resumed
run sees exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch


class ShapeGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler whose batches share one image shape; deterministic in (seed, epoch), rank-disjoint."""

    def __init__(self, shape_fn: Callable[[int], tuple[int, int]], n: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.shape_fn = shape_fn
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0
        self._batches: list[list[int]] | None = None  # this rank's batches for self.epoch, built on first use

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (and the dataset's matching shapes); skip its first start_step batches."""
        self.epoch = epoch
        self.start_step = start_step
        self._batches = None

    def _shapes(self) -> np.ndarray:
        return np.array([self.shape_fn(i) for i in range(self.n)], dtype=np.int64).reshape(self.n, 2)

    def epoch_batches(self) -> list[list[int]]:
        """All batches of this epoch, in order, before dealing to ranks."""
        shapes = self._shapes()
        _, group = np.unique(shapes, axis=0, return_inverse=True)
        group = group.reshape(-1)
        rng = np.random.default_rng([self.seed % 2**63, self.epoch % 2**63])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        order = order[np.argsort(group[order], kind="stable")]  # grouped by shape, shuffled within groups
        bounds = np.flatnonzero(np.diff(group[order])) + 1
        batches = []
        for members in np.split(order, bounds) if self.n else []:
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self._batches is None:
            batches = self.epoch_batches()
            steps = len(batches) // self.world_size if self.drop_last else -(-len(batches) // self.world_size)
            mine = batches[self.rank::self.world_size][:steps]
            while batches and len(mine) < steps:  # one batch short: repeat own first batch (or the epoch's)
                mine.append(mine[0] if mine else batches[0])
            self._batches = mine
        return self._batches

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a full epoch for this rank (ignoring start_step)."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches()[self.start_step:]

    def __len__(self) -> int:
        return max(0, len(self._rank_batches()) - self.start_step)
