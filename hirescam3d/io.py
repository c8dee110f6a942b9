"""Reading scans and writing explanation volumes, with the geometry kept exact.

Arrays are in NIfTI index order ``(I, J, K)`` (what nibabel gives; ITK images are
transposed to the same x, y, z order) and every affine maps voxel indices to RAS mm.
Files are written to a temporary name in the target folder and renamed, so a crash
never leaves a partial output.

Reading dispatches by file type: NIfTI header checks live in :mod:`hirescam3d.nifti`,
DICOM series reading in :mod:`hirescam3d.dicom`; the checks every format shares (rank,
values, affine) and single ITK files are here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import _SUPPORTED, _itk_to_array, _quiet_itk, _read_dicom_series, looks_like_dicom
from .errors import HiResCAMError, ScanError
from .nifti import _matrix_problem, _read_nifti, affine_distance_mm

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# An output's qform is written (code 1) only where it matches the sform this closely.
QFORM_TOLERANCE_MM = 1e-4


class ScanWarning(UserWarning):
    """A scan was read but looks unusual (e.g. intensities that are not Hounsfield units)."""


class OutputError(HiResCAMError):
    """An output file exists (and ``force`` is off) or the output folder is not writable."""


@dataclass
class Scan:
    """A 3D scan.

    ``array``: float32 ``(I, J, K)``; ``affine``: 4x4 voxel index -> RAS mm (for NIfTI
    exactly the file's affine); ``header``: the nibabel header (None for ITK formats);
    ``sha256``: of the file, or of the sorted series files for DICOM; ``warnings``: the
    texts of the :class:`ScanWarning` s issued while reading.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    header: Any = None
    sha256: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along I, J, K."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> str:
        """Orientation codes of the array axes, e.g. ``"LPS"``."""
        import nibabel as nib

        return "".join(nib.orientations.aff2axcodes(self.affine))


def scan_stem(path: str | Path) -> str:
    """File name without its image suffix (``a/ct.nii.gz`` -> ``ct``; a folder -> its name)."""
    path = Path(path)
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SCAN_SUFFIXES if name.endswith(s)), path.suffix.lower())


def sha256_files(paths: Iterable[str | Path]) -> str:
    """sha256 of the concatenated bytes of ``paths`` (in the order given)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -- reading ------------------------------------------------------------------------------
def _read_itk_file(path: Path) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        with _quiet_itk():
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise ScanError(
            f"{path}: SimpleITK cannot read this file ({reason}); check that it is a "
            f"complete {_suffix(path)} image and re-export it"
        ) from err
    except MemoryError as err:
        raise ScanError(
            f"{path}: not enough memory to read this image; free memory, or crop or "
            "downsample the scan first"
        ) from err
    return _itk_to_array(image)


def as_volume(arr: np.ndarray, path: Path) -> np.ndarray:
    """Check rank: 3 spatial axes of length > 1; squeeze trailing singleton axes."""
    shape = tuple(arr.shape)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim > 3:
        raise ScanError(
            f"{path}: the image is {arr.ndim}D with shape {shape} (a time series or a "
            "multi-channel image); pass a single 3D volume, e.g. extract one frame first"
        )
    if arr.ndim < 3 or min(arr.shape) < 2:
        raise ScanError(
            f"{path}: the image is {min(arr.ndim, 2)}D (shape {shape}); explanations need a 3D "
            "volume: pass the whole series (for DICOM, the folder holding all slices of the scan)"
        )
    return arr


def _check_values(arr: np.ndarray, path: Path) -> list[str]:
    """Raise on non-finite or constant volumes; return HU-plausibility warnings."""
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ScanError(
            f"{path}: the volume has {n_nan} NaN and {n_inf} infinite voxels; fill or mask "
            "them (e.g. with the air value -1000 HU) before explaining"
        )
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise ScanError(
            f"{path}: the volume is constant (every voxel is {lo:g}); it holds no image "
            "content - check the export"
        )
    problems = []
    if lo >= 0.0 and hi <= 1.0:
        problems.append("they lie in 0..1 (normalised)")
    elif lo >= 0.0 and hi <= 255.0:
        problems.append("they lie in 0..255 (8-bit)")
    elif hi < 0.0:
        problems.append("even the maximum is below 0 (no soft tissue or bone)")
    elif lo > -500.0:
        problems.append("the minimum is above -500 (no air, which is about -1000 HU)")
    if not problems:
        return []
    return [
        f"{path}: intensities range {lo:g} .. {hi:g} and do not look like Hounsfield units: "
        f"{problems[0]}. The model windows HU values; convert the scan to HU (apply "
        "RescaleSlope/RescaleIntercept) if it is a CT, or expect meaningless explanations"
    ]


def _check_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    """The affine as float64; :class:`ScanError` if it is not a finite, invertible 4x4 matrix."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ScanError(f"{path}: the voxel -> world affine has shape {affine.shape}, not 4 x 4")
    problem = _matrix_problem(affine, ("the x row", "the y row", "the z row"))
    if problem:
        raise ScanError(
            f"{path}: the voxel -> world transform (spacing, direction, origin) is unusable: "
            f"{problem}; fix the image's spacing and direction and save it again"
        )
    return affine


