"""Organ label maps: reading (TotalSegmentator names accepted), aligning, attribution.

A label map is an integer ``(I, J, K)`` volume (0 = background) with a voxel -> RAS
affine and names ``{label: name}``. Names are kept as given; :func:`organ_group` maps
fine-grained names (TotalSegmentator's lobes, vertebrae, ribs) to the coarse organs the
report also sums over (``left_lung``, ``right_lung``, ``heart``, ``airway``, ``spine``,
``ribs``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hirescam3d.core.organ_groups import group_fractions, organ_group  # noqa: F401 - kept importable here
from hirescam3d.errors import InputError, ScanError
from hirescam3d.io.scans import NIFTI_SUFFIXES, as_volume, read_image, scan_stem


def _read_names(path: Path) -> dict[int, str]:
    """``{"1": "right_lung", ...}`` (or ``{"right_lung": 1, ...}``) from a JSON file."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(f"{path}: organ names file not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON file of organ names ({err})") from err
    if not isinstance(raw, dict):
        raise InputError(f'{path}: expected a JSON object like {{"1": "right_lung"}}')
    names: dict[int, str] = {}
    try:
        for k, v in raw.items():
            if isinstance(v, int) and not isinstance(v, bool):
                names[int(v)] = str(k)  # {"name": label}
            else:
                names[int(k)] = str(v)  # {"label": "name"}
    except ValueError as err:
        raise InputError(
            f'{path}: keys must be label numbers, as in {{"1": "right_lung"}} ({err})'
        ) from err
    return names


def _integer_labels(arr: np.ndarray, path: Path) -> np.ndarray:
    """``arr`` as uint8 (uint16 above 255 labels); ScanError unless non-negative integers."""
    arr = as_volume(arr, path)
    if np.issubdtype(arr.dtype, np.integer):  # stored as integers: only the sign to check
        bad = bool(np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0)
    else:
        bad = not np.isfinite(arr).all() or (arr < 0).any() or not np.array_equal(
            arr, np.round(arr))  # fmt: skip
    if bad:
        raise ScanError(
            f"{path}: not a label map: values must be non-negative integers (0 = background)"
        )
    top = arr.max()
    if not top:
        raise ScanError(f"{path}: the organ map is empty (every voxel is 0)")
    return arr.astype(np.uint8 if top <= 255 else np.uint16, copy=False)


def _load_mask_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A TotalSegmentator-style folder of binary masks ``<name>.nii.gz`` -> one label map."""
    files = sorted(
        p for p in folder.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES) and p.is_file()
    )
    if not files:
        raise ScanError(
            f"{folder}: the folder holds no .nii/.nii.gz masks; pass a label map file or a "
            "folder of per-organ masks (TotalSegmentator output)"
        )
    labels = affine = None
    names: dict[int, str] = {}
    for i, f in enumerate(files, start=1):
        arr, aff, _, _ = read_image(f)
        mask = as_volume(arr, f) > 0
        if labels is None:
            labels, affine = np.zeros(mask.shape, np.uint16), aff
        elif mask.shape != labels.shape or not np.allclose(aff, affine, atol=1e-4):
            raise ScanError(f"{f}: the mask's grid differs from {files[0].name}'s")
        labels[mask] = i
        names[i] = scan_stem(f)
    if labels is None or affine is None or not labels.any():
        raise ScanError(f"{folder}: every mask is empty")
    dtype = np.uint8 if len(files) <= 255 else np.uint16
    return labels.astype(dtype), affine, names


def load_organ_map(
    path: str | Path, names_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Read an organ label map: ``(labels (I, J, K) uint8/uint16, affine, {label: name})``.

    ``path``: a label image (.nii/.nii.gz/.nrrd/.mha) or a folder of binary masks named
    ``<organ>.nii.gz`` (TotalSegmentator's per-structure output; labels 1..N in name
    order). Names come from ``names_path`` (JSON ``{"1": "right_lung", ...}``), else from a
    sidecar ``<stem>.json`` beside the map, else from the NIfTI header's label table
    (TotalSegmentator v2's multilabel file, :mod:`hirescam3d.io.totalseg`); labels without a
    name become ``label_<n>``.
    """
    path = Path(path)
    if path.is_dir():
        labels, affine, names = _load_mask_folder(path)
    else:
        arr, affine, _, _ = read_image(path, integers=True)
        labels = _integer_labels(arr, path)
        from hirescam3d.io.totalseg import header_label_names

        names = header_label_names(path)  # TotalSegmentator v2's multilabel file
        sidecar = path.with_name(scan_stem(path) + ".json")
        if names_path is None and sidecar.is_file():
            names_path = sidecar
    if names_path is not None:
        names = _read_names(Path(names_path))
    present = [int(v) for v in np.unique(labels.reshape(-1, order="A")) if v != 0]
    return labels, affine, {v: names.get(v, f"label_{v}") for v in present}


