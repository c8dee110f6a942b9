"""Model grid -> scan grid: one raw map placed on the model's input grid, then on the scan's.

A map is placed by its layer's traced geometry and resampled as MONAI ``Invertd`` would, in
one separable pass (:class:`~hirescam3d.core.placement.ModelGrid`; ``Invertd`` itself is
the fallback for preprocessing that pass does not cover). ``values="unit"``: [0, 1]
display maps; ``values="logit"``: logits per voxel, rescaled so they sum to the model-grid
contributions inside the scan (:func:`conserve`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from hirescam3d.core import postprocess
from hirescam3d.core.placement import _SLAB_VOXELS, ModelGrid


def placed_map(
    cells: torch.Tensor, geometry: Any, shape: tuple[int, ...], values: str
) -> tuple[torch.Tensor, float]:
    """``(model-grid map before scaling, scale)`` of the raw map ``cells``: the placed ReLU
    map and its maximum (``unit``), or the logit density and 1 (``logit``)."""
    cells = cells[None, None].float()
    if values == "logit":
        return postprocess.density(cells, geometry, shape)[0, 0], 1.0
    placed = postprocess.place(postprocess.relu(cells), geometry, shape)[0, 0]
    return placed, float(placed.max())


def model_map(
    cells: torch.Tensor, geometry: Any, shape: tuple[int, ...], values: str
) -> np.ndarray:
    """Float32 ``shape`` on the model's input grid: a [0, 1] display map (``unit``) or
    logits per model voxel (``logit``)."""
    placed, top = placed_map(cells, geometry, shape, values)
    if values == "logit":
        return placed.numpy().astype(np.float32)
    out = placed / top if top > 0 else torch.zeros_like(placed)
    return out.numpy().astype(np.float32)


class ScanMap(NamedTuple):
    """A map on the scan's grid: float32 ``(I, J, K)`` (F-ordered); for logit maps, the two
    factors :func:`conserve` scaled its positive and negative parts by; ``clean``: every
    value is known finite and in [0, 1] (a clipped display map of finite cells), so a
    writer need not check it."""

    volume: np.ndarray
    correction: list[float] | None
    clean: bool = False


def scan_map(
    cells: torch.Tensor, geometry: Any, grid: ModelGrid, values: str, out: np.ndarray | None = None
) -> ScanMap:
    """The raw map ``cells`` on the scan's grid: a [0, 1] display map, or logits per scan
    voxel summing to the model-grid contributions inside the scan. ``out``: a float32
    F-ordered array of the scan's shape to reuse (the separable path writes into it)."""
    unit = values == "unit"
    if not grid.fast:
        placed = model_map(cells, geometry, grid.shape, values)
        volume = grid.invert(torch.from_numpy(placed), clip=unit)
    elif unit:
        _, top = placed_map(cells, geometry, grid.shape, values)
        finite = bool(torch.isfinite(cells).all()) and math.isfinite(top)
        if top <= 0:
            if out is None:
                return ScanMap(np.zeros(grid.scan_shape, np.float32, order="F"), None, finite)
            out.fill(0)
            return ScanMap(out, None, finite)
        volume = grid.to_scan(cells.float().clamp_min(0) / top, geometry, "place", out)
        np.clip(volume, 0.0, 1.0, out=volume)  # finite weights of finite cells: finite
        return ScanMap(volume, None, finite)
    else:
        volume = grid.to_scan(cells, geometry, "density", out)
    if unit:
        return ScanMap(volume, None)
    density, _ = placed_map(cells, geometry, grid.shape, values)
    ratio = abs(np.linalg.det(grid.scan_affine[:3, :3])) / abs(np.linalg.det(grid.affine[:3, :3]))
    volume *= np.float32(ratio)
    return ScanMap(volume, conserve(volume, density, grid.inside()))


def conserve(volume: np.ndarray, density: torch.Tensor, inside: torch.Tensor) -> list[float]:
    """Scale a resampled logit density (in place) so it sums exactly to the model-grid
    contributions inside the scan; returns the two factors (positive, negative part).

    Linear resampling of a density that is constant on each cell's tile is not mass
    preserving where tiles are only a few scan voxels across (sampling error, a few
    percent for a focal map). The positive and the negative parts are therefore each
    scaled to their model-grid totals (1 for an empty part; NaN, null in JSON, if
    resampling lost a part). Works in slabs: no full-size temporary.
    """
    flat = torch.from_numpy(volume.reshape(-1, order="A"))
    density = density.double() * inside
    have = [0.0, 0.0]
    for chunk in flat.split(_SLAB_VOXELS):
        have[0] += float(chunk.clamp_min(0).sum(dtype=torch.float64))
        have[1] += float((-chunk).clamp_min(0).sum(dtype=torch.float64))
    factors = []
    for sign, part in zip((1.0, -1.0), have, strict=True):
        target = float((sign * density).clamp_min(0).sum())
        factors.append(target / part if part > 0 else (1.0 if target == 0 else math.nan))
    scale = [0.0 if math.isnan(f) else f for f in factors]
    for chunk in flat.split(_SLAB_VOXELS):
        chunk.mul_(torch.where(chunk > 0, scale[0], scale[1]).to(chunk.dtype))
    return factors
