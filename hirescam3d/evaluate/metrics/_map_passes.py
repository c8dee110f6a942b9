"""The mask metrics' loops over the voxels of a map, a mask or a selection, compiled by
numba and run without the GIL: two worker threads then score two maps at once (NumPy's
many short calls hand the GIL back and forth instead).

Maps are float32 or float64 rows ``(N,)``, C-contiguous, not empty, with ``bits``, the
same memory as unsigned integers of the same width, and a bool ``mask`` ``(N,)``. Blocks
are ``block`` voxels (the last may be shorter). Selections and labels are ``(Z, Y, X)``.
Compiled on first use and cached on disk (:func:`_compiled`)."""

from __future__ import annotations

import numba
import numpy as np

#: Reordered sums (a vector of partial sums), no other fast-math: NaN and inf kept.
_REORDER = {"reassoc", "nsz", "contract"}


def _compiled(**options):
    """``numba.njit`` without the GIL, cached on disk where numba finds a folder it can
    write (next to this module, else the user's cache folder); where it finds none (a
    read-only install and home), compiled again in each process instead of failing."""

    def compile_(function):
        try:
            return numba.njit(nogil=True, cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(function)

    return compile_


@_compiled(fastmath=_REORDER)
def _positive_sums(x: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The sums of the positive values of ``x``, a block, all and in the bool ``mask``
    (vectorised: as many partial sums as the vector has lanes, in ``x``'s dtype)."""
    zero = x.dtype.type(0)
    total = inside = zero
    for i in range(x.size):
        v = x[i] if x[i] > zero else zero
        total += v
        inside += v if mask[i] else zero
    return total, inside


@_compiled()
def _bits_max(bits: np.ndarray) -> int:
    """The largest of ``bits`` (vectorised): without a sign bit set, the bits of floats
    order as the values, NaN above infinity."""
    top = bits[0]
    for i in range(bits.size):
        top = top if top > bits[i] else bits[i]
    return top


@_compiled()
def _value_max(x: np.ndarray) -> float:
    """The maximum of ``x``, the first NaN if there is one (as NumPy's and torch's)."""
    top = x[0]
    for i in range(x.size):
        v = x[i]
        if v > top or (v != v and top == top):
            top = v
    return top


@_compiled()
def read_map(
    row: np.ndarray,
    bits: np.ndarray,
    mask: np.ndarray,
    block: int,
    block_max: np.ndarray,
    max_bits: np.ndarray,
) -> tuple[int, float, float]:
    """Fill ``block_max`` ``(n_blocks,)`` (``max_bits``: the same memory as unsigned
    integers) with each block's maximum; return the first maximum's flat position (the
    first NaN if any) and the sums of the positive values, all and in the bool ``mask``
    ``(N,)`` (float64; NaN is not positive; blocks of no positive value are skipped)."""
    sign = bits.dtype.type(1) << bits.dtype.type(8 * bits.itemsize - 1)
    positive = inside = 0.0
    for b in range(block_max.size):
        start, stop = b * block, min((b + 1) * block, row.size)
        top = _bits_max(bits[start:stop])
        if top >= sign:  # a negative value, -0.0 or a NaN with its sign bit: as values
            block_max[b] = _value_max(row[start:stop])
        else:
            max_bits[b] = top
        if not block_max[b] <= 0:  # positive or NaN: NaN values are not summed
            block_positive, block_inside = _positive_sums(row[start:stop], mask[start:stop])
            positive += block_positive
            inside += block_inside
    b = 0
    for c in range(block_max.size):  # the first block holding the maximum
        v, top = block_max[c], block_max[b]
        if top != top:
            break
        if v > top or v != v:
            b = c
    top = block_max[b]
    for i in range(b * block, min((b + 1) * block, row.size)):
        v = row[i]
        if v == top or (v != v and top != top):
            return i, positive, inside
    return b * block, positive, inside


@_compiled()
def _count_keyed(values, bits, mask, start, stop, lowest, low, below, at, reached, overlap):
    """Add to ``reached`` ``(T + 1,)`` how many of the levels each value of
    ``values[start:stop]`` at or above ``lowest`` reaches (the levels under lower keys,
    plus the one under its own key if it reaches that), and to ``overlap`` for those in
    ``mask``."""
    for i in range(start, stop):
        v = values[i]
        if v >= lowest:
            key = np.int64(bits[i] >> 16) - low
            c = below[key] + (1 if v >= at[key] else 0)
            reached[c] += 1
            overlap[c] += mask[i]


@_compiled()
def _count_searched(values, mask, start, stop, levels, reached, overlap):
    """:func:`_count_keyed` by a binary search over the ascending ``levels`` ``(T,)``."""
    for i in range(start, stop):
        v = values[i]
        if v >= levels[0]:
            c = np.searchsorted(levels, v, side="right")
            reached[c] += 1
            overlap[c] += mask[i]


@_compiled()
def count_levels(
    row: np.ndarray,
    bits: np.ndarray,
    mask: np.ndarray,
    block: int,
    block_max: np.ndarray,
    levels: np.ndarray,
    low: int,
    below: np.ndarray,
    at: np.ndarray,
    reached: np.ndarray,
    overlap: np.ndarray,
) -> None:
    """Histograms ``(T + 1,)`` of how many of the ascending ``levels`` ``(T,)`` each value
    reaches, added into ``reached`` for all values and into ``overlap`` for those in the
    bool ``mask`` ``(N,)``, in the blocks whose maximum reaches the lowest level.

    The level lookup (:class:`~hirescam3d.evaluate.metrics.localisation._LevelIndex`):
    a value's key is its upper 16 bits less ``low``; ``below[k]``, the levels under keys
    below ``k``; ``at[k]``, the level under key ``k`` (+inf if none). An empty ``below``:
    a binary search instead."""
    for b in range(block_max.size):
        if block_max[b] >= levels[0]:
            start, stop = b * block, min((b + 1) * block, row.size)
            if below.size:
                _count_keyed(row, bits, mask, start, stop, levels[0], low, below, at, reached,
                             overlap)  # fmt: skip
            else:
                _count_searched(row, mask, start, stop, levels, reached, overlap)


@_compiled()
def _widen(box: np.ndarray, axis: int, first: int, last: int) -> None:
    """Widen ``box[axis]`` (inclusive ``[first, last]``, -1 if empty) to hold both."""
    if box[axis, 0] < 0 or first < box[axis, 0]:
        box[axis, 0] = first
    box[axis, 1] = max(box[axis, 1], last)


@_compiled()
def count_and_box(values: np.ndarray, value, box: np.ndarray) -> int:
    """The number of voxels of ``values`` ``(Z, Y, X)`` equal to ``value``; their
    inclusive ``[first, last]`` index per axis written into ``box`` ``(3, 2)`` (-1 if
    none). Line by line along the last axis: each line's count (vectorised), then its
    ends where it has any."""
    box[:] = -1
    count = 0
    for z in range(values.shape[0]):
        for y in range(values.shape[1]):
            line = values[z, y]
            n = 0
            for x in range(line.size):
                n += line[x] == value
            if n:
                count += n
                first, last = 0, line.size - 1
                while line[first] != value:
                    first += 1
                while line[last] != value:
                    last -= 1
                _widen(box, 0, z, z)
                _widen(box, 1, y, y)
                _widen(box, 2, first, last)
    return count


@_compiled()
def largest_label(labels: np.ndarray, n_labels: int, box: np.ndarray) -> int:
    """The size of the largest of the components ``1..n_labels`` of ``labels`` ``(Z, Y,
    X)`` (the lowest label on ties: the first in C order, as ``cc3d`` and SciPy number
    them); its inclusive box written into ``box`` ``(3, 2)`` (:func:`count_and_box`)."""
    sizes = np.zeros(n_labels + 1, np.int64)
    for v in labels.ravel():
        sizes[v] += 1
    best = 1
    for label in range(2, n_labels + 1):
        if sizes[label] > sizes[best]:
            best = label
    return count_and_box(labels, labels.dtype.type(best), box)
