"""Post-processing of raw maps ``(B, K, *S)``: placement on the input, units, display.

Raw maps live on the explained layer's grid. :class:`~hirescam3d.core.trace.LayerGeometry`
says where each cell lies in the input (cell ``i`` centred on input voxel
``first + i * step``, its *tile* reaching half a step either side). Two ways to bring a
map onto the input grid, both separable along the axes:

- :func:`place` (display): the value at a cell centre is the cell's value, linear in
  between; from the outermost centres to the edge of their tiles the value is held
  constant; beyond the tiles (input regions no cell is centred over, e.g. the border of
  a network with valid convolutions) it is 0.
- :func:`density` (units): each cell's value is spread evenly over its tile, so the
  input-grid map sums to the same total as the cells, apart from the parts of tiles
  that lie outside the input (see :func:`cell_fractions`).

:func:`unit_maps` is the default display chain: ReLU -> place -> divide by the maximum
(the zero of the map stays zero; a map with no positive value is all zeros).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hirescam3d.core.trace import AxisGeometry, LayerGeometry

#: ``f(raw, geometry, input_size) -> maps``: what ``ExplanationResult.maps`` holds
#: (:func:`unit_maps`, :func:`density`, ...).
PostProcessing = Callable[[torch.Tensor, LayerGeometry, Sequence[int]], torch.Tensor]


def relu(maps: torch.Tensor) -> torch.Tensor:
    """Keep the positive evidence only."""
    return maps.clamp_min(0)


def normalize(maps: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Min-max each map over its last ``spatial_dims`` axes to [0, 1].

    The maximum maps to 1 (not inverted, unlike MONAI's ``default_normalizer``).
    A constant map (all zeros included) becomes all zeros, never NaN.
    """
    flat = maps.flatten(start_dim=maps.ndim - spatial_dims)
    lo = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return out.reshape(maps.shape)


