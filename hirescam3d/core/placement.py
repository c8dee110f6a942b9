"""The model's grid and the scan's grid: maps and label maps from one to the other.

:class:`ModelGrid` knows how the model's input grid was made from the scan (MONAI's
applied orientation, resampling, padding and cropping). It puts a layer's cells on the
scan's grid in one separable pass, resampled as MONAI ``Invertd`` would, and pools the
scan's organ labels onto the cells. :func:`invert_maps` (``Invertd`` itself) is the
reference and the fallback for preprocessing the fast path does not cover.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hirescam3d.errors import HiResCAMError

# Fast inversion: the applied operations it knows how to undo (anything else: Invertd).
_FAST_OPS = ("Orientation", "SpatialResample", "ResizeWithPadOrCrop")
# Scan voxels per slab when pooling organ labels onto the cells (bounds temporary memory).
_SLAB_VOXELS = 1 << 23


def invert_maps(
    pre: Any,
    image: Any,
    model_grid: dict[tuple[str, str], torch.Tensor],
    shape: tuple[int, ...],
    affine: np.ndarray,
    clip: bool = True,
) -> dict[tuple[str, str], np.ndarray]:
    """Map ``(1, *model_grid)`` maps back to the scan's grid with ``Invertd`` (linear).

    ``pre`` is the preprocessing applied to ``image`` (the preprocessed MetaTensor whose
    applied operations are undone). Returns float32 ``shape`` volumes, clipped to [0, 1]
    with ``clip`` (display maps), else as resampled (signed values).
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    if not model_grid:
        return {}
    # One inverse for all maps (they share one resampling grid): stack them as the
    # channels of one MetaTensor; it runs on the image's device (fast on a GPU).
    stack = MetaTensor(torch.cat(list(model_grid.values())), meta=dict(image.meta))
    inverter = Invertd("maps", transform=pre, orig_keys="image", nearest_interp=False)
    inverted = inverter({"maps": stack, "image": image})["maps"]
    plain = inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted
    back = torch.as_tensor(plain).detach().cpu().numpy()
    if back.shape[1:] != tuple(shape) or (
        isinstance(inverted, MetaTensor)
        and not np.allclose(inverted.affine.cpu().numpy(), affine, atol=1e-3)
    ):
        raise HiResCAMError(
            f"internal error: the inverted maps (shape {back.shape[1:]}) are not on the "
            f"scan's grid (shape {tuple(shape)})"
        )
    if clip:
        back = np.clip(back, 0.0, 1.0)
    return {p: back[i].astype(np.float32) for i, p in enumerate(model_grid)}


