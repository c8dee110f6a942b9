"""Localisation: how well maps ``(B, K, *S)`` find a mask (pointing game, relevance mass,
IoU over thresholds, the Grad-CAM box).

The mask metrics run map by map on the CPU and return ``(B, K)`` float32 tensors on the
maps' device. The passes over the voxels are compiled by numba and hold no GIL
(:mod:`~hirescam3d.evaluate.metrics._map_passes`). Each map is read from memory once,
with its mask, in blocks of whole lines along the last axis (about 4096 voxels): its
first maximum, each block's maximum, its positive mass, all and inside the mask. After
that only the blocks whose maximum reaches a level are read again (explanation maps are
mostly zero). The IoU curve counts each value at or above the lowest level, all and
inside the mask, by the number of levels it reaches (found from the value's upper bits
and one comparison, or a binary search; no sort). The Grad-CAM box's components are
labelled by ``cc3d`` band by band: the first-axis indices whose lines lie in blocks
that reach the box's level, between indices that have none (no component crosses
those), each band inside the box of its selected voxels. Each distinct mask is listed
once, while the first maps are read. Large maps run on ``torch.get_num_threads()``
worker threads, which are kept between calls with their buffers.
:func:`localisation_metrics` computes every mask metric at once, sharing the passes
over the maps: use it when you need more than one. Masks are boolean ``(B, K, *S)`` or
``(B, 1, *S)`` (one mask for all K targets of an item), moved to the maps' device.

Conventions, the same for every mask metric:

- **Empty masks** score 0 (nothing can be hit, covered or overlapped), never NaN.
- **A map with no positive value** (all zeros, or all negative) gives NaN in
  :func:`relevance_mass`, :func:`iou_curve` / :func:`iou_at_best_threshold` and
  :func:`gradcam_box`: there is no positive mass to share and a threshold relative to a
  non-positive maximum selects nothing meaningful. Average with ``torch.nanmean`` and
  report how many were NaN. :func:`pointing_game` still points at the first maximum.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from hirescam3d.errors import InputError
from hirescam3d.evaluate.metrics._common import as_float, spatial_dims
from hirescam3d.evaluate.metrics._map_passes import (
    count_and_box,
    count_levels,
    largest_label,
    read_map,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BestIoU",
    "Localisation",
    "gradcam_box",
    "iou_at_best_threshold",
    "iou_curve",
    "localisation_metrics",
    "pointing_game",
    "relevance_mass",
]

#: The HiResCAM paper's binarisation thresholds (section 5.5): 0.02, 0.04, ..., 0.98.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.02 * i, 2) for i in range(1, 50))

#: Maps of this many voxels or more are scored on ``torch.get_num_threads()`` threads.
_THREADED_VOXELS = 1 << 16
#: Voxels per block, about: each block's maximum is kept, and later passes read only the
#: blocks whose maximum reaches their level. A block is made of whole lines along the
#: last axis (:func:`_block_size`), so the blocks also tell which lines may hold a voxel.
_BLOCK = 1 << 12
#: uint64 words of two masks compared at a time (:func:`_rows_equal`).
_WORDS = 1 << 15
#: One in this many uint64 words of each mask is compared before the whole masks
#: (:func:`_first_equal_rows`).
_SAMPLE = 1 << 11
#: A worker's buffers are kept for the next call up to this many bytes (page faults on
#: fresh buffers cost more than the metrics' own work on small maps).
_KEEP_BYTES = 64 << 20

#: Buffers kept between calls, and worker threads by their number (kept too: a thread's
#: allocator arena stays warm), both reset in a forked child.
_kept: queue.SimpleQueue[_Scratch] = queue.SimpleQueue()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _flat_pair(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps`` as float ``(B, K, N)`` and ``masks`` as bool ``(B or 1, K or 1, N)``."""
    spatial_dims(maps)
    if not isinstance(masks, torch.Tensor):
        raise InputError(f"masks must be a torch.Tensor, not {type(masks).__name__}")
    b, k = maps.shape[:2]
    ok = (
        masks.ndim == maps.ndim
        and masks.shape[2:] == maps.shape[2:]
        and masks.shape[0] in (1, b)
        and masks.shape[1] in (1, k)
    )
    if not ok:
        raise InputError(
            f"masks of shape {tuple(masks.shape)} do not match maps {tuple(maps.shape)}; "
            f"give (B, K, *spatial) or (B, 1, *spatial)"
        )
    if maps.numel() == 0:
        raise InputError(f"maps of shape {tuple(maps.shape)} have no voxels; give maps "
                         f"(B, K, *spatial) with every axis at least 1 long")  # fmt: skip
    masks = masks.to(device=maps.device)
    if masks.dtype != torch.bool:
        masks = masks != 0
    return as_float(maps).flatten(2), masks.flatten(2)


