"""Reading scans and writing explanation volumes, with the geometry kept exact.

Arrays are in NIfTI index order ``(I, J, K)`` (what nibabel gives; ITK images are
transposed to the same x, y, z order) and every affine maps voxel indices to RAS mm.
Files are written to a temporary name in the target folder and renamed, so a crash
never leaves a partial output.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
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
# An output's qform is written (code 1) only where it matches the sform this closely.
QFORM_TOLERANCE_MM = 1e-4
# Shear, or an sform and qform that disagree, by less than this is float rounding in real
# headers (e.g. DICOM direction cosines with 6 digits), not worth a warning.
_GEOMETRY_WARNING_MM = 0.01
# Deflate cannot compress more than about 1032:1, so a .gz file of n bytes holds at most
# 1032 n bytes of data: a cheap bound on what a .nii.gz header may declare.
_DEFLATE_MAX_RATIO = 1032
# Voxel sizes (mm) and distances of the first voxel from the origin beyond which an affine
# is corrupt rather than a scan (1 nm to 10 m voxels; 10 km).
_VOXEL_MM_RANGE = (1e-6, 1e4)
_MAX_ORIGIN_MM = 1e7
# DICOM slices whose spacing deviates from even by more than this share of a slice are
# refused (ITK would place them at even spacing, i.e. in the wrong place).
_SLICE_SPACING_TOLERANCE = 0.1


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
@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Keep nibabel's own header log lines (e.g. 'pixdim[1,2,3] should be non-zero') off
    stderr: every problem they describe is checked here and reported in one line."""
    from nibabel import imageglobals

    disabled = imageglobals.logger.disabled
    imageglobals.logger.disabled = True
    try:
        yield
    finally:
        imageglobals.logger.disabled = disabled


def _flat(err: BaseException) -> str:
    """An exception's text on one line (nibabel's messages span several)."""
    return " ".join(str(err).split())


def _human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 kB"``; ``2e12`` -> ``"2 TB"``."""
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000.0
        if n < 1000 or unit == "PB":
            break
    return f"{n:.3g} {unit}"


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _raw_nifti_header(path: Path) -> Any | None:
    """The NIfTI-1/-2 header exactly as stored, or None if it cannot be parsed.

    nibabel's loader silently "fixes" some fields (zero pixdim -> 1, invalid codes -> 0);
    the checks here need the stored values.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with _quiet_nibabel(), ImageOpener(str(path)) as f:
            block = f.read(4)
            sizes = {int.from_bytes(block, "little"), int.from_bytes(block, "big")}
            klass = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
            if len(block) < 4 or not sizes & {348, 540}:
                return None
            f.seek(0)
            return klass.from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - unreadable: nib.load reports it with its reason
        return None


def _declared_shape(path: Path, hdr: Any) -> tuple[int, ...]:
    """The data shape from the header's ``dim``; :class:`ScanError` if it is impossible."""
    corrupt = "the header is corrupt: copy or export the image again"
    swapped = int(hdr["sizeof_hdr"]) not in (348, 540)  # nibabel guessed the byte order
    dim0 = int(np.asarray(hdr["dim"][0]).byteswap()) if swapped else int(hdr["dim"][0])
    if swapped or not 1 <= dim0 <= 7:
        raise ScanError(f"{path}: dim[0] (the number of dimensions) is {dim0}, not 1-7; {corrupt}")
    dim = [int(d) for d in hdr["dim"]]
    shape = tuple(dim[1 : dim[0] + 1])
    if min(shape) < 1:
        raise ScanError(
            f"{path}: the header declares the shape {shape} (dim[1..{dim[0]}]); every "
            f"dimension must be at least 1; {corrupt}"
        )
    return shape


