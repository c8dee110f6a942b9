"""Reading DICOM: a series in a folder, or one enhanced multi-frame file, with its checks.

The files of a folder are grouped by series from their headers (pydicom, no pixels); with
several series one must be chosen (``series=UID``). A classic series (one file per slice)
is checked and sorted along the slice normal from its headers, then its pixels are read
once with SimpleITK (rescale applied, ITK's warnings kept off stderr). An enhanced
multi-frame image is read with pydicom from its functional groups. Slice files that cannot
be read, gantry tilt, mixed image sizes or orientations and several stacks are refused
with a :class:`ScanError`; unevenly spaced slices (a missing slice) are resampled onto a
regular grid with a note that the reader issues as a warning. The ITK image -> (array, RAS
affine) conversion and the ITK quieting here are also used by :mod:`hirescam3d.io.scans` for
single ITK files.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hirescam3d.errors import OptionError, ScanError

# What read_scan accepts (for error messages; a folder without a series names the others).
_SUPPORTED = ".nii, .nii.gz, .nrrd, .mha, .mhd or a folder holding one DICOM series"
# ITK images are LPS; NIfTI/MONAI affines are RAS: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# DICOM slices whose positions deviate from even spacing by more than this share of a slice
# are resampled onto a regular grid (ITK would place them at even spacing, i.e. wrongly).
_SLICE_SPACING_TOLERANCE = 0.1


@dataclass(frozen=True)
class DicomSource:
    """Where a scan read from DICOM came from, for outputs that must reference it.

    ``files``: one file per slice in the order of the scan array's last axis (K), or the
    one file of an enhanced multi-frame image; ``on_source_grid``: False when the
    reader resampled the slices (the outputs then reference the frame of reference only);
    ``frames``: for a multi-frame image, its 1-based frame numbers in K order (else empty).
    """

    files: tuple[Path, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    on_source_grid: bool = True
    multiframe: bool = False
    frames: tuple[int, ...] = ()

    @classmethod
    def from_files(cls, files: list[str] | list[Path], **kwargs: Any) -> DicomSource:
        """The source of a series whose slice files are ``files``, in K order."""
        import pydicom

        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        return cls(
            files=tuple(Path(f) for f in files),
            study_uid=str(first.StudyInstanceUID),
            series_uid=str(first.SeriesInstanceUID),
            frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
            **kwargs,
        )


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


# -- which files make up a series (headers only, read with pydicom) --------------------------
# SOP classes that are never the scan to explain although they carry pixels.
_NOT_SCANS = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # segmentation
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose
}
# Image orientation cosines that differ by more than this are different orientations.
_ORIENTATION_TOLERANCE = 1e-3
# Slice positions may stray sideways from the slice normal by this share of a pixel before
# the series counts as tilted (a regular grid would misplace the far slices).
_TILT_TOLERANCE_PX = 0.1
_CHOOSE = "pass --series UID (series=UID in Python)"


@dataclass
class _Header:
    """One readable DICOM image file: its header (no pixels) and what groups it."""

    path: Path
    ds: Any
    series_uid: str
    frames: int


@dataclass
class _Plane:
    """One 2D image of a stack (a slice file, or a frame of a multi-frame file)."""

    name: str
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient: row then column cosines
    pixel_spacing: tuple[float, float] | None  # mm between rows, between columns
    size: tuple[int, int]  # rows, columns
    thickness: float | None = None  # SliceThickness, mm


@dataclass
class _Stack:
    """Where a stack's planes go: ``order`` sorts them along the slice normal; ``grid`` is
    None when they are evenly spaced, else the output positions (mm along the normal)."""

    order: np.ndarray
    affine: np.ndarray
    positions: np.ndarray
    grid: np.ndarray | None
    note: str | None


@dataclass
class DicomVolume:
    """A volume read from DICOM: ``array`` ``(I, J, K)`` = (column, row, slice), values with
    the rescale applied; ``affine`` voxel index -> RAS mm; ``files`` the files read, in K
    order; ``notes`` the texts of the warnings to issue (e.g. slices resampled)."""

    array: np.ndarray
    affine: np.ndarray
    files: list[Path]
    source: DicomSource
    notes: list[str]


def _pixel_data_complete(fp: Any, ds: Any, size: int) -> bool:
    """Whether the file behind ``fp`` (positioned where pydicom stopped before the pixels)
    holds a pixel data element with all the bytes the header declares."""
    encoding = ds.original_encoding
    implicit, little = (encoding if encoding and encoding[1] is not None else (False, True))
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if not little or syntax == "1.2.840.10008.1.2.1.99":
        return True  # big endian (retired) or deflated: leave the check to the pixel reader
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head)
    if group != 0x7FE0 or element not in (0x0008, 0x0009, 0x0010):
        return False
    if implicit:
        (length,), start = struct.unpack_from("<I", head, 4), 8
    elif head[4:6] in _LONG_VRS:
        (length,), start = struct.unpack_from("<I", head, 8), 12
    else:
        (length,), start = struct.unpack_from("<H", head, 6), 8
    if length == 0xFFFFFFFF:  # encapsulated (compressed) frames
        return pos + start < size
    bits = int(ds.get("BitsAllocated") or 16)
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    expected *= int(ds.get("NumberOfFrames") or 1)
    expected = (expected * bits + 7) // 8
    return length >= expected and pos + start + length <= size


def _read_header(path: Path, force: bool = False) -> tuple[Any, bool]:
    """``(header without pixels or None, whether it is a complete image file)``."""
    import pydicom

    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
            if "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
                return ds, False
            return ds, _pixel_data_complete(fp, ds, path.stat().st_size)
    except Exception:  # pydicom raises many types on damaged files
        return None, False


def _gdcm_files(folder: Path) -> list[Path]:
    """Files GDCM takes for series slices (it also reads files without the DICOM preamble)."""
    import SimpleITK as sitk

    with _quiet_itk():
        reader = sitk.ImageSeriesReader()
        return sorted(
            {Path(f) for uid in reader.GetGDCMSeriesIDs(str(folder))
             for f in reader.GetGDCMSeriesFileNames(str(folder), uid)}
        )


def _scan_folder(folder: Path) -> tuple[dict[str, list[_Header]], list[tuple[Path, Any]]]:
    """Image files of ``folder`` grouped by SeriesInstanceUID (headers only), and the other
    DICOM files with their header where it could be read (None otherwise)."""
    candidates, force = _dicom_files(folder), False
    if not candidates:
        candidates, force = _gdcm_files(folder), True
    series: dict[str, list[_Header]] = {}
    others: list[tuple[Path, Any]] = []
    for path in candidates:
        ds, image = _read_header(path, force)
        if image and str(ds.get("SOPClassUID", "")) not in _NOT_SCANS:
            uid = str(ds.SeriesInstanceUID)
            frames = int(ds.get("NumberOfFrames") or 1)
            series.setdefault(uid, []).append(_Header(path, ds, uid, frames))
        else:
            others.append((path, ds))
    return series, others


def _describe_series(uid: str, headers: list[_Header]) -> str:
    ds = headers[0].ds
    what = str(ds.get("SeriesDescription", "") or "no description")
    count = f"{len(headers)} slice{'s' if len(headers) != 1 else ''}"
    if len(headers) == 1 and headers[0].frames > 1:
        count = f"1 file of {headers[0].frames} frames"
    return f"{uid} ({what!r}, {ds.get('Modality', '?') or '?'}, {count})"


def _series_list(groups: dict[str, list[_Header]]) -> str:
    def key(item: tuple[str, list[_Header]]) -> tuple[int, str]:
        number = item[1][0].ds.get("SeriesNumber")
        try:
            return int(number), item[0]
        except (TypeError, ValueError):
            return 1 << 30, item[0]

    return "; ".join(_describe_series(uid, hs) for uid, hs in sorted(groups.items(), key=key))


def _choose_series(folder: Path, groups: dict[str, list[_Header]], series: str | None) -> str:
    """The UID of the series to read: ``series``, or the only one; else a :class:`ScanError`
    listing the series."""
    if series is not None:
        if series.strip() in groups:
            return series.strip()
        raise OptionError(
            f"{folder}: no DICOM series with UID {series!r} here; the folder holds "
            f"{_series_list(groups)}; {_CHOOSE} with one of these UIDs"
        )
    if len(groups) > 1:
        raise ScanError(
            f"{folder}: the folder holds {len(groups)} DICOM series: {_series_list(groups)}; "
            f"choose one: {_CHOOSE}"
        )
    return next(iter(groups))


# -- geometry of a stack of planes --------------------------------------------------------
def _float_list(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _plane(name: str, ds: Any, size: tuple[int, int]) -> _Plane:
    """A :class:`_Plane` from a dataset (or functional group items) holding the geometry."""
    spacing = _float_list(ds.get("PixelSpacing"), 2)
    thickness = _float_list([ds.get("SliceThickness")], 1)
    return _Plane(
        name,
        _float_list(ds.get("ImagePositionPatient"), 3),
        _float_list(ds.get("ImageOrientationPatient"), 6),
        None if spacing is None else (float(spacing[0]), float(spacing[1])),
        size,
        None if thickness is None or thickness[0] <= 0 else float(thickness[0]),
    )


def _gaps(positions: np.ndarray, names: list[str], noun: str) -> str | None:
    """The irregular steps between sorted slice ``positions`` (mm along the normal), or None
    when the slices are evenly spaced within :data:`_SLICE_SPACING_TOLERANCE`."""
    if len(positions) < 3:
        return None
    steps = np.diff(positions)
    even = np.linspace(positions[0], positions[-1], len(positions))
    usual = float(np.median(steps))
    limit = _SLICE_SPACING_TOLERANCE * max(usual, 1e-3)
    if np.abs(positions - even).max() <= limit:
        return None
    odd = np.flatnonzero(np.abs(steps - usual) > limit)
    if not len(odd):
        odd = np.array([int(np.argmax(np.abs(steps - usual)))])
    parts = [
        f"{noun} {names[k]} and {names[k + 1]} are {steps[k]:.4g} mm apart (at "
        f"{positions[k]:.6g} and {positions[k + 1]:.6g} mm along the slice normal)"
        for k in odd[:5]
    ]
    more = f", {len(odd) - 5} more such gaps" if len(odd) > 5 else ""
    return ", ".join(parts) + more + f", the others {usual:.4g} mm"


def _spacing_gap(positions: np.ndarray | None, files: list[str]) -> str | None:
    """Describe the irregular slice spacing of sorted ``positions``; None if even."""
    if positions is None:
        return None
    return _gaps(np.asarray(positions), [Path(f).name for f in files], "slices")


def _first_differing(planes: list[_Plane], key: Any, same: Any) -> tuple[int, int] | None:
    """Index of a plane and of the first plane whose ``key`` differs from it, or None."""
    ref = key(planes[0])
    for i, plane in enumerate(planes[1:], 1):
        if not same(key(plane), ref):
            return 0, i
    return None


class _SortedPlanes(NamedTuple):
    """A stack's planes sorted along the slice normal: ``order`` (indices into the planes),
    ``xyz`` (N, 3) positions (LPS mm), ``along`` (N,) mm along the normal, ``names``."""

    order: np.ndarray
    xyz: np.ndarray
    along: np.ndarray
    names: list[str]


class _SliceGrid(NamedTuple):
    """Where the output slices go: ``step`` (mm along the normal); ``positions`` None when
    the planes are evenly spaced, else the resampled slices (mm); ``note`` the warning text
    of a resampling."""

    step: float
    positions: np.ndarray | None
    note: str | None


def _plan_stack(where: Path, planes: list[_Plane], noun: str, fix: str) -> _Stack:
    """Check that ``planes`` form one regular or resamplable stack and place it.

    Raises :class:`ScanError` for planes without position or orientation, mixed image sizes,
    pixel spacings or orientations, two planes at one position and tilted stacks (``fix``
    says how to split the input). Sorts the planes along the slice normal; unevenly spaced
    planes get an output grid at the median spacing and a note naming the gaps.
    """
    _check_planes_alike(where, planes, noun, fix)
    first = planes[0]
    normal = _slice_normal(where, first, fix)
    placed = _sort_along_normal(where, planes, normal, noun, fix)
    row_mm, col_mm = np.asarray(first.pixel_spacing, dtype=np.float64)
    _refuse_tilt(where, placed, normal, min(row_mm, col_mm), noun)
    grid = _slice_grid(where, placed, noun, first.thickness)
    row, col = np.asarray(first.orientation, dtype=np.float64).reshape(2, 3)
    lps = np.eye(4)
    lps[:3, 0] = row * col_mm  # I: along a row, one column to the next
    lps[:3, 1] = col * row_mm  # J: down a column, one row to the next
    lps[:3, 2] = normal * grid.step
    lps[:3, 3] = placed.xyz[0]
    return _Stack(placed.order, _LPS_TO_RAS @ lps, placed.along, grid.positions, grid.note)


def _check_planes_alike(where: Path, planes: list[_Plane], noun: str, fix: str) -> None:
    """:class:`ScanError` unless every plane has a position, an orientation and a pixel
    spacing, and all share one image size, orientation and pixel spacing."""
    missing = [p.name for p in planes if p.position is None or p.orientation is None
               or p.pixel_spacing is None or min(p.pixel_spacing) <= 0]
    if missing:
        raise ScanError(
            f"{where}: {noun[:-1]} {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} lack a usable "
            "ImagePositionPatient, ImageOrientationPatient or PixelSpacing, so their place "
            f"in 3D is unknown (a localizer or secondary capture?); {fix}"
        )
    diff = _first_differing(planes, lambda p: p.size, lambda a, b: a == b)
    if diff:
        a, b = (planes[i] for i in diff)
        raise ScanError(
            f"{where}: the {noun} differ in image size: {a.name} is {a.size[0]} x {a.size[1]} "
            f"pixels (rows x columns), {b.name} is {b.size[0]} x {b.size[1]}; {fix}"
        )
    diff = _first_differing(
        planes, lambda p: p.orientation,
        lambda a, b: np.abs(a - b).max() <= _ORIENTATION_TOLERANCE,
    )
    if diff:
        a, b = (planes[i] for i in diff)
        raise ScanError(
            f"{where}: the {noun} have different orientations: {a.name} has "
            f"ImageOrientationPatient {(np.round(a.orientation, 4) + 0.0).tolist()}, {b.name} "
            f"{(np.round(b.orientation, 4) + 0.0).tolist()} (e.g. a localizer or reformats in the "
            f"series); {fix}"
        )
    diff = _first_differing(
        planes, lambda p: np.array(p.pixel_spacing), lambda a, b: np.abs(a - b).max() <= 1e-4,
    )
    if diff:
        a, b = (planes[i] for i in diff)
        raise ScanError(
            f"{where}: the {noun} have different pixel spacings: {a.name} "
            f"{a.pixel_spacing[0]:g} x {a.pixel_spacing[1]:g} mm, {b.name} "
            f"{b.pixel_spacing[0]:g} x {b.pixel_spacing[1]:g} mm; {fix}"
        )


def _slice_normal(where: Path, first: _Plane, fix: str) -> np.ndarray:
    """The unit normal (LPS) of ``first``'s plane: row x column direction; :class:`ScanError`
    if they are parallel."""
    iop = np.asarray(first.orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    if not np.linalg.norm(normal) > 1e-6:
        raise ScanError(
            f"{where}: ImageOrientationPatient of {first.name} has parallel row and column "
            f"directions {iop.tolist()}; the file is damaged; {fix}"
        )
    normal /= np.linalg.norm(normal)
    return normal


def _sort_along_normal(
    where: Path, planes: list[_Plane], normal: np.ndarray, noun: str, fix: str
) -> _SortedPlanes:
    """``planes`` sorted by their position along ``normal``; :class:`ScanError` if two lie
    within 1e-3 mm of each other."""
    xyz = np.array([p.position for p in planes])
    along = xyz @ normal
    order = np.argsort(along, kind="stable")
    xyz, along = xyz[order], along[order]
    names = [planes[i].name for i in order]
    dup = np.flatnonzero(np.diff(along) < 1e-3)
    if len(dup):
        k = int(dup[0])
        raise ScanError(
            f"{where}: {noun[:-1]} {names[k]} and {names[k + 1]} lie at the same position "
            f"({along[k]:.6g} mm along the slice normal), e.g. two acquisitions, phases or "
            f"echoes in one series; {fix}"
        )
    return _SortedPlanes(order, xyz, along, names)


def _refuse_tilt(
    where: Path, placed: _SortedPlanes, normal: np.ndarray, pixel_mm: float, noun: str
) -> None:
    """:class:`ScanError` if a plane lies more than :data:`_TILT_TOLERANCE_PX` pixels
    (of ``pixel_mm``) sideways of the line through the first plane along ``normal``."""
    xyz, along, names = placed.xyz, placed.along, placed.names
    sideways = (xyz - xyz[0]) - np.outer(along - along[0], normal)
    drift = np.linalg.norm(sideways, axis=1)
    k = int(np.argmax(drift))
    if drift[k] > _TILT_TOLERANCE_PX * pixel_mm:
        angle = float(np.degrees(np.arctan2(drift[k], along[k] - along[0])))
        raise ScanError(
            f"{where}: the {noun} are tilted (gantry tilt): their positions run {angle:.3g} "
            f"degrees off the slice normal ({names[k]} lies {drift[k]:.3g} mm sideways of "
            f"{names[0]}), which a regular voxel grid cannot hold; convert the series with "
            "dcm2niix (it corrects gantry tilt) and pass the NIfTI it writes"
        )


def _slice_grid(
    where: Path, placed: _SortedPlanes, noun: str, thickness: float | None
) -> _SliceGrid:
    """The output slices of sorted planes: their own positions when evenly spaced, else a
    regular grid at the median spacing from the first to the last (:class:`ScanError` if
    that needs more than 4 times as many slices)."""
    along = placed.along
    gaps = _gaps(along, placed.names, noun)
    grid, note = None, None
    if len(along) > 1:
        step = (along[-1] - along[0]) / (len(along) - 1)
    else:  # one slice (refused as 2D by read_scan): its thickness, for read_image
        step = thickness or 1.0
    if gaps:
        median = float(np.median(np.diff(along)))
        n = int(round((along[-1] - along[0]) / median)) + 1
        if n > 4 * len(along):
            raise ScanError(
                f"{where}: the {noun} are spaced too irregularly to resample: {gaps}; a "
                f"regular grid at the median spacing ({median:.4g} mm) would need {n} {noun} "
                f"for {len(along)}; convert the series with dcm2niix or resample it yourself "
                "(e.g. in 3D Slicer) and pass the result"
            )
        grid = np.linspace(along[0], along[-1], n)
        step = (along[-1] - along[0]) / (n - 1)
        note = (
            f"{where}: the {noun} are not evenly spaced: {gaps}, so a {noun[:-1]} is probably "
            f"missing; resampled the {len(along)} {noun} onto a regular grid of {n} at "
            f"{step:.4g} mm along the slice normal (linear interpolation between neighbouring "
            f"{noun}); check the series is complete"
        )
    return _SliceGrid(step, grid, note)


def _resample(arr: np.ndarray, positions: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linearly interpolate ``arr`` (..., K) from slices at ``positions`` (ascending, mm) to
    slices at ``grid``; grid points within 1e-3 mm of a slice take that slice unchanged."""
    out = np.empty(arr.shape[:-1] + (len(grid),), dtype=np.float32)
    for m, t in enumerate(grid):
        k = int(np.clip(np.searchsorted(positions, t, side="right") - 1, 0, len(positions) - 2))
        lo, hi = positions[k], positions[k + 1]
        if abs(t - lo) <= 1e-3:
            out[..., m] = arr[..., k]
        elif abs(t - hi) <= 1e-3:
            out[..., m] = arr[..., k + 1]
        else:
            w = (t - lo) / (hi - lo)
            out[..., m] = (1.0 - w) * arr[..., k] + w * arr[..., k + 1]
    return out