def _read_image(path: Path) -> tuple[np.ndarray, np.ndarray, Any, list[Path], list[str]]:
    """:func:`read_image` plus the texts of the geometry warnings (not yet issued)."""
    header, notes = None, []
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        arr, affine, names = _read_dicom_series(path)
        return arr, _check_affine(path, affine), None, sorted(Path(n) for n in names), notes
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        arr, affine, header, notes = _read_nifti(path)
    elif suffix in ITK_SUFFIXES or looks_like_dicom(path):
        arr, affine = _read_itk_file(path)
    else:
        raise ScanError(
            f"{path}: not a supported image file (suffix {suffix or 'none'!r}); "
            f"expected {_SUPPORTED}"
        )
    return np.asarray(arr), _check_affine(path, affine), header, [path], notes


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, Any, list[Path]]:
    """Read any supported image without validating its content.

    Returns ``(array in (I, J, K, ...) order, voxel -> RAS affine, nibabel header or None,
    the files read)``. Raises :class:`ScanError` for missing, unsupported or unreadable
    paths, and for geometry that cannot be trusted (see :func:`read_scan`); warns with
    :class:`ScanWarning` where the geometry had to be chosen.
    """
    arr, affine, header, files, notes = _read_image(Path(path))
    for text in notes:
        warnings.warn(text, ScanWarning, stacklevel=2)
    return arr, affine, header, files


def read_scan(path: str | Path) -> Scan:
    """Read a NIfTI, NRRD, MHA/MHD file or a folder with one DICOM series; validate it.

    Returns a :class:`Scan` with a float32 ``(I, J, K)`` array and a voxel -> RAS affine.
    Raises :class:`ScanError` (naming the file and what to do) for a missing path, an
    unsupported or unreadable file, a 2D or 4D image, NaN/Inf voxels, a constant volume.
    Warns with :class:`ScanWarning` when intensities do not look like Hounsfield units.

    Geometry is never guessed silently:

    - NIfTI: a header declaring more data than the file (or free memory) holds, an invalid
      transform code, or an unusable voxel size (zero, negative or NaN pixdim) where the
      geometry depends on it is a :class:`ScanError`. No sform and no qform: nibabel's
      default (LAS, centred) is used with a warning. A sheared sform, or an sform and qform
      that disagree: the sform is used, with a warning. An unusable sform (NaN, singular)
      falls back to a usable qform with a warning, else is a :class:`ScanError`.
    - DICOM series: a slice file that cannot be read, or unevenly spaced slices, is a
      :class:`ScanError` naming the file and the gap (a slice is never dropped silently).
    - Every format: a non-finite or singular affine is a :class:`ScanError`.
    """
    path = Path(path)
    arr, affine, header, files, notes = _read_image(path)
    arr = np.ascontiguousarray(as_volume(arr, path), dtype=np.float32)
    texts = notes + _check_values(arr, path)
    for text in texts:
        warnings.warn(text, ScanWarning, stacklevel=2)
    return Scan(arr, affine, path, header, sha256_files(files), texts)


# -- writing ------------------------------------------------------------------------------
def check_writable(paths: Iterable[str | Path], force: bool = False) -> None:
    """Raise :class:`OutputError` if any path exists (without ``force``) or cannot be written.

    Call it for every output of a run before writing the first one.
    """
    paths = [Path(p) for p in paths]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"output {'file' if len(existing) == 1 else 'files'} {shown}{more} already "
            "exist; use --force (force=True) to overwrite, or choose another output folder"
        )
    for folder in sorted({p.parent for p in paths}):
        ensure_folder(folder)