def _check_data_size(path: Path, hdr: Any, shape: tuple[int, ...]) -> None:
    """Compare the data size the header declares with the file and with free memory.

    Done before any allocation, so a corrupt ``dim`` or ``datatype`` gives a clear
    :class:`ScanError` instead of a ``MemoryError``. For ``.nii.gz`` the uncompressed size
    is unknown; the bound is deflate's maximal compression ratio.
    """
    dtype = _scalar_dtype(path, hdr)
    n_bytes = math.prod(shape) * dtype.itemsize
    what = f"a {' x '.join(map(str, shape))} {dtype.name} volume ({_human_bytes(n_bytes)})"
    fix = "the file is truncated or its header (dim, datatype) is corrupt: copy or export it again"
    size = path.stat().st_size
    offset = float(hdr["vox_offset"])
    if not math.isfinite(offset) or offset < 0:
        raise ScanError(
            f"{path}: vox_offset (where the data starts) is {offset:g}; the header is "
            "corrupt: copy or export the image again"
        )
    if hdr["magic"] == hdr.single_magic and offset < hdr.single_vox_offset:
        raise ScanError(
            f"{path}: vox_offset is {offset:g}, but in a single-file NIfTI the data starts at "
            f"byte {hdr.single_vox_offset} or later; the header is corrupt: copy or export the "
            "image again"
        )
    if path.name.lower().endswith(".gz"):
        if offset + n_bytes > _DEFLATE_MAX_RATIO * size:
            raise ScanError(
                f"{path}: the header declares {what}, but the compressed file has only "
                f"{_human_bytes(size)}, too little to hold it at any compression; {fix}"
            )
    elif offset + n_bytes > size:
        held = max(size - offset, 0)
        raise ScanError(
            f"{path}: the header declares {what} starting at byte {offset:g}, but the file "
            f"holds only {_human_bytes(held)} of image data; {fix}"
        )
    available = _available_memory()
    needed = math.prod(shape) * (4 + dtype.itemsize)  # stored values + the float32 copy
    if available is not None and needed > available:
        raise ScanError(
            f"{path}: reading {what} needs about {_human_bytes(needed)} of memory, but only "
            f"{_human_bytes(available)} is available; free memory, or crop or downsample the "
            "scan first"
        )


def _scalar_dtype(path: Path, hdr: Any) -> np.dtype:
    """The stored data type; :class:`ScanError` unless it is a known real scalar type."""
    code = int(hdr["datatype"])
    try:
        dtype = hdr.get_data_dtype()
    except Exception as err:  # noqa: BLE001 - nibabel raises several types for unknown codes
        raise ScanError(
            f"{path}: datatype code {code} is not a NIfTI data type; the header is corrupt: "
            "copy or export the image again"
        ) from err
    if dtype.kind not in "iuf" or dtype.fields:
        raise ScanError(
            f"{path}: datatype code {code} ({hdr.get_value_label('datatype')}) is not a real "
            "scalar type, so the file holds no CT intensities; the header is corrupt or the "
            "file is not a CT: copy or export the image again"
        )
    return dtype


def _check_scaling(path: Path, hdr: Any) -> None:
    """Refuse an intensity scaling that would make every voxel NaN or infinite."""
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if math.isfinite(slope) and slope != 0 and not math.isfinite(inter):
        raise ScanError(
            f"{path}: scl_inter (the intensity offset) is {inter:g} while scl_slope is "
            f"{slope:g}; the header is corrupt: set scl_inter to its true value (0 if unknown "
            "and the values are already in HU)"
        )


def _check_scaled(path: Path, hdr: Any, data: np.ndarray) -> None:
    """Refuse data that only the header's intensity scaling made non-finite."""
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    scaled = math.isfinite(slope) and slope != 0 and (slope != 1 or inter != 0)
    if scaled and not np.isfinite(data).all():
        raise ScanError(
            f"{path}: scaling the stored values by scl_slope {slope:g} and scl_inter {inter:g} "
            "gives infinite voxels; the scaling fields are corrupt: set them to their true "
            "values (1 and 0 if the values are already in HU)"
        )


def _xform_code(path: Path, hdr: Any, field: str) -> int:
    """``sform_code`` / ``qform_code`` as stored; :class:`ScanError` if not a NIfTI code."""
    from nibabel.nifti1 import xform_codes

    code = int(hdr[field])
    if code not in xform_codes.value_set():
        codes = sorted(xform_codes.value_set())
        raise ScanError(
            f"{path}: {field} is {code}, not a NIfTI transform code ({codes[0]}-{codes[-1]}); "
            f"the header is corrupt: set {field} to 1 if the {field[:5]} holds the scanner "
            "geometry, or to 0, and save the image again"
        )
    return code


