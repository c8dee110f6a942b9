"""Localisation: how well maps ``(B, K, *S)`` find a mask (pointing game, relevance mass,
IoU over thresholds, the Grad-CAM box).

The mask metrics run map by map on the CPU with NumPy (a few passes over each map; the IoU
curve from one histogram, boxes from per-axis projections, ``cc3d`` labelling the
components of :func:`gradcam_box` inside each map's box; large maps on
``torch.get_num_threads()`` threads) and return ``(B, K)`` float32
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


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of inclusive voxel boxes ``(..., D, 2)``, counted in voxels."""
    lo = torch.maximum(a[..., 0], b[..., 0])
    hi = torch.minimum(a[..., 1], b[..., 1])
    inter = (hi - lo + 1).clamp_min(0).double().prod(-1)
    area_a = (a[..., 1] - a[..., 0] + 1).double().prod(-1)
    area_b = (b[..., 1] - b[..., 0] + 1).double().prod(-1)
    return inter / (area_a + area_b - inter)


def _largest_component_box(
    crop: np.ndarray, connectivity: int, offset: Sequence[int]
) -> list[list[int]]:
    """Inclusive box of the largest connected component of bool ``crop`` (the first in C
    order on ties), in the coordinates of the array ``crop`` was cut from at ``offset``.

    ``cc3d`` labels in C order, as ``scipy.ndimage.label`` does, about four times faster;
    ``connectivity`` is its 3D neighbourhood (6, 18 or 26), the crop padded to 3D."""
    import cc3d
    from scipy import ndimage

    as_3d = crop.reshape((1,) * (3 - crop.ndim) + crop.shape)
    labels, n_found = cc3d.connected_components(as_3d, connectivity=connectivity, return_N=True)
    if n_found == 1:  # one component: its box is the crop's box of selected voxels
        box = _projection_box(crop)
        return [[lo + a, lo + z] for lo, (a, z) in zip(offset, box, strict=True)]
    sizes = np.bincount(labels.reshape(crop.shape)[crop], minlength=n_found + 1)[1:]
    biggest = int(np.argmax(sizes)) + 1  # labels follow C order: first on ties
    box = ndimage.find_objects(labels, max_label=biggest)[biggest - 1][3 - crop.ndim :]
    return [[lo + sl.start, lo + sl.stop - 1] for lo, sl in zip(offset, box, strict=True)]


def _projection_box(selected: np.ndarray) -> list[list[int]] | None:
    """Inclusive ``[first, last]`` per axis of the True voxels of bool ``selected`` ``(*S)``
    from its per-axis projections (an ``any`` over the other axes); None if none."""
    box = []
    for d in range(selected.ndim):
        other = tuple(a for a in range(selected.ndim) if a != d)
        where = np.flatnonzero(selected.any(axis=other) if other else selected)
        if where.size == 0:
            return None
        box.append([int(where[0]), int(where[-1])])
    return box


