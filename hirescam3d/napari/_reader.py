"""napari reader: scans, organ label maps and explanation maps -> layers in mm.

What a file is:

* a folder (one DICOM series) or a volume with many intensities -> a CT Image layer;
* a NIfTI with intent "label", a file with a names sidecar ``<stem>.json`` (e.g.
  ``chest_organs.nii.gz`` + ``chest_organs.json``), or an integer volume with at most
  :data:`MAX_LABELS` non-negative values -> a Labels layer with organ names and colours;
* a NIfTI with intent "estimate" (as written by ``hirescam3d explain``) -> a heat-map
  Image layer named ``<finding> · <method>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.io.organs import load_organ_map
from hirescam3d.io.outputs import parse_map_name
from hirescam3d.io.scans import (
    NIFTI_SUFFIXES,
    SCAN_SUFFIXES,
    as_volume,
    read_image,
    read_scan,
    scan_stem,
)
from hirescam3d.napari import _layers

MAX_LABELS = 256
KINDS = ("scan", "labels", "explanation")


def get_reader(path: str | list[str]) -> Callable[[Any], list[_layers.LayerData]] | None:
    """The reader function for ``path`` (napari's get_reader hook), or None if not ours."""
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(_is_readable(Path(p)) for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[_layers.LayerData]:
    """Layer data tuples for one path or a list of paths (each read on its own)."""
    paths = path if isinstance(path, list) else [path]
    return [layer for p in paths for layer in read_path(p)]


def read_path(
    path: str | Path, kind: str | None = None, names_path: str | Path | None = None
) -> list[_layers.LayerData]:
    """One layer data tuple for a scan, label map or explanation file.

    ``kind``: one of :data:`KINDS` to skip the guess; ``names_path``: a JSON of organ names
    (``{"1": "right_lung", ...}``) for a label map, by default its ``<stem>.json`` sidecar.
    A folder of per-organ masks (TotalSegmentator output) is read as labels only with
    ``kind="labels"``; otherwise a folder is a DICOM series, and a ``.dcm`` file stands
    for the series in its folder.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".dcm":
        path = path.parent  # one slice of a series: read the whole series
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if names_path is None:
        names_path = names_sidecar(path)
    kind = kind or guess_kind(path, names_path)
    if kind == "labels":
        return [_read_labels(path, names_path)]
    if kind == "explanation":
        return [_read_explanation(path)]
    scan = read_scan(path)
    layer = _layers.scan_layer(scan.array, scan.affine, scan_stem(path), scan.header, path)
    layer[1]["metadata"][_layers.META]["sha256"] = scan.sha256
    return [layer]


def names_sidecar(path: Path) -> Path | None:
    """``<stem>.json`` beside a label file, if it exists."""
    if path.is_dir():
        return None
    candidate = path.with_name(scan_stem(path) + ".json")
    return candidate if candidate.is_file() else None


def guess_kind(path: Path, names_path: Path | str | None = None) -> str:
    """``"scan"``, ``"labels"`` or ``"explanation"`` from the header, sidecar and values."""
    if path.is_dir():
        return "scan"
    intent, dtype = _peek(path)
    if intent == "estimate":
        return "explanation"
    if intent == "label" or names_path is not None:
        return "labels"
    if dtype is not None and np.issubdtype(dtype, np.integer):
        values = np.unique(_read_array(path))
        if values.size <= MAX_LABELS and values.min() >= 0:
            return "labels"
    return "scan"


def _is_readable(path: Path) -> bool:
    if path.is_dir():
        return _has_dicom(path)
    return path.name.lower().endswith(SCAN_SUFFIXES)


def _has_dicom(folder: Path, probe: int = 20) -> bool:
    """A few files of ``folder`` have a .dcm suffix or the DICOM preamble ("DICM")."""
    try:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()][:probe]
    except OSError:
        return False
    for file in files:
        if file.suffix.lower() == ".dcm":
            return True
        try:
            with open(file, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _peek(path: Path) -> tuple[str | None, np.dtype | None]:
    """``(NIfTI intent name or None, stored dtype or None)`` without reading the voxels."""
    try:
        if _is_nifti(path):
            import nibabel as nib

            header = nib.load(str(path)).header
            return header.get_intent()[0], np.dtype(header.get_data_dtype())
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        if "integer" in pixel:
            return None, np.dtype(np.int64)
        return None, np.dtype(np.float32)
    except Exception:  # unreadable here -> read_scan gives the precise error later
        return None, None


def _read_array(path: Path) -> np.ndarray:
    return read_image(path)[0]


def _read_labels(path: Path, names_path: str | Path | None) -> _layers.LayerData:
    labels, affine, names = load_organ_map(path, names_path)
    return _layers.labels_layer(labels, affine, names, scan_stem(path), None, path)


def _read_explanation(path: Path) -> _layers.LayerData:
    array, affine, header, _ = read_image(path)  # maps are not HU: no checks
    volume = np.nan_to_num(as_volume(array, path).astype(np.float32))
    intent = None
    if header is not None and hasattr(header, "get_intent"):
        intent = header.get_intent()[2] or None
    # "logit/voxel": signed contributions (explain --values logit); else [0, 1] maps
    # whose intent name is the method.
    signed = intent == "logit/voxel" or bool((volume < 0).any())
    if not signed:
        volume = np.clip(volume, 0.0, 1.0)
    # Our own file names (hirescam3d.io.outputs): the report beside the maps names them exactly.
    _, finding, method = parse_map_name(path, methods=None if signed or not intent else [intent])
    name = _layers.layer_name(finding, method) if finding and method else scan_stem(path)
    return _layers.explanation_layer(
        volume, affine, name, finding, method, header, path, signed=signed
    )