# -- classic series (one file per slice) ----------------------------------------------------
def _unreadable_slices(
    others: list[tuple[Path, Any]], headers: list[_Header], uid: str
) -> list[str]:
    """DICOM files that look like slices of series ``uid`` but could not be read."""
    series_class = _dicom_sop_class(headers[0].path) or str(headers[0].ds.get("SOPClassUID"))
    dropped = []
    for path, ds in others:
        their_uid = str(ds.get("SeriesInstanceUID", "")) if ds is not None else ""
        if their_uid and their_uid != uid:
            continue
        if _dicom_sop_class(path) in (series_class, None):
            dropped.append(path.name)
    return dropped


def _refuse_unreadable(folder: Path, dropped: list[str], gap: str | None) -> None:
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


def _read_classic(
    folder: Path, headers: list[_Header], others: list[tuple[Path, Any]]
) -> DicomVolume:
    """Read one classic series (one file per slice) with SimpleITK, placed by its headers."""
    import SimpleITK as sitk

    uid = headers[0].series_uid
    fix = (
        "move the slices of one stack into a folder of their own (e.g. sort by "
        "ImageOrientationPatient, size or AcquisitionNumber) and pass that folder"
    )
    planes = [_plane(h.path.name, h.ds, (int(h.ds.Rows), int(h.ds.Columns))) for h in headers]
    dropped = _unreadable_slices(others, headers, uid)
    if dropped:  # name the lost slices (and the gap they leave) before any other check
        gap = None
        if all(p.position is not None and p.orientation is not None for p in planes):
            iop = np.asarray(planes[0].orientation, dtype=np.float64)
            along = np.array([p.position for p in planes]) @ np.cross(iop[:3], iop[3:])
            order = np.argsort(along, kind="stable")
            gap = _spacing_gap(along[order], [planes[i].name for i in order])
        _refuse_unreadable(folder, dropped, gap)
    stack = _plan_stack(folder, planes, "slices", fix)
    files = [headers[i].path for i in stack.order]
    slopes = {(h.ds.get("RescaleSlope"), h.ds.get("RescaleIntercept")) for h in headers}
    with _quiet_itk():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        if len(slopes) > 1:  # per-slice rescale: keep every slice's values exact
            reader.SetOutputPixelType(sitk.sitkFloat32)
        try:
            image = reader.Execute()
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
            raise ScanError(f"{folder}: cannot read the DICOM series ({reason})") from err
        except MemoryError as err:
            raise ScanError(
                f"{folder}: not enough memory to read the DICOM series; free memory first"
            ) from err
    arr, _ = _itk_to_array(image)
    if arr.ndim == 3 and arr.shape[:2] != (planes[0].size[1], planes[0].size[0]):
        raise ScanError(
            f"{folder}: SimpleITK read {arr.shape[1]} x {arr.shape[0]} pixel slices where the "
            f"headers say {planes[0].size[0]} x {planes[0].size[1]}; the series is damaged"
        )
    if stack.grid is not None:
        arr = _resample(arr, stack.positions, stack.grid)
    source = DicomSource.from_files(files, on_source_grid=stack.grid is None)
    return DicomVolume(arr, stack.affine, files, source, [stack.note] if stack.note else [])


