"""Reading scans (NIfTI, DICOM, ITK, 2D images) and organ maps; writing maps (NIfTI, DICOM
Parametric Map, SEG and CT series, PNG), with atomic writes and output names.

``hirescam3d.io`` keeps the names of the former single module: ``read_scan``, ``Scan``,
``write_explanation``, ... (from :mod:`hirescam3d.io.scans` and :mod:`hirescam3d.io.outputs`).
"""

from importlib import import_module
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(import_module(f"{__name__}.scans"), name)