def _apply_axis(
    x: torch.Tensor, m: torch.Tensor, dim: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the ``(out, in)`` matrix ``m`` along axis ``dim`` of ``x`` (one matmul), into
    the contiguous tensor ``out`` if given."""
    lead, trail = x.shape[:dim], x.shape[dim + 1 :]
    shape = (*lead, m.shape[0], *trail)
    if out is None:
        out = torch.empty(shape, dtype=torch.promote_types(x.dtype, m.dtype))
    if dim == x.ndim - 1:
        torch.matmul(x, m.T, out=out.view(shape))
    else:
        flat = x.reshape(-1, x.shape[dim], math.prod(trail))
        torch.matmul(m, flat, out=out.view(flat.shape[0], m.shape[0], math.prod(trail)))
    return out.view(shape)


def _apply_separable(
    x: torch.Tensor, matrices: Sequence[torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply one ``(out, in)`` matrix per axis of ``x``, in the order with the fewest
    multiply-adds (the result does not depend on the order); the last one into ``out``
    (contiguous, of the result's size) if given."""
    best, best_cost = None, math.inf
    for order in itertools.permutations(range(x.ndim)):
        shape, cost = list(x.shape), 0
        for d in order:
            cost += math.prod(shape) // shape[d] * matrices[d].shape[0] * shape[d]
            shape[d] = matrices[d].shape[0]
        if cost < best_cost:
            best, best_cost = order, cost
    order = best or ()
    for i, d in enumerate(order):
        x = _apply_axis(x, matrices[d], d, out if i == len(order) - 1 else None)
    return x


@dataclass
class ModelGrid:
    """How the model's input grid ``(S, H, W)`` lies on the scan's grid ``(I, J, K)``.

    ``affine``: model voxel -> RAS mm. ``scan_axis[a]``: the scan axis that model axis
    ``a`` runs along, with model index ``u = scale[a] * v + offset[a]`` for scan index
    ``v`` (set when the preprocessing only reorients, resamples and pads or crops, as it
    does for every axis-aligned or oblique scan; else None and maps go back with MONAI
    ``Invertd``). ``lo``/``hi``: the model indices of the resampled scan before padding
    or cropping, where MONAI's inverse clamps (its ``border`` padding mode).
    """

    scan_shape: tuple[int, ...]
    scan_affine: np.ndarray
    shape: tuple[int, ...]
    affine: np.ndarray
    scan_axis: tuple[int, ...] | None
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    pre: Any = field(default=None, repr=False)
    image: Any = field(default=None, repr=False)
    support: torch.Tensor | None = field(default=None, repr=False)  # Invertd path only

    @classmethod
    def of(cls, image: Any, pre: Any, scan_shape: Sequence[int], scan_affine: np.ndarray):
        """From the preprocessed MetaTensor ``image`` ``(1, S, H, W)`` and its transforms."""
        shape = tuple(int(n) for n in image.shape[1:])
        affine = np.asarray(image.affine.cpu(), dtype=np.float64)
        scan_shape = tuple(int(n) for n in scan_shape)
        mapping = np.linalg.solve(affine, np.asarray(scan_affine, np.float64))
        fast = _fast_extent(image.applied_operations, shape)
        axes = _axis_mapping(mapping, scan_shape) if fast is not None else None
        lo, hi = fast if fast is not None else ((0.0,) * len(shape), (0.0,) * len(shape))
        if axes is None:
            scale = offset = (0.0,) * len(shape)
        else:
            scale = tuple(float(mapping[a, q]) for a, q in enumerate(axes))
            offset = tuple(float(mapping[a, 3]) for a in range(len(shape)))
        return cls(scan_shape, np.asarray(scan_affine, np.float64), shape, affine, axes,
                   scale, offset, lo, hi, pre, image)

    @property
    def fast(self) -> bool:
        """Whether maps go back by the separable resampling (else by ``Invertd``)."""
        return self.scan_axis is not None

    def inside(self) -> torch.Tensor:
        """Bool ``(S, H, W)``: model voxels that hold the resampled scan (not padding)."""
        if self.support is not None:
            return self.support > 0
        masks = [
            (torch.arange(n, dtype=torch.float64) >= lo - 1e-6)
            & (torch.arange(n, dtype=torch.float64) <= hi + 1e-6)
            for n, lo, hi in zip(self.shape, self.lo, self.hi, strict=True)
        ]
        return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]

    def _inverse_matrix(self, a: int) -> torch.Tensor:
        """``(scan length, model length)``: linear interpolation of model axis ``a`` at each
        scan voxel of its scan axis, clamped to ``[lo, hi]``; model indices outside the
        grid (cropped-away scan) count as 0. MONAI ``Invertd``'s weights, in float64."""
        q, n = self.scan_axis[a], self.shape[a]
        v = torch.arange(self.scan_shape[q], dtype=torch.float64)
        u = (self.scale[a] * v + self.offset[a]).clamp(self.lo[a], self.hi[a])
        i0 = u.floor()
        w1 = u - i0
        m = torch.zeros(len(v), n, dtype=torch.float64)
        rows = torch.arange(len(v))
        for index, weight in ((i0, 1.0 - w1), (i0 + 1, w1)):
            ok = (index >= 0) & (index <= n - 1)
            m.index_put_((rows[ok], index[ok].long()), weight[ok], accumulate=True)
        return m

    def to_scan(
        self, cells: torch.Tensor, geometry: Any, kind: str, out: np.ndarray | None = None
    ) -> np.ndarray:
        """A cell map ``(*grid)`` on the scan's grid: float32 ``(I, J, K)``, F-ordered;
        written into ``out`` (float32, F-ordered, the scan's shape) if given: a reused
        buffer spares the page faults of a fresh 300 MB array (most of the time here).

        ``kind="place"``: linear between cell centres (:func:`postprocess.place`);
        ``"density"``: each cell spread over its tile (:func:`postprocess.density`); then
        linear interpolation at every scan voxel, as ``Invertd`` does, in one separable
        pass per axis: the model-grid map is never resampled voxel by voxel.
        """
        from hirescam3d.core import postprocess

        taps = postprocess._taps_linear if kind == "place" else postprocess._taps_tile
        matrices = {}
        for a, geo in enumerate(geometry.axes):
            n_cells = geometry.grid_shape[a]
            placing = postprocess._matrix(taps(geo, n_cells, self.shape[a], torch.device("cpu")),
                                          n_cells, torch.float64)
            matrices[a] = (self._inverse_matrix(a) @ placing).float()
        # Work on axes in reversed scan order, so the result is the F-ordered (I, J, K).
        model_axis = {q: a for a, q in enumerate(self.scan_axis)}
        order = [model_axis[q] for q in reversed(range(len(self.scan_shape)))]
        x = cells.detach().float().cpu().permute(order)
        target = None if out is None else torch.from_numpy(out.T)
        placed = _apply_separable(x, [matrices[a] for a in order], target)
        return placed.contiguous().numpy().T

    def nearest_on_scan(self, volume: torch.Tensor | np.ndarray) -> np.ndarray:
        """A model-grid label volume ``(S, H, W)`` on the scan's grid by nearest neighbour:
        uint8 ``(I, J, K)``; scan voxels whose nearest model index (rounded half up) lies
        outside the model's grid get 0. Works slab by slab for any affine."""
        labels = np.asarray(volume.cpu() if isinstance(volume, torch.Tensor) else volume)
        labels = np.pad(labels.astype(np.uint8), [(0, 1)] * labels.ndim)  # the pad reads 0
        n = np.array(self.shape)
        mapping = np.linalg.solve(self.affine, self.scan_affine)  # scan index -> model index
        out = np.zeros(self.scan_shape, np.uint8)
        j, k = np.meshgrid(np.arange(self.scan_shape[1]), np.arange(self.scan_shape[2]),
                           indexing="ij")  # fmt: skip
        rest = mapping[:3, 1:3] @ np.stack([j.ravel(), k.ravel()]) + mapping[:3, 3:4]
        for i in range(self.scan_shape[0]):
            u = np.floor(rest + mapping[:3, 0:1] * i + 0.5).astype(np.int64)
            outside = ((u < 0) | (u >= n[:, None])).any(axis=0)
            u = np.where(outside[None], n[:, None], u)
            out[i] = labels[u[0], u[1], u[2]].reshape(self.scan_shape[1:])
        return out

    def invert(self, model_map: torch.Tensor, clip: bool) -> np.ndarray:
        """A model-grid map ``(S, H, W)`` on the scan's grid with MONAI ``Invertd``."""
        back = invert_maps(self.pre, self.image, {("", ""): model_map[None].float()},
                           self.scan_shape, self.scan_affine, clip=clip)
        return back[("", "")]

    def _pool_matrix(self, a: int, geo: Any, n_cells: int) -> torch.Tensor:
        """``(cells, scan length)``: the share of each cell's tile (inside the model's
        input) that each scan voxel of model axis ``a``'s scan axis covers."""
        q = self.scan_axis[a]
        v = torch.arange(self.scan_shape[q], dtype=torch.float64)
        centre = self.scale[a] * v + self.offset[a]
        half = abs(self.scale[a]) / 2
        i = torch.arange(n_cells, dtype=torch.float64)[:, None]
        tile_lo = (geo.first + (i - 0.5) * geo.step).clamp(-0.5, self.shape[a] - 0.5)
        tile_hi = (geo.first + (i + 0.5) * geo.step).clamp(-0.5, self.shape[a] - 0.5)
        overlap = (torch.minimum(tile_hi, centre + half) - torch.maximum(tile_lo, centre - half))
        return overlap.clamp_min(0) / geo.step

    def cell_regions(
        self, geometry: Any, labels: np.ndarray | None, names: dict[int, str] | None
    ) -> Any:
        """:class:`~hirescam3d.core.attribution.CellRegions` of ``geometry``'s cells, pooled
        straight from the scan's grid: per cell, the share of its tile inside the scan and
        inside each organ of ``labels`` (``(I, J, K)`` integers, 0 = background), each
        scan voxel counted by the part of the tile it covers. Labels sharing a name are
        summed. One pass over the scan, in slabs (:func:`_pool_labels`)."""
        from hirescam3d.core.attribution import CellRegions

        pools = {
            self.scan_axis[a]: self._pool_matrix(a, geo, geometry.grid_shape[a]).float()
            for a, geo in enumerate(geometry.axes)
        }
        to_model = list(self.scan_axis)  # result axis q -> model axis order
        shares = [pools[q].double().sum(dim=1) for q in range(3)]
        inside = torch.einsum("i,j,k->ijk", *shares).permute(to_model)
        organs: dict[str, torch.Tensor] = {}
        if labels is None:
            return CellRegions(inside, organs)
        values = _label_values(labels)
        if values:
            pooled, order = _pool_labels(labels, values, pools)
            to_model = [order.index(q) for q in self.scan_axis]
            for i, v in enumerate(values, start=1):
                name = (names or {}).get(v, f"label_{v}")
                share = pooled[:, :, i, :].permute(to_model)
                organs[name] = organs[name] + share if name in organs else share
        return CellRegions(inside, organs)


