"""The mask metrics' compiled passes over a map (``_map_passes``, numba) on their own,
against NumPy and SciPy: block maxima with signed NaNs, -0.0 and infinities, blocks that
do not divide the map, the level counts by key and by binary search, and the voxel
counts, boxes and largest components of random selections; and the passes where numba
has no folder for its cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from hirescam3d.evaluate import metrics
from hirescam3d.evaluate.metrics import _map_passes as passes
from hirescam3d.evaluate.metrics import localisation

SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0])


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.itemsize}"))


def special_row(rng: np.random.Generator, n: int, dtype, nan: bool) -> np.ndarray:
    """Random values, a third of them zero, some negative, with -0.0, infinities and (if
    ``nan``) NaNs of both signs at random places."""
    row = (rng.random(n) - 0.3) * (rng.random(n) > 0.33)
    specials = SPECIAL if nan else SPECIAL[2:]
    row[rng.integers(0, n, 12)] = rng.choice(specials, 12)
    return row.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, block", [(1000, 7), (4099, 16), (70_000, 4096), (33, 64)])
@pytest.mark.parametrize("nan", [False, True])
def test_read_map_like_numpy(dtype, n, block, nan):
    rng = np.random.default_rng(n + block)
    for _ in range(5):
        row = special_row(rng, n, dtype, nan)
        mask = rng.random(n) > 0.5
        block_max = np.empty(-(-n // block), dtype)
        first, positive, inside = passes.read_map(row, bits(row), mask, block, block_max,
                                                  bits(block_max))  # fmt: skip
        want_max = np.maximum.reduceat(row, np.arange(0, n, block))
        np.testing.assert_array_equal(block_max, want_max)  # NaN where NumPy has NaN
        assert first == int(np.argmax(row))  # the first NaN, else the first maximum
        pos = np.where(row > 0, row, 0).astype(np.float64)  # NaN is not positive
        np.testing.assert_allclose(positive, pos.sum(), rtol=1e-6)
        np.testing.assert_allclose(inside, pos[mask].sum(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relative", [(0.02, 0.5, 0.51, 0.98), (0.0, 0.3, 0.3001), (-0.5, 0.7)])
def test_count_levels_like_one_comparison_per_level(dtype, relative):
    """How many values reach each level, all and in the mask, against ``row >= level``
    per level: by key where the levels allow it (positive float32 ones, 1/128 apart),
    else by a binary search."""
    rng = np.random.default_rng(3)
    n, block = 50_000, 256
    row = (np.maximum(rng.random(n) - 0.6, 0) * 5).astype(dtype)
    row[rng.integers(0, n, 200)] *= -1  # negative values
    mask = rng.random(n) > 0.4
    top = row.max()
    levels = np.sort(np.asarray(relative, dtype) * top).astype(dtype)
    row[rng.integers(0, n, 2 * levels.size)] = np.repeat(levels, 2)  # values on the levels
    block_max = np.maximum.reduceat(row, np.arange(0, n, block))
    index = localisation._level_index(levels, top)
    keyed = dtype == np.float32 and relative[0] > 0 and relative[1:3] != (0.3, 0.3001)
    assert (index.below.size > 0) == keyed
    reached, overlap = np.zeros((2, levels.size + 1), np.int64)
    passes.count_levels(row, bits(row), mask, block, block_max, levels, index.low,
                        index.below, index.at, reached, overlap)  # fmt: skip
    at_or_above = reached[:0:-1].cumsum()[::-1]
    in_mask = overlap[:0:-1].cumsum()[::-1]
    want = row[:, None] >= levels
    np.testing.assert_array_equal(at_or_above, want.sum(0))
    np.testing.assert_array_equal(in_mask, want[mask].sum(0))


@pytest.mark.parametrize("shape", [(9, 13, 17), (1, 1, 40), (30, 1, 1), (4, 50, 3)])
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_count_box_and_largest_component_like_scipy(shape, connectivity):
    """The count and box of a selection, and the size and box of its largest component
    (the first on ties) from ``cc3d``'s labels, against NumPy and ``scipy.ndimage``."""
    import cc3d

    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    structure = ndimage.generate_binary_structure(3, rank)
    rng = np.random.default_rng(sum(shape) + connectivity)
    for p in (0.0, 0.2, 0.45, 1.0):
        selected = rng.random(shape) < p
        box = np.empty((3, 2), np.int64)
        count = passes.count_and_box(selected, True, box)
        assert count == selected.sum()
        where = np.argwhere(selected)
        want_box = np.stack([where.min(0), where.max(0)], 1) if count else np.full((3, 2), -1)
        np.testing.assert_array_equal(box, want_box)
        if not count:
            continue
        labels, n = cc3d.connected_components(selected.view(np.uint8),
                                              connectivity=connectivity, return_N=True)  # fmt: skip
        size = passes.largest_label(labels, n, box)
        ref, n_ref = ndimage.label(selected, structure)
        sizes = np.bincount(ref.ravel())[1:]
        best = np.argwhere(ref == int(np.argmax(sizes)) + 1)
        assert (n, size) == (n_ref, sizes.max())
        np.testing.assert_array_equal(box, np.stack([best.min(0), best.max(0)], 1))


@pytest.mark.slow
def test_metrics_run_where_numba_has_no_cache_folder():
    """A read-only install and home leave numba no folder for its cache, and plain
    ``njit(cache=True)`` then fails at import. The passes compile in the process instead,
    with the same results. (numba's own setting, ``NUMBA_CACHE_LOCATOR_CLASSES``, limits
    it here to the locator of IPython cells, which never applies to a file.)"""
    code = (
        "import numba, torch\n"
        "try:\n"
        "    numba.njit(cache=True)(lambda x: x)\n"
        "    raise SystemExit('numba found a cache folder: the test does not test')\n"
        "except RuntimeError as e:\n"
        "    assert 'no locator available' in str(e), e\n"
        "from hirescam3d.evaluate import metrics\n"
        "g = torch.Generator().manual_seed(0)\n"
        "maps = torch.rand((1, 2, 9, 10, 11), generator=g) ** 4\n"
        "out = metrics.localisation_metrics(maps, maps > 0.3)\n"
        "print(repr(out.iou_curve.tolist()), repr(out.gradcam_box.tolist()))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    g = torch.Generator().manual_seed(0)
    maps = torch.rand((1, 2, 9, 10, 11), generator=g) ** 4
    out = metrics.localisation_metrics(maps, maps > 0.3)
    assert run.stdout.split() == f"{out.iou_curve.tolist()!r} {out.gradcam_box.tolist()!r}".split()
