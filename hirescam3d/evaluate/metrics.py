"""Measure explanations: localisation and faithfulness metrics for 2D and 3D maps.

Everything here is a function of torch tensors. The mask metrics run map by map on the
CPU with NumPy (a few passes over each map; the IoU curve from one histogram, boxes from
per-axis projections, ``scipy.ndimage`` labelling the components of :func:`gradcam_box`
inside each map's box) and return tensors on the maps' device.
:func:`localisation_metrics` computes every mask metric at once, sharing the passes over
the maps: use it when you need more than one. Maps are ``(B, K, *S)`` with 1 to 3
spatial dims: B inputs, K explained targets. Masks are boolean ``(B, K, *S)`` or
``(B, 1, *S)`` (one mask for all K targets of an item), moved to the maps' device.
Mask metrics return ``(B, K)`` float32 tensors on the maps' device.

Conventions, the same for every mask metric:

- **Empty masks** score 0 (nothing can be hit, covered or overlapped), never NaN.
- **A map with no positive value** (all zeros, or all negative) gives NaN in
  :func:`relevance_mass`, :func:`iou_curve` / :func:`iou_at_best_threshold` and
  :func:`gradcam_box`: there is no positive mass to share and a threshold relative to a
  non-positive maximum selects nothing meaningful. Average with ``torch.nanmean`` and
  report how many were NaN. :func:`pointing_game` still points at the first maximum.

Model-based measures: :func:`deletion_insertion` (perturbation curves and their AUC,
batched) and :func:`randomisation_check` (Adebayo et al.'s cascading model-parameter
randomisation). :func:`l2_to_exact` is the HiResCAM paper's Table 1 distance.
See ``docs/metrics.md`` for a user guide.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hirescam3d.core import postprocess
from hirescam3d.core.capture import model_state_restored, resolve_layer
from hirescam3d.core.trace import LayerGeometry
from hirescam3d.errors import InputError, LayerError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BestIoU",
    "DeletionInsertion",
    "Localisation",
    "RandomisationResult",
    "deletion_insertion",
    "gradcam_box",
    "iou_at_best_threshold",
    "iou_curve",
    "l2_to_exact",
    "localisation_metrics",
    "pointing_game",
    "randomisation_check",
    "relevance_mass",
    "spearman",
]

#: The HiResCAM paper's binarisation thresholds (section 5.5): 0.02, 0.04, ..., 0.98.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.02 * i, 2) for i in range(1, 50))


# -- shapes -------------------------------------------------------------------------------
def _spatial_dims(maps: torch.Tensor, name: str = "maps") -> int:
    if not isinstance(maps, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, not {type(maps).__name__}")
    nd = maps.ndim - 2
    if not 1 <= nd <= 3:
        raise InputError(
            f"{name} must be (B, K, *spatial) with 1 to 3 spatial dims; got {tuple(maps.shape)}"
        )
    return nd


def _as_float(maps: torch.Tensor) -> torch.Tensor:
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def _flat_pair(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps`` as float ``(B, K, N)`` and ``masks`` as bool ``(B or 1, K or 1, N)``."""
    _spatial_dims(maps)
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
    return _as_float(maps).flatten(2), masks.flatten(2)


