"""Reading scans, with the geometry kept exact (writing: :mod:`hirescam3d.io.outputs`).

Arrays are in NIfTI index order ``(I, J, K)`` (what nibabel gives; ITK images are
transposed to the same x, y, z order) and every affine maps voxel indices to RAS mm.

Reading dispatches by file type: NIfTI header checks live in :mod:`hirescam3d.io.nifti`,
DICOM series reading in :mod:`hirescam3d.io.dicom`; the checks every format shares (rank,
values, affine) and single ITK files are here.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hirescam3d.errors import HiResCAMError, OptionError, ScanError
from hirescam3d.io.dicom import (
    _SUPPORTED,
    DicomSource,
    _itk_to_array,
    _quiet_itk,
    _read_dicom_series,
    looks_like_dicom,
    read_dicom_file,
)
from hirescam3d.io.nifti import _matrix_problem, _read_nifti

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# Source bytes one slab of the reordering copy in _float32_c touches per pass (half an L2).
_L2_SLAB_BYTES = 1 << 18


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
    texts of the :class:`ScanWarning` s issued while reading; ``dicom``: for DICOM input,
    the source series (UIDs, slice files in K order or the one multi-frame file, and
    whether the array is still on the slices' grid), else None.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    header: Any = None
    sha256: str = ""
    warnings: list[str] = field(default_factory=list)
    dicom: DicomSource | None = None

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

    from hirescam3d.io.input_checks import captured_stderr, check_itk_file, check_itk_size

    check_itk_file(path)  # a missing data file is named before ITK prints its own lines
    try:
        with _quiet_itk(), captured_stderr() as noise:  # ITK's C++ lines never show raw
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            check_itk_size(path, reader)  # before allocating the voxels
            image = reader.Execute()
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        if noise:  # what MetaIO/NRRD said is more telling than ITK's exception text
            reason = "; ".join(noise)[:200]
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
    lo, hi = float(arr.min()), float(arr.max())  # NaN and +-inf show in these two
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = np.isfinite(arr)
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ScanError(
            f"{path}: the volume has {n_nan} NaN and {n_inf} infinite voxels; fill or mask "
            "them (e.g. with the air value -1000 HU) before explaining"
        )
    from hirescam3d.io.input_checks import check_intensity_range

    check_intensity_range(arr, path, lo, hi)
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


def _read_image(
    path: Path, series: str | None = None, integers: bool = False
) -> tuple[np.ndarray, np.ndarray, Any, list[Path], list[str], DicomSource | None]:
    """:func:`read_image` plus the texts of the geometry warnings (not yet issued) and, for
    DICOM input, the :class:`DicomSource`."""
    header, notes = None, []
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        got = _read_dicom_series(path, series)
        affine = _check_affine(path, got.affine)
        return got.array, affine, None, got.files, got.notes, got.source
    suffix = _suffix(path)
    is_dicom = suffix == ".dcm" or looks_like_dicom(path)
    if series is not None and not is_dicom:
        raise OptionError(
            f"{path}: --series (series= in Python) selects a series of a DICOM folder, and "
            "this is not DICOM; drop it"
        )
    got = read_dicom_file(path, series) if is_dicom else None
    if got is not None:
        affine = _check_affine(path, got.affine)
        return got.array, affine, None, got.files, got.notes, got.source
    if suffix in NIFTI_SUFFIXES:
        arr, affine, header, notes = _read_nifti(path, integers)
    elif suffix in ITK_SUFFIXES or is_dicom:
        arr, affine = _read_itk_file(path)
    elif suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):  # 2D pictures
        from hirescam3d.io.image2d import as_scan_array

        arr, affine = as_scan_array(path)
    else:
        raise ScanError(
            f"{path}: not a supported image file (suffix {suffix or 'none'!r}); "
            f"expected {_SUPPORTED}"
        )
    return np.asarray(arr), _check_affine(path, affine), header, [path], notes, None


def read_image(
    path: str | Path, series: str | None = None, integers: bool = False
) -> tuple[np.ndarray, np.ndarray, Any, list[Path]]:
    """Read any supported image without validating its content.

    Returns ``(array in (I, J, K, ...) order, voxel -> RAS affine, nibabel header or None,
    the files read)``. ``series``: the SeriesInstanceUID to read from a DICOM folder
    holding several. ``integers``: a NIfTI file stored as unscaled integers (a label map)
    comes back in its stored type instead of float32. Raises :class:`ScanError` for
    missing, unsupported or unreadable paths, and for geometry that cannot be trusted
    (see :func:`read_scan`); warns with :class:`ScanWarning` where the geometry had to be
    chosen or the slices resampled.
    """
    arr, affine, header, files, notes, _ = _read_image(Path(path), series, integers)
    for text in notes:
        warnings.warn(text, ScanWarning, stacklevel=2)
    return arr, affine, header, files


def _float32_c(arr: np.ndarray, empty: Callable[..., np.ndarray] | None = None) -> np.ndarray:
    """``arr`` as C-ordered float32: ``arr`` itself if it is one already, unless
    ``empty(shape)`` is given (a C-ordered float32 array, e.g. kept memory of a batch),
    which then always receives the voxels. NIfTI data comes F-ordered and often as int16:
    torch's multi-threaded copy converts and reorders in one pass, with no F-ordered
    float32 copy on the way. A 3D volume is copied a few rows of its second axis at a
    time, so the source cache lines one pass over the last axis touches stay in L2 for the
    next first index: a 300x512x512 int16 volume in 0.25 s instead of 0.44 s (whole) and
    1.5 s (NumPy)."""
    if arr.dtype == np.float32 and arr.flags.c_contiguous and empty is None:
        return arr
    import torch

    out = np.empty(arr.shape, np.float32) if empty is None else empty(arr.shape)
    try:
        source = torch.from_numpy(arr) if arr.flags.writeable else None
    except (TypeError, ValueError):  # a dtype torch lacks (uint32), or big-endian
        source = None
    if source is None:
        np.copyto(out, arr, casting="unsafe")
        return out
    target = torch.from_numpy(out)
    if arr.ndim != 3 or arr.flags.c_contiguous:
        target.copy_(source)
        return out
    rows = max(1, _L2_SLAB_BYTES // (64 * arr.shape[2]))  # one 64-byte line per last index
    for j in range(0, arr.shape[1], rows):
        target[:, j : j + rows].copy_(source[:, j : j + rows])
    return out


class StoredScan(NamedTuple):
    """A scan as read by :func:`read_stored`, before :func:`finish_scan`: ``array`` as
    stored (unscaled NIfTI integers stay integers), the :class:`Scan` fields, and the
    texts of the geometry warnings not yet issued."""

    array: np.ndarray
    affine: np.ndarray
    path: Path
    header: Any
    sha256: str
    notes: list[str]
    dicom: DicomSource | None


def read_stored(path: str | Path, series: str | None = None) -> StoredScan:
    """The first half of :func:`read_scan`: the file read and its geometry checked, the
    voxels kept as stored. A scan read ahead in a thread is held this way: an int16 CT
    takes half the memory of its float32 volume. Raises what :func:`read_scan` raises
    for the file and its geometry; the voxel checks and every warning come with
    :func:`finish_scan`."""
    path = Path(path)
    arr, affine, header, files, notes, dicom = _read_image(path, series, integers=True)
    return StoredScan(as_volume(np.asarray(arr), path), affine, path, header,
                      sha256_files(sorted(files)), notes, dicom)  # fmt: skip


def finish_scan(stored: StoredScan, empty: Callable[..., np.ndarray] | None = None) -> Scan:
    """The second half of :func:`read_scan`: the voxels as C-ordered float32, checked
    (non-finite, constant, not HU), and every warning issued. ``empty(shape)``: the
    C-ordered float32 array the voxels are put in (default: a new one where they need
    converting, else the stored array itself)."""
    arr = _float32_c(stored.array, empty)
    texts = stored.notes + _check_values(arr, stored.path)
    for text in texts:
        warnings.warn(text, ScanWarning, stacklevel=3)
    return Scan(arr, stored.affine, stored.path, stored.header, stored.sha256, texts,
                stored.dicom)  # fmt: skip


def read_scan(path: str | Path, series: str | None = None) -> Scan:
    """Read a NIfTI, NRRD, MHA/MHD file, a DICOM folder or an enhanced multi-frame DICOM
    file; validate it.

    Returns a :class:`Scan` with a float32 ``(I, J, K)`` array and a voxel -> RAS affine.
    ``series``: the SeriesInstanceUID to read where a DICOM folder holds several series
    (without it such a folder is a :class:`ScanError` listing the series).
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
    - DICOM: values are RescaleSlope * stored + RescaleIntercept (per slice or frame, so
      HU for CT). For a series in a folder (I, J, K) = (column, row, slice) with the
      slices sorted along the slice normal (cross product of the row and column
      directions of ImageOrientationPatient). An enhanced multi-frame file is placed
      frame by frame from its functional groups (plane position and orientation, pixel
      measures, pixel value transformation). A slice file that cannot be read is a
      :class:`ScanError` naming the file and the gap it leaves (a slice is never dropped
      silently); so are slices of several sizes, pixel spacings or orientations, two
      slices at one position, several stacks in one multi-frame file, and gantry tilt
      (slice positions off the slice normal: convert with dcm2niix, which corrects it).
      Unevenly spaced slices (e.g. a missing slice) are read with a :class:`ScanWarning`
      naming each gap (its positions in mm along the slice normal and the files on either
      side) and resampled onto a regular grid from the first to the last slice at the
      median slice spacing (linear interpolation along the normal; grid points that fall
      on a slice keep its values), and ``scan.dicom.on_source_grid`` is False.
    - Every format: a non-finite or singular affine is a :class:`ScanError`.
    """
    return finish_scan(read_stored(path, series))


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