# -- enhanced multi-frame images -----------------------------------------------------------
def _frame_item(ds: Any, frame: int, sequence: str) -> Any:
    """The first item of functional group ``sequence`` for ``frame`` (per-frame, else
    shared), or None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and index < len(items) and items[index].get(sequence):
            return items[index].get(sequence)[0]
    return None


def _is_enhanced(ds: Any) -> bool:
    return int(ds.get("NumberOfFrames") or 1) > 1 and (
        "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    )


def _read_enhanced(path: Path) -> DicomVolume:
    """Read an enhanced (functional group) multi-frame image with pydicom; frames sorted
    along the slice normal, each frame's rescale applied."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise ScanError(f"{path}: cannot read the DICOM file ({err}); export it again") from err
    n = int(ds.get("NumberOfFrames") or 1)
    fix = (
        "extract one stack of parallel frames first (e.g. dcm2niix writes one NIfTI per "
        "stack) and pass that"
    )
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise ScanError(f"{path}: the frames are colour images, not a CT volume; {fix}")
    stacks = set()
    planes, slopes, intercepts = [], np.ones(n), np.zeros(n)
    size = (int(ds.Rows), int(ds.Columns))
    for f in range(n):
        geometry = pydicom.Dataset()
        for seq in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
            item = _frame_item(ds, f, seq)
            if item is not None:
                geometry.update(item)
        planes.append(_plane(str(f + 1), geometry, size))
        content = _frame_item(ds, f, "FrameContentSequence")
        if content is not None and "StackID" in content:
            stacks.add(str(content.StackID))
        rescale = _frame_item(ds, f, "PixelValueTransformationSequence") or ds
        slopes[f] = float(rescale.get("RescaleSlope", 1.0) or 1.0)
        intercepts[f] = float(rescale.get("RescaleIntercept", 0.0) or 0.0)
    if len(stacks) > 1:
        raise ScanError(
            f"{path}: the multi-frame image holds {len(stacks)} stacks of frames (StackID "
            f"{', '.join(sorted(stacks))}), not one volume; {fix}"
        )
    stack = _plan_stack(path, planes, "frames", fix)
    try:
        pixels = ds.pixel_array
    except Exception as err:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise ScanError(
            f"{path}: cannot decode the pixel data ({name}: {err}); decompress the file "
            "first (e.g. gdcmconv --raw) or convert it with dcm2niix"
        ) from err
    pixels = pixels.reshape(n, size[0], size[1])[stack.order]
    values = pixels.astype(np.float32) * slopes[stack.order, None, None].astype(np.float32)
    values += intercepts[stack.order, None, None].astype(np.float32)
    arr = values.transpose(2, 1, 0)  # (frame, row, column) -> (column, row, frame)
    if stack.grid is not None:
        arr = _resample(arr, stack.positions, stack.grid)
    source = DicomSource(
        files=(path,),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        on_source_grid=stack.grid is None,
        multiframe=True,
        frames=tuple(int(i) + 1 for i in stack.order),
    )
    return DicomVolume(arr, stack.affine, [path], source, [stack.note] if stack.note else [])