@dataclass
class Localisation:
    """Every mask metric of maps ``(B, K, *S)``, from :func:`localisation_metrics`.

    ``pointing_game``, ``relevance_mass``, ``iou`` (the best over the thresholds),
    ``iou_threshold`` (the lowest threshold reaching it) and ``gradcam_box``: ``(B, K)``
    float32; ``iou_curve``: ``(B, K, T)`` float32 for ``thresholds`` ``(T,)`` (sorted
    ascending); ``map_boxes`` / ``mask_boxes``: long ``(B, K, D, 2)`` inclusive
    ``[first, last]`` voxel index per axis of the Grad-CAM box and of the mask (-1 where
    there is none).
    """

    pointing_game: torch.Tensor
    relevance_mass: torch.Tensor
    iou: torch.Tensor
    iou_threshold: torch.Tensor
    iou_curve: torch.Tensor
    thresholds: torch.Tensor
    gradcam_box: torch.Tensor
    map_boxes: torch.Tensor
    mask_boxes: torch.Tensor


def _box_iou(a: list[list[int]], b: list[list[int]]) -> float:
    """IoU of two inclusive voxel boxes ``[[first, last], ...]``, counted in voxels (exact
    integers, one rounding: the division)."""
    inter = math.prod(max(min(a1, b1) - max(a0, b0) + 1, 0)
                      for (a0, a1), (b0, b1) in zip(a, b, strict=True))  # fmt: skip
    area_a = math.prod(last - first + 1 for first, last in a)
    area_b = math.prod(last - first + 1 for first, last in b)
    return inter / (area_a + area_b - inter)


def _count_and_box(selected: np.ndarray) -> tuple[int, list[list[int]] | None]:
    """The True voxels of the bool ``selected`` ``(Z, Y, X)``: their count and inclusive
    box ``[[first, last], ...]`` (None if none), in one compiled pass
    (:func:`~hirescam3d.evaluate.metrics._map_passes.count_and_box`)."""
    box = np.empty((3, 2), np.int64)
    count = int(count_and_box(selected, True, box))
    return count, box.tolist() if count else None


def _nd_box(box: list[list[int]], nd: int) -> list[list[int]]:
    """A box of a map as 3D (:func:`_as_3d`) as a box of its ``nd`` axes."""
    return box if nd == 3 else [box[0], box[2]][:nd]


def _breaks(values: np.ndarray, gap: int) -> list[int]:
    """Positions ``[0, ..., M]`` that cut the ascending ``values`` ``(M,)`` into groups: a
    new group begins where the next value is more than ``gap`` above the last."""
    return [0, *(np.flatnonzero(np.diff(values) > gap) + 1).tolist(), values.size]