def scale_to_max(maps: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Divide each map by its maximum over the last ``spatial_dims`` axes.

    Zero stays zero, so a map's [0, 1] values keep their ratios. A map whose maximum is
    not positive (no positive evidence) becomes all zeros, never NaN.
    """
    flat = maps.flatten(start_dim=maps.ndim - spatial_dims)
    top = flat.max(dim=-1, keepdim=True).values
    out = torch.where(top > 0, flat / top.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return out.reshape(maps.shape)


def _taps_linear(geo: AxisGeometry, n: int, size: int, device: torch.device):
    """Per input voxel: two cells and weights for linear interpolation between centres."""
    o = torch.arange(size, dtype=torch.float64, device=device)
    u = (o - geo.first) / geo.step  # fractional cell index of each voxel centre
    inside = (u >= -0.5) & (u < n - 0.5)
    uc = u.clamp(0, n - 1)
    i0 = uc.floor().clamp(max=max(n - 2, 0)).long()
    w1 = (uc - i0) if n > 1 else torch.zeros_like(uc)
    i1 = (i0 + 1).clamp(max=n - 1)
    w0 = (1 - w1) * inside
    return i0, w0, i1, w1 * inside


def _taps_tile(geo: AxisGeometry, n: int, size: int, device: torch.device):
    """Per input voxel ``[o - 1/2, o + 1/2)``: the (at most two) tiles it overlaps, each
    weighted by the overlap as a share of the tile's length."""
    if geo.step < 1:
        raise ValueError(
            f"cells {geo.step:g} voxels apart are finer than the input grid; "
            "density needs a step of at least one voxel"
        )
    o = torch.arange(size, dtype=torch.float64, device=device)
    lo = (o - 0.5 - geo.first) / geo.step + 0.5  # voxel edges in tile units
    hi = (o + 0.5 - geo.first) / geo.step + 0.5
    i0 = lo.floor()
    # overlap of [lo, hi) with tile i0 = [i0, i0 + 1) and tile i0 + 1, in tile lengths
    w0 = torch.minimum(hi, i0 + 1) - lo
    w1 = (hi - (i0 + 1)).clamp_min(0)
    i1 = i0 + 1
    ok0 = (i0 >= 0) & (i0 < n)
    ok1 = (i1 >= 0) & (i1 < n)
    return (
        i0.clamp(0, n - 1).long(),
        w0 * ok0,
        i1.clamp(0, n - 1).long(),
        w1 * ok1,
    )


def _matrix(taps: tuple, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``(size, n)`` operator of one axis' two-tap weights."""
    i0, w0, i1, w1 = taps
    size = i0.shape[0]
    m = torch.zeros(size, n, dtype=torch.float64, device=i0.device)
    rows = torch.arange(size, device=i0.device)
    m.index_put_((rows, i0), w0.double(), accumulate=True)
    m.index_put_((rows, i1), w1.double(), accumulate=True)
    return m.to(dtype)


def _apply_axes(x: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply one ``(out, in)`` matrix to each of the last ``len(matrices)`` axes of ``x``.

    Each axis is one batched matrix product without transposes: ``x`` is viewed as
    ``(leading, in, trailing)``. Axes are applied last to first.
    """
    n = len(matrices)
    for a in reversed(range(n)):
        m = matrices[a]
        dim = x.ndim - n + a
        lead, trail = x.shape[:dim], x.shape[dim + 1 :]
        if not trail:
            x = x @ m.T
        else:
            flat = x.reshape(-1, x.shape[dim], math.prod(trail))
            x = torch.matmul(m, flat).reshape(*lead, m.shape[0], *trail)
    return x


def _check(maps: torch.Tensor, geometry: LayerGeometry, size: Sequence[int] | None):
    n_spatial = len(geometry.grid_shape)
    if tuple(maps.shape[maps.ndim - n_spatial :]) != tuple(geometry.grid_shape):
        raise ValueError(
            f"maps of shape {tuple(maps.shape)} do not end in the geometry's grid "
            f"{geometry.grid_shape}"
        )
    size = tuple(int(s) for s in (size if size is not None else geometry.input_shape))
    if len(size) != n_spatial:
        raise ValueError(f"size {size} has not {n_spatial} axes")
    return size


def place(
    maps: torch.Tensor, geometry: LayerGeometry, size: Sequence[int] | None = None
) -> torch.Tensor:
    """Maps ``(..., *grid)`` on the input grid ``(..., *size)`` (default: the input's).

    Linear between cell centres, constant to the edge of the outermost tiles, 0 beyond.
    Values stay within the range of the cells (and 0).
    """
    size = _check(maps, geometry, size)
    matrices = [
        _matrix(_taps_linear(geo, n, s, maps.device), n, maps.dtype)
        for geo, n, s in zip(geometry.axes, geometry.grid_shape, size, strict=True)
    ]
    return _apply_axes(maps, matrices)


def density(
    maps: torch.Tensor, geometry: LayerGeometry, size: Sequence[int] | None = None
) -> torch.Tensor:
    """Each cell's value spread evenly over its tile: values per input voxel.

    The result sums (over the input) to ``sum(maps * cell_fractions(...))``: every
    cell's value times the share of its tile inside the input. For HiResCAM at a
    guaranteed layer the result is a contribution density in logits per voxel.
    """
    size = _check(maps, geometry, size)
    matrices = [
        _matrix(_taps_tile(geo, n, s, maps.device), n, maps.dtype)
        for geo, n, s in zip(geometry.axes, geometry.grid_shape, size, strict=True)
    ]
    return _apply_axes(maps, matrices)


def pool_to_cells(volumes: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """The transpose of :func:`density`: ``(..., *input)`` -> ``(..., *grid)``.

    Each cell gets the mean of ``volumes`` over its tile, counting the parts of the tile
    outside the input as 0. Pooling a mask gives the share of each cell's tile inside
    it; pooling ones gives the share of each tile inside the input.
    """
    n_spatial = len(geometry.grid_shape)
    size = tuple(volumes.shape[volumes.ndim - n_spatial :])
    matrices = [
        _matrix(_taps_tile(geo, n, s, volumes.device), n, volumes.dtype).T
        for geo, n, s in zip(geometry.axes, geometry.grid_shape, size, strict=True)
    ]
    return _apply_axes(volumes, matrices)


def cell_fractions(geometry: LayerGeometry) -> torch.Tensor:
    """``(*grid)`` share of each cell's tile that lies inside the input (1 inside)."""
    ones = torch.ones(geometry.input_shape, dtype=torch.float64)
    return pool_to_cells(ones, geometry)


def unit_maps(
    raw: torch.Tensor, geometry: LayerGeometry, size: Sequence[int] | None = None
) -> torch.Tensor:
    """The default display chain: ReLU -> :func:`place` -> divide by the maximum, [0, 1]."""
    size = _check(raw, geometry, size)
    return scale_to_max(place(relu(raw), geometry, size), spatial_dims=len(size))


def stretch_geometry(grid: Sequence[int], size: Sequence[int]) -> LayerGeometry:
    """The geometry of a grid stretched evenly over the input (``align_corners=False``).

    What older code and other libraries assume for every network; correct only where
    the grid tiles the input exactly. Used for comparisons and for callers that have
    no network to trace.
    """
    axes = tuple(
        AxisGeometry(a, (s / n - 1) / 2, s / n, s / n)
        for a, (n, s) in enumerate(zip(grid, size, strict=True))
    )
    return LayerGeometry(tuple(int(n) for n in grid), tuple(int(s) for s in size), axes)