def _pixdim_problem(hdr: Any, ndim: int) -> str | None:
    """``"pixdim[3] (the voxel size along axis k) is 0"`` for the first unusable spatial
    voxel size (zero, negative or not finite), or None."""
    for i in range(1, min(ndim, 3) + 1):
        value = float(hdr["pixdim"][i])
        if not (math.isfinite(value) and value > 0):
            return f"pixdim[{i}] (the voxel size along axis {'ijk'[i - 1]}) is {value:g}"
    return None


def _matrix_problem(affine: np.ndarray, fields: tuple[str, str, str]) -> str | None:
    """Why a voxel -> world matrix is unusable (``fields`` name its rows), or None."""
    rows = zip(fields, affine[:3], strict=True)
    bad = [name for name, row in rows if not np.isfinite(row).all()]
    if bad:
        return f"{'/'.join(bad)} {'holds' if len(bad) == 1 else 'hold'} NaN or infinite values"
    zero_rows = [name for name, row in zip(fields, affine[:3], strict=True) if not row[:3].any()]
    if zero_rows:
        return f"{zero_rows[0]} has 0 in its first three values, so it is singular"
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    for axis, n in zip("ijk", norms, strict=True):
        if n < _VOXEL_MM_RANGE[0]:
            length = "zero length" if n == 0 else f"a length of {n:.3g} mm"
            return f"it is singular: voxel axis {axis} has {length} in {'/'.join(fields)}"
        if n > _VOXEL_MM_RANGE[1]:
            return f"voxel axis {axis} is {n:.3g} mm long in {'/'.join(fields)}, not a CT voxel"
    far = np.abs(affine[:3, 3]).max()
    if far > _MAX_ORIGIN_MM:
        return f"it puts the first voxel {far:.3g} mm from the origin, not a plausible position"
    det = float(np.linalg.det(affine[:3, :3]))
    if abs(det) <= 1e-6 * float(np.prod(norms)):
        return (
            f"it is singular (determinant {det:.3g}): the voxel axes in {'/'.join(fields)} "
            "are coplanar"
        )
    return None


def _sform_problem(hdr: Any) -> str | None:
    """Why the stored sform (``srow_x/y/z``) is unusable, or None."""
    sform = np.asarray(hdr.get_sform(), dtype=np.float64)
    return _matrix_problem(sform, ("srow_x", "srow_y", "srow_z"))


def _qform(hdr: Any) -> np.ndarray:
    """The qform affine; a ``qfac`` (pixdim[0]) other than -1 counts as 1, as in nibabel."""
    hdr = hdr.copy()
    if float(hdr["pixdim"][0]) != -1.0:
        hdr["pixdim"][0] = 1.0
    return np.asarray(hdr.get_qform(), dtype=np.float64)


def _qform_problem(hdr: Any, ndim: int) -> str | None:
    """Why the stored qform (quaternion, offset and pixdim) is unusable, or None."""
    pixdim = _pixdim_problem(hdr, ndim)
    if pixdim:
        return pixdim
    fields = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
    bad = [f for f in fields if not math.isfinite(float(hdr[f]))]
    if bad:
        return f"{'/'.join(bad)} {'holds' if len(bad) == 1 else 'hold'} NaN or infinite values"
    bcd = sum(float(hdr[f]) ** 2 for f in fields[:3])
    if bcd > 1.0 + 1e-6:
        return f"quatern_b/c/d do not form a rotation (b² + c² + d² = {bcd:.3g} > 1)"
    return _matrix_problem(_qform(hdr), ("quatern_b/c/d", "pixdim", "qoffset"))


def _corners(shape: Iterable[int]) -> np.ndarray:
    """Homogeneous voxel coordinates of the 8 corner voxels of a volume, as ``(4, 8)``."""
    ends = [(0.0, float(max(n - 1, 0))) for n in list(shape)[:3]]
    ends += [(0.0, 0.0)] * (3 - len(ends))
    grid = np.array(np.meshgrid(*ends, indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones((1, grid.shape[1]))])


