"""Layer data for napari without importing napari: display geometry, names, colours.

The display array of every layer is in ``SPL`` order (axis 0 -> superior, 1 -> posterior,
2 -> patient left): axial slices on the slider, anterior at the top, patient right on the
image left. napari world coordinates are mm along (S, P, L), so layers from scans on
different grids line up. The source geometry (the file's affine, shape and header) is kept
in ``metadata["hirescam3d"]`` so a map can be written back on its scan's grid.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from hirescam3d.errors import InputError
from hirescam3d.io.scans import reorient

DISPLAY_AXCODES = "SPL"
META = "hirescam3d"
# A wide chest window (HU): lungs dark, soft tissue mid-grey, so heat maps added on top
# stay visible instead of saturating to white. Adjust with napari's contrast slider.
CT_WINDOW = (-1000.0, 1000.0)
HEAT_COLORMAP = "inferno"
EXPLANATION_OPACITY = 0.5
SEPARATOR = " · "
# (S, P, L) world mm from RAS mm: S = z, P = -y, L = -x.
_SPL_FROM_RAS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])

LayerData = tuple[Any, dict[str, Any], str]

# Fixed organ colours (RGB 0..1) by organ group, so an organ looks the same in every file.
ORGAN_COLORS: dict[str, tuple[float, float, float]] = {
    "right_lung": (0.35, 0.65, 1.0),
    "left_lung": (0.2, 0.85, 0.85),
    "lung": (0.3, 0.75, 0.95),
    "heart": (0.95, 0.25, 0.25),
    "airway": (0.95, 0.95, 0.55),
    "trachea": (0.95, 0.95, 0.55),
    "spine": (0.9, 0.85, 0.75),
    "vertebrae": (0.9, 0.85, 0.75),
    "ribs": (1.0, 0.7, 0.4),
    "aorta": (0.85, 0.2, 0.6),
    "liver": (0.65, 0.4, 0.25),
    "esophagus": (0.6, 0.9, 0.4),
}
# Colours for organs not in the table, picked by a checksum of the name.
_PALETTE = (
    (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5),
    (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)


def layer_name(finding: str, method: str) -> str:
    """Name of an explanation layer: ``"<finding> · <method>"``."""
    return f"{finding}{SEPARATOR}{method}"


def to_display(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(I, J, K)`` array + voxel -> RAS affine -> contiguous SPL array + its affine."""
    out, out_affine = reorient(array, affine, DISPLAY_AXCODES)
    return np.ascontiguousarray(out), out_affine


def display_geometry(display_affine: np.ndarray) -> dict[str, Any]:
    """napari ``scale`` (mm), ``translate`` (mm) and, for oblique scans, ``rotate``.

    ``display_affine`` maps SPL array indices to RAS mm. World = (S, P, L) mm.
    """
    affine = np.asarray(display_affine, dtype=np.float64)
    linear = _SPL_FROM_RAS @ affine[:3, :3]
    scale = np.linalg.norm(linear, axis=0)
    geometry: dict[str, Any] = {
        "scale": tuple(float(s) for s in scale),
        "translate": tuple(float(t) for t in _SPL_FROM_RAS @ affine[:3, 3]),
    }
    direction = linear / scale
    if not np.allclose(direction, np.eye(3), atol=1e-6):
        # Oblique (tilted) scan: the nearest proper rotation of the direction cosines.
        u, _, vt = np.linalg.svd(direction)
        geometry["rotate"] = u @ vt
    return geometry


def affine_from_geometry(
    scale: Any, translate: Any, rotate: Any | None = None
) -> np.ndarray:
    """Inverse of :func:`display_geometry`: SPL index -> RAS mm affine of a display array."""
    rotation = np.eye(3) if rotate is None else np.asarray(rotate, dtype=np.float64)
    if rotation.shape != (3, 3):
        raise InputError(f"expected a 3x3 rotation for a 3D layer; got shape {rotation.shape}")
    ras_from_spl = _SPL_FROM_RAS.T
    affine = np.eye(4)
    affine[:3, :3] = ras_from_spl @ rotation @ np.diag(np.asarray(scale, dtype=np.float64)[-3:])
    affine[:3, 3] = ras_from_spl @ np.asarray(translate, dtype=np.float64)[-3:]
    return affine


