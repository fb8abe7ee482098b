"""Training batches as the published trainer forms them, split into same-shape micro-batches.

Each epoch is a fresh permutation of all training triplets (seeded by seed and epoch, the same on every
rank); step t of the epoch takes the next `global_batch` triplets of it, the last incomplete batch of the
epoch dropped, so a batch mixes datasets and image sizes in proportion to their triplet counts. Rank r of
R takes the r-th of R equal slices, so which triplets make up step t does not depend on R. Inside its
slice, a rank groups the triplets by image shape (after the epoch's augmentation) and cuts each group into
micro-batches of at most `micro_batch` images: full-size images, no crop, no padding. The training loop
sums the micro-batches' loss gradients divided by the global batch size and sums them over ranks: the
gradient of the mean loss over the whole global batch (docs/training.md, "Batches"; the README, "How this differs
from the official release").

Triplets are addressed as (epoch, index) keys, so a DataLoader can run across epochs and its workers
apply each epoch's augmentation without being told the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .errors import AfineError

Key = tuple[int, int]  # (epoch, triplet index)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's permutation of the n triplets (identity without shuffling)."""
    return np.random.default_rng([seed % 2**63, epoch]).permutation(n) if shuffle else np.arange(n)


def shape_groups(keys: list, shape: Callable, cap: int = 0) -> list[list]:
    """Keys grouped by shape (groups in order of first appearance, keys in order), each group cut into
    chunks of at most `cap` keys (0: no cap)."""
    groups: dict[tuple[int, int], list] = {}
    for key in keys:
        groups.setdefault(shape(key), []).append(key)
    size = cap or max(1, len(keys))
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


class GlobalBatches:
    """Which triplets each rank trains on at each step: the official batch order, micro-batched by shape.

    shape(key) -> (H, W) of triplet key = (epoch, index) after that epoch's augmentation.
    """

    def __init__(self, n: int, shape: Callable[[Key], tuple[int, int]], batch_size: int, grad_accum: int = 1,
                 micro_batch: int = 0, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.shape, self.seed, self.shuffle = n, shape, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = batch_size * grad_accum
        self.global_batch = self.per_rank * world_size
        self.per_forward = max(1, micro_batch // 3) if micro_batch else 0  # triplets: up to 3 images each
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise AfineError(f"{n} training triplets cannot fill one global batch of {self.global_batch} "
                             f"(batch_size x grad_accum x {world_size} process(es)); lower batch_size")

    def keys(self, step: int) -> list[Key]:
        """This rank's triplets of optimiser step `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + self.rank * self.per_rank
        order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        return [(epoch, int(i)) for i in order[start:start + self.per_rank]]

    def micro_batches(self, step: int) -> list[list[Key]]:
        """This rank's triplets of step `step` as same-shape micro-batches."""
        return shape_groups(self.keys(step), self.shape, self.per_forward)

    def sampler(self, first_step: int, end_step: int) -> Iterator[list[Key]]:
        """Every micro-batch of steps first_step..end_step-1 in training order: a DataLoader batch_sampler."""
        for step in range(first_step, end_step):
            yield from self.micro_batches(step)


def distinct_images(batch: dict, names: tuple[str, ...] = ("x1", "x2", "y")) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct images of a batch (by file and augmentation), each once, and where each triplet's
    images are among them: (images [U, 3, H, W], index [len(names), B])."""
    column = {"x1": 0, "x2": 1, "y": 2}
    keys = [triplet[column[name]] for name in names for triplet in batch["keys"]]
    slot: dict[str, int] = {}
    first = []
    for pos, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(first)
            first.append(pos)
    stacked = torch.cat([batch[name] for name in names])
    index = torch.tensor([slot[k] for k in keys], dtype=torch.long).view(len(names), -1)
    return stacked[torch.tensor(first, dtype=torch.long)], index
