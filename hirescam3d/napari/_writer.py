"""napari writer: an explanation Image layer -> NIfTI on its source scan's grid.

The layer's ``metadata["hirescam3d"]`` (set by this plugin's reader, sample data and
widget) holds the scan's affine, shape and header; the display array is put back in the
scan's ``(I, J, K)`` order and written with :func:`hirescam3d.io.outputs.write_explanation`, the
same contract as ``hirescam3d explain``. A layer without that metadata is written on the
grid its ``scale``/``translate``/``rotate`` describe (world axes taken as S, P, L mm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.errors import InputError
from hirescam3d.io.outputs import write_explanation as _write_nifti
from hirescam3d.napari import _layers


def write_explanation(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Image layer (values in [0, 1]) as a NIfTI explanation; returns ``[path]``.

    ``path``: target ``.nii.gz``/``.nii`` (replaced if it exists: napari's save dialog has
    already asked); ``data``: the layer's SPL display array; ``meta``: the layer state.
    """
    volume = np.asarray(data, dtype=np.float32)
    name = meta.get("name", "layer")
    if volume.ndim != 3:
        raise InputError(f"layer {name!r}: expected a 3D map; got shape {volume.shape}")
    finite = volume[np.isfinite(volume)]
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1.0 + 1e-6):
        raise InputError(
            f"layer {name!r}: values range {finite.min():g} .. {finite.max():g}; only "
            "explanation maps in [0, 1] can be saved as explanations (save scans with "
            "napari's built-in writers)"
        )
    entry = _layers.layer_source(meta.get("metadata"))
    method = str((entry or {}).get("method") or meta.get("name") or "explanation")
    if entry is not None and "display_affine" in entry:
        source = _layers.from_display(volume, entry)
        affine = np.asarray(entry["affine"], dtype=np.float64)
        header = entry.get("header")
    else:
        source = volume
        affine = _layers.affine_from_geometry(
            meta.get("scale", (1.0, 1.0, 1.0)),
            meta.get("translate", (0.0, 0.0, 0.0)),
            _rotation(meta.get("rotate")),
        )
        header = None
    out = Path(path)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        out = out.with_name(out.name + ".nii.gz")
    written = _write_nifti(out, source, affine, method, source_header=header, force=True)
    return [str(written)]


def _rotation(rotate: Any) -> np.ndarray | None:
    if rotate is None:
        return None
    matrix = np.asarray(rotate, dtype=np.float64)
    return matrix if matrix.shape == (3, 3) else None