def affine_distance_mm(a: np.ndarray, b: np.ndarray, shape: Iterable[int]) -> float:
    """The largest distance (mm) between where two affines put any voxel of a volume."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) @ _corners(shape)
    return float(np.linalg.norm(diff[:3], axis=0).max())


def nearest_qform(affine: np.ndarray) -> np.ndarray:
    """The affine a NIfTI qform holds for ``affine`` (rotation + zooms: no shear; float32)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    return np.asarray(hdr.get_qform(), dtype=np.float64)


def _mm(values: Iterable[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values) + " mm"


def _vector(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def grid_differences(
    shape: Iterable[int], affine: np.ndarray, ref_shape: Iterable[int], ref_affine: np.ndarray,
    ref: str = "the scan's", atol: float = 1e-3,
) -> list[str]:
    """What differs between two voxel grids, with the values: shape, spacing, origin and
    direction, e.g. ``["origin (0, 0, 30) mm vs the scan's (0, 0, 0) mm"]``.

    ``atol`` is in mm for spacing and origin and in direction-cosine units for direction.
    """
    import nibabel as nib

    shape, ref_shape = tuple(int(n) for n in shape), tuple(int(n) for n in ref_shape)
    a, b = np.asarray(affine, np.float64), np.asarray(ref_affine, np.float64)
    spacing, ref_spacing = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    out = []
    if shape != ref_shape:
        out.append(f"shape {shape} vs {ref} {ref_shape}")
    if not np.allclose(spacing, ref_spacing, atol=atol):
        out.append(f"spacing {_mm(spacing)} vs {ref} {_mm(ref_spacing)}")
    if not np.allclose(a[:3, 3], b[:3, 3], atol=atol):
        out.append(f"origin {_vector(a[:3, 3])} mm vs {ref} {_vector(b[:3, 3])} mm")
    cosines, ref_cosines = a[:3, :3] / spacing, b[:3, :3] / ref_spacing
    if not np.allclose(cosines, ref_cosines, atol=atol):
        codes, ref_codes = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(b))
        dots = np.clip(np.sum(cosines * ref_cosines, axis=0), -1.0, 1.0)
        angle = float(np.degrees(np.arccos(dots)).max())
        out.append(
            f"direction {codes} vs {ref} {ref_codes}"
            + (f" (voxel axes rotated by up to {angle:.3g} degrees)" if codes == ref_codes else "")
        )
    return out


def _sform_notes(path: Path, hdr: Any, shape: tuple[int, ...], sform: np.ndarray) -> list[str]:
    """Warnings for a usable sform: shear, a disagreeing qform, unusable pixdim."""
    notes = []
    qcode = int(hdr["qform_code"])
    qform = _qform(hdr) if qcode and _qform_problem(hdr, len(shape)) is None else None
    off = affine_distance_mm(sform, qform, shape) if qform is not None else 0.0
    shear = affine_distance_mm(sform, nearest_qform(sform), shape)
    if shear > _GEOMETRY_WARNING_MM:
        qnote = (
            f"; the header's qform (code {qcode}) differs by up to {off:.3g} mm"
            if qform is not None
            else ""
        )
        notes.append(
            f"{path}: the sform is sheared (its voxel axes are not perpendicular; the nearest "
            f"qform is off by up to {shear:.3g} mm){qnote}; used the sform: the outputs keep it "
            "exactly and have qform_code 0, so view them in a tool that reads the sform"
        )
    elif off > _GEOMETRY_WARNING_MM:
        notes.append(
            f"{path}: the sform (code {int(hdr['sform_code'])}) and the qform (code {qcode}) "
            f"disagree by up to {off:.3g} mm; used the sform, as nibabel and most tools do "
            "(the outputs hold it as both); fix the header if the qform is the right one"
        )
    pixdim = _pixdim_problem(hdr, len(shape))
    if pixdim:
        spacing = np.linalg.norm(sform[:3, :3], axis=0)
        notes.append(
            f"{path}: {pixdim}; used the voxel size the sform gives ({_mm(spacing)}); fix "
            "pixdim so that other tools agree"
        )
    return notes


def _unset_orientation_note(path: Path, affine: np.ndarray) -> str:
    import nibabel as nib

    codes = "".join(nib.aff2axcodes(affine))
    return (
        f"{path}: the orientation is unknown (sform_code and qform_code are both 0, as in an "
        f"Analyze header); assumed {codes} (nibabel's default: axis i runs from right to left), "
        f"voxel size {_mm(np.linalg.norm(affine[:3, :3], axis=0))} from pixdim and the volume "
        "centred at the origin; if that is wrong, the maps are misplaced: set the sform "
        "(nibabel: img.set_sform(affine, code=1), then save)"
    )


def _nifti_affine(path: Path, hdr: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, list[str]]:
    """Choose the voxel -> RAS affine from the stored header, as nibabel would, but never
    silently: ``(affine, warning texts)``.

    - sform (code > 0) usable: it is used; warnings for shear (a qform cannot hold it),
      a qform that disagrees, or an unusable pixdim.
    - sform unusable (NaN, singular) and a usable qform: the qform, with a warning naming
      the sform's problem; no usable qform: :class:`ScanError` naming the field.
    - only a qform: it is used; an unusable one (zero/negative/NaN pixdim, bad quaternion)
      is a :class:`ScanError`.
    - no sform and no qform: nibabel's fallback (LAS, voxel size from pixdim, centred) is
      used with a warning saying so; an unusable pixdim is a :class:`ScanError`.
    """
    ndim = len(shape)
    scode = _xform_code(path, hdr, "sform_code")
    qcode = _xform_code(path, hdr, "qform_code")
    s_problem = _sform_problem(hdr) if scode else None
    q_problem = _qform_problem(hdr, ndim) if qcode else None
    fix = "fix the header (or export the scan again) so that it holds the true geometry"
    if scode and s_problem is None:
        sform = np.asarray(hdr.get_sform(), dtype=np.float64)
        return sform, _sform_notes(path, hdr, shape, sform)
    if qcode and q_problem is None:
        notes = []
        if scode:
            notes.append(
                f"{path}: the sform (sform_code {scode}) is unusable: {s_problem}; used the "
                f"qform (qform_code {qcode}) instead; {fix}"
            )
        return _qform(hdr), notes
    if scode:
        also = (
            f"; the qform is unusable too: {q_problem}"
            if qcode
            else " and there is no qform to fall back on (qform_code 0)"
        )
        raise ScanError(f"{path}: the sform is unusable: {s_problem}{also}; {fix}")
    if qcode:
        raise ScanError(
            f"{path}: the qform (the header's only orientation) is unusable: {q_problem}; "
            f"{_pixdim_fix(q_problem, fix)}"
        )
    pixdim = _pixdim_problem(hdr, ndim)
    if pixdim:
        raise ScanError(
            f"{path}: {pixdim} and the header has no sform or qform, so the voxel size is "
            f"unknown; {_pixdim_fix(pixdim, fix)}"
        )
    affine = np.asarray(hdr.get_base_affine(), dtype=np.float64)
    return affine, [_unset_orientation_note(path, affine)]


def _pixdim_fix(problem: str, fallback: str) -> str:
    """How to fix an unusable pixdim (``problem`` from :func:`_pixdim_problem`)."""
    if not problem.startswith("pixdim["):
        return fallback
    return (
        "write the true voxel size in mm into pixdim (nibabel: img.header.set_zooms(sizes), "
        "then save) or export the scan again"
    )


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any, list[str]]:
    """Read a NIfTI file: ``(data, affine, header, warning texts)``.

    The stored header is checked before the data is read: the declared size against the
    file and free memory, the transform codes, pixdim, sform and qform (see
    :func:`_nifti_affine`). nibabel's own log lines are suppressed.
    """
    import nibabel as nib

    raw = _raw_nifti_header(path)
    affine, notes = None, []
    if raw is not None:
        shape = _declared_shape(path, raw)
        _check_data_size(path, raw, shape)
        _check_scaling(path, raw)
        affine, notes = _nifti_affine(path, raw, shape)
    with _quiet_nibabel():
        try:
            img = nib.load(str(path))
        except Exception as err:  # ImageFileError, gzip/zlib errors, bad headers
            raise ScanError(
                f"{path}: not a readable NIfTI image ({type(err).__name__}: {_flat(err)}); "
                "check that the file is a .nii/.nii.gz volume and re-export it"
            ) from err
        try:
            data = img.get_fdata(dtype=np.float32)
        except MemoryError as err:
            raise ScanError(
                f"{path}: not enough memory to read the {' x '.join(map(str, img.shape))} "
                "volume; free memory, or crop or downsample the scan first"
            ) from err
        except (EOFError, OSError, ValueError, TypeError, zlib.error, gzip.BadGzipFile) as err:
            raise ScanError(
                f"{path}: the image data is truncated or corrupt ({type(err).__name__}: "
                f"{_flat(err)}); copy or export the file again"
            ) from err
    if raw is not None:
        _check_scaled(path, raw, data)
    if affine is None:
        affine = np.asarray(img.affine, dtype=np.float64)
    return data, affine, img.header, notes


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


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Keep ITK's ``WARNING: In .../itk*.cxx`` lines off stderr while reading; what they
    say (no series found, uneven slices) is checked here and reported in one line."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(shown)


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


