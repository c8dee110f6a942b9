"""Scan-sized arrays kept between the scans of a batch (``pipeline.scan_memory``). Oracle:
the arrays' data addresses (the same memory handed out again, or not)."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from hirescam3d.pipeline import scan_memory

SHAPE = (6, 5, 4)


def test_kept_memory_is_handed_to_the_next_scan_of_that_size_in_either_order():
    with scan_memory.reuse():
        arrays = [scan_memory.empty(SHAPE), scan_memory.empty(SHAPE, order="F")]
        owners = [weakref.ref(a) for a in arrays]  # new arrays: each owns its memory
        scan_memory.keep(arrays)
        assert arrays == [] and all(o() is not None for o in owners)  # alive: kept
        again = [scan_memory.empty(SHAPE, order="F"), scan_memory.empty(SHAPE)]
        assert {id(a.base) for a in again} == {id(o()) for o in owners}
        assert again[0].flags.f_contiguous and again[1].flags.c_contiguous
        assert all(a.shape == SHAPE and a.dtype == np.float32 for a in again)
        assert scan_memory.empty(SHAPE).base is None  # nothing kept left: new memory


def test_memory_still_referred_to_is_not_kept():
    with scan_memory.reuse() as memory:
        for hold in (lambda a: a[1:], torch.from_numpy, lambda a: a):
            arrays = [scan_memory.empty(SHAPE)]
            held = hold(arrays[0])  # a view or tensor of it would see the next scan
            scan_memory.keep(arrays)
            assert memory.free == [] and scan_memory.empty(SHAPE).base is None
            del held


def test_at_most_two_are_kept_and_another_size_lets_them_go():
    with scan_memory.reuse() as memory:
        scan_memory.keep([scan_memory.empty(SHAPE) for _ in range(3)])
        assert len(memory.free) == scan_memory.KEEP
        scan_memory.keep([np.ones(SHAPE, np.float64)])  # not float32: not kept
        assert len(memory.free) == scan_memory.KEEP
        bigger = scan_memory.empty((7, 5, 4))
        assert bigger.shape == (7, 5, 4) and memory.free == []


def test_outside_a_batch_nothing_is_kept():
    array = scan_memory.empty(SHAPE)
    gone = weakref.ref(array)
    scan_memory.keep(arrays := [array])
    del array
    assert arrays == [] and gone() is None  # let go: nothing holds it
    with scan_memory.reuse() as memory:
        assert memory.free == []