def _levels_reached(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """How many of the ascending ``levels (T,)`` each value reaches (``>=``), exactly in
    the values' dtype: a guess from the levels' mean spacing, corrected by comparing with
    the levels themselves; ``searchsorted`` for the values a guess misses by more."""
    n_t = levels.size
    span = float(levels[-1]) - float(levels[0])
    if n_t < 3 or not span > 0 or values.size < 4096:
        return np.searchsorted(levels, values, side="right")
    edges = np.concatenate([[-np.inf], levels, [np.inf]]).astype(levels.dtype)
    guess = (values - levels[0]).astype(np.float64) * ((n_t - 1) / span)
    reached = np.clip(guess, -1.0, n_t).astype(np.intp) + 1  # floor for guess >= -1
    np.clip(reached, 0, n_t, out=reached)
    reached -= values < edges[reached]  # edges[c] = levels[c - 1]: must be reached
    reached += values >= edges[reached + 1]  # levels[c] must not be
    bad = (values < edges[reached]) | (values >= edges[reached + 1])
    if bad.any():
        reached[bad] = np.searchsorted(levels, values[bad], side="right")
    return reached


def _reached_curve(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``(T,)`` how many ``values`` reach each ascending level (one histogram, summed
    from the top)."""
    hist = np.bincount(_levels_reached(values, levels), minlength=levels.size + 1)
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
    mask's voxel list (and box, if asked for) is found once."""

    def __init__(self, masks: torch.Tensor, k: int, shape: tuple[int, ...], boxes: bool):
        self.rows = masks.reshape(-1, masks.shape[-1]).cpu().numpy()
        self.bm, self.km = masks.shape[:2]
        self.k = k
        self.shape = shape
        self.boxes = boxes
        self._found: dict[int, tuple[np.ndarray, list[list[int]] | None]] = {}

    def of_map(self, r: int) -> int:
        """The mask row of map row ``r`` (item ``r // K``, target ``r % K``)."""
        return (r // self.k if self.bm > 1 else 0) * self.km + (r % self.k if self.km > 1 else 0)

    def voxels(self, i: int) -> tuple[np.ndarray, list[list[int]] | None]:
        """Mask row ``i``'s voxels (flat positions) and its box (None if not asked for)."""
        if i not in self._found:
            m = self.rows[i]
            box = _projection_box(m.reshape(self.shape)) if self.boxes else None
            self._found[i] = (np.flatnonzero(m), box)
        return self._found[i]


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


def _mass_inside(row: np.ndarray, inside: np.ndarray) -> float:
    """Share of the positive mass of a flat map ``row`` that lies in ``inside`` (the
    map's values on the mask)."""
    positive = row if row.min() >= 0 else np.maximum(row, 0)
    total = float(positive.sum(dtype=np.float64))
    inner = float(np.maximum(inside, 0).sum(dtype=np.float64))
    return inner / max(total, 1e-300)


def _iou_row(
    row: np.ndarray, inside: np.ndarray, mask_size: int, levels: np.ndarray
) -> np.ndarray:
    """``(T,)`` IoU of ``{row >= level}`` with a mask of ``mask_size`` voxels (``inside``:
    the map's values on it) for ascending ``levels`` in the map's dtype."""
    pred = _reached_curve(row[row >= levels[0]], levels)
    inter = _reached_curve(inside[inside >= levels[0]], levels)
    union = pred + mask_size - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _component_box(
    row: np.ndarray, shape: tuple[int, ...], level: np.ndarray, connectivity: int
) -> list[list[int]]:
    """Box of the largest component of ``{row >= level}`` (``row`` a flat map of
    ``shape``), labelled inside the box of those voxels."""
    chosen = (row >= level).reshape(shape)
    outer = _projection_box(chosen)  # the maximum is always chosen: never None
    crop = chosen[tuple(slice(lo, hi + 1) for lo, hi in outer)]
    return _largest_component_box(crop, connectivity, [lo for lo, _ in outer])


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
    first = int(row.argmax())  # the first maximum (NaN counts as one, as in torch)
    top = row[first]
    out.pointing[r] = masks.rows[i, first]
    if not parts & {"mass", "iou", "box"}:
        return
    where, m_box = masks.voxels(i)
    if m_box is not None:
        out.mask_boxes[r] = m_box
    if not top > 0:  # no positive value (or NaN): NaN metrics
        return
    inside = row[where]
    if "mass" in parts:
        out.mass[r] = _mass_inside(row, inside)
    if "iou" in parts:
        levels = thresholds.values * top  # map >= t * max, in the maps' dtype
        out.curve[r] = _iou_row(row, inside, where.size, levels)
    if "box" in parts:
        level = box_rule.threshold * top
        out.map_boxes[r] = _component_box(row, masks.shape, level, box_rule.connectivity)
        iou = _box_iou(torch.from_numpy(out.map_boxes[r]), torch.from_numpy(out.mask_boxes[r]))
        out.box[r] = float(iou) if where.size else 0.0


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

    Map by map, on the CPU (``numpy``): each map is read in full a few times (maximum,
    minimum and sum, one comparison with its lowest IoU level, one with its box level);
    each distinct mask once (its voxel list, and its box from per-axis projections). The
    IoU curve is one histogram of "how many levels ``t * max`` a voxel reaches" over the
    voxels at or above the lowest level, and one over the mask's voxels, summed from the
    top; the Grad-CAM box labels components (``cc3d``) only inside the box of
    the selected voxels, itself from per-axis projections.
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
    with ThreadPoolExecutor(workers) as pool:  # NumPy, cc3d and SciPy release the GIL
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
    dtype. Each voxel at or above its map's lowest level, and each mask voxel, is given
    the number of levels ``t * max`` it reaches (a guess from the levels' spacing,
    corrected by comparing with the levels); one histogram of those numbers, summed from
    the top, gives every threshold's prediction and overlap. Cost: a few passes over
    each map, then work on the voxels above the lowest threshold and on the masks'
    voxels.
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
