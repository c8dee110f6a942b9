"""Regions of segmentation models on the scan's grid: a mask file or array, checked.

A region is never resampled: a mask made on another grid would explain other voxels than
the user drew, so one off the scan's grid is an InputError naming both grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hirescam3d.errors import InputError

#: A region on the scan's grid must match it this closely (largest voxel offset, mm).
REGION_TOLERANCE_MM = 1e-3
RegionArg = str | Path | np.ndarray | None


def grid_text(shape: Sequence[int], affine: np.ndarray) -> str:
    """One grid in words: ``64x64x48 voxels of 5 x 5 x 6 mm, LPS, origin (x, y, z) mm``."""
    import nibabel as nib

    affine = np.asarray(affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    codes = "".join(nib.aff2axcodes(affine))
    origin = ", ".join(f"{v:.4g}" for v in affine[:3, 3])
    size = "x".join(str(int(n)) for n in shape)
    mm = " x ".join(f"{v:.4g}" for v in spacing)
    return f"{size} voxels of {mm} mm, {codes}, origin ({origin}) mm"


def check_region_grid(
    shape: Sequence[int],
    affine: np.ndarray,
    scan_shape: Sequence[int],
    scan_affine: np.ndarray,
    what: str = "region",
) -> None:
    """InputError naming both grids unless ``shape``/``affine`` is the scan's grid (same
    shape, every voxel within :data:`REGION_TOLERANCE_MM`). A region is never resampled:
    a mask made on another grid would explain other voxels than the user drew."""
    from hirescam3d.io.nifti import affine_distance_mm, grid_differences

    shape, scan_shape = tuple(int(n) for n in shape), tuple(int(n) for n in scan_shape)
    same = shape == scan_shape
    if same and affine_distance_mm(affine, scan_affine, shape) <= REGION_TOLERANCE_MM:
        return
    differ = grid_differences(shape, affine, scan_shape, scan_affine, atol=REGION_TOLERANCE_MM)
    if not differ:
        off = affine_distance_mm(affine, scan_affine, shape)
        differ = [f"voxel positions up to {off:.3g} mm apart"]
    raise InputError(
        f"{what} is not on the scan's grid: region grid {grid_text(shape, affine)}; scan grid "
        f"{grid_text(scan_shape, scan_affine)} ({'; '.join(differ)}); a region must have the "
        f"scan's shape and affine (within {REGION_TOLERANCE_MM:g} mm): resample it onto the "
        "scan's grid with nearest-neighbour interpolation first"
    )


def load_region(
    path: str | Path, scan_shape: Sequence[int], scan_affine: np.ndarray
) -> np.ndarray:
    """A region mask file (nonzero = region) on the scan's grid: bool ``(I, J, K)``.

    InputError if it is not on the scan's grid (:func:`check_region_grid`), not finite or
    empty; ScanError if it cannot be read."""
    from hirescam3d.io.scans import as_volume, read_image

    path = Path(path)
    arr, region_affine, _, _ = read_image(path)
    arr = as_volume(arr, path)
    check_region_grid(arr.shape, region_affine, scan_shape, scan_affine, f"region {path}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"region {path} has non-finite values (NaN or Inf); pass a 0/1 mask")
    mask = arr != 0
    if not mask.any():
        raise InputError(f"region {path} is empty (every voxel is 0): there is nothing to explain")
    return mask


def check_region_array(region: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A region given as an array on the scan's grid, checked: bool (a mask) or float32
    (weights)."""
    r = np.asarray(region)
    if r.shape != tuple(shape):
        raise InputError(
            f"region {r.shape} is not on the scan's grid {tuple(shape)}: pass a mask or "
            "weight map with the scan's shape (and affine)"
        )
    if r.dtype == bool:
        mask = r
    elif r.dtype.kind in "iu":
        values = np.unique(r)
        if not set(values.tolist()) <= {0, 1}:
            raise InputError(
                f"region is an integer array with values {', '.join(map(str, values[:6]))}: "
                "pass a 0/1 mask (e.g. labels == k) or floating-point weights"
            )
        mask = r.astype(bool)
    elif r.dtype.kind == "f":
        if not np.isfinite(r).all():
            raise InputError("region has non-finite values (NaN or Inf); pass a mask or weights")
        if not r.any():
            raise InputError("region is empty (all zero): there is nothing to explain")
        return r.astype(np.float32, copy=False)
    else:
        raise InputError(f"region must be a bool, 0/1 or floating-point array, not {r.dtype}")
    if not mask.any():
        raise InputError("region is empty (all zero): there is nothing to explain")
    return mask
