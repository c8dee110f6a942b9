"""Checks on what a scan file or folder declares, made before its voxels are read.

- :func:`check_one_subject`: the slices of one DICOM series belong to one patient, one
  study and one frame of reference (a series mixing them is never stacked);
- :func:`check_itk_file`: the data file a ``.mhd`` / ``.nhdr`` / detached ``.nrrd`` header
  names exists, and the image fits in memory (from its header, before allocating);
- :func:`check_memory`: the bytes an allocation needs against the memory available;
- :func:`check_intensity_range`: voxel values that no CT holds (beyond +-1e5 HU);
- :func:`captured_stderr`: what C++ libraries (ITK's MetaIO, NRRD) print on the process's
  stderr while reading, kept off the terminal and handed back as text.

Each raises :class:`~hirescam3d.errors.ScanError` (one line naming the file).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.errors import HiResCAMError, ScanError

# No CT holds values beyond this (HU of air -1000, dense metal ~ +3e4 at most).
MAX_ABS_HU = 1e5
# Identity fields every slice of one series must share, and how they are named.
_SUBJECT_FIELDS = (
    ("PatientID", "patient (PatientID)"),
    ("StudyInstanceUID", "study (StudyInstanceUID)"),
    ("FrameOfReferenceUID", "frame of reference (FrameOfReferenceUID)"),
)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.54 kB"`` (decimal units)."""
    from hirescam3d.io.nifti import _human_bytes

    return _human_bytes(n)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or None where unknown."""
    from hirescam3d.io.nifti import _available_memory

    return _available_memory()


def check_memory(
    n_bytes: float, what: str, fix: str, error: type[HiResCAMError] = ScanError
) -> None:
    """``error`` naming ``what`` when ``n_bytes`` exceed the memory available now."""
    available = available_memory()
    if available is not None and n_bytes > available:
        raise error(
            f"{what} needs about {human_bytes(n_bytes)} of memory, but only "
            f"{human_bytes(available)} is available; {fix}"
        )


def check_one_subject(folder: Path, uid: str, headers: Sequence[Any]) -> None:
    """ScanError when the slices (pydicom headers ``h.ds``, file ``h.path``) of series
    ``uid`` differ in patient, study or frame of reference; the message lists each
    differing field with its values and a file holding each."""
    differ = []
    for keyword, label in _SUBJECT_FIELDS:
        seen: dict[str, str] = {}
        for h in headers:
            value = str(h.ds.get(keyword, "") or "")
            seen.setdefault(value, Path(h.path).name)
        if len(seen) > 1:
            shown = ", ".join(f"{v or '(empty)'!r} in {name}" for v, name in list(seen.items())[:3])
            more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
            differ.append(f"{len(seen)} {label.split(' (')[0]}s {label[label.index('('):]}: "
                          f"{shown}{more}")  # fmt: skip
    if differ:
        raise ScanError(
            f"{folder}: series {uid} mixes slices of {'; '.join(differ)}; one scan is one "
            "patient, study and frame of reference: move each one's files into a folder of "
            "their own and pass that folder (--series cannot combine them)"
        )


def check_series_memory(folder: Path, headers: Sequence[Any]) -> None:
    """ScanError when the series' voxels (stored + a float32 copy) exceed free memory."""
    voxels = 0
    for h in headers:
        try:
            voxels += int(h.ds.Rows) * int(h.ds.Columns) * max(int(h.frames), 1)
        except (AttributeError, TypeError, ValueError):
            return
    bits = int(headers[0].ds.get("BitsAllocated", 16) or 16) if headers else 16
    check_memory(
        voxels * (4 + math.ceil(bits / 8)),
        f"{folder}: reading {len(headers)} DICOM files of {voxels} voxels",
        "free memory, or crop or downsample the scan first",
    )


# -- MetaImage and NRRD headers -------------------------------------------------------------
def _header_lines(path: Path, limit: int = 1 << 16) -> list[str]:
    """The text lines of a header at the start of ``path`` (up to ``limit`` bytes)."""
    with open(path, "rb") as f:
        head = f.read(limit)
    return head.decode("latin-1").splitlines()


def _meta_fields(path: Path) -> dict[str, str]:
    """``key = value`` lines of a MetaImage header, up to ElementDataFile (its last)."""
    fields: dict[str, str] = {}
    for line in _header_lines(path):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    return fields