def _pool_labels(
    labels: np.ndarray, values: list[int], pools: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pool every label at once: ``(pooled (c0, c1, 1 + len(values), c2), axis order)``.

    ``pools[q]``: ``(cells, length)`` weights of scan axis ``q``. The labels are walked in
    memory order (axis ``order[2]`` fastest): that axis is contracted by a scatter-add of
    each voxel's weight into its (label, cell) bin (a voxel overlaps one or two cells),
    slab by slab, the other two by small matrix products. Index 0 is the background.
    """
    if labels.flags.c_contiguous:
        view, order = labels, (0, 1, 2)
    elif labels.flags.f_contiguous:
        view, order = labels.T, (2, 1, 0)
    else:
        view, order = np.ascontiguousarray(labels), (0, 1, 2)
    mats = [pools[q].double() for q in order]
    n_labels, cells = len(values) + 1, mats[2].shape[0]
    lut = np.zeros(int(max(values)) + 1, np.int64)
    lut[values] = np.arange(1, n_labels) * cells
    taps = _column_taps(mats[2].float())
    rows = view.shape[1]
    acc = torch.zeros(mats[0].shape[0], mats[1].shape[0], n_labels, cells, dtype=torch.float64)
    step = max(1, _SLAB_VOXELS // (view.shape[1] * view.shape[2]))
    for start in range(0, view.shape[0], step):
        slab = view[start : start + step]
        n = slab.shape[0]
        base = torch.from_numpy(lut[slab].reshape(n * rows, -1))  # label offset per voxel
        out = torch.zeros(n * rows, n_labels * cells, dtype=torch.float32)
        for cell, weight, cols in taps:
            if cols is None:
                out.scatter_add_(1, base + cell, weight.expand(n * rows, -1))
            elif len(cols):
                out.scatter_add_(1, base[:, cols] + cell[cols], weight[cols].expand(n * rows, -1))
        per_row = out.double().reshape(n, rows, n_labels, cells)
        per_row = torch.einsum("bj,sjlc->sblc", mats[1], per_row)
        acc += torch.einsum("as,sblc->ablc", mats[0][:, start : start + n], per_row)
    return acc, order


def _column_taps(matrix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """The nonzero rows of each column of ``(cells, length)`` as taps ``(cell, weight,
    columns)``: the first tap covers every column, later ones only the columns that have
    them (voxels on a tile border), or every column (None, zero weights elsewhere) where
    most have them: picking most columns out of every slab costs more than adding zeros."""
    nonzero = matrix > 0
    count = int(nonzero.sum(0).max()) if matrix.numel() else 0
    ranked = torch.argsort((~nonzero).to(torch.int8), dim=0, stable=True)  # nonzero first
    taps: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
    for t in range(max(count, 1)):
        cell = ranked[t]
        weight = matrix.gather(0, cell[None])[0] * nonzero.gather(0, cell[None])[0]
        cols = torch.nonzero(weight > 0)[:, 0]
        taps.append((cell, weight, None if t == 0 or 2 * len(cols) > len(weight) else cols))
    return taps


def _label_values(labels: np.ndarray) -> list[int]:
    """The nonzero values in an integer label map, counted in slabs (no full-size copy)."""
    if labels.dtype.kind not in "ub":
        return [int(v) for v in np.unique(labels) if v != 0]
    flat = np.ravel(labels, order="K")
    counts = np.zeros(1, np.int64)
    for start in range(0, flat.size, _SLAB_VOXELS):
        part = np.bincount(flat[start : start + _SLAB_VOXELS])
        if len(part) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(part) - len(counts), np.int64)])
        counts[: len(part)] += part
    return [v for v in range(1, len(counts)) if counts[v] > 0]


def _fast_extent(
    operations: Sequence[dict], shape: tuple[int, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(lo, hi)``: model indices of the resampled scan (before pad or crop), or None if
    an applied operation is one the separable inverse does not reproduce."""
    lo, hi = [0.0] * len(shape), [float(n - 1) for n in shape]
    for op in operations:
        name = op.get("class")
        info = op.get("extra_info", {}) or {}
        if name not in _FAST_OPS:
            return None
        if name == "SpatialResample" and (
            info.get("mode") not in ("bilinear", 1) or info.get("padding_mode") != "border"
        ):
            return None
        if name == "ResizeWithPadOrCrop":
            size = [int(n) for n in op.get("orig_size", shape)]
            crop = (info.get("crop_info") or {}).get("extra_info", {}).get("cropped")
            pad = (info.get("pad_info") or {}).get("extra_info", {}).get("padded")
            crop = list(crop) if crop else [0] * (2 * len(shape))
            pad = list(pad)[-len(shape):] if pad else [(0, 0)] * len(shape)
            for a in range(len(shape)):
                lo[a] = float(pad[a][0] - crop[2 * a])
                hi[a] = lo[a] + size[a] - 1
    return tuple(lo), tuple(hi)


def _axis_mapping(mapping: np.ndarray, scan_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The scan axis each model axis runs along, if scan -> model index is a scaled
    permutation (off-axis terms move no voxel by more than 1e-4 model voxels), else None."""
    axes = []
    for a in range(3):
        row = np.abs(mapping[a, :3])
        q = int(np.argmax(row))
        off = sum(row[k] * scan_shape[k] for k in range(3) if k != q)
        if off > 1e-4 or row[q] == 0:
            return None
        axes.append(q)
    return tuple(axes) if sorted(axes) == [0, 1, 2] else None