def source_metadata(
    kind: str,
    affine: np.ndarray,
    shape: tuple[int, ...],
    display_affine: np.ndarray,
    header: Any = None,
    path: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """``metadata`` of a layer: ``{"hirescam3d": {...}}`` with the source geometry.

    ``affine``/``shape``: the source file's voxel -> RAS affine and ``(I, J, K)`` shape;
    ``display_affine``: the affine of the SPL display array.
    """
    entry = {
        "kind": kind,
        "affine": np.asarray(affine, dtype=np.float64).copy(),
        "shape": tuple(int(n) for n in shape),
        "display_affine": np.asarray(display_affine, dtype=np.float64).copy(),
        "header": header,
        "path": None if path is None else str(path),
    }
    entry.update(extra)
    return {META: entry}


def layer_source(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``hirescam3d`` entry of a layer's metadata, or None."""
    entry = (metadata or {}).get(META)
    return entry if isinstance(entry, dict) else None


def from_display(array: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """An SPL display array back in its source file's ``(I, J, K)`` order.

    Raises InputError if the array does not fit the source grid in ``entry``.
    """
    display_affine = np.asarray(entry["display_affine"], dtype=np.float64)
    affine = np.asarray(entry["affine"], dtype=np.float64)
    codes = "".join(_axcodes(affine))
    out, out_affine = reorient(np.asarray(array), display_affine, codes)
    if tuple(out.shape) != tuple(entry["shape"]) or not np.allclose(out_affine, affine, atol=1e-4):
        raise InputError(
            f"the layer's data (display shape {np.shape(array)}) does not match its source "
            f"scan grid {tuple(entry['shape'])}; it was resized or cropped after loading"
        )
    return np.ascontiguousarray(out)


def _axcodes(affine: np.ndarray) -> tuple[str, ...]:
    import nibabel as nib

    return tuple(nib.orientations.aff2axcodes(affine))


def intensity_window(array: np.ndarray) -> tuple[float, float]:
    """Contrast limits: a chest window in HU for CT-like data, else the 1-99th percentiles."""
    lo, hi = float(np.min(array)), float(np.max(array))
    if lo <= -500.0 and hi >= 0.0:
        return CT_WINDOW
    p1, p99 = (float(v) for v in np.percentile(array, [1, 99]))
    return (p1, p99) if p99 > p1 else (lo, hi if hi > lo else lo + 1.0)


def scan_layer(
    array: np.ndarray,
    affine: np.ndarray,
    name: str,
    header: Any = None,
    path: Any = None,
) -> LayerData:
    """Image layer data of a scan ``(I, J, K)`` (float) with voxel -> RAS ``affine``."""
    data, display_affine = to_display(np.asarray(array, dtype=np.float32), affine)
    kwargs = {
        "name": name,
        **display_geometry(display_affine),
        "colormap": "gray",
        "contrast_limits": intensity_window(data),
        "metadata": source_metadata("scan", affine, array.shape, display_affine, header, path),
    }
    return data, kwargs, "image"


def signed_colormap() -> Any:
    """Blue (negative) - black (0) - red (positive): with additive blending, 0 adds nothing
    to the CT, so the diverging map is centred on 0 and leaves the scan visible."""
    from napari.utils.colormaps import Colormap

    colors = [[0.2, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.3, 0.1, 1.0]]
    return Colormap(colors, name="hirescam3d_signed", controls=[0.0, 0.5, 1.0])


def explanation_kwargs(
    name: str, geometry: Mapping[str, Any], metadata: dict, signed_limit: float | None = None
) -> dict:
    """Image-layer kwargs of an explanation map: heat colours over the CT for a [0, 1] map;
    with ``signed_limit`` a diverging colormap over ``(-limit, limit)``, centred on 0."""
    signed = signed_limit is not None
    limit = float(signed_limit or 1.0) or 1.0
    return {
        "name": name,
        **dict(geometry),
        "colormap": signed_colormap() if signed else HEAT_COLORMAP,
        "contrast_limits": (-limit, limit) if signed else (0.0, 1.0),
        "blending": "additive",
        "opacity": EXPLANATION_OPACITY,
        "metadata": metadata,
    }


def explanation_layer(
    volume: np.ndarray,
    affine: np.ndarray,
    name: str,
    finding: str | None = None,
    method: str | None = None,
    header: Any = None,
    path: Any = None,
    signed: bool = False,
) -> LayerData:
    """Image layer data of an explanation map ``(I, J, K)`` on a scan grid: in [0, 1], or
    ``signed`` (logit contributions; shown with a diverging colormap centred on 0)."""
    data, display_affine = to_display(np.asarray(volume, dtype=np.float32), affine)
    meta = source_metadata(
        "explanation", affine, volume.shape, display_affine, header, path,
        finding=finding, method=method,
    )
    limit = float(np.abs(data).max()) if signed and data.size else None
    kwargs = explanation_kwargs(name, display_geometry(display_affine), meta, limit)
    return data, kwargs, "image"


def organ_color(name: str) -> tuple[float, float, float]:
    """Fixed RGB of an organ name (its group's colour, else one picked by name)."""
    key = name.lower()
    if key not in ORGAN_COLORS:
        try:
            from hirescam3d.io.organs import organ_group

            key = organ_group(key)
        except Exception:  # the name is only used to pick a colour
            pass
    if key in ORGAN_COLORS:
        return ORGAN_COLORS[key]
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def organ_colors(names: Mapping[int, str], opacity: float = 1.0) -> dict[int | None, np.ndarray]:
    """``{label: RGBA}`` for a DirectLabelColormap: 0 and unnamed labels transparent."""
    colors: dict[int | None, np.ndarray] = {
        None: np.zeros(4), 0: np.zeros(4),
    }
    for value, name in names.items():
        if int(value) != 0:
            colors[int(value)] = np.array([*organ_color(name), opacity])
    return colors


def labels_features(labels: np.ndarray, names: Mapping[int, str]) -> dict[str, list]:
    """Labels-layer ``features``: one row per label value (incl. 0) with its organ name."""
    values = sorted({0, *(int(v) for v in names), *(int(v) for v in np.unique(labels))})
    return {
        "index": values,
        "name": [names.get(v, "background" if v == 0 else f"label {v}") for v in values],
    }


def labels_layer(
    labels: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    name: str,
    header: Any = None,
    path: Any = None,
) -> LayerData:
    """Labels layer data of an organ map ``(I, J, K)`` (ints) with ``{label: organ name}``."""
    from napari.utils.colormaps import DirectLabelColormap

    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array).astype(np.int32)
    data, display_affine = to_display(array, affine)
    names = {int(k): str(v) for k, v in names.items()}
    kwargs = {
        "name": name,
        **display_geometry(display_affine),
        "features": labels_features(data, names),
        "colormap": DirectLabelColormap(color_dict=organ_colors(names)),
        "opacity": 0.4,
        "metadata": source_metadata(
            "labels", affine, array.shape, display_affine, header, path, names=names
        ),
    }
    return data, kwargs, "labels"