class OrgansOnGrid(NamedTuple):
    """An organ map on a scan's grid: ``labels`` ``(I, J, K)``, ``names`` ``{label: name}``
    and the aligner's warning text (None if the grids matched)."""

    labels: np.ndarray
    names: dict[int, str]
    note: str | None


def organs_on_grid(
    path: str | Path, names_path: str | Path | None, shape: Sequence[int], affine: np.ndarray
) -> OrgansOnGrid:
    """:func:`load_organ_map` of ``path`` put on the scan grid ``shape``/``affine`` by
    :func:`align_organs`."""
    labels, labels_affine, names = load_organ_map(path, names_path)
    organs, note = align_organs(labels, labels_affine, shape, affine, f"organ map {path}")
    return OrgansOnGrid(organs, names, note)


def align_organs(
    labels: np.ndarray,
    labels_affine: np.ndarray,
    scan_shape: Sequence[int],
    scan_affine: np.ndarray,
    source: str = "organ map",
) -> tuple[np.ndarray, str | None]:
    """Put ``labels`` on the scan's grid: ``(labels (scan_shape), warning text or None)``.

    Same shape and affine (within 1e-3 mm): returned as is. Otherwise resampled with
    nearest-neighbour interpolation (MONAI ``SpatialResample``) and a warning text is
    returned that names what differs (shape, spacing, origin, direction) with the values.
    Raises :class:`ScanError` if no label lands inside the scan.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    scan_shape = tuple(int(n) for n in scan_shape)
    labels_affine = np.asarray(labels_affine, dtype=np.float64)
    scan_affine = np.asarray(scan_affine, dtype=np.float64)
    if labels.shape == scan_shape and np.allclose(labels_affine, scan_affine, atol=1e-3):
        return labels, None
    src = MetaTensor(
        torch.as_tensor(labels[None].astype(np.float32)), affine=torch.as_tensor(labels_affine)
    )
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)(
        src, dst_affine=torch.as_tensor(scan_affine), spatial_size=scan_shape
    )
    aligned = np.rint(out.as_tensor()[0].numpy()).astype(labels.dtype)

    from hirescam3d.io.nifti import affine_distance_mm, grid_differences

    differences = grid_differences(labels.shape, labels_affine, scan_shape, scan_affine)
    if not differences:  # each part within tolerance, the affines as a whole not
        off = affine_distance_mm(labels_affine, scan_affine, labels.shape)
        differences = [f"voxel positions up to {off:.3g} mm apart"]
    differ = "; ".join(differences)
    if not aligned.any():
        raise ScanError(
            f"{source} does not overlap the scan ({differ}): no labelled voxel lies inside "
            "the scan; check that the organ map was made from this scan"
        )
    voxel_mm3 = [abs(np.linalg.det(a[:3, :3])) for a in (scan_affine, labels_affine)]
    inside = (aligned > 0).sum() * voxel_mm3[0] / ((labels > 0).sum() * voxel_mm3[1])
    warning = (
        f"{source} is on a different grid than the scan ({differ}); resampled to the scan's "
        "grid with nearest-neighbour interpolation"
    )
    if inside < 0.9:
        warning += f"; only about {min(inside, 1.0):.0%} of the labelled volume is inside it"
    return aligned, warning


def organ_fractions(
    volume: np.ndarray, labels: np.ndarray, names: dict[int, str]
) -> dict[str, float]:
    """Fraction of the map's positive mass inside each named label.

    ``volume`` and ``labels`` are ``(I, J, K)`` on the same grid. The mass is the sum of
    ``max(volume, 0)``; labels sharing a name are summed. The fractions sum to at most 1
    (the rest lies outside every named label); an all-zero map gives zeros.
    """
    volume = np.asarray(volume)
    if volume.shape != labels.shape:
        raise InputError(
            f"explanation {volume.shape} and organ labels {labels.shape} differ in shape; "
            "align the organ map to the scan first (align_organs)"
        )
    mass = np.clip(volume, 0.0, None).astype(np.float64).ravel()
    total = mass.sum()
    flat = labels.ravel().astype(np.int64)
    sums = np.bincount(flat, weights=mass, minlength=max(names, default=0) + 1)
    out: dict[str, float] = {}
    for label, name in sorted(names.items()):
        share = float(sums[label] / total) if total > 0 and label < len(sums) else 0.0
        out[name] = out.get(name, 0.0) + share
    return out
