"""Reading scans (NIfTI, DICOM, ITK, 2D images) and organ maps; writing maps (NIfTI, DICOM
Parametric Map, SEG and CT series, PNG), with atomic writes and output names.

``hirescam3d.io`` keeps the names of the former single module: ``read_scan``, ``Scan``,
``write_explanation``, ... (readers from :mod:`hirescam3d.io.scans`, writers from
:mod:`hirescam3d.io.outputs`), imported on first use.
"""

from importlib import import_module
from typing import Any

_READERS = (
    "ITK_SUFFIXES", "NIFTI_SUFFIXES", "SCAN_SUFFIXES", "DicomSource", "OutputError", "Scan",
    "ScanWarning", "as_volume", "looks_like_dicom", "read_dicom_file", "read_image",
    "read_scan", "reorient", "scan_stem", "sha256_files",
)
_WRITERS = (
    "QFORM_TOLERANCE_MM", "_check_geometry", "_nifti_image", "atomic_write", "check_writable",
    "ensure_folder", "write_explanation", "write_labels",
)
# The module of :mod:`hirescam3d.io` that serves each old name.
_HOMES = {**dict.fromkeys(_READERS, "scans"), **dict.fromkeys(_WRITERS, "outputs")}


def __getattr__(name: str) -> Any:
    """``hirescam3d.io.read_scan``, ``hirescam3d.io.write_explanation``, ...: the name from
    its module (see :data:`_HOMES`)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
