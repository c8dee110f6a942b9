"""Localisation: how well maps ``(B, K, *S)`` find a mask (pointing game, relevance mass,
IoU over thresholds, the Grad-CAM box).

The mask metrics run map by map on the CPU with NumPy (each map read once, in chunks;
then only the voxels at or above the lowest level: the IoU curve from one histogram, the
Grad-CAM box's components labelled by ``cc3d`` inside the box of its selected voxels;
large maps on ``torch.get_num_threads()`` threads) and return ``(B, K)`` float32
tensors on the maps' device. :func:`localisation_metrics` computes every mask metric at
once, sharing the passes over the maps: use it when you need more than one. Masks are
boolean ``(B, K, *S)`` or ``(B, 1, *S)`` (one mask for all K targets of an item), moved
to the maps' device.

Conventions, the same for every mask metric:

- **Empty masks** score 0 (nothing can be hit, covered or overlapped), never NaN.
- **A map with no positive value** (all zeros, or all negative) gives NaN in
  :func:`relevance_mass`, :func:`iou_curve` / :func:`iou_at_best_threshold` and
  :func:`gradcam_box`: there is no positive mass to share and a threshold relative to a
  non-positive maximum selects nothing meaningful. Average with ``torch.nanmean`` and
  report how many were NaN. :func:`pointing_game` still points at the first maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from hirescam3d.errors import InputError
from hirescam3d.evaluate.metrics._common import as_float, spatial_dims

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
#: Voxels per chunk of a map (4 MB of float32). Each chunk is read from memory once; on 10
#: maps of 1.6 M voxels, 1 M-voxel chunks measured 10 % faster than 64 k (fewer NumPy calls
#: between the threads), and chunks whose maximum misses a level are skipped.
_CHUNK = 1 << 20


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


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two inclusive voxel boxes ``(D, 2)``, counted in voxels."""
    inter = np.prod(np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]) + 1,
                            0, None), dtype=np.float64)  # fmt: skip
    area_a = np.prod(a[:, 1] - a[:, 0] + 1, dtype=np.float64)
    area_b = np.prod(b[:, 1] - b[:, 0] + 1, dtype=np.float64)
    return float(inter / (area_a + area_b - inter))


def _projection_box(selected: np.ndarray) -> list[list[int]] | None:
    """Inclusive ``[first, last]`` per axis of the True voxels of bool ``selected`` ``(*S)``
    from per-axis projections (an ``any`` over the other axes, each later axis read only
    within the range of the earlier ones); None if none."""
    box, sub = [], selected
    for _ in range(selected.ndim):
        rest = tuple(range(1, sub.ndim))
        where = np.flatnonzero(sub.any(axis=rest) if rest else sub)
        if where.size == 0:
            return None
        box.append([int(where[0]), int(where[-1])])
        sub = sub[where[0] : where[-1] + 1].any(axis=0)
    return box