# -- mask metrics ---------------------------------------------------------------------------
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
    crop: np.ndarray, structure: np.ndarray, offset: Sequence[int]
) -> list[list[int]]:
    """Inclusive box of the largest connected component of bool ``crop`` (the first in C
    order on ties), in the coordinates of the array ``crop`` was cut from at ``offset``."""
    from scipy import ndimage

    labels, n_found = ndimage.label(crop, structure=structure)
    if n_found == 1:  # one component: its box is the crop's box of selected voxels
        box = _projection_box(crop)
        return [[lo + a, lo + z] for lo, (a, z) in zip(offset, box, strict=True)]
    sizes = np.bincount(labels.ravel(), minlength=n_found + 1)[1:]
    biggest = int(np.argmax(sizes)) + 1  # labels follow C order: first on ties
    box = ndimage.find_objects(labels, max_label=biggest)[biggest - 1]
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
    top; the Grad-CAM box labels components (``scipy.ndimage``) only inside the box of
    the selected voxels, itself from per-axis projections.
    """
    flat, mflat = _flat_pair(maps, masks)
    b, k, n = flat.shape
    n_rows = b * k
    shape = tuple(int(s) for s in maps.shape[2:])
    nd = len(shape)
    dev = flat.device
    rows = flat.reshape(n_rows, n).detach().cpu().numpy()
    mrows = mflat.reshape(-1, n).cpu().numpy()
    bm, km = mflat.shape[:2]
    out: dict[str, torch.Tensor] = {}
    if "iou" in parts:
        t = torch.as_tensor(thresholds, dtype=flat.dtype, device=dev).flatten()
        if t.numel() == 0 or not torch.isfinite(t).all():
            raise InputError("thresholds must be a non-empty sequence of finite numbers")
        t_sorted, order = t.sort()
        t_np = t_sorted.cpu().numpy()
        n_t = t.numel()
    if "box" in parts:
        from scipy import ndimage

        structure = ndimage.generate_binary_structure(nd, connectivity or nd)
        box_t = np.asarray(box_threshold, dtype=rows.dtype)

    cache: dict[int, tuple[np.ndarray, list[list[int]] | None]] = {}

    def mask_info(i: int) -> tuple[np.ndarray, list[list[int]] | None]:
        """A distinct mask's voxels (flat positions) and box, listed once."""
        if i not in cache:
            m = mrows[i]
            box = _projection_box(m.reshape(shape)) if "box" in parts else None
            cache[i] = (np.flatnonzero(m), box)
        return cache[i]

    nan = math.nan
    pointing = np.zeros(n_rows, np.float32)
    mass = np.full(n_rows, nan)
    curve = np.full((n_rows, n_t if "iou" in parts else 0), nan)
    box_iou = np.full(n_rows, nan)
    map_boxes = np.full((n_rows, nd, 2), -1, np.int64)
    mask_boxes = np.full((n_rows, nd, 2), -1, np.int64)
    for r in range(n_rows):
        i = (r // k if bm > 1 else 0) * km + (r % k if km > 1 else 0)
        row = rows[r]
        first = int(row.argmax())  # the first maximum (NaN counts as one, as in torch)
        top = row[first]
        pointing[r] = mrows[i, first]
        if not parts & {"mass", "iou", "box"}:
            continue
        where, m_box = mask_info(i)
        if m_box is not None:
            mask_boxes[r] = m_box
        if not top > 0:  # no positive value (or NaN): NaN metrics
            continue
        inside = row[where]
        if "mass" in parts:
            positive = row if row.min() >= 0 else np.maximum(row, 0)
            total = float(positive.sum(dtype=np.float64))
            inner = float(np.maximum(inside, 0).sum(dtype=np.float64))
            mass[r] = inner / max(total, 1e-300)
        if "iou" in parts:
            levels = t_np * top  # map >= t * max, in the maps' dtype
            pred = _reached_curve(row[row >= levels[0]], levels)
            inter = _reached_curve(inside, levels)
            union = pred + where.size - inter
            curve[r] = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        if "box" in parts:
            chosen = (row >= box_t * top).reshape(shape)
            outer = _projection_box(chosen)  # the maximum is always chosen: never None
            crop = chosen[tuple(slice(lo, hi + 1) for lo, hi in outer)]
            map_boxes[r] = _largest_component_box(crop, structure, [lo for lo, _ in outer])
            iou = _box_iou(torch.from_numpy(map_boxes[r]), torch.from_numpy(mask_boxes[r]))
            box_iou[r] = float(iou) if where.size else 0.0

    def back(a: np.ndarray, *tail: int) -> torch.Tensor:
        return torch.from_numpy(a).reshape(b, k, *tail).to(dev)

    if "pointing" in parts:
        out["pointing"] = back(pointing)
    if "mass" in parts:
        out["mass"] = back(mass.astype(np.float32))
    if "iou" in parts:
        out["curve"] = back(curve.astype(np.float32), n_t)
        out["thresholds"] = t_sorted
        out["order"] = order
    if "box" in parts:
        out["box"] = back(box_iou.astype(np.float32))
        out["map_boxes"] = back(map_boxes, nd, 2)
        out["mask_boxes"] = back(mask_boxes, nd, 2)
    return out


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
    ``scipy.ndimage.label`` on the CPU, inside the box around the map's selected voxels.

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


# -- Table 1 ------------------------------------------------------------------------------
Normalization = Literal["relu-minmax", "relu-max", "minmax", "none"]


def _normalise(maps: torch.Tensor, how: Normalization, nd: int) -> torch.Tensor:
    if how == "relu-minmax":
        return postprocess.normalize(maps.clamp_min(0), nd)
    if how == "relu-max":
        return postprocess.scale_to_max(maps.clamp_min(0), nd)
    if how == "minmax":
        return postprocess.normalize(maps, nd)
    if how == "none":
        return maps
    raise InputError(
        f"unknown normalization {how!r}; use 'relu-minmax', 'relu-max', 'minmax' or 'none'"
    )


def l2_to_exact(
    raw: torch.Tensor, exact: torch.Tensor, normalization: Normalization = "relu-minmax"
) -> torch.Tensor:
    """The HiResCAM paper's Table 1 distance between a method's map and the truth.

    Args:
        raw: ``(B, K, *S)`` a method's raw map on the explained layer's grid
            (``ExplanationResult.raw``).
        exact: ``(B, K, *S)`` the exact per-location contributions on the same grid
            (``sum_f W_k[f, s] * A[f, s]`` for a network ending in one linear layer).
        normalization: how both maps are normalised before the distance.

    Returns:
        ``(B, K)`` float32: ``|| norm(raw) - norm(exact) ||_2`` over the cells
        (dimensionless; at most ``sqrt(N)`` for N cells).

    Normalisation (default ``"relu-minmax"``): each map is passed through a ReLU and
    min-max scaled to [0, 1] over its cells (a map with no positive value becomes all
    zeros), then the L2 norm of the difference is taken over the cells of the explained
    layer's grid, before any upsampling. The paper does not spell out Table 1's
    normalisation; this is the post-processing it gives for every explanation (section
    3.3: "applying a ReLU and normalizing the attention values to the range [0, 1]";
    section 3.1: explanations have values in [0, 1]). Its reported distances (0.6 to 3.0)
    are of the size expected of [0, 1] maps over a feature grid of a few hundred cells,
    not over input pixels. Any normalisation applied to both maps leaves HiResCAM at 0
    on a network ending in one linear layer. ``"relu-max"`` divides by the maximum
    instead (the same unless every cell is positive), ``"minmax"`` skips the ReLU,
    ``"none"`` compares raw values (logits for HiResCAM).
    """
    nd = _spatial_dims(raw, "raw")
    if not isinstance(exact, torch.Tensor) or exact.shape != raw.shape:
        shape = tuple(exact.shape) if isinstance(exact, torch.Tensor) else type(exact).__name__
        raise InputError(f"exact {shape} must have the shape of raw {tuple(raw.shape)}")
    a = _normalise(raw.double(), normalization, nd)
    e = _normalise(exact.to(device=raw.device, dtype=torch.float64), normalization, nd)
    return (a - e).flatten(2).pow(2).sum(-1).sqrt().to(torch.float32)


# -- rank correlation ------------------------------------------------------------------------
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 along the last axis of ``(M, N)``; tied values share their mean rank."""
    m, n = x.shape
    values, order = x.sort(dim=-1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.cumsum(-1) - 1  # tie group of each sorted position
    pos = torch.arange(n, dtype=torch.float64, device=x.device).expand(m, n)
    sums = torch.zeros(m, n, dtype=torch.float64, device=x.device).scatter_add_(1, group, pos)
    counts = torch.zeros_like(sums).scatter_add_(1, group, torch.ones_like(pos))
    mean = sums / counts.clamp_min(1)
    ranks = torch.empty(m, n, dtype=torch.float64, device=x.device)
    return ranks.scatter_(1, order, mean.gather(1, group))


def spearman(a: torch.Tensor, b: torch.Tensor, spatial_dims: int | None = None) -> torch.Tensor:
    """Spearman rank correlation of ``a`` and ``b`` over their last ``spatial_dims`` axes.

    Args:
        a: ``(..., *S)`` maps.
        b: ``(..., *S)``, the same shape as ``a``.
        spatial_dims: the number of trailing axes to correlate over; defaults to
            ``a.ndim - 2`` (maps ``(B, K, *S)``).

    Returns:
        ``(...)`` float32 in [-1, 1]: Pearson's correlation of the ranks, ties given
        their average rank (as ``scipy.stats.spearmanr``). NaN where either map is
        constant (its ranks have no variance).
    """
    if a.shape != b.shape:
        raise InputError(f"cannot correlate maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    nd = a.ndim - 2 if spatial_dims is None else spatial_dims
    lead = a.shape[: a.ndim - nd]
    ra = _average_ranks(a.detach().reshape(math.prod(lead), -1))
    rb = _average_ranks(b.detach().to(a.device).reshape(math.prod(lead), -1))
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()
    rho = torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), math.nan)
    return rho.clamp(-1, 1).reshape(lead).to(torch.float32)


# -- deletion / insertion -----------------------------------------------------------------
Baseline = float | str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
TargetsArg = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class DeletionInsertion:
    """Deletion and insertion curves of K targets for B inputs.

    ``deletion[b, k, s]``: the target's probability after the ``floor(s * U / steps)``
    most attended of the item's U units were replaced by the baseline (``s = 0``: the
    input itself; ``s = steps``: the baseline);
    ``insertion[b, k, s]``: after that share was put back into the baseline (``s = 0``:
    the baseline alone). Both ``(B, K, steps + 1)``. ``fractions``: ``(steps + 1,)`` the
    share of units, ``0 .. 1``. ``deletion_auc`` / ``insertion_auc``: ``(B, K)`` trapezoid
    areas under the curves over ``fractions`` (low deletion and high insertion AUC =
    the map ranks the evidence the model uses first). ``n_units``: ``(B,)`` units per
    input; ``evaluations``: perturbed inputs that went through the model.
    """

    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    fractions: torch.Tensor
    n_units: torch.Tensor
    evaluations: int


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for buf in model.buffers():
        return buf.device
    return torch.device("cpu")


def _gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *S)`` over the spatial axes (edges replicated)."""
    nd = x.ndim - 2
    sigmas = [float(sigma)] * nd if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != nd:
        raise InputError(f"blur_sigma needs one value or {nd}; got {len(sigmas)}")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    c = x.shape[1]
    out = x
    for d, s in enumerate(sigmas):
        if s <= 0:
            continue
        radius = max(1, int(math.ceil(3 * s)))
        r = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
        kern = torch.exp(-0.5 * (r / s) ** 2)
        kern = (kern / kern.sum()).to(x.dtype)
        shape = [1, 1] + [1] * nd
        shape[2 + d] = kern.numel()
        weight = kern.reshape(shape).expand(c, *shape[1:])  # one kernel per channel
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - d)] = radius  # F.pad lists the last axis first
        pad[2 * (nd - 1 - d) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out


def _baseline(x: torch.Tensor, baseline: Baseline, blur_sigma: float | Sequence[float]):
    if isinstance(baseline, str):
        if baseline != "blur":
            raise InputError(f"baseline {baseline!r}: give a number, 'blur', a tensor or callable")
        return _gaussian_blur(x, blur_sigma)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError as err:
            raise InputError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input "
                f"{tuple(x.shape)}"
            ) from err
    if callable(baseline):
        out = baseline(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"baseline(x) returned {got}; it must return x's shape {x.shape}")
        return out.to(device=x.device, dtype=x.dtype)
    raise InputError(f"baseline must be a number, 'blur', a tensor or a callable, not {baseline!r}")


