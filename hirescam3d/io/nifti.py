"""Reading a NIfTI file safely: the stored header is checked before the data is read.

The declared size is compared with the file and with free memory, the data type and the
intensity scaling are checked, and the voxel -> RAS affine is chosen from the sform, the
qform or nibabel's fallback, never silently: each fallback, shear or disagreement becomes
a warning text (issued by :mod:`hirescam3d.io.scans`), unusable geometry a
:class:`~hirescam3d.errors.ScanError`. The affine helpers here (distance between two
affines, the nearest qform, why a matrix is unusable, what differs between two grids) are
also used when writing outputs and comparing label maps.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.errors import ScanError
from hirescam3d.io.gzip_stream import INFLATE_ERRORS, GzipReader

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


@contextlib.contextmanager
def quiet_nibabel() -> Iterator[None]:
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
        with quiet_nibabel(), ImageOpener(str(path)) as f:
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


def _stored_integers(img: Any) -> np.ndarray | None:
    """The voxels as stored, if that is an integer type without intensity scaling."""
    proxy = img.dataobj
    unscaled = getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0
    if unscaled and np.issubdtype(img.get_data_dtype(), np.integer):
        return np.asanyarray(proxy)
    return None


def _load(path: Path, raw: Any | None) -> Any:
    """nibabel's image of the NIfTI ``path`` (``raw``: its stored header, None if it could
    not be read); a single-file ``.nii.gz`` is read through
    :class:`~hirescam3d.io.gzip_stream.GzipReader` (ISA-L's inflate, about 2x faster than
    nibabel's ``gzip``, and free of the GIL)."""
    import nibabel as nib

    gz = path.name.lower().endswith(".gz")
    if raw is None or not gz or raw["magic"] != raw.single_magic:
        # read now, not memory-mapped: a scan read ahead is in memory when its turn comes
        return nib.load(str(path), mmap=False)
    klass = nib.Nifti2Image if isinstance(raw, nib.Nifti2Header) else nib.Nifti1Image
    stream = io.BufferedReader(GzipReader(path))  # read forward only: no seekable copy
    try:
        return klass.from_file_map(klass.make_file_map({"image": stream}))
    except BaseException:
        stream.close()
        raise


def _gzip_stream(img: Any) -> io.BufferedReader | None:
    """The gzip stream an image from :func:`_load` reads its voxels from, else None."""
    stream = getattr(img.dataobj, "file_like", None)
    return stream if isinstance(stream, io.BufferedReader) else None


def _read_nifti(
    path: Path, integers: bool = False
) -> tuple[np.ndarray, np.ndarray, Any, list[str]]:
    """Read a NIfTI file: ``(data, affine, header, warning texts)``; the data as float32,
    or with ``integers`` as stored where that is an unscaled integer type (label maps).

    The stored header is checked before the data is read: the declared size against the
    file and free memory, the transform codes, pixdim, sform and qform (see
    :func:`_nifti_affine`). nibabel's own log lines are suppressed.
    """
    raw = _raw_nifti_header(path)
    affine, notes = None, []
    if raw is not None:
        shape = _declared_shape(path, raw)
        _check_data_size(path, raw, shape)
        _check_scaling(path, raw)
        affine, notes = _nifti_affine(path, raw, shape)
    with quiet_nibabel():
        try:
            img = _load(path, raw)
        except Exception as err:  # ImageFileError, gzip/zlib errors, bad headers
            raise ScanError(
                f"{path}: not a readable NIfTI image ({type(err).__name__}: {_flat(err)}); "
                "check that the file is a .nii/.nii.gz volume and re-export it"
            ) from err
        stream = _gzip_stream(img)
        try:
            data = _stored_integers(img) if integers else None
            data = img.get_fdata(dtype=np.float32) if data is None else data
            if stream is not None:  # on past the voxels: the stream's CRC is checked at
                stream.read(1)  # its end (nibabel stops short of it)
        except MemoryError as err:
            raise ScanError(
                f"{path}: not enough memory to read the {' x '.join(map(str, img.shape))} "
                "volume; free memory, or crop or downsample the scan first"
            ) from err
        except (EOFError, OSError, ValueError, TypeError, gzip.BadGzipFile, *INFLATE_ERRORS) as err:
            raise ScanError(
                f"{path}: the image data is truncated or corrupt ({type(err).__name__}: "
                f"{_flat(err)}); copy or export the file again"
            ) from err
        finally:
            if stream is not None:
                stream.close()
    if raw is not None:
        _check_scaled(path, raw, data)
    if affine is None:
        affine = np.asarray(img.affine, dtype=np.float64)
    return data, affine, img.header, notes