def _nrrd_fields(path: Path) -> dict[str, str]:
    """``field: value`` lines of an NRRD header (up to the blank line ending it)."""
    lines = _header_lines(path)
    fields: dict[str, str] = {}
    if not lines or not lines[0].startswith("NRRD"):
        return fields
    for line in lines[1:]:
        if not line.strip():
            break
        if line.startswith("#") or ":=" in line.split(":", 1)[0]:
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _data_files(path: Path) -> tuple[str, list[str]]:
    """``(header field, data files it names)`` for a header that keeps its voxels in other
    files; ``("", [])`` when the voxels follow the header in ``path`` itself."""
    suffix = path.name.lower()
    if suffix.endswith((".mhd", ".mha")):
        value = _meta_fields(path).get("elementdatafile", "")
        if not value or value.upper() == "LOCAL":
            return "", []
        if value.upper().startswith("LIST"):
            return "ElementDataFile", []  # one file per slice listed below: ITK checks them
        if "%" in value.split()[0]:  # printf-style pattern of slice files: ITK checks them
            return "ElementDataFile", []
        return "ElementDataFile", [value]
    if suffix.endswith((".nrrd", ".nhdr")):
        fields = _nrrd_fields(path)
        value = fields.get("data file", fields.get("datafile", ""))
        if not value or value.upper().startswith("LIST") or "%" in value:
            return ("data file" if value else ""), []
        return "data file", [value]
    return "", []


def check_itk_file(path: Path) -> None:
    """ScanError naming the missing data file of a ``.mhd``/``.mha``/``.nhdr``/``.nrrd``
    header, before SimpleITK reads it (ITK would print its own lines and not name it)."""
    try:
        field, names = _data_files(path)
    except OSError:
        return  # unreadable: SimpleITK's read reports it
    for name in names:
        target = Path(name) if Path(name).is_absolute() else path.parent / name
        if not target.is_file():
            raise ScanError(
                f"{path}: its header ({field} = {name}) names the data file {target}, which "
                "does not exist; copy the data file next to the header (or fix the "
                f"{field} line)"
            )


def check_itk_size(path: Path, image_reader: Any) -> None:
    """ScanError when the image ``image_reader`` (``sitk.ImageFileReader`` after
    ``ReadImageInformation``) describes does not fit in memory."""
    size = tuple(int(n) for n in image_reader.GetSize())
    components = int(image_reader.GetNumberOfComponents() or 1)
    voxels = math.prod(size) * components
    check_memory(
        voxels * (_itk_bytes_per_value(image_reader) + 4),
        f"{path}: reading a {' x '.join(map(str, size))} image",
        "free memory, or crop or downsample the scan first",
    )


def _itk_bytes_per_value(image_reader: Any) -> int:
    """Bytes of one stored value (from ITK's pixel type text, e.g. "16-bit signed integer")."""
    import re

    import SimpleITK as sitk

    try:
        text = sitk.GetPixelIDValueAsString(image_reader.GetPixelID())
    except Exception:  # noqa: BLE001 - unknown type: assume the widest
        return 8
    found = re.search(r"(\d+)-bit", text)
    return int(found.group(1)) // 8 if found else 8


def check_intensity_range(arr: np.ndarray, path: Path, lo: float, hi: float) -> None:
    """ScanError when voxel values ``lo``..``hi`` go beyond +-:data:`MAX_ABS_HU`."""
    if lo < -MAX_ABS_HU or hi > MAX_ABS_HU:
        raise ScanError(
            f"{path}: intensities range {lo:.4g} .. {hi:.4g}, far beyond any CT "
            f"(+-{MAX_ABS_HU:.0e} HU); the file is corrupt or not a CT in Hounsfield units: "
            "convert it to HU (RescaleSlope/RescaleIntercept) or export it again"
        )


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where ITK's C++ code prints) into a temporary file for
    the block; yields a list that holds the captured text's non-empty lines afterwards."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded): nothing to capture
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def precheck_scan_file(path: str | Path) -> None:
    """The header-only checks of a MetaImage/NRRD scan (missing data file, size against
    memory), cheap enough to run before a model loads; other inputs pass."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file() or not name.endswith((".mhd", ".mha", ".nhdr", ".nrrd")):
        return
    import SimpleITK as sitk

    check_itk_file(path)
    with captured_stderr():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return  # the full read reports it with its reason
    check_itk_size(path, reader)