def _target_matrix(targets: TargetsArg, b: int, device: torch.device) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        t = targets.to(device=device, dtype=torch.long)
    elif isinstance(targets, int):
        t = torch.tensor([[targets]], device=device)
    else:
        rows = list(targets)
        if rows and isinstance(rows[0], (list, tuple)):
            t = torch.tensor(rows, dtype=torch.long, device=device)
        else:
            t = torch.tensor([rows], dtype=torch.long, device=device)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] not in (1, b):
        raise InputError(f"targets must be (B, K) class indices; got shape {tuple(t.shape)}")
    return t.expand(b, t.shape[1])


def _as_sizes(size: int | Sequence[int], nd: int) -> list[int]:
    sizes = [int(size)] * nd if isinstance(size, int) else [int(s) for s in size]
    if len(sizes) != nd or min(sizes) < 1:
        raise InputError(f"unit_size must be a positive int or {nd} positive ints; got {size}")
    return sizes


def _grid_labels(index_per_axis: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Flat unit label of every voxel from per-axis unit indices (C order)."""
    nd = len(index_per_axis)
    label = torch.zeros((), dtype=torch.long, device=index_per_axis[0].device)
    for d, idx in enumerate(index_per_axis):
        shape = [1] * nd
        shape[d] = idx.numel()
        label = label * counts[d] + idx.reshape(shape)
    return label


def _unit_labels(
    unit: str | torch.Tensor,
    geometry: LayerGeometry | None,
    size: tuple[int, ...],
    unit_size: int | Sequence[int],
    batch: int,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """``(B or 1, N)`` long unit labels of the input voxels; and whether they are cells
    of ``geometry`` (labels = flat cell indices of its grid)."""
    nd = len(size)
    if isinstance(unit, torch.Tensor):
        lab = unit.to(device=device, dtype=torch.long)
        if tuple(lab.shape[-nd:]) != size or lab.ndim - nd not in (0, 1, 2):
            raise InputError(f"unit labels {tuple(lab.shape)} must be (*S), (B, *S) or (B, 1, *S)")
        lab = lab.reshape(-1, math.prod(size))
        if lab.shape[0] not in (1, batch):
            raise InputError(f"unit labels have {lab.shape[0]} items for a batch of {batch}")
        return lab, False
    if unit == "cell" and geometry is not None:
        if tuple(geometry.input_shape) != size:
            raise InputError(
                f"geometry is for inputs {tuple(geometry.input_shape)}, not {size}; "
                "take it from explainer.geometry(x)"
            )
        idx = []
        for geo, n, s in zip(geometry.axes, geometry.grid_shape, size, strict=True):
            o = torch.arange(s, dtype=torch.float64, device=device)
            # tile i = [first + (i - 1/2) step, first + (i + 1/2) step); voxels beyond the
            # outermost tiles join the nearest cell, so every voxel is in one unit
            i = torch.floor((o - geo.first) / geo.step + 0.5).long().clamp(0, n - 1)
            idx.append(i)
        return _grid_labels(idx, geometry.grid_shape).reshape(1, -1), True
    if unit not in ("cell", "supervoxel"):
        raise InputError(f"unit must be 'cell', 'supervoxel' or a label tensor, not {unit!r}")
    sizes = _as_sizes(unit_size, nd)
    idx = [torch.arange(s, device=device) // c for s, c in zip(size, sizes, strict=True)]
    counts = [math.ceil(s / c) for s, c in zip(size, sizes, strict=True)]
    return _grid_labels(idx, counts).reshape(1, -1), False


def _probabilities(scores: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """``(n, K)`` of ``scores (n, C)`` for ``targets (n, K)``."""
    if kind == "sigmoid":
        values = torch.sigmoid(scores)
    elif kind == "softmax":
        values = torch.softmax(scores, dim=-1)
    else:
        values = scores
    return values.gather(1, targets).double()


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: TargetsArg,
    steps: int = 20,
    baseline: Baseline = 0.0,
    unit: Literal["cell", "supervoxel"] | torch.Tensor = "cell",
    max_batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
    geometry: LayerGeometry | None = None,
    unit_size: int | Sequence[int] = 8,
    probability: Literal["sigmoid", "softmax", "logit"] = "sigmoid",
    blur_sigma: float | Sequence[float] = 5.0,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> DeletionInsertion:
    """Deletion and insertion curves: perturb the input in order of attention.

    The input is cut into units; units are ranked by the map's value (mean over the
    unit's voxels; ties keep unit order). Deletion replaces the ``s / steps`` most
    attended share of the units by the baseline and records the target's probability,
    for ``s = 0 .. steps``; insertion starts from the baseline and puts the most
    attended units back. A faithful map makes deletion fall and insertion rise early.

    Args:
        model: maps ``(n, C_in, *S)`` to logits ``(n, C)`` (or use ``output_selector``).
            It runs in eval mode under ``torch.no_grad()``; its modes and flags are
            restored and its parameters are not touched.
        x: ``(B, C_in, *S)`` inputs, in the model's units (for CT typically HU windowed
            and scaled: convert the baseline the same way).
        maps: ``(B, K, *S)`` at input resolution (``ExplanationResult.maps``), or, with
            ``unit="cell"`` and ``geometry``, ``(B, K, *grid)`` on the explained layer's
            grid (``ExplanationResult.raw``; each cell's own value ranks it).
        targets: class index per explained map: ``(B, K)`` (``ExplanationResult.targets``),
            or K indices shared by all items, or one int.
        steps: points of each curve after the start (``steps + 1`` in all).
        baseline: what removed input becomes: a number (e.g. air, -1000 HU, put through
            the same scaling as ``x``), ``"blur"`` (a Gaussian-blurred copy of ``x``,
            ``blur_sigma`` voxels), a tensor broadcastable to ``x`` (e.g. each organ's
            mean intensity) or a callable ``x -> baseline``.
        unit: ``"cell"``: each unit is one explanation cell's tile on the input (cell
            ``i`` covers ``first + (i -/+ 1/2) * step`` per axis, from ``geometry``, e.g.
            ``explainer.geometry(x)``; voxels outside every tile join the nearest cell).
            Without ``geometry``, cubes of ``unit_size`` voxels. ``"supervoxel"``: a
            regular grid of cubes of ``unit_size`` voxels from voxel 0 (simple regular-grid
            supervoxels, not intensity-adaptive ones). Or an integer label tensor
            ``(*S)`` / ``(B, *S)``: your own supervoxels (e.g. SLIC), one unit per label.
        max_batch: perturbed inputs per forward pass.
        progress: called as ``progress(done, total)`` (perturbed inputs) after each pass.
        unit_size: cube edge in voxels (int or one per axis) for cubes and supervoxels.
        probability: ``"sigmoid"`` of the target's logit (multi-label, the default),
            ``"softmax"`` over the classes, or the ``"logit"`` itself.
        output_selector: maps the model's output to ``(n, C)`` logits.

    Cost: the start and end points are shared by the K targets of an item, so
    ``B * (2 + 2 * K * (steps - 1))`` perturbed inputs go through the model, in
    ``ceil(that / max_batch)`` forward passes of up to ``max_batch`` inputs: per map and
    curve about ``steps / max_batch`` batched passes. Memory: one batch of inputs, plus
    the unit ranks of one item (``K * N`` int64).
    """
    nd = _spatial_dims(x, "x")
    size = tuple(int(s) for s in x.shape[2:])
    if steps < 1 or max_batch < 1:
        raise InputError("steps and max_batch must be at least 1")
    if probability not in ("sigmoid", "softmax", "logit"):
        raise InputError(
            f"probability must be 'sigmoid', 'softmax' or 'logit', not {probability!r}"
        )
    _spatial_dims(maps)
    device = _model_device(model)
    x = x.detach().to(device)
    if not x.is_floating_point():
        x = x.float()
    b = x.shape[0]
    if maps.shape[0] != b:
        raise InputError(f"maps have {maps.shape[0]} items for a batch of {b} inputs")
    k = maps.shape[1]
    tgt = _target_matrix(targets, b, device)
    if tgt.shape[1] != k:
        raise InputError(f"{tgt.shape[1]} targets per item for {k} maps per item")
    base = _baseline(x, baseline, blur_sigma)
    labels, cells = _unit_labels(unit, geometry, size, unit_size, b, device)
    map_size = tuple(maps.shape[2:])
    on_grid = cells and geometry is not None and map_size == tuple(geometry.grid_shape)
    if not on_grid and map_size != size:
        raise InputError(
            f"maps {tuple(maps.shape)} are neither at the input's resolution {size} nor "
            "(with unit='cell' and geometry) on the explained layer's grid"
        )
    if maps.ndim - 2 != nd:
        raise InputError(f"maps {tuple(maps.shape)} and input {tuple(x.shape)} differ in rank")
    flat_maps = _as_float(maps.detach()).to(device).flatten(2)

    # Per item: compact unit ids, their scores (K, U) and the rank of each voxel's unit.
    def item_ranks(i: int) -> tuple[torch.Tensor, int]:
        lab = labels[i if labels.shape[0] > 1 else 0]
        ids, inverse = torch.unique(lab, return_inverse=True)
        n_units = ids.numel()
        if on_grid:
            scores = flat_maps[i][:, ids]
        else:
            sums = torch.zeros(k, n_units, dtype=torch.float64, device=device)
            sums.index_add_(1, inverse, flat_maps[i].double())
            counts = torch.bincount(inverse, minlength=n_units).clamp_min(1)
            scores = sums / counts
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n_units, device=device).expand(k, n_units))
        return rank.gather(1, inverse.expand(k, -1)), n_units

    # Jobs: (item, target or -1 for the shared end points, curve, step)
    jobs: list[tuple[int, int, int, int]] = []
    for i in range(b):
        jobs += [(i, -1, 0, 0), (i, -1, 1, 0)]  # the input, the baseline
        for j in range(k):
            for curve in (0, 1):
                jobs += [(i, j, curve, s) for s in range(1, steps)]
    total = len(jobs)
    deletion = torch.empty(b, k, steps + 1, dtype=torch.float64, device=device)
    insertion = torch.empty_like(deletion)
    n_units = torch.zeros(b, dtype=torch.long)
    cache: dict[int, tuple[torch.Tensor, int]] = {}
    done = 0
    with model_state_restored(model), torch.no_grad():
        for start in range(0, total, max_batch):
            chunk = jobs[start : start + max_batch]
            inputs = []
            for i, j, curve, s in chunk:
                if j < 0:
                    inputs.append(x[i] if curve == 0 else base[i])
                    continue
                if i not in cache:
                    cache.clear()  # one item's ranks at a time
                    cache[i] = item_ranks(i)
                    n_units[i] = cache[i][1]
                vrank, u = cache[i]
                chosen = (vrank[j] < (s * u) // steps).reshape(1, *size)
                if curve == 0:  # deletion: the chosen units become baseline
                    inputs.append(torch.where(chosen, base[i], x[i]))
                else:  # insertion: the chosen units come back
                    inputs.append(torch.where(chosen, x[i], base[i]))
            out = model(torch.stack(inputs))
            if output_selector is not None:
                out = output_selector(out)
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise InputError("the model did not return (n, C) logits; pass output_selector=...")
            rows = torch.tensor([i for i, *_ in chunk], device=device)
            probs = _probabilities(out.float(), tgt[rows], probability)
            for row, (i, j, curve, s) in enumerate(chunk):
                if j < 0 and curve == 0:
                    deletion[i, :, 0] = probs[row]
                    insertion[i, :, steps] = probs[row]
                elif j < 0:
                    deletion[i, :, steps] = probs[row]
                    insertion[i, :, 0] = probs[row]
                elif curve == 0:
                    deletion[i, j, s] = probs[row, j]
                else:
                    insertion[i, j, s] = probs[row, j]
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    for i in range(b):
        if n_units[i] == 0:
            n_units[i] = item_ranks(i)[1]
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
    return DeletionInsertion(
        deletion=deletion.float(),
        insertion=insertion.float(),
        deletion_auc=torch.trapezoid(deletion, fractions, dim=-1).float(),
        insertion_auc=torch.trapezoid(insertion, fractions, dim=-1).float(),
        fractions=fractions.float(),
        n_units=n_units,
        evaluations=total,
    )


# -- randomisation check ---------------------------------------------------------------------
@dataclass
class RandomisationResult:
    """Cascading model-parameter randomisation (Adebayo et al., 2018).

    ``layers``: names of the modules re-initialised, in order (``layers[i]`` at step
    ``i + 1``). ``correlations``: ``(steps, B, K)`` float32 Spearman correlation of each
    map with the original, ``steps = len(layers) + 1``; step 0 compares the original with
    itself (1, or NaN for a constant map). ``targets``: ``(B, K)`` the explained classes
    (those of the original model, kept fixed). A method that depends on the model shows
    correlations that fall as layers are randomised.
    """

    layers: tuple[str, ...]
    correlations: torch.Tensor
    targets: torch.Tensor
    method: str
    order: str


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Modules that own parameters, in the order a forward pass first calls them."""
    seen: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):

            def hook(_m, _i, _o, name=name):
                if name not in seen:
                    seen.append(name)

            handles.append(module.register_forward_hook(hook))
    try:
        with model_state_restored(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _reinitialise(module: nn.Module, seed: int) -> None:
    """New random parameters for ``module``: its ``reset_parameters()`` under a fixed seed
    (the caller's RNG state is restored), else normal noise of each tensor's own std."""
    params = list(module.parameters(recurse=False))
    device = params[0].device if params else torch.device("cpu")
    if hasattr(module, "reset_parameters"):
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            module.reset_parameters()
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            std = std if math.isfinite(std) and std > 0 else 0.02
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * std)