# Value representations whose length field in the (explicit VR) file meta group is 4 bytes.
_LONG_VRS = {
    b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"
}
_SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT image",
    "1.2.840.10008.5.1.4.1.1.2.1": "enhanced CT image",
    "1.2.840.10008.5.1.4.1.1.4": "MR image",
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT plan",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation",
    "1.2.840.10008.5.1.4.1.1.11.1": "presentation state",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}


def _dicom_sop_class(path: Path) -> str | None:
    """The Media Storage SOP Class UID (0002,0002) from a file's DICOM meta header, or None
    (no DICOM signature, or the meta header is cut off or malformed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132 + 4096)
    except OSError:
        return None
    pos = 132
    while len(head) >= 132 and head[128:132] == b"DICM" and pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 2:
            return None
        if head[pos + 4 : pos + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if element == 2 and start + length <= len(head):
            return head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return None


def _sop_class_name(uid: str | None) -> str:
    if uid is None:
        return "unreadable"
    if uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "structured report"
    return _SOP_CLASS_NAMES.get(uid, f"SOP class {uid}")


def _dicom_files(folder: Path) -> list[Path]:
    """Files in ``folder`` (not below) that carry the DICOM signature, DICOMDIR excepted."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [
        p for p in entries
        if p.name.upper() != "DICOMDIR" and p.is_file() and looks_like_dicom(p)
    ]