def _groups(where: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the groups of the ascending indices ``where``: a new group
    begins after more than ``gap - 1`` missing indices."""
    if where.size == 0:
        return []
    return [(int(where[first]), int(where[last - 1]) + 1)
            for first, last in itertools.pairwise(_breaks(where, gap))]  # fmt: skip


class _Thresholds(NamedTuple):
    """The IoU thresholds sorted ascending ``(T,)`` (maps' dtype and device), the order
    that sorted them, and the sorted ones as NumPy."""

    sorted: torch.Tensor
    order: torch.Tensor
    values: np.ndarray


def _sorted_thresholds(
    thresholds: Sequence[float] | torch.Tensor, like: torch.Tensor
) -> _Thresholds:
    """``thresholds`` in the dtype and on the device of ``like``, sorted; InputError if
    empty or not finite."""
    t = torch.as_tensor(thresholds, dtype=like.dtype, device=like.device).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise InputError("thresholds must be a non-empty sequence of finite numbers")
    t_sorted, order = t.sort()
    return _Thresholds(t_sorted, order, t_sorted.cpu().numpy())


class _BoxRule(NamedTuple):
    """How :func:`gradcam_box` selects a map's voxels: ``map >= threshold * max`` (the
    threshold in the maps' dtype), components of ``connectivity`` (``cc3d``'s 3D
    neighbourhood: 6, 18 or 26)."""

    threshold: np.ndarray
    connectivity: int


def _box_rule(threshold: float, connectivity: int | None, nd: int, dtype: np.dtype) -> _BoxRule:
    """The :class:`_BoxRule` of a relative ``threshold`` and ``connectivity`` (as in
    ``scipy.ndimage.generate_binary_structure``, 1 to ``nd``; default ``nd``: faces,
    edges and corners) for ``nd``-D maps of ``dtype``. A threshold above 1 would select
    no voxel: refused."""
    if not threshold <= 1:
        raise InputError(f"threshold must be at most 1 (a share of the map's maximum); got "
                         f"{threshold}")  # fmt: skip
    c = nd if connectivity is None else connectivity
    if not 1 <= c <= nd:
        raise InputError(f"connectivity must be 1 to {nd} for {nd}-D maps; got {connectivity}")
    neighbours = 6 if c == 1 else 26 if c == nd else 18
    return _BoxRule(np.asarray(threshold, dtype=dtype), neighbours)


class _MaskRows:
    """The masks as NumPy rows ``(B or 1) * (K or 1)`` of ``N`` voxels; each distinct
    mask's voxel count (and box, if asked for) is found once, for the first of the rows
    that hold it (:meth:`find`)."""

    def __init__(self, masks: torch.Tensor, k: int, shape: tuple[int, ...], boxes: bool):
        self.rows = np.ascontiguousarray(masks.reshape(-1, masks.shape[-1]).cpu().numpy())
        self.bm, self.km = masks.shape[:2]
        self.k = k
        self.shape = shape
        self.boxes = boxes
        self.first: list[int] = []
        self._found: dict[int, tuple[int, list[list[int]] | None]] = {}

    def of_map(self, r: int) -> int:
        """The mask row of map row ``r`` (item ``r // K``, target ``r % K``)."""
        return (r // self.k if self.bm > 1 else 0) * self.km + (r % self.k if self.km > 1 else 0)

    def find(self) -> _MaskRows:
        """Find which rows are equal (:attr:`first`), then the voxel count (and box) of
        each distinct mask, for :meth:`voxels`."""
        self.first = _first_equal_rows(self.rows)
        for i in sorted(set(self.first)):
            count, box = _count_and_box(self.rows[i].reshape(_as_3d(self.shape)))
            keep = self.boxes and box is not None
            self._found[i] = (count, _nd_box(box, len(self.shape)) if keep else None)
        return self

    def voxels(self, i: int) -> tuple[int, list[list[int]] | None]:
        """Mask row ``i``'s voxel count and its box (None if not asked for), once
        :meth:`find` has run."""
        return self._found[self.first[i]]


def _as_words(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A bool row ``(N,)`` (contiguous) as uint64 words of 8 voxels ``(N // 8,)`` and the
    remaining ``N % 8`` voxels."""
    cut = row.size - row.size % 8
    return row[:cut].view(np.uint64), row[cut:]


def _rows_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the bool rows ``a`` and ``b`` ``(N,)`` (contiguous) are equal, compared 8
    voxels a word, :data:`_WORDS` words at a time up to the first difference."""
    (wa, ta), (wb, tb) = _as_words(a), _as_words(b)
    if not np.array_equal(ta, tb):
        return False
    return all(np.array_equal(wa[s : s + _WORDS], wb[s : s + _WORDS])
               for s in range(0, wa.size, _WORDS))  # fmt: skip


def _first_equal_rows(rows: np.ndarray) -> list[int]:
    """For each bool row of ``rows (R, N)`` (C-contiguous), the first row equal to it.
    Rows are compared in full only where a sample of their words (one in
    :data:`_SAMPLE`, read at almost no cost) agrees."""
    if len(rows) == 1:
        return [0]
    samples = [_as_words(row)[0][::_SAMPLE].tobytes() for row in rows]
    first: list[int] = []
    for i, row in enumerate(rows):
        same = (j for j in range(i) if first[j] == j and samples[j] == samples[i])
        first.append(next((j for j in same if _rows_equal(rows[j], row)), i))
    return first


@dataclass
class _RowScores:
    """The mask metrics of ``R = B * K`` map rows as NumPy arrays, filled row by row."""

    pointing: np.ndarray  # (R,) float32
    mass: np.ndarray  # (R,) float64
    curve: np.ndarray  # (R, T) float64, over the sorted thresholds
    box: np.ndarray  # (R,) float64
    map_boxes: np.ndarray  # (R, D, 2) int64
    mask_boxes: np.ndarray  # (R, D, 2) int64

    @classmethod
    def unscored(cls, n_rows: int, n_thresholds: int, nd: int) -> _RowScores:
        """What a row keeps where it is not scored: pointing 0, NaN metrics, boxes -1."""
        return cls(
            pointing=np.zeros(n_rows, np.float32),
            mass=np.full(n_rows, math.nan),
            curve=np.full((n_rows, n_thresholds), math.nan),
            box=np.full(n_rows, math.nan),
            map_boxes=np.full((n_rows, nd, 2), -1, np.int64),
            mask_boxes=np.full((n_rows, nd, 2), -1, np.int64),
        )


def _block_size(shape: tuple[int, ...]) -> int:
    """Voxels per block of maps of ``shape``: whole lines along the last axis of
    :func:`_as_3d`, about :data:`_BLOCK` voxels (one line if longer; :data:`_BLOCK`
    voxels in 1D, whose lines are single voxels)."""
    line = _as_3d(shape)[2]
    return line * max(1, _BLOCK // line)


class _Read(NamedTuple):
    """What one read of a flat map gives: its first maximum (flat position; NaN counts as
    one, as in torch), each block's maximum ``(n_blocks,)``, its positive mass, all and
    inside its mask, and the voxels per block."""

    first: int
    block_max: np.ndarray
    positive: float
    inside: float
    block: int


def _bits(a: np.ndarray) -> np.ndarray:
    """The float array ``a`` as unsigned integers of its width (the same memory)."""
    return a.view(np.dtype(f"u{a.itemsize}"))


def _read(row: np.ndarray, mask: np.ndarray, block: int) -> _Read:
    """Read the flat map ``row`` and its bool ``mask`` (both C-contiguous) once, in blocks
    of ``block`` voxels (:func:`~hirescam3d.evaluate.metrics._map_passes.read_map`:
    compiled, no GIL held)."""
    block_max = np.empty(-(-row.size // block), row.dtype)
    first, positive, inside = read_map(row, _bits(row), mask, block, block_max, _bits(block_max))
    return _Read(int(first), block_max, float(positive), float(inside), block)


class _Scratch:
    """Buffers one worker reuses from map to map and from call to call (grown when a map
    needs more; see :data:`_KEEP_BYTES`), so that the large temporaries of a map are not
    allocated, faulted in and released again for each map."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: np.dtype) -> np.ndarray:
        """A flat buffer ``(size,)`` of ``dtype``, holding whatever it last held."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = np.empty(size, dtype)
        return buffer[:size]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.nbytes for b in self._buffers.values())


class _LevelIndex(NamedTuple):
    """T ascending positive float32 levels by their upper 16 bits (sign, exponent and 7
    mantissa bits: their key; keys order as the values do), from ``low``, the lowest
    level's key, for every key ``low + k`` up to the map's maximum's: ``below[k]``, how
    many levels lie under lower keys; ``at[k]``, the level under that key (+inf if
    none). A value under key ``low + k`` reaches ``below[k]`` levels, and one more if it
    reaches ``at[k]``."""

    low: int
    below: np.ndarray  # (K,) int64
    at: np.ndarray  # (K,) float32


#: No :class:`_LevelIndex`: the compiled count searches the levels instead.
_SEARCH = _LevelIndex(0, np.empty(0, np.int64), np.empty(0, np.float32))


def _level_index(levels: np.ndarray, top: np.floating) -> _LevelIndex:
    """The :class:`_LevelIndex` of ascending ``levels`` ``(T,)`` of a map whose maximum is
    ``top``; :data:`_SEARCH` where it does not apply (not float32, not all positive and
    finite, or two levels under one key: less than 1/128 of their value apart)."""
    if levels.dtype != np.float32 or not 0 < levels[0] <= levels[-1] < np.inf:
        return _SEARCH
    keys = (levels.view(np.uint32) >> 16).astype(np.int64)
    if not (keys[1:] > keys[:-1]).all():
        return _SEARCH
    low, high = int(keys[0]), max(int(keys[-1]), int(np.float32(top).view(np.uint32)) >> 16)
    at = np.full(high - low + 1, np.inf, np.float32)
    at[keys - low] = levels
    below = np.searchsorted(keys - low, np.arange(high - low + 1), side="left")
    return _LevelIndex(low, below.astype(np.int64), at)


@functools.lru_cache(maxsize=64)
def _cached_level_index(raw: bytes, dtype: str, top: float) -> _LevelIndex:
    """:func:`_level_index` of the levels ``np.frombuffer(raw, dtype)``, kept: maps with
    the same maximum (such as maps scaled to 1) share it."""
    return _level_index(np.frombuffer(raw, dtype), np.float32(top))


def _level_counts(
    row: np.ndarray, read: _Read, mask: np.ndarray, levels: np.ndarray, top: np.floating
) -> tuple[np.ndarray, np.ndarray]:
    """How many voxels of the flat map ``row`` lie at or above each of the ascending
    ``levels`` ``(T,)``, all and in the bool ``mask`` ``(N,)``. One compiled pass over
    the blocks that reach the lowest level
    (:func:`~hirescam3d.evaluate.metrics._map_passes.count_levels`): each value counted
    by the levels it reaches, by the :func:`_level_index` of ``levels`` (or a binary
    search); then summed from the top level down. No sort, no copy of the values."""
    index = _cached_level_index(levels.tobytes(), levels.dtype.str, float(top))
    reached, overlap = np.zeros((2, levels.size + 1), np.int64)
    count_levels(row, _bits(row), mask, read.block, read.block_max, levels, index.low,
                 index.below, index.at, reached, overlap)  # fmt: skip
    return reached[:0:-1].cumsum()[::-1], overlap[:0:-1].cumsum()[::-1]


def _iou_row(pred: np.ndarray, inter: np.ndarray, mask_size: int) -> np.ndarray:
    """``(T,)`` IoU of ``{map >= level}`` with a mask of ``mask_size`` voxels for T
    levels, from the :func:`_level_counts` of the map's values, all (``pred``) and
    inside the mask (``inter``)."""
    union = pred + mask_size - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _as_3d(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Maps of ``shape`` (1 to 3 axes) as 3D: ``(Y, X)`` as ``(Y, 1, X)``, ``(N,)`` as
    ``(N, 1, 1)``; lines run along the last axis, groups along the first."""
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    return (shape[0], 1, shape[1] if len(shape) == 2 else 1)


class _Band(NamedTuple):
    """Consecutive first-axis indices ``[first, stop)`` whose lines may hold a selected
    voxel, and the middle-axis indices ``[low, high)`` of those lines."""

    first: int
    stop: int
    low: int
    high: int


def _bands(shape: tuple[int, int, int], read: _Read, level: np.ndarray) -> list[_Band]:
    """The :class:`_Band` of each group of consecutive first-axis indices of a 3D map of
    ``shape`` with a line in a block whose maximum reaches ``level`` (blocks are whole
    lines). No component of ``{map >= level}`` spans two bands."""
    z, y, x = shape
    lines = np.repeat(read.block_max >= level, read.block // x)[: z * y].reshape(z, y)
    bands = []
    for first, stop in _groups(np.flatnonzero(np.logical_or.reduce(lines, axis=1)), 1):
        middle = np.flatnonzero(np.logical_or.reduce(lines[first:stop], axis=0))
        bands.append(_Band(first, stop, int(middle[0]), int(middle[-1]) + 1))
    return bands


def _largest_in(
    selected: np.ndarray,
    count: int,
    outer: list[list[int]],
    connectivity: int,
    scratch: _Scratch,
) -> tuple[int, list[list[int]]]:
    """Size and inclusive box (in ``selected``'s indices) of the largest component (the
    first in C order on ties) of the bool ``selected`` ``(Z, Y, X)``, whose ``count``
    voxels all lie in the box ``outer``.

    ``cc3d`` labels the crop to ``outer`` (a buffer of ``scratch``) in C order, as
    ``scipy.ndimage.label`` does, about four times faster; ``connectivity`` is its 3D
    neighbourhood (6, 18 or 26)."""
    import cc3d

    view = selected[tuple(slice(first, last + 1) for first, last in outer)]
    crop = scratch.get("crop", view.size, np.dtype(bool)).reshape(view.shape)
    np.copyto(crop, view)
    # cc3d 4.1's binary labelling (bool input; twice as fast as its multi-label one) fails
    # on lines, 26-connected ("maximum length exception"): those go as uint8.
    line = sum(n == 1 for n in crop.shape) >= 2
    labels, n_found = cc3d.connected_components(
        crop.view(np.uint8) if line else crop, connectivity=connectivity, return_N=True
    )
    if n_found == 1:
        return count, outer
    inner = np.empty((3, 2), np.int64)
    size = int(largest_label(labels, n_found, inner))
    return size, (inner + np.asarray(outer)[:, :1]).tolist()  # in ``selected``'s indices


def _component_box(
    row: np.ndarray,
    shape: tuple[int, ...],
    read: _Read,
    level: np.ndarray,
    connectivity: int,
    scratch: _Scratch,
) -> list[list[int]]:
    """Inclusive box ``[[first, last], ...]`` per axis of ``shape`` of the largest
    component (the first in C order on ties) of the voxels of the flat map ``row`` at or
    above ``level``.

    Each :func:`_bands` region is compared with the level (a buffer of ``scratch``) and
    labelled inside the box of its selected voxels (:func:`_largest_in`), the regions of
    most voxels first. A region with fewer voxels, or fewer selected voxels, than the
    largest component found so far is not compared or not labelled, nor one with as many
    that comes later in C order (the first wins ties, as a whole-volume labelling would
    have it)."""
    shape3 = _as_3d(shape)
    volume = row.reshape(shape3)
    bands = _bands(shape3, read, level)
    bound = [(b.stop - b.first) * (b.high - b.low) * shape3[2] for b in bands]
    best: tuple[int, int] = (0, 0)  # (size, -band) of the largest component so far
    best_box: list[list[int]] = []
    for g in sorted(range(len(bands)), key=lambda g: -bound[g]):
        if (bound[g], -g) <= best:
            continue
        band = bands[g]
        region = volume[band.first : band.stop, band.low : band.high]
        buffer = scratch.get("selected", region.size, np.dtype(bool)).reshape(region.shape)
        selected = np.greater_equal(region, level, out=buffer)
        count, outer = _count_and_box(selected)
        if (count, -g) <= best:  # too few voxels for a larger component
            continue
        size, box = _largest_in(selected, count, outer, connectivity, scratch)
        if (size, -g) > best:
            corner = (band.first, band.low, 0)
            best = (size, -g)
            best_box = [[c + first, c + last] for c, (first, last) in zip(corner, box, strict=True)]
    return _nd_box(best_box, len(shape))


def _score_row(
    r: int,
    row: np.ndarray,
    read: _Read,
    masks: _MaskRows,
    parts: frozenset[str],
    thresholds: _Thresholds | None,
    box_rule: _BoxRule | None,
    out: _RowScores,
    scratch: _Scratch,
) -> None:
    """Fill row ``r`` of ``out`` with the metrics in ``parts`` of the flat map ``row``,
    given its :func:`_read`."""
    i = masks.of_map(r)
    top = row[read.first]
    out.pointing[r] = masks.rows[i, read.first]
    if not parts & {"mass", "iou", "box"}:
        return
    mask_size, m_box = masks.voxels(i)
    if m_box is not None:
        out.mask_boxes[r] = m_box
    if not top > 0:  # no positive value (or NaN): NaN metrics
        return
    if "iou" in parts:
        levels = thresholds.values * top  # map >= t * max
        out.curve[r] = _iou_row(*_level_counts(row, read, masks.rows[i], levels, top), mask_size)
    if "mass" in parts:
        out.mass[r] = read.inside / read.positive
    if "box" in parts:
        level = box_rule.threshold * top
        box = _component_box(row, masks.shape, read, level, box_rule.connectivity, scratch)
        out.map_boxes[r] = box
        out.box[r] = _box_iou(box, m_box) if mask_size else 0.0


def _as_tensors(
    scores: _RowScores,
    parts: frozenset[str],
    thresholds: _Thresholds | None,
    b: int,
    k: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The metrics in ``parts`` as ``(B, K, ...)`` tensors on ``device``, by the keys
    :func:`_localise` returns."""

    def back(a: np.ndarray, *tail: int) -> torch.Tensor:
        return torch.from_numpy(a).reshape(b, k, *tail).to(device)

    nd = scores.map_boxes.shape[1]
    out: dict[str, torch.Tensor] = {}
    if "pointing" in parts:
        out["pointing"] = back(scores.pointing)
    if "mass" in parts:
        out["mass"] = back(scores.mass.astype(np.float32))
    if "iou" in parts:
        out["curve"] = back(scores.curve.astype(np.float32), scores.curve.shape[1])
        out["thresholds"] = thresholds.sorted
        out["order"] = thresholds.order
    if "box" in parts:
        out["box"] = back(scores.box.astype(np.float32))
        out["map_boxes"] = back(scores.map_boxes, nd, 2)
        out["mask_boxes"] = back(scores.mask_boxes, nd, 2)
    return out


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads for ``workers`` workers, made on first use and kept."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="hirescam3d-metrics")
        return _pools[workers]


def _forget_pools() -> None:
    """In a forked child: the parent's threads are not there."""
    global _pools_lock, _kept
    _pools.clear()
    _pools_lock = threading.Lock()
    _kept = queue.SimpleQueue()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_pools)


def _scratch() -> _Scratch:
    """Buffers kept from an earlier map or call, or new ones."""
    try:
        return _kept.get_nowait()
    except queue.Empty:
        return _Scratch()


def _drop_large_scratches() -> None:
    """Keep for later calls only buffers of at most :data:`_KEEP_BYTES`, and no more sets
    of them than there are worker threads."""
    kept = []
    while True:
        try:
            kept.append(_kept.get_nowait())
        except queue.Empty:
            break
    for scratch in [s for s in kept if s.nbytes <= _KEEP_BYTES][: sum(_pools)]:
        _kept.put(scratch)


def _localise(
    maps: torch.Tensor,
    masks: torch.Tensor,
    parts: frozenset[str],
    thresholds: Sequence[float] | torch.Tensor = DEFAULT_THRESHOLDS,
    box_threshold: float = 0.15,
    connectivity: int | None = None,
) -> dict[str, torch.Tensor]:
    """The mask metrics named in ``parts`` (``pointing``, ``mass``, ``iou``, ``box``).

    Map by map, on the CPU (numba and NumPy), on threads for large maps. The distinct
    masks are found first (:meth:`_MaskRows.find`: equal rows, then each one's voxel
    count and box) while the maps are read (:func:`_read`: each with its mask, from
    memory once: its first maximum, its blocks' maxima, its positive mass, all and in the
    mask). Then, per map, only the blocks whose maximum reaches a level are read again:
    the values at or above the lowest IoU level, all and in the mask, counted by the
    levels they reach, give every threshold's prediction and overlap
    (:func:`_level_counts`, :func:`_iou_row`); the voxels at or above the box level are
    compared and labelled by ``cc3d`` band by band (:func:`_component_box`). Workers
    reuse their buffers from map to map and call to call, and the worker threads are
    kept too (:func:`_pool`).
    """
    flat, mflat = _flat_pair(maps, masks)
    b, k, n = flat.shape
    shape = tuple(int(s) for s in maps.shape[2:])
    rows = np.ascontiguousarray(flat.reshape(b * k, n).detach().cpu().numpy())
    mask_rows = _MaskRows(mflat, k, shape, boxes="box" in parts)
    levels = _sorted_thresholds(thresholds, flat) if "iou" in parts else None
    rule = None
    if "box" in parts:
        rule = _box_rule(box_threshold, connectivity, len(shape), rows.dtype)
    scores = _RowScores.unscored(b * k, 0 if levels is None else levels.values.size, len(shape))
    workers = min(torch.get_num_threads(), b * k) if n >= _THREADED_VOXELS else 1
    pool = _pool(workers)  # the compiled passes and NumPy release the GIL (cc3d does not)
    # Submitted in this order, a task only ever waits for tasks already started: the masks
    # are found while the first maps are read.
    found = pool.submit(mask_rows.find if parts & {"mass", "iou", "box"} else lambda: None)
    block = _block_size(shape)
    reads = [pool.submit(_read, row, mask_rows.rows[mask_rows.of_map(r)], block)
             for r, row in enumerate(rows)]  # fmt: skip

    def score(r: int) -> None:
        found.result()
        scratch = _scratch()
        try:
            _score_row(r, rows[r], reads[r].result(), mask_rows, parts, levels, rule, scores,
                       scratch)  # fmt: skip
        finally:
            _kept.put(scratch)

    try:
        list(pool.map(score, range(b * k)))
    finally:
        _drop_large_scratches()
    return _as_tensors(scores, parts, levels, b, k, flat.device)


def _best(curve: torch.Tensor, t_sorted: torch.Tensor) -> BestIoU:
    """Best IoU and the lowest threshold reaching it, from a curve over sorted thresholds.
    In NumPy: torch's ``max(-1)``, even on a few hundred values, starts its OpenMP
    workers, which then spin for milliseconds on the cores the next call needs."""
    c = curve.cpu().numpy()
    where = np.argmax(np.nan_to_num(c, nan=-1.0), axis=-1)  # first maximum: lowest t
    best = np.take_along_axis(c, where[..., None], axis=-1)[..., 0]
    thr = t_sorted.cpu().numpy().astype(np.float32)[where]
    valid = ~np.isnan(c[..., 0])
    nan = np.float32(math.nan)
    return BestIoU(*(torch.from_numpy(np.where(valid, a, nan)).to(curve.device)
                     for a in (best, thr)))  # fmt: skip


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1.0 where the map's maximum lies inside the mask, else 0.0: ``(B, K)`` float32.

    Args:
        maps: ``(B, K, *S)`` explanation maps (any units; only the location of the
            maximum matters).
        masks: bool ``(B, K, *S)`` or ``(B, 1, *S)``.

    Ties resolve to the first maximum in flattened (C) order, so a constant map (all
    zeros included) points at voxel ``(0, ..., 0)``. An empty mask scores 0.
    """
    return _localise(maps, masks, frozenset({"pointing"}))["pointing"]


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's positive mass inside the mask, ``(B, K)`` float32 in [0, 1].

    ``a / (a + b)`` with ``a`` the sum of ``relu(map)`` inside the mask and ``b`` outside
    (Quantus' "relevance mass accuracy"; the AxialNet authors' organ score). Negative
    values are ignored. A map with no positive mass gives NaN (neither 0 nor 1); an
    empty mask gives 0.
    """
    return _localise(maps, masks, frozenset({"mass"}))["mass"]


def iou_curve(
    maps: torch.Tensor,
    masks: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor = DEFAULT_THRESHOLDS,
) -> torch.Tensor:
    """IoU of ``{map >= t * max(map)}`` with the mask for every threshold ``t``.

    Args:
        maps: ``(B, K, *S)``; thresholds are relative to each map's own maximum.
        masks: bool ``(B, K, *S)`` or ``(B, 1, *S)``.
        thresholds: ``T`` relative thresholds (default 0.02 ... 0.98 in steps of 0.02).

    Returns:
        ``(B, K, T)`` float32 IoUs, in the order of ``thresholds``. NaN for a map with
        no positive value; 0 where the mask is empty.

    All thresholds are evaluated at once, exactly as ``map >= t * max`` in the maps'
    dtype: each of the map's values at or above its lowest level ``t * max``, all and
    those inside the mask, is counted by how many levels it reaches: from its upper 16
    bits, the levels under lower keys, plus one comparison with the level under its own
    key (or a binary search over the levels, for float64 maps, levels at or below zero,
    or levels less than 1/128 of their value apart). That counts every threshold's
    prediction and overlap. Cost: one read of each map, then work on the blocks of
    voxels that reach the lowest threshold.
    """
    res = _localise(maps, masks, frozenset({"iou"}), thresholds=thresholds)
    return res["curve"].index_select(-1, torch.argsort(res["order"]))


class BestIoU(NamedTuple):
    """``iou``: ``(B, K)`` best IoU over the thresholds; ``threshold``: ``(B, K)`` the
    relative threshold that reached it (the lowest one on ties). NaN for maps with no
    positive value."""

    iou: torch.Tensor
    threshold: torch.Tensor


def iou_at_best_threshold(
    maps: torch.Tensor,
    masks: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor = DEFAULT_THRESHOLDS,
) -> BestIoU:
    """Best IoU of ``{map >= t * max(map)}`` with the mask over ``thresholds``, per map.

    The HiResCAM paper's Table 2 protocol (section 5.5) binarises at 0.02, 0.04, ...,
    0.98 and keeps the best threshold *per method and class over the data set*; this
    function picks it per map, an upper bound of that. For the paper's protocol, average
    :func:`iou_curve` over the data set per class and take the maximum.

    Returns:
        :class:`BestIoU` ``(iou, threshold)``, both ``(B, K)`` float32.
    """
    res = _localise(maps, masks, frozenset({"iou"}), thresholds=thresholds)
    return _best(res["curve"], res["thresholds"])


def gradcam_box(
    maps: torch.Tensor,
    masks: torch.Tensor,
    threshold: float = 0.15,
    connectivity: int | None = None,
    return_boxes: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Grad-CAM paper's localisation: IoU of the map's box with the mask's box.

    Each map is binarised at ``threshold`` (15 %) of its maximum (``map >= 0.15 *
    max``), the largest connected component is kept (the first in C order on ties), and
    its bounding box is compared with the bounding box of all of the mask's voxels. IoU
    is counted in voxels (boxes are inclusive). Components are labelled with
    ``cc3d`` (the same labels as ``scipy.ndimage.label``) on the CPU, band by band of
    first-axis indices between indices with no selected voxel, each inside the box of
    its band's selected voxels.

    Args:
        maps: ``(B, K, *S)``.
        masks: bool ``(B, K, *S)`` or ``(B, 1, *S)``.
        threshold: relative threshold.
        connectivity: neighbourhood for connected components, as in
            ``scipy.ndimage.generate_binary_structure``: 1 = faces only, ``D`` (the
            default) = faces, edges and corners (8-connected in 2D, 26 in 3D).
        return_boxes: also return the boxes.

    Returns:
        ``(B, K)`` float32 IoU (NaN for a map with no positive value, 0 for an empty
        mask); with ``return_boxes``, also the map's and the mask's boxes as long
        ``(B, K, D, 2)`` tensors of inclusive ``[first, last]`` voxel indices (-1 where
        there is none).
    """
    res = _localise(
        maps, masks, frozenset({"box"}), box_threshold=threshold, connectivity=connectivity
    )
    if not return_boxes:
        return res["box"]
    return res["box"], res["map_boxes"], res["mask_boxes"]


def localisation_metrics(
    maps: torch.Tensor,
    masks: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor = DEFAULT_THRESHOLDS,
    box_threshold: float = 0.15,
    connectivity: int | None = None,
) -> Localisation:
    """All mask metrics at once (:func:`pointing_game`, :func:`relevance_mass`,
    :func:`iou_curve` / :func:`iou_at_best_threshold`, :func:`gradcam_box`), sharing one
    pass over the maps and one index list per distinct mask: cheaper than calling the
    four functions. Same arguments and conventions as those; returns
    :class:`Localisation`.
    """
    res = _localise(
        maps,
        masks,
        frozenset({"pointing", "mass", "iou", "box"}),
        thresholds=thresholds,
        box_threshold=box_threshold,
        connectivity=connectivity,
    )
    best = _best(res["curve"], res["thresholds"])
    return Localisation(
        pointing_game=res["pointing"],
        relevance_mass=res["mass"],
        iou=best.iou,
        iou_threshold=best.threshold,
        iou_curve=res["curve"],
        thresholds=res["thresholds"],
        gradcam_box=res["box"],
        map_boxes=res["map_boxes"],
        mask_boxes=res["mask_boxes"],
    )