# -- entry points -----------------------------------------------------------------------------
def _read_dicom_series(folder: Path, series: str | None = None) -> DicomVolume:
    """Read the DICOM series in ``folder`` (the one with UID ``series`` where given).

    Headers are read with pydicom to group the files by series, check and sort the slices;
    the pixels of a classic series are then read once with SimpleITK, those of an enhanced
    multi-frame file with pydicom. Errors (:class:`ScanError`): no series, several series
    and no ``series``, an unknown UID, unreadable slice files (named, with the gap they
    leave), mixed sizes or orientations, gantry tilt. Unevenly spaced slices are resampled
    (see :func:`_plan_stack`) with a note.
    """
    groups, others = _scan_folder(folder)
    if not groups:
        raise ScanError(_no_series_message(folder))
    uid = _choose_series(folder, groups, series)
    headers = groups[uid]
    from hirescam3d.io.input_checks import check_one_subject, check_series_memory

    check_one_subject(folder, uid, headers)  # never stack two patients, studies or frames
    check_series_memory(folder, headers)
    multi = [h for h in headers if h.frames > 1]
    if multi and len(headers) > 1:
        raise ScanError(
            f"{folder}: series {uid} mixes {len(multi)} multi-frame files ({multi[0].path.name}"
            f"{', ...' if len(multi) > 1 else ''}) with {len(headers) - len(multi)} other "
            "files; pass one multi-frame file itself, or a folder holding only the single-frame "
            "slices"
        )
    if multi:
        if _is_enhanced(multi[0].ds):
            return _read_enhanced(multi[0].path)
        return _read_legacy_multiframe(multi[0].path)
    return _read_classic(folder, headers, others)


def _read_legacy_multiframe(path: Path) -> DicomVolume:
    """A multi-frame file without functional groups: SimpleITK's geometry, as for any file."""
    import SimpleITK as sitk

    try:
        with _quiet_itk():
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise ScanError(f"{path}: SimpleITK cannot read this DICOM file ({reason})") from err
    arr, affine = _itk_to_array(image)
    source = DicomSource.from_files([path], multiframe=True)
    return DicomVolume(arr, affine, [path], source, [])


def read_dicom_file(path: Path, series: str | None = None) -> DicomVolume | None:
    """Read one DICOM file if it is an enhanced multi-frame image, else None (single images
    are read like any ITK file). ``series``: if given, must be the file's series UID."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    uid = str(ds.get("SeriesInstanceUID", ""))
    if series is not None and series.strip() != uid:
        raise OptionError(
            f"{path}: the file belongs to series {uid or '(none)'}, not {series!r}; drop "
            "--series (series= in Python) or pass the folder of the series you want"
        )
    if not _is_enhanced(ds):
        return None
    return _read_enhanced(path)


def looks_like_dicom(path: Path) -> bool:
    """True when ``path`` carries the DICOM signature (b"DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"
