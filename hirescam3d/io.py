"""Reading scans and writing explanation volumes, with the geometry kept exact.

Arrays are in NIfTI index order ``(I, J, K)`` (what nibabel gives; ITK images are
transposed to the same x, y, z order) and every affine maps voxel indices to RAS mm.
Files are written to a temporary name in the target folder and renamed, so a crash
never leaves a partial output.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import HiResCAMError, ScanError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_SUPPORTED = ".nii, .nii.gz, .nrrd, .mha, .mhd or a folder holding one DICOM series"
# ITK images are LPS; NIfTI/MONAI affines are RAS: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # ImageFileError, gzip/zlib errors, bad headers
        raise ScanError(
            f"{path}: not a readable NIfTI image ({type(err).__name__}: {err}); "
            "check that the file is a .nii/.nii.gz volume and re-export it"
        ) from err
    try:
        data = img.get_fdata(dtype=np.float32)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise ScanError(
            f"{path}: the image data is truncated or corrupt ({type(err).__name__}: {err}); "
            "copy or export the file again"
        ) from err
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def _itk_to_array(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array in x, y, z index order, voxel -> RAS affine)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, components)
    dim = image.GetDimension()
    # Put the spatial axes in x, y, z order; vector components stay last.
    arr = np.transpose(arr, tuple(range(dim))[::-1] + tuple(range(dim, arr.ndim)))
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    n = min(dim, 3)
    lps[:n, :n] = (direction * spacing)[:n, :n]
    lps[:n, 3] = origin[:n]
    return arr, _LPS_TO_RAS @ lps


def _read_itk_file(path: Path) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise ScanError(
            f"{path}: SimpleITK cannot read this file ({reason}); check that it is a "
            f"complete {_suffix(path)} image and re-export it"
        ) from err
    return _itk_to_array(image)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ScanError(
            f"{folder}: the folder holds no DICOM series (subfolders are not searched); pass "
            f"the folder with the DICOM files of one series, or an image file ({_SUPPORTED})"
        )
    if len(series) > 1:
        counts = [
            f"{uid} ({len(reader.GetGDCMSeriesFileNames(str(folder), uid))} files)"
            for uid in series
        ]
        raise ScanError(
            f"{folder}: the folder holds {len(series)} DICOM series ({'; '.join(counts)}); "
            "move the series you want into a folder of its own"
        )
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise ScanError(f"{folder}: cannot read the DICOM series ({reason})") from err
    arr, affine = _itk_to_array(image)
    return arr, affine, files


def looks_like_dicom(path: Path) -> bool:
    """True when ``path`` carries the DICOM signature (b"DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


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
            f"{path}: the image is 2D (shape {shape}); explanations need a 3D volume: pass "
            "the whole series (for DICOM, the folder holding all slices of the scan)"
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


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, Any, list[Path]]:
    """Read any supported image without validating its content.

    Returns ``(array in (I, J, K, ...) order, voxel -> RAS affine, nibabel header or None,
    the files read)``. Raises :class:`ScanError` for missing, unsupported or unreadable
    paths.
    """
    path = Path(path)
    header = None
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        arr, affine, names = _read_dicom_series(path)
        return arr, affine, None, sorted(Path(n) for n in names)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        arr, affine, header = _read_nifti(path)
    elif suffix in ITK_SUFFIXES or looks_like_dicom(path):
        arr, affine = _read_itk_file(path)
    else:
        raise ScanError(
            f"{path}: not a supported image file (suffix {suffix or 'none'!r}); "
            f"expected {_SUPPORTED}"
        )
    return np.asarray(arr), affine, header, [path]


def read_scan(path: str | Path) -> Scan:
    """Read a NIfTI, NRRD, MHA/MHD file or a folder with one DICOM series; validate it.

    Returns a :class:`Scan` with a float32 ``(I, J, K)`` array and a voxel -> RAS affine.
    Raises :class:`ScanError` (naming the file and what to do) for a missing path, an
    unsupported or unreadable file, a 2D or 4D image, NaN/Inf voxels, a constant volume.
    Warns with :class:`ScanWarning` when intensities do not look like Hounsfield units.
    """
    path = Path(path)
    arr, affine, header, files = read_image(path)
    arr = np.ascontiguousarray(as_volume(arr, path), dtype=np.float32)
    texts = _check_values(arr, path)
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
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise HiResCAMError(f"{what}: affine must be a finite 4x4 matrix; got {affine.shape}")
    if volume.ndim != 3:
        raise HiResCAMError(f"{what}: expected a 3D (I, J, K) volume; got shape {volume.shape}")
    return affine


def _nifti_image(data: np.ndarray, affine: np.ndarray, source_header: Any = None):
    """A NIfTI-1 image with sform and qform = ``affine`` (code 1) and no intensity scaling.

    Only the spatial unit is taken from ``source_header`` (so the affine keeps its
    meaning); nothing else of the source (scaling, intent, extensions) carries over.
    """
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
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
) -> Path:
    """Write an explanation map as NIfTI that overlays on its scan in any viewer.

    ``volume``: ``(I, J, K)`` in [0, 1] on the scan's grid (stored as float32);
    ``affine``: the scan's voxel -> RAS mm affine, stored as sform and qform (code 1).
    Intent "estimate" with ``method`` as intent name, ``cal_min`` 0 / ``cal_max`` 1, no
    intensity scaling. Written atomically; an existing file is an :class:`OutputError`
    unless ``force``.
    """
    volume = np.asarray(volume)
    affine = _check_geometry(volume, affine, str(path))
    data = np.ascontiguousarray(np.clip(np.nan_to_num(volume, nan=0.0), 0.0, 1.0), np.float32)

    def write(tmp: Path) -> None:
        import nibabel as nib

        img = _nifti_image(data, affine, source_header)
        img.header.set_intent("estimate", (), name=method[:16])
        img.header["cal_min"] = 0.0
        img.header["cal_max"] = 1.0
        img.header["descrip"] = f"hirescam3d {method} explanation"[:80].encode()
        nib.save(img, str(tmp))

    return atomic_write(path, write, force=force)


def write_labels(
    path: str | Path, labels: np.ndarray, affine: np.ndarray, force: bool = False
) -> Path:
    """Write a label map ``(I, J, K)`` (uint8) as NIfTI with ``affine`` (sform/qform code 1)."""
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