def ensure_folder(folder: str | Path) -> None:
    """Create ``folder`` if needed; :class:`OutputError` if that fails or it is read-only."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create output folder {folder}: {err.strerror or err}; choose another "
            "output folder"
        ) from err
    if not os.access(folder, os.W_OK):
        raise OutputError(
            f"output folder {folder} is not writable; choose another output folder or fix "
            "its permissions"
        )


def atomic_write(path: str | Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s suffix (writers pick the format from it). Nothing
    is left behind if ``write`` raises. Refuses to replace an existing file unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(
            f"{path} already exists; use --force (force=True) to overwrite it"
        )
    ensure_folder(path.parent)
    suffix = _suffix(path) or path.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
        )
    except OSError as err:
        raise OutputError(
            f"cannot write to {path.parent}: {err.strerror or err}; choose another output folder"
        ) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_geometry(volume: np.ndarray, affine: np.ndarray, what: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise HiResCAMError(f"{what}: the affine must be a 4x4 matrix; got shape {affine.shape}")
    problem = _matrix_problem(affine, ("row x", "row y", "row z"))
    if problem:
        raise HiResCAMError(f"{what}: the affine is unusable: {problem}; pass the scan's affine")
    if volume.ndim != 3:
        raise HiResCAMError(f"{what}: expected a 3D (I, J, K) volume; got shape {volume.shape}")
    return affine


def _nifti_image(data: np.ndarray, affine: np.ndarray, source_header: Any = None):
    """A NIfTI-1 image with sform = ``affine`` (code 1) and no intensity scaling.

    The qform holds the same affine with code 1 where it can, i.e. where the nearest
    rotation + zooms puts every voxel within :data:`QFORM_TOLERANCE_MM` of the sform; a
    sheared affine gets qform_code 0 (a viewer reading a qform would misplace the map).
    Only the spatial unit is taken from ``source_header`` (so the affine keeps its
    meaning); nothing else of the source (scaling, intent, extensions) carries over.
    """
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    hdr = img.header
    if affine_distance_mm(hdr.get_qform(), hdr.get_sform(), data.shape) > QFORM_TOLERANCE_MM:
        img.set_qform(affine, code=0)
    img.header.set_slope_inter(np.nan, np.nan)
    unit = "mm"
    if source_header is not None and hasattr(source_header, "get_xyzt_units"):
        source_unit = source_header.get_xyzt_units()[0]
        unit = source_unit if source_unit != "unknown" else unit
    img.header.set_xyzt_units(unit, "sec")
    return img


def write_explanation(
    path: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    method: str,
    source_header: Any = None,
    force: bool = False,
    values: str = "unit",
) -> Path:
    """Write an explanation map as NIfTI that overlays on its scan in any viewer.

    ``volume``: ``(I, J, K)`` on the scan's grid (stored as float32): in [0, 1] for
    ``values="unit"``; signed logit contributions per voxel for ``values="logit"``
    (intent name ``logit/voxel``, the unit also in the description, ``cal_min`` /
    ``cal_max`` symmetric about 0 so viewers centre a diverging colormap on 0);
    ``affine``: the scan's voxel -> RAS mm affine, stored exactly as the sform (code 1) and
    as the qform (code 1) unless it is sheared (then qform code 0; see :func:`_nifti_image`).
    Intent "estimate" with ``method`` as intent name, ``cal_min`` 0 / ``cal_max`` 1, no
    intensity scaling. Written atomically; an existing file is an :class:`OutputError`
    unless ``force``.
    """
    volume = np.asarray(volume)
    affine = _check_geometry(volume, affine, str(path))
    data = np.nan_to_num(volume, nan=0.0)
    if values == "unit":
        data, low, high, name = np.clip(data, 0.0, 1.0), 0.0, 1.0, method[:16]
        text = f"hirescam3d {method} explanation"
    else:
        high = float(np.abs(data).max()) if data.size else 0.0
        low, name = -high, "logit/voxel"
        text = f"hirescam3d {method} contribution, logit per voxel"
    data = np.ascontiguousarray(data, np.float32)

    def write(tmp: Path) -> None:
        import nibabel as nib

        img = _nifti_image(data, affine, source_header)
        img.header.set_intent("estimate", (), name=name)
        img.header["cal_min"] = low
        img.header["cal_max"] = high
        img.header["descrip"] = text[:80].encode()
        nib.save(img, str(tmp))

    return atomic_write(path, write, force=force)


def write_labels(
    path: str | Path, labels: np.ndarray, affine: np.ndarray, force: bool = False
) -> Path:
    """Write a label map ``(I, J, K)`` (uint8) as NIfTI with ``affine`` (sform code 1; qform
    code 1 unless sheared, as in :func:`write_explanation`)."""
    labels = np.asarray(labels)
    affine = _check_geometry(labels, affine, str(path))
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise HiResCAMError(f"{path}: labels must lie in 0..255 to be stored as uint8")
    data = np.ascontiguousarray(labels, dtype=np.uint8)

    def write(tmp: Path) -> None:
        import nibabel as nib

        img = _nifti_image(data, affine)
        img.header.set_intent("label", (), name="organs")
        img.header["cal_min"] = 0.0
        img.header["cal_max"] = float(data.max()) if data.size else 0.0
        nib.save(img, str(tmp))

    return atomic_write(path, write, force=force)


def reorient(
    array: np.ndarray, affine: np.ndarray, axcodes: str = "SPL"
) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip ``array`` (first 3 axes) so they point to ``axcodes``.

    Returns the reoriented array (a view where possible) and its voxel -> RAS affine;
    world positions of voxels are unchanged. ``axcodes`` letters: R/L, A/P, S/I.
    """
    from nibabel import orientations as ornt

    affine = np.asarray(affine, dtype=np.float64)
    src = ornt.io_orientation(affine)
    dst = ornt.axcodes2ornt(tuple(axcodes.upper()))
    transform = ornt.ornt_transform(src, dst)
    out = ornt.apply_orientation(np.asarray(array), transform)
    return out, affine @ ornt.inv_ornt_aff(transform, np.asarray(array).shape[:3])
