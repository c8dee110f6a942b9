"""Reading the one DICOM series in a folder, with its checks.

The series is read with SimpleITK, its warnings kept off stderr. A folder without a series
gets one error saying what it holds (by SOP class) and naming a subfolder that holds a
series; slice files that cannot be read and unevenly spaced slices are refused, never
skipped. The ITK image -> (array, RAS affine) conversion and the ITK quieting here are also
used by :mod:`hirescam3d.io` for single ITK files.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ScanError

# What read_scan accepts (for error messages; a folder without a series names the others).
_SUPPORTED = ".nii, .nii.gz, .nrrd, .mha, .mhd or a folder holding one DICOM series"
# ITK images are LPS; NIfTI/MONAI affines are RAS: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# DICOM slices whose spacing deviates from even by more than this share of a slice are
# refused (ITK would place them at even spacing, i.e. in the wrong place).
_SLICE_SPACING_TOLERANCE = 0.1


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