def _subfolders_with_series(folder: Path, depth: int = 3, limit: int = 3) -> list[Path]:
    """Up to ``limit`` folders at most ``depth`` levels below ``folder`` that hold a DICOM
    series (breadth first, sorted by name)."""
    import SimpleITK as sitk

    found: list[Path] = []
    level = [folder]
    for _ in range(depth):
        below = []
        for parent in level:
            with contextlib.suppress(OSError):
                below += sorted(p for p in parent.iterdir() if p.is_dir())
        for sub in below[:200]:
            if _dicom_files(sub) and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)):
                found.append(sub)
                if len(found) >= limit:
                    return found
        level = below[:200]
    return found


def _no_series_message(folder: Path) -> str:
    """Why ``folder`` gave no DICOM series, with what it holds and where a series is."""
    files = _dicom_files(folder)
    subs = _subfolders_with_series(folder)
    if subs:
        where = (
            f"its subfolder {subs[0]} does; pass that folder"
            if len(subs) == 1
            else f"its subfolders {', '.join(map(str, subs))} do; pass one of them"
        )
        held = "holds no DICOM series"
        if files:
            held = f"holds no image series, only {len(files)} other DICOM file"
            held += "" if len(files) == 1 else "s"
        return f"{folder}: the folder {held} (subfolders are not searched), but {where}"
    if files:
        kinds = sorted({_sop_class_name(_dicom_sop_class(p)) for p in files})
        return (
            f"{folder}: the folder holds {len(files)} DICOM "
            f"{'file' if len(files) == 1 else 'files'} ({', '.join(kinds)}) but no readable "
            "image series; pass the folder holding the scan's image slices"
        )
    return (
        f"{folder}: the folder holds no DICOM series (subfolders are not searched); pass "
        f"the folder with the DICOM files of one series, or an image file ({_SUPPORTED})"
    )