def randomisation_check(
    model: nn.Module,
    x: torch.Tensor,
    targets: TargetsArg | None = None,
    method: str = "hirescam",
    layer: str | nn.Module | None = None,
    order: Literal["top-down", "bottom-up", "independent"] = "top-down",
    seed: int = 0,
    use: Literal["raw", "maps"] = "raw",
    absolute: bool = False,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> RandomisationResult:
    """Adebayo et al.'s model-parameter randomisation test for an explanation method.

    A deep copy of ``model`` is explained with :class:`hirescam3d.Explainer` at
    ``layer``; then its parameterised modules are re-initialised one by one and the
    explanation is recomputed after each, and each map's Spearman rank correlation with
    the original map is recorded. The user's model is never modified (nor the global
    RNG state).

    Args:
        model: the network; ``x``: ``(B, C_in, *S)``.
        targets: classes to explain (as for :class:`~hirescam3d.Explainer`); None = each
            item's top class under the original model. Kept fixed at every step.
        method: a registered method name.
        layer: the explained layer (name or module of ``model``); default
            ``model.default_layer``.
        order: ``"top-down"`` (cascading from the output towards the input, as in the
            paper), ``"bottom-up"`` (cascading from the input), or ``"independent"``
            (one module at a time, the others original). Module order is the order in
            which one forward pass first calls the modules that own parameters.
        seed: re-initialisation seed (module ``i`` uses ``seed + i``). Modules with
            ``reset_parameters()`` use it; others get normal noise with the standard
            deviation of each of their parameter tensors.
        use: correlate the ``"raw"`` maps on the layer's grid (default; signed, few
            ties) or the display ``"maps"`` on the input (ReLU'd: ties at 0 share their
            average rank).
        absolute: correlate absolute values (Adebayo et al. report both).
        output_selector: as for :class:`~hirescam3d.Explainer`.

    Returns:
        :class:`RandomisationResult`. Ranks are average ranks for ties (Spearman as in
        ``scipy.stats.spearmanr``); a map made constant by randomisation gives NaN.

    Cost: ``1 + len(layers)`` explanations (one forward and one backward pass each),
    plus one forward pass to find the module order.
    """
    from hirescam3d.core.explainer import Explainer

    if order not in ("top-down", "bottom-up", "independent"):
        raise InputError(f"order must be 'top-down', 'bottom-up' or 'independent', not {order!r}")
    if use not in ("raw", "maps"):
        raise InputError(f"use must be 'raw' or 'maps', not {use!r}")
    if layer is None:
        layer = getattr(model, "default_layer", None)
        if not layer:
            raise LayerError("give layer=...: the model has no default_layer")
    layer_name, _ = resolve_layer(model, layer)
    work = copy.deepcopy(model)

    def explain(net: nn.Module, explainer: Explainer | None, tgt):
        explainer = explainer or Explainer(net, layer_name, method, output_selector=output_selector)
        res = explainer.explain(x, targets=tgt, maps=use == "maps")[explainer.method]
        out = res.raw if use == "raw" else res.maps
        return (out.abs() if absolute else out), res.targets, explainer

    first, tgt, explainer = explain(work, None, targets)
    x_dev = x.detach().to(_model_device(work))
    if not x_dev.is_floating_point():
        x_dev = x_dev.float()
    names = _execution_order(work, x_dev)
    if order != "bottom-up":
        names = names[::-1]
    correlations = [spearman(first, first)]
    for step, name in enumerate(names):
        if order == "independent":
            net = copy.deepcopy(model)
            _reinitialise(dict(net.named_modules())[name], seed + step)
            current, _, _ = explain(net, None, tgt)
        else:
            _reinitialise(dict(work.named_modules())[name], seed + step)
            current, _, _ = explain(work, explainer, tgt)
        correlations.append(spearman(current, first))
    return RandomisationResult(
        layers=tuple(names),
        correlations=torch.stack(correlations),
        targets=tgt,
        method=explainer.method,
        order=order,
    )
