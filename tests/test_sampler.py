"""ShapeGroupedBatchSampler invariants: coverage, rank-disjointness, equal steps, determinism, resume, stacking."""

from collections import Counter

import numpy as np
import pytest

from afine.datasets import augmentation_flags
from afine.sampler import ShapeGroupedBatchSampler

SIZES = [(4, 6), (6, 4), (8, 8), (4, 4)]


class FakeShapes:
    """shape_fn of a dataset whose triplet i has a base size and an epoch-dependent transpose."""

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.base = [SIZES[k] for k in rng.choice(len(SIZES), size=n, p=[0.5, 0.3, 0.15, 0.05])]
        self.epoch = 0

    def __call__(self, i):
        h, w = self.base[i]
        return (w, h) if augmentation_flags(0, self.epoch, np.array([i]))[0, 2] else (h, w)


def _epoch(shapes, n, epoch, world_size=1, start_step=0, **kw):
    shapes.epoch = epoch
    out = []
    for rank in range(world_size):
        s = ShapeGroupedBatchSampler(shapes, n, rank=rank, world_size=world_size, **kw)
        s.set_epoch(epoch, start_step)
        batches = list(s)
        assert len(s) == len(batches)
        out.append(batches)
    return out


@pytest.mark.parametrize("n, batch_size", [(203, 8), (50, 1), (7, 32)])
def test_each_triplet_once_per_epoch_and_batches_stack(n, batch_size):
    shapes = FakeShapes(n)
    for epoch in (0, 1):
        [batches] = _epoch(shapes, n, epoch, batch_size=batch_size, seed=3)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        for b in batches:
            assert 1 <= len(b) <= batch_size and len({shapes(i) for i in b}) == 1
        # at most one partial batch per shape group
        partial = Counter(shapes(b[0]) for b in batches if len(b) < batch_size)
        assert all(c == 1 for c in partial.values())


def test_drop_last_only_full_batches():
    n = 203
    shapes = FakeShapes(n)
    [batches] = _epoch(shapes, n, 0, batch_size=8, drop_last=True)
    assert batches and all(len(b) == 8 for b in batches)
    groups = Counter(shapes(i) for i in range(n))
    assert len(batches) == sum(c // 8 for c in groups.values())


@pytest.mark.parametrize("world_size, drop_last", [(2, False), (3, False), (4, True), (3, True)])
def test_ranks_disjoint_equal_steps(world_size, drop_last):
    n = 301
    shapes = FakeShapes(n, seed=1)
    per_rank = _epoch(shapes, n, 5, world_size=world_size, batch_size=4, seed=9, drop_last=drop_last)
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1 and steps.pop() > 0
    owned = [{i for b in batches for i in b} for batches in per_rank]
    for r in range(world_size):
        for q in range(r + 1, world_size):
            assert not owned[r] & owned[q]
        for b in per_rank[r]:
            assert len({shapes(i) for i in b}) == 1


def test_even_split_covers_every_triplet_once():
    n, world_size = 96, 4  # one shape, 12 full batches of 8 -> 3 per rank, no padding
    per_rank = _epoch(lambda i: (4, 4), n, 0, world_size=world_size, batch_size=8)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert [len(b) for b in per_rank] == [3, 3, 3, 3]


def test_uneven_split_pads_with_own_batch():
    n, world_size = 40, 3  # 5 batches of 8 over 3 ranks: rank 2 repeats its own first batch
    per_rank = _epoch(lambda i: (4, 4), n, 0, world_size=world_size, batch_size=8)
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert per_rank[2][1] == per_rank[2][0]
    assert {i for batches in per_rank for b in batches for i in b} == set(range(n))


def test_same_seed_same_order_other_seed_or_epoch_differs():
    n = 150
    shapes = FakeShapes(n)
    a = _epoch(shapes, n, 3, batch_size=8, seed=1)
    assert a == _epoch(shapes, n, 3, batch_size=8, seed=1)
    assert a != _epoch(shapes, n, 3, batch_size=8, seed=2)
    assert a != _epoch(shapes, n, 4, batch_size=8, seed=1)


def test_no_shuffle_keeps_index_order_within_groups():
    [batches] = _epoch(lambda i: (4, 4) if i % 2 else (8, 8), 10, 0, batch_size=3, shuffle=False)
    assert batches == [[1, 3, 5], [7, 9], [0, 2, 4], [6, 8]]  # groups in sorted (H, W) order


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_matches_uninterrupted(world_size):
    n = 203
    shapes = FakeShapes(n)
    full = _epoch(shapes, n, 7, world_size=world_size, batch_size=8, seed=5)
    for start in (0, 1, 6, len(full[0]), len(full[0]) + 3):
        resumed = _epoch(shapes, n, 7, world_size=world_size, start_step=start, batch_size=8, seed=5)
        assert resumed == [batches[start:] for batches in full]


def test_len_without_iterating_and_steps_per_epoch():
    n = 120
    shapes = FakeShapes(n)
    s = ShapeGroupedBatchSampler(shapes, n, batch_size=8, seed=0, rank=1, world_size=2)
    s.set_epoch(0, start_step=2)
    total = s.steps_per_epoch
    assert len(s) == total - 2 == len(list(s))


def test_shape_fn_follows_dataset_epoch():
    n = 64
    shapes = FakeShapes(n)
    for epoch in (0, 1, 2):
        [batches] = _epoch(shapes, n, epoch, batch_size=4)
        assert all(len({shapes(i) for i in b}) == 1 for b in batches)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ShapeGroupedBatchSampler(lambda i: (1, 1), 4, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        ShapeGroupedBatchSampler(lambda i: (1, 1), 4, batch_size=2, rank=2, world_size=2)


def test_empty_dataset_yields_nothing():
    s = ShapeGroupedBatchSampler(lambda i: (1, 1), 0, batch_size=2, world_size=2)
    assert len(s) == 0 and list(s) == []