def _from_top(hist: np.ndarray) -> np.ndarray:
    """``(T,)`` from a histogram ``(T + 1,)`` of how many levels voxels reach: how many
    reach each level."""
    return np.cumsum(hist[::-1])[::-1][1:]


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
    edges and corners) for ``nd``-D maps of ``dtype``."""
    c = nd if connectivity is None else connectivity
    if not 1 <= c <= nd:
        raise InputError(f"connectivity must be 1 to {nd} for {nd}-D maps; got {connectivity}")
    neighbours = 6 if c == 1 else 26 if c == nd else 18
    return _BoxRule(np.asarray(threshold, dtype=dtype), neighbours)


class _MaskRows:
    """The masks as NumPy rows ``(B or 1) * (K or 1)`` of ``N`` voxels; each distinct
    mask's voxel list (and box, if asked for) is found once, for the first of the rows
    that hold it (:meth:`find`)."""

    def __init__(self, masks: torch.Tensor, k: int, shape: tuple[int, ...], boxes: bool):
        self.rows = masks.reshape(-1, masks.shape[-1]).cpu().numpy()
        self.bm, self.km = masks.shape[:2]
        self.k = k
        self.shape = shape
        self.boxes = boxes
        self.first = _first_equal_rows(self.rows)
        self._found: dict[int, tuple[np.ndarray, list[list[int]] | None]] = {}

    def of_map(self, r: int) -> int:
        """The mask row of map row ``r`` (item ``r // K``, target ``r % K``)."""
        return (r // self.k if self.bm > 1 else 0) * self.km + (r % self.k if self.km > 1 else 0)

    def find(self, i: int) -> None:
        """Find the voxels (and box) of mask row ``i``, one of :attr:`first`."""
        m = self.rows[i]
        box = _projection_box(m.reshape(self.shape)) if self.boxes else None
        self._found[i] = (np.flatnonzero(m), box)

    def voxels(self, i: int) -> tuple[np.ndarray, list[list[int]] | None]:
        """Mask row ``i``'s voxels (flat positions) and its box (None if not asked for)."""
        return self._found[self.first[i]]


def _first_equal_rows(rows: np.ndarray) -> list[int]:
    """For each bool row of ``rows (R, N)``, the first row equal to it."""
    counts = [np.count_nonzero(row) for row in rows]  # with axis=1: a 5x slower sum of ints
    first: list[int] = []
    for i in range(len(rows)):
        same = (j for j in range(i) if first[j] == j and counts[j] == counts[i])
        first.append(next((j for j in same if np.array_equal(rows[j], rows[i])), i))
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


class _Voxels(NamedTuple):
    """Some voxels of a flat map: their flat positions (ascending) and values."""

    where: np.ndarray
    values: np.ndarray


class _Read(NamedTuple):
    """What one read of a flat map gives: its first maximum (flat position; NaN counts as
    one, as in torch), each chunk's maximum ``(n_chunks,)`` and its positive mass."""

    first: int
    chunk_max: np.ndarray
    positive: float


def _read(row: np.ndarray) -> _Read:
    """Read the flat map ``row`` once, a chunk of :data:`_CHUNK` voxels at a time: each
    chunk comes from memory once and the passes over it reuse what the cache holds."""
    n = -(-row.size // _CHUNK)
    tops, at, positive = np.empty(n, row.dtype), np.empty(n, np.intp), 0.0
    for c in range(n):
        chunk = row[c * _CHUNK : (c + 1) * _CHUNK]
        at[c] = chunk.argmax()
        tops[c] = chunk[at[c]]
        if tops[c] > 0:  # a chunk's own sum is pairwise (accurate); chunks add in float64
            positive += float((chunk if chunk.min() >= 0 else np.maximum(chunk, 0)).sum())
    best = int(tops.argmax())  # the first chunk holding the (first) maximum
    return _Read(best * _CHUNK + int(at[best]), tops, positive)


def _reaching(row: np.ndarray, read: _Read, level: np.ndarray) -> _Voxels:
    """The voxels of the flat map ``row`` at or above ``level``, from the chunks whose
    maximum reaches it (explanation maps are mostly zero: most chunks are skipped)."""
    where, values = [np.empty(0, np.intp)], [np.empty(0, row.dtype)]
    for c in np.flatnonzero(read.chunk_max >= level):
        chunk = row[c * _CHUNK : (c + 1) * _CHUNK]
        found = np.flatnonzero(chunk >= level)
        where.append(found + c * _CHUNK)
        values.append(chunk[found])
    return _Voxels(np.concatenate(where), np.concatenate(values))


def _iou_row(
    reached: np.ndarray, in_mask: np.ndarray, mask_size: int, levels: np.ndarray
) -> np.ndarray:
    """``(T,)`` IoU of ``{map >= level}`` with a mask of ``mask_size`` voxels for ascending
    ``levels`` in the map's dtype; ``reached``: the map's values at or above ``levels[0]``,
    ``in_mask``: whether each of those voxels lies in the mask. One histogram of how many
    levels each voxel reaches, summed from the top, counts every level's voxels."""
    counts = np.searchsorted(levels, reached, side="right")  # levels each value reaches
    pred = _from_top(np.bincount(counts, minlength=levels.size + 1))
    inter = _from_top(np.bincount(counts[in_mask], minlength=levels.size + 1))
    union = pred + mask_size - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _component_box(
    chosen: np.ndarray, shape: tuple[int, ...], connectivity: int
) -> list[list[int]]:
    """Inclusive box of the largest component (the first in C order on ties) of the voxels
    at the flat positions ``chosen`` (ascending, not empty) of a map of ``shape``.

    ``cc3d`` labels the components inside the box of those voxels, in C order as
    ``scipy.ndimage.label`` does, about four times faster; ``connectivity`` is its 3D
    neighbourhood (6, 18 or 26), the crop padded to 3D."""
    import cc3d

    coords = np.unravel_index(chosen, shape)
    local = tuple(c - c.min() for c in coords)
    crop = np.zeros([int(c.max()) + 1 for c in local], dtype=bool)
    crop[local] = True
    as_3d = crop.reshape((1,) * (3 - crop.ndim) + crop.shape)
    labels, n_found = cc3d.connected_components(as_3d, connectivity=connectivity, return_N=True)
    if n_found > 1:
        own = labels.reshape(crop.shape)[local]  # each chosen voxel's component
        biggest = int(np.argmax(np.bincount(own, minlength=n_found + 1)[1:])) + 1
        coords = tuple(c[own == biggest] for c in coords)
    return [[int(c.min()), int(c.max())] for c in coords]


def _score_row(
    r: int,
    row: np.ndarray,
    masks: _MaskRows,
    parts: frozenset[str],
    thresholds: _Thresholds | None,
    box_rule: _BoxRule | None,
    out: _RowScores,
) -> None:
    """Fill row ``r`` of ``out`` with the metrics in ``parts`` of the flat map ``row``."""
    i = masks.of_map(r)
    read = _read(row)
    first = read.first
    top = row[first]
    out.pointing[r] = masks.rows[i, first]
    if not parts & {"mass", "iou", "box"}:
        return
    where, m_box = masks.voxels(i)
    if m_box is not None:
        out.mask_boxes[r] = m_box
    if not top > 0:  # no positive value (or NaN): NaN metrics
        return
    if "mass" in parts:
        inside = row[where]
        out.mass[r] = float(np.maximum(inside, 0).sum(dtype=np.float64)) / read.positive
    levels = thresholds.values * top if "iou" in parts else None  # map >= t * max
    box_level = box_rule.threshold * top if "box" in parts else None
    wanted = [x for x in (None if levels is None else levels[0], box_level) if x is not None]
    if not wanted:
        return
    reached = _reaching(row, read, min(wanted))  # one read of the chunks for both
    if levels is not None:
        keep = reached.values >= levels[0]
        in_mask = masks.rows[i][reached.where[keep]]
        out.curve[r] = _iou_row(reached.values[keep], in_mask, where.size, levels)
    if box_level is not None:
        chosen = reached.where[reached.values >= box_level]
        out.map_boxes[r] = _component_box(chosen, masks.shape, box_rule.connectivity)
        out.box[r] = _box_iou(out.map_boxes[r], out.mask_boxes[r]) if where.size else 0.0


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


def _localise(
    maps: torch.Tensor,
    masks: torch.Tensor,
    parts: frozenset[str],
    thresholds: Sequence[float] | torch.Tensor = DEFAULT_THRESHOLDS,
    box_threshold: float = 0.15,
    connectivity: int | None = None,
) -> dict[str, torch.Tensor]:
    """The mask metrics named in ``parts`` (``pointing``, ``mass``, ``iou``, ``box``).

    Map by map, on the CPU (``numpy``): each map is read in full once, a chunk at a time
    (:func:`_read`: its first maximum, each chunk's maximum and its positive mass); each
    distinct mask once (its voxel list, and its box from per-axis projections). Then the
    voxels at or above the lower of the lowest IoU level and the box level are listed,
    from the chunks whose maximum reaches it (:func:`_reaching`). The IoU curve is one
    histogram of "how many levels ``t * max`` a voxel reaches" over those voxels, and one
    over those inside the mask, summed from the top; the Grad-CAM box labels components
    (``cc3d``) only inside the box of its selected voxels.
    """
    flat, mflat = _flat_pair(maps, masks)
    b, k, n = flat.shape
    shape = tuple(int(s) for s in maps.shape[2:])
    rows = flat.reshape(b * k, n).detach().cpu().numpy()
    mask_rows = _MaskRows(mflat, k, shape, boxes="box" in parts)
    levels = _sorted_thresholds(thresholds, flat) if "iou" in parts else None
    rule = None
    if "box" in parts:
        rule = _box_rule(box_threshold, connectivity, len(shape), rows.dtype)
    scores = _RowScores.unscored(b * k, 0 if levels is None else levels.values.size, len(shape))
    workers = min(torch.get_num_threads(), b * k) if n >= _THREADED_VOXELS else 1
    with ThreadPoolExecutor(workers) as pool:  # NumPy and cc3d release the GIL
        if parts & {"mass", "iou", "box"}:
            list(pool.map(mask_rows.find, sorted(set(mask_rows.first))))
        list(pool.map(lambda r: _score_row(r, rows[r], mask_rows, parts, levels, rule, scores),
                      range(b * k)))  # fmt: skip
    return _as_tensors(scores, parts, levels, b, k, flat.device)


def _best(curve: torch.Tensor, t_sorted: torch.Tensor) -> BestIoU:
    """Best IoU and the lowest threshold reaching it, from a curve over sorted thresholds."""
    valid = ~torch.isnan(curve[..., 0])
    best, where = torch.nan_to_num(curve, nan=-1.0).max(-1)  # first maximum: lowest t
    thr = t_sorted.to(torch.float32)[where]
    nan = torch.tensor(math.nan, device=curve.device)
    return BestIoU(torch.where(valid, best, nan), torch.where(valid, thr, nan))


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
    dtype. Each voxel at or above its map's lowest level is given the number of levels
    ``t * max`` it reaches (a binary search among the levels); one histogram of those
    numbers, and one of those inside the mask, summed from the top, give every
    threshold's prediction and overlap. Cost: one read of each map, then work on the
    voxels above the lowest threshold.
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
    ``cc3d`` (the same labels as ``scipy.ndimage.label``) on the CPU, inside the box
    around the map's selected voxels.

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
