"""GlobalBatches: the official batch order (one permutation per epoch, consecutive global batches, last
incomplete dropped), rank slices that add up to the one-process batch, same-shape micro-batches."""

from collections import Counter

import numpy as np
import pytest

from afine.batches import GlobalBatches, epoch_order, shape_groups
from afine.datasets import augmentation_flags
from afine.errors import AfineError

SIZES = [(4, 6), (6, 4), (8, 8), (4, 4)]


class FakeShapes:
    """shape(key) of a dataset whose triplet i has a base size and an epoch-dependent transpose."""

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.base = [SIZES[k] for k in rng.choice(len(SIZES), size=n, p=[0.5, 0.3, 0.15, 0.05])]

    def __call__(self, key):
        epoch, i = key
        h, w = self.base[i]
        return (w, h) if augmentation_flags(0, epoch, np.array([i]))[0, 2] else (h, w)


def test_each_epoch_is_one_permutation_cut_into_global_batches():
    n, shapes = 50, FakeShapes(50)
    plan = GlobalBatches(n, shapes, batch_size=8, seed=3)
    assert plan.steps_per_epoch == 6  # 48 triplets; the last 2 of each epoch are dropped
    for epoch in range(3):
        steps = range(epoch * 6, epoch * 6 + 6)
        keys = [k for s in steps for k in plan.keys(s)]
        assert {e for e, _ in keys} == {epoch}
        order = epoch_order(n, 3, epoch)
        assert [i for _, i in keys] == order[:48].tolist()  # consecutive slices of the epoch's permutation
    first, second = (epoch_order(n, 3, e) for e in (0, 1))
    assert sorted(first) == list(range(n)) and not np.array_equal(first, second)
    assert np.array_equal(epoch_order(n, 3, 1), second)  # a function of (seed, epoch) alone
    assert epoch_order(n, 3, 0, shuffle=False).tolist() == list(range(n))


@pytest.mark.parametrize("world_size, grad_accum", [(2, 1), (4, 1), (2, 2), (1, 4)])
def test_the_ranks_of_a_step_hold_exactly_the_one_process_batch(world_size, grad_accum):
    n, shapes = 70, FakeShapes(70, seed=1)
    one = GlobalBatches(n, shapes, batch_size=16, seed=5)
    per = 16 // (world_size * grad_accum)
    ranks = [GlobalBatches(n, shapes, batch_size=per, grad_accum=grad_accum, seed=5, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert all(r.global_batch == 16 and r.steps_per_epoch == one.steps_per_epoch for r in ranks)
    for step in range(2 * one.steps_per_epoch + 1):
        split = [r.keys(step) for r in ranks]
        assert all(len(s) == per * grad_accum for s in split)
        assert [k for s in split for k in s] == one.keys(step)  # rank r holds the r-th slice


def test_micro_batches_share_one_shape_respect_the_cap_and_cover_the_step():
    n, shapes = 60, FakeShapes(60, seed=2)
    for cap_images, per_forward in ((0, 20), (9, 3), (2, 1)):
        plan = GlobalBatches(n, shapes, batch_size=20, micro_batch=cap_images, seed=0)
        for step in range(4):
            micro = plan.micro_batches(step)
            assert all(len({shapes(k) for k in m}) == 1 for m in micro)
            assert all(len(m) <= per_forward for m in micro)
            assert Counter(k for m in micro for k in m) == Counter(plan.keys(step))
            assert len(micro) >= len({shapes(k) for k in plan.keys(step)})
    plan = GlobalBatches(n, shapes, batch_size=20, seed=0)
    assert list(plan.sampler(1, 3)) == plan.micro_batches(1) + plan.micro_batches(2)


def test_shape_groups_keep_order_within_a_shape():
    keys = ["a", "B", "c", "D", "e"]
    assert shape_groups(keys, str.islower) == [["a", "c", "e"], ["B", "D"]]
    assert shape_groups(keys, str.islower, cap=2) == [["a", "c"], ["e"], ["B", "D"]]


def test_too_few_triplets_for_one_global_batch_is_a_clear_error():
    with pytest.raises(AfineError, match="cannot fill one global batch of 12"):
        GlobalBatches(10, FakeShapes(10), batch_size=3, grad_accum=2, world_size=2)