def _slice_positions(reader: Any, n: int) -> np.ndarray | None:
    """Each read slice's position (mm) along the slice normal, from ImagePositionPatient and
    ImageOrientationPatient; None where a slice lacks them."""
    try:
        orientation = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
        ipp = [
            [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)
        ]
    except (RuntimeError, ValueError, IndexError):
        return None
    if len(orientation) != 6 or any(len(p) != 3 for p in ipp):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.linalg.norm(normal) > 0:
        return None
    return np.asarray(ipp) @ (normal / np.linalg.norm(normal))


def _spacing_gap(positions: np.ndarray | None, files: list[str]) -> str | None:
    """Describe the largest irregularity in slice spacing, or None if the slices are evenly
    spaced (ITK assumes even spacing from the first to the last slice)."""
    if positions is None or len(positions) < 3:
        return None
    steps = np.diff(positions)
    even = positions[0] + (positions[-1] - positions[0]) * np.linspace(0, 1, len(positions))
    usual = float(np.median(np.abs(steps)))
    if np.abs(positions - even).max() <= _SLICE_SPACING_TOLERANCE * max(usual, 1e-3):
        return None
    k = int(np.argmax(np.abs(np.abs(steps) - usual)))
    return (
        f"slices {Path(files[k]).name} and {Path(files[k + 1]).name} are {abs(steps[k]):.4g} mm "
        f"apart (at {positions[k]:.6g} and {positions[k + 1]:.6g} mm along the slice normal), "
        f"the others {usual:.4g} mm"
    )


def _check_series_complete(folder: Path, reader: Any, files: list[str]) -> None:
    """Refuse a series with unreadable slice files or unevenly spaced slices.

    A file in the folder that looks like DICOM (signature, same SOP class as the series,
    or a meta header too damaged to tell) but was left out of the series is an unreadable
    slice: a :class:`ScanError` names it (and the gap it leaves) rather than skipping it.
    """
    read = {Path(f).resolve() for f in files}
    series_class = _dicom_sop_class(Path(files[0]))
    dropped = [
        p.name for p in _dicom_files(folder)
        if p.resolve() not in read and _dicom_sop_class(p) in (series_class, None)
    ]
    gap = _spacing_gap(_slice_positions(reader, len(files)), files)
    if dropped:
        one = len(dropped) == 1
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        names = ", ".join(dropped[:5]) + more
        without = f"; without {'it' if one else 'them'}, {gap}" if gap else ""
        raise ScanError(
            f"{folder}: {names} {'looks like a DICOM slice' if one else 'look like DICOM slices'}"
            f" of this series but cannot be read (truncated or corrupt){without}; copy the "
            f"series again or replace {'that file' if one else 'those files'} (slices are never "
            "skipped silently)"
        )
    if gap:
        raise ScanError(
            f"{folder}: the slices are not evenly spaced: {gap}, so a slice is probably "
            "missing; copy the series again, or resample it to even spacing (e.g. in 3D "
            "Slicer) if the spacing is meant to vary"
        )


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the one DICOM series in ``folder``.

    Unreadable slice files and uneven slice spacing are refused with a :class:`ScanError`
    naming the file or the gap (never skipped: the z geometry would be silently wrong).
    ITK's warnings are kept off stderr; a folder without a series gets one error, naming
    a subfolder that holds one where there is.
    """
    import SimpleITK as sitk

    with _quiet_itk():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise ScanError(_no_series_message(folder))
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
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
            raise ScanError(f"{folder}: cannot read the DICOM series ({reason})") from err
        except MemoryError as err:
            raise ScanError(
                f"{folder}: not enough memory to read the DICOM series; free memory first"
            ) from err
        _check_series_complete(folder, reader, files)
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
