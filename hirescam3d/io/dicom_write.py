"""Writing explanation maps as DICOM (Parametric Map, Segmentation) and scans as CT series.

One call per map: :func:`write_parametric_map` writes a float32 ``(I, J, K)`` map as one
multi-frame DICOM Parametric Map, :func:`write_segmentation` a thresholded map as one
binary DICOM Segmentation; both reference the source series (same study and frame of
reference) so a PACS shows them over the CT. A scan read from NIfTI has no DICOM series:
:func:`write_ct_series` writes one first and returns its :class:`DicomSource`.

Geometry. Arrays are ``(I, J, K)`` with a voxel -> RAS mm affine; DICOM patient
coordinates are LPS (x and y flipped). Frame ``k`` of a DICOM output is the plane of
constant ``K``: ``values[:, :, k].T`` (rows = ``J``, columns = ``I``), so the row
direction cosine is the affine's ``I`` column, the column direction cosine its ``J``
column (both in LPS), PixelSpacing is ``(|J step|, |I step|)`` mm and each frame's
ImagePositionPatient is ``affine @ (0, 0, k)`` in LPS. For a series read by SimpleITK
(``I`` = column, ``J`` = row, ``K`` = slice) this reproduces the source slices exactly.
The in-plane axes must be perpendicular (DICOM pixels are rectangles); the ``K`` axis
may be oblique to the planes (each frame carries its own position).

Referencing. A map *on the source grid* (same shape, every voxel within
:data:`GEOMETRY_TOLERANCE_MM` of the source slices' voxels, and
``source.on_source_grid``) references its source slice (or source frame) per frame and
copies the source geometry. Any other map (the model's coarse grid, a scan the reader
resampled) gets explicit plane positions, orientation and pixel measures from its own
affine and no per-frame source references: it shares only the study and the frame of
reference (the source series is still listed as the series it was derived from).
highdicom stores the frames sorted along the slice normal, which need not be K order:
readers place each frame by its ImagePositionPatient.

Parametric Map encoding. Stored values are 16-bit unsigned integers; the Real World
Value Mapping (slope, intercept) turns them into the map's values:

- ``values_kind="unit"``: value = stored / 65535, unit UCUM ``1`` ("no units"): the
  dimensionless [0, 1] display score (values outside [0, 1] are clipped, as in the
  NIfTI output). Precision: +-0.5 / 65535 (7.6e-6).
- ``values_kind="logit"``: value = (stored - 32768) * m / 32767 with ``m`` the map's
  largest absolute value (0 is stored exactly), unit UCUM ``{logit}/{voxel}`` ("logit
  per voxel"): the signed logit contribution of each voxel. Precision: +-m / 65534.

NaN voxels are written as 0 (as in the NIfTI output); infinite values are refused.
Concepts: the quantity is DCM 130402 "Class activation" (CID 7180); the algorithm is
identified by Manufacturer "hirescam3d", ManufacturerModelName "hirescam3d <method>",
SoftwareVersions, a DerivationDescription, and content items DCM 111001 "Algorithm
Name", 111003 "Algorithm Version", 111000 "Algorithm Family" (= DCM 123110 "Artificial
Intelligence", CID 7162), items 2-4 of the Quantity Definition Sequence after the
quantity. A Segmentation carries the standard Algorithm Identification (name, version,
family, parameters) in its segment.

Attributes the validator (dciodvfy) asks for: a Parametric Map's Laterality (General
Series, type 2C) is copied from the source series where it has one, else written empty
("unknown": neither a NIfTI file nor a series without it says which body part was
scanned; a Segmentation has none, its Segment Sequence takes that role); the CT series
written for a NIfTI scan has an empty PatientPosition (type 2C for CT: unknown, NIfTI
does not record it) and a StudyID (the date and time it was written).

highdicom and pydicom are imported inside the functions (importing this module is cheap).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hirescam3d.errors import HiResCAMError
from hirescam3d.io.atomic import atomic_write, ensure_folder
from hirescam3d.io.dicom import DicomSource, looks_like_dicom
from hirescam3d.io.scans import OutputError

# Voxel positions closer than this (mm) count as the same place: a map whose every voxel
# lies this close to the source slices' voxels is "on the source grid".
GEOMETRY_TOLERANCE_MM = 1e-3
# Largest |cos| of the angle between a grid's in-plane axes (I, J) that still counts as
# perpendicular (1e-4 is 0.0057 degrees: DICOM orientations written with 6 digits pass).
ORTHOGONALITY_TOLERANCE = 1e-4
MAP_VALUE_KINDS = ("unit", "logit")
# Stored-value scaling of the Parametric Map (uint16).
UNIT_SCALE = 65535
LOGIT_ZERO = 32768
LOGIT_HALF_RANGE = 32767
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "hirescam3d"

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Type 2 patient/study attributes that highdicom reads from the source; filled with ""
# where a source file lacks them (type 2: present, may be empty).
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


class DicomOutputError(HiResCAMError):
    """A map or scan cannot be written as DICOM: unusable values, geometry or source series."""


# -- geometry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameGeometry:
    """The DICOM frames of an ``(I, J, K)`` grid, in LPS mm.

    ``orientation``: (6,) ImageOrientationPatient (row cosine = along ``I``, column
    cosine = along ``J``); ``pixel_spacing``: (between rows = ``|J step|``, between
    columns = ``|I step|``) mm; ``positions``: (K, 3) ImagePositionPatient of voxel
    ``(0, 0, k)``; ``slice_spacing``: distance between adjacent frame planes along their
    normal (mm); ``shape``: ``(I, J, K)``.
    """

    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    positions: np.ndarray
    slice_spacing: float
    shape: tuple[int, int, int]

    def corners(self, k: int) -> np.ndarray:
        """(4, 3) LPS positions of the corner voxels of frame ``k``."""
        rows, cols = self.shape[1], self.shape[0]
        row_step = self.orientation[:3] * self.pixel_spacing[1]  # next column
        col_step = self.orientation[3:] * self.pixel_spacing[0]  # next row
        return _plane_corners(self.positions[k], row_step, col_step, rows, cols)


def _plane_corners(
    origin: np.ndarray, row_step: np.ndarray, col_step: np.ndarray, rows: int, cols: int
) -> np.ndarray:
    return np.array([
        origin + r * col_step + c * row_step for r in (0, rows - 1) for c in (0, cols - 1)
    ])


def frame_geometry(affine: np.ndarray, shape: Sequence[int], what: str = "map") -> FrameGeometry:
    """DICOM frame geometry of an ``(I, J, K)`` grid with voxel -> RAS mm ``affine``.

    Raises :class:`DicomOutputError` for an affine that is not a finite, invertible 4x4
    matrix, or whose in-plane axes (I, J) are not perpendicular (DICOM frames are
    rectangular pixel grids); see :data:`ORTHOGONALITY_TOLERANCE`.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DicomOutputError(
            f"{what}: the voxel -> world affine must be a finite 4x4 matrix; got "
            f"{'shape ' + str(affine.shape) if affine.shape != (4, 4) else 'NaN/Inf entries'}"
            "; pass the scan's (or the model grid's) affine"
        )
    if len(shape) != 3 or min(shape) < 1:
        raise DicomOutputError(f"{what}: expected a 3D (I, J, K) grid; got shape {tuple(shape)}")
    lps = _LPS_FROM_RAS @ affine
    steps = lps[:3, :3]
    norms = np.linalg.norm(steps, axis=0)
    if not (norms > 0).all() or abs(np.linalg.det(steps)) <= 1e-12 * float(np.prod(norms)):
        raise DicomOutputError(
            f"{what}: the affine is singular (an axis has zero length, or the K axis lies in "
            "the plane of I and J), so its slices are not planes of constant K; pass a "
            "usable affine"
        )
    u, v = steps[:, 0] / norms[0], steps[:, 1] / norms[1]
    cosine = float(u @ v)
    if abs(cosine) > ORTHOGONALITY_TOLERANCE:
        angle = float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
        raise DicomOutputError(
            f"{what}: the in-plane axes I and J meet at {angle:.4f} degrees, not 90 (a sheared "
            "grid); DICOM frames need rectangular pixels: resample the map onto a grid with "
            "perpendicular I and J axes first"
        )
    normal = np.cross(u, v)
    normal /= np.linalg.norm(normal)
    n_i, n_j, n_k = (int(s) for s in shape)
    positions = (lps @ np.stack([np.zeros(n_k), np.zeros(n_k), np.arange(n_k), np.ones(n_k)]))
    return FrameGeometry(
        orientation=np.concatenate([u, v]),
        pixel_spacing=(float(norms[1]), float(norms[0])),
        positions=positions[:3].T.copy(),
        slice_spacing=float(abs(steps[:, 2] @ normal)),
        shape=(n_i, n_j, n_k),
    )


@dataclass(frozen=True)
class _SourcePlane:
    position: np.ndarray  # (3,) LPS mm
    orientation: np.ndarray  # (6,)
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int

    def corners(self) -> np.ndarray:
        row_step = self.orientation[:3] * self.pixel_spacing[1]
        col_step = self.orientation[3:] * self.pixel_spacing[0]
        return _plane_corners(self.position, row_step, col_step, self.rows, self.columns)


def _floats(values: Any, n: int, what: str) -> np.ndarray:
    out = np.asarray([float(v) for v in values], dtype=np.float64)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise ValueError(f"{what} must hold {n} finite numbers")
    return out


def _source_planes(datasets: list[Any], multiframe: bool) -> list[_SourcePlane] | None:
    """Geometry of each source slice (or frame, in frame order); None where it is missing."""
    try:
        if not multiframe:
            return [
                _SourcePlane(
                    _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                    _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                    tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing")),  # type: ignore[arg-type]
                    int(ds.Rows), int(ds.Columns),
                )
                for ds in datasets
            ]
        ds = datasets[0]
        shared = ds.SharedFunctionalGroupsSequence[0]
        planes = []
        for frame in ds.PerFrameFunctionalGroupsSequence:

            def group(keyword: str, frame: Any = frame) -> Any:
                return (frame if keyword in frame else shared)[keyword][0]

            planes.append(_SourcePlane(
                _floats(group("PlanePositionSequence").ImagePositionPatient, 3, "position"),
                _floats(
                    group("PlaneOrientationSequence").ImageOrientationPatient, 6, "orientation"
                ),
                tuple(_floats(group("PixelMeasuresSequence").PixelSpacing, 2, "spacing")),  # type: ignore[arg-type]
                int(ds.Rows), int(ds.Columns),
            ))
        return planes
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None


def _match_source_planes(
    geometry: FrameGeometry, planes: list[_SourcePlane] | None
) -> list[int] | None:
    """For each map frame k, the index of the source plane whose voxels coincide with its
    voxels (within :data:`GEOMETRY_TOLERANCE_MM`); None unless every frame has one and no
    source plane is used twice, with as many planes as frames."""
    n_i, n_j, n_k = geometry.shape
    if planes is None or len(planes) != n_k:
        return None
    if any((p.rows, p.columns) != (n_j, n_i) for p in planes):
        return None
    source_corners = np.stack([p.corners() for p in planes])  # (n, 4, 3)
    match = []
    for k in range(n_k):
        distance = np.linalg.norm(source_corners - geometry.corners(k), axis=-1).max(axis=1)
        best = int(np.argmin(distance))
        if distance[best] > GEOMETRY_TOLERANCE_MM:
            return None
        match.append(best)
    return match if len(set(match)) == n_k else None


# -- source series ------------------------------------------------------------------------
def _read_source(source: DicomSource) -> list[Any]:
    """The source slice headers (pixel data not read), checked against ``source``."""
    import pydicom

    if not isinstance(source, DicomSource) or not source.files:
        raise DicomOutputError(
            "a DICOM output needs the scan's DICOM source series (Scan.dicom, or the "
            "DicomSource write_ct_series returns for a NIfTI scan); got none"
        )
    if source.multiframe and len(source.files) != 1:
        raise DicomOutputError(
            f"the DICOM source is marked multi-frame but lists {len(source.files)} files; "
            "a multi-frame source is exactly one file"
        )
    if not source.frame_of_reference_uid:
        raise DicomOutputError(
            f"the DICOM source series {source.series_uid} has no FrameOfReferenceUID, so a "
            "map cannot be placed on it; write the scan as a new CT series with "
            "write_ct_series and use that as the source"
        )
    datasets = []
    for path in source.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            raise DicomOutputError(
                f"{path}: cannot read this source slice ({err}); the DICOM outputs reference "
                "the source series, so it must still be readable where it was read from"
            ) from err
        for keyword, expected in (
            ("StudyInstanceUID", source.study_uid),
            ("FrameOfReferenceUID", source.frame_of_reference_uid),
        ):
            if str(ds.get(keyword, "")) != expected:
                raise DicomOutputError(
                    f"{path}: its {keyword} {ds.get(keyword, '(none)')} differs from the "
                    f"source series' {expected}; the files changed since the scan was read: "
                    "read the scan again"
                )
        for keyword in _TYPE2_SOURCE_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    return datasets


@dataclass
class _Placement:
    """How a derived image is placed: highdicom geometry arguments and referencing."""

    source_images: list[Any]
    frames: np.ndarray  # (K, rows, columns), frame k <-> map slice K = k
    on_source_grid: bool
    kwargs: dict[str, Any]


def _placement(
    frames: np.ndarray, affine: np.ndarray, source: DicomSource, what: str
) -> _Placement:
    """Source images and highdicom geometry for ``frames`` ``(K, J, I)`` (frame k = map
    slice K = k, i.e. ``values[:, :, k].T``) of a map with voxel -> RAS ``affine``."""
    import highdicom as hd

    n_k, n_j, n_i = frames.shape
    geometry = frame_geometry(affine, (n_i, n_j, n_k), what)
    datasets = _read_source(source)
    planes = _source_planes(datasets, source.multiframe)
    match = _match_source_planes(geometry, planes) if source.on_source_grid else None
    if match is not None and not source.multiframe:
        # Copy the source geometry; source image k is the slice of map frame k.
        return _Placement([datasets[m] for m in match], frames, True, {})
    patient = hd.CoordinateSystemNames.PATIENT
    if match is not None:  # multi-frame source: its exact planes; highdicom matches frames
        assert planes is not None
        positions = [planes[m].position for m in match]
        orientation, spacing = planes[0].orientation, planes[0].pixel_spacing
    else:
        positions = list(geometry.positions)
        orientation, spacing = geometry.orientation, geometry.pixel_spacing
    kwargs = {
        "plane_positions": [
            hd.PlanePositionSequence(patient, [float(x) for x in p]) for p in positions
        ],
        "plane_orientation": hd.PlaneOrientationSequence(
            patient, [float(x) for x in orientation]
        ),
        "pixel_measures": hd.PixelMeasuresSequence(
            [float(s) for s in spacing], geometry.slice_spacing, geometry.slice_spacing
        ),
    }
    return _Placement(datasets, frames, match is not None, kwargs)


def _drop_frame_references(dataset: Any) -> None:
    """Remove per-frame source references (a map off the source grid references the
    frame of reference only); Derivation Image Sequence is type 2, so it stays, empty."""
    for item in dataset.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" in item:
            item.DerivationImageSequence = []


def _text(value: str, limit: int = 64) -> str:
    """A DICOM LO value: no backslash, at most ``limit`` characters."""
    value = str(value).replace("\\", "/").strip()
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _check_names(finding: str, method: str, version: str) -> None:
    for name, value in (("finding", finding), ("method", method), ("version", version)):
        if not isinstance(value, str) or not value.strip():
            raise DicomOutputError(f"{name} must be a non-empty string; got {value!r}")


def _check_map(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as an array (not copied) after checking it is a real 3D map without
    infinite values (NaN is allowed: written as 0, or outside a segmentation)."""
    data = np.asarray(values)
    if data.ndim != 3 or min(data.shape) < 1:
        raise DicomOutputError(
            f"{what}: expected a 3D (I, J, K) map; got shape {data.shape}"
        )
    if data.dtype == bool or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise DicomOutputError(f"{what}: expected a real-valued map; got dtype {data.dtype}")
    if np.issubdtype(data.dtype, np.floating):
        n_inf = int(np.isinf(data).sum())
        if n_inf:
            raise DicomOutputError(
                f"{what}: the map has {n_inf} infinite values; DICOM stores finite numbers "
                "only: fix the map (e.g. clip it) before writing"
            )
    return data


def _equipment(method: str, version: str) -> dict[str, Any]:
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": _text(f"hirescam3d {method}"),
        "software_versions": _text(version),
        "device_serial_number": "0",
    }


def _derived(
    build: Any,
    what: str,
    path: str | Path,
    placement: _Placement,
    series_number: int,
    method: str,
    version: str,
    **kwargs: Any,
) -> Any:
    """A highdicom ``build`` (ParametricMap, Segmentation) of ``placement``'s frames as a
    new series derived from its source images; DicomOutputError naming ``path`` and
    ``what`` if highdicom refuses it. Off the source grid, per-frame source references
    are dropped."""
    import highdicom as hd

    try:
        dataset = build(
            source_images=placement.source_images,
            pixel_array=placement.frames,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            **kwargs,
            **_equipment(method, version),
            **placement.kwargs,
        )
    except (ValueError, TypeError) as err:
        raise DicomOutputError(
            f"{path}: cannot build the DICOM {what}: {err}; check that the source "
            "series is a consistent CT series"
        ) from err
    if not placement.on_source_grid:
        _drop_frame_references(dataset)
    if build is hd.pm.ParametricMap:
        # General Series Laterality (type 2C): the source's (same body part), else empty
        # (unknown); a map has no Image/Frame Laterality that would stand in for it. A
        # Segmentation has none: its Segment Sequence takes that role (dciodvfy refuses
        # Laterality there).
        dataset.Laterality = str(placement.source_images[0].get("Laterality", "") or "").strip()
    return dataset


def _save(path: str | Path, dataset: Any, force: bool) -> Path:
    return atomic_write(
        path, lambda tmp: dataset.save_as(tmp, enforce_file_format=True), force=force
    )


# -- parametric map -----------------------------------------------------------------------
def encode_map(values: np.ndarray, values_kind: str) -> tuple[np.ndarray, float, float]:
    """Quantise an ``(I, J, K)`` map for the Parametric Map.

    Returns ``(stored, slope, intercept)``: ``stored`` uint16 frames ``(K, J, I)`` (frame k
    is ``values[:, :, k].T``) with value = stored * slope + intercept; NaN -> 0 (see the
    module docstring for scaling and precision). Works in blocks of slices (float64).
    """
    data = np.asarray(values)
    if values_kind == "unit":
        slope, intercept = 1.0 / UNIT_SCALE, 0.0
    elif values_kind == "logit":
        peak = float(np.nanmax(np.abs(data))) if data.size and not np.isnan(data).all() else 0.0
        slope = (peak if peak > 0 else 1.0) / LOGIT_HALF_RANGE
        intercept = -LOGIT_ZERO * slope
    else:
        raise DicomOutputError(
            f"values_kind must be one of {', '.join(MAP_VALUE_KINDS)}; got {values_kind!r}"
        )
    n_i, n_j, n_k = data.shape
    stored = np.empty((n_k, n_j, n_i), dtype=np.uint16)
    block = max(1, (1 << 22) // max(1, n_i * n_j))
    for k0 in range(0, n_k, block):
        chunk = np.array(data[:, :, k0 : k0 + block].transpose(2, 1, 0), np.float64, order="C")
        nan = np.isnan(chunk)
        if nan.any():
            chunk[nan] = 0.0
        if values_kind == "unit":
            np.clip(chunk, 0.0, 1.0, out=chunk)
            chunk *= UNIT_SCALE
        else:
            chunk /= slope
            np.clip(chunk, -LOGIT_HALF_RANGE, LOGIT_HALF_RANGE, out=chunk)
            chunk += LOGIT_ZERO
        stored[k0 : k0 + block] = np.rint(chunk, out=chunk)
    return stored, slope, intercept


def _value_mapping(values_kind: str, slope: float, intercept: float, method: str, version: str):
    import highdicom as hd
    from highdicom.sr import CodeContentItem, CodedConcept, TextContentItem
    from pydicom.sr.codedict import codes

    if values_kind == "unit":
        unit = CodedConcept("1", "UCUM", "no units")
        label, explanation = "CAM_SCORE", "class activation, dimensionless display score 0..1"
    else:
        unit = CodedConcept("{logit}/{voxel}", "UCUM", "logit per voxel")
        label = "LOGIT_PER_VOXEL"
        explanation = "class activation, signed logit contribution per voxel"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=explanation,
        unit=unit,
        value_range=(0, 65535),
        slope=slope,
        intercept=intercept,
        quantity_definition=codes.DCM.ClassActivation,
    )
    # The algorithm items are further items of the Quantity Definition Sequence (each a
    # Content Item Macro: "other items may be concept modifiers"), not a nested Content
    # Item Modifier Sequence, which that macro does not have.
    mapping.QuantityDefinitionSequence.extend([
        TextContentItem(codes.DCM.AlgorithmName, _text(f"hirescam3d {method}")),
        TextContentItem(codes.DCM.AlgorithmVersion, _text(version)),
        CodeContentItem(codes.DCM.AlgorithmFamily, codes.cid7162.ArtificialIntelligence),
    ])
    return mapping


def write_parametric_map(
    path: str | Path,
    values: np.ndarray,
    affine: np.ndarray,
    source: DicomSource,
    *,
    finding: str,
    method: str,
    values_kind: str = "unit",
    version: str,
    force: bool = False,
    series_number: int = 900,
) -> Path:
    """Write one explanation map as a DICOM Parametric Map referencing ``source``.

    ``values``: ``(I, J, K)`` map (float; ``values_kind="unit"``: [0, 1] display score,
    ``"logit"``: signed logits per voxel); ``affine``: its voxel -> RAS mm affine (the
    scan's, or the model grid's); ``source``: the scan's DICOM series (``Scan.dicom``, or
    what :func:`write_ct_series` returned). Stored as uint16 with a real-world value
    mapping (precision: unit +-7.6e-6, logit +-max|values|/65534); SeriesDescription
    ``hirescam3d: <finding> (<method>)``. Written atomically; an existing ``path`` is an
    :class:`~hirescam3d.io.scans.OutputError` unless ``force``. Returns ``path``.
    """
    import highdicom as hd

    _check_names(finding, method, version)
    what = f"{path}"
    data = _check_map(values, what)
    stored, slope, intercept = encode_map(data, values_kind)
    placement = _placement(stored, affine, source, what)
    mapping = _value_mapping(values_kind, slope, intercept, method, version)
    if values_kind == "unit":
        window = hd.VOILUTTransformation(window_center=UNIT_SCALE / 2.0, window_width=65536.0)
    else:
        window = hd.VOILUTTransformation(window_center=float(LOGIT_ZERO), window_width=65535.0)
    pm = _derived(
        hd.pm.ParametricMap, "Parametric Map", path, placement, series_number, method, version,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[window],
        content_label="CLASS_ACTIVATION",
        content_description=_text(f"hirescam3d {method} explanation of {finding}"),
        series_description=_text(f"hirescam3d: {finding} ({method})"),
    )  # fmt: skip
    pm.DerivationDescription = _text(
        f"hirescam3d {method} {version}: class activation of {finding} "
        f"({'logit per voxel' if values_kind == 'logit' else 'display score 0..1'})",
        1024,
    )
    return _save(path, pm, force)


# -- segmentation -------------------------------------------------------------------------
def write_segmentation(
    path: str | Path,
    values: np.ndarray,
    affine: np.ndarray,
    source: DicomSource,
    *,
    threshold: float,
    finding: str,
    method: str,
    version: str,
    force: bool = False,
    series_number: int = 901,
) -> Path:
    """Write ``values >= threshold`` as a binary DICOM Segmentation referencing ``source``.

    ``values``/``affine``/``source`` as in :func:`write_parametric_map` (``threshold`` in
    the map's units; NaN voxels are outside). One segment, labelled
    ``<finding> <method> >= <threshold>``, segmented property DCM 130402 "Class
    activation" (category SCT "Spatial and Relational Concept"), algorithm "hirescam3d
    <method>" (family "Artificial Intelligence", ``version``). Frames without a voxel
    above the threshold are omitted; a map entirely below the threshold is not an error:
    it gives a valid Segmentation whose one segment is empty (every frame present, all
    zero). Written atomically; ``force`` as in :func:`write_parametric_map`.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _check_names(finding, method, version)
    what = f"{path}"
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as err:
        raise DicomOutputError(f"{what}: threshold must be a number; got {threshold!r}") from err
    if not np.isfinite(threshold):
        raise DicomOutputError(f"{what}: threshold must be finite; got {threshold}")
    data = _check_map(values, what)
    mask = np.ascontiguousarray((data >= threshold).transpose(2, 1, 0))  # NaN: outside
    placement = _placement(mask, affine, source, what)
    label = _text(f"{finding} {method} >= {threshold:g}")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.cid7150.SpatialAndRelationalConcept,
        segmented_property_type=codes.DCM.ClassActivation,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=_text(f"hirescam3d {method}"),
            family=codes.cid7162.ArtificialIntelligence,
            version=_text(version),
            source=MANUFACTURER,
            parameters={"finding": _text(finding, 32), "threshold": f"{threshold:g}"},
        ),
    )
    description.SegmentDescription = _text(
        f"class activation of {finding} by hirescam3d {method} >= {threshold:g}"
    )
    seg = _derived(
        hd.seg.Segmentation, "Segmentation", path, placement, series_number, method, version,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        content_label="CAM_REGION",
        content_description=_text(f"hirescam3d {method}: {finding} >= {threshold:g}"),
        series_description=_text(f"hirescam3d: {finding} ({method}) >= {threshold:g}"),
    )  # fmt: skip
    return _save(path, seg, force)


# -- CT series ----------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A number as a DICOM DS string (at most 16 characters, full precision kept)."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def ct_rescale(array: np.ndarray) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept for storing HU ``array`` as int16 (HU = stored *
    slope + intercept). Whole HU within int16 are stored exactly (slope 1, intercept 0);
    other values use the finest slope that fits their range (error <= slope / 2)."""
    data = np.asarray(array)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    whole = np.issubdtype(data.dtype, np.integer) or all(
        np.array_equal(plane, np.rint(plane)) for plane in np.moveaxis(data, -1, 0)
    )
    if whole and lo >= -32768 and hi <= 32767:
        return 1.0, 0.0
    intercept = float(_ds((lo + hi) / 2.0))
    slope = float(_ds(max((hi - lo) / 65534.0, 1e-6) * (1 + 1e-9)))
    return slope, intercept


def _ct_frame(plane: np.ndarray, slope: float, intercept: float) -> bytes:
    """One ``(I, J)`` slice as little-endian int16 pixel data, rows = J."""
    values = np.asarray(plane, dtype=np.float64).T
    if (slope, intercept) != (1.0, 0.0):
        values = np.rint((values - intercept) / slope)
    return np.clip(values, -32768, 32767).astype("<i2").tobytes()


def _refuse_existing_folder(folder: Path, force: bool) -> bool:
    """True if ``folder`` exists and will be replaced; raise if it may not be."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; choose another output folder")
    entries = list(folder.iterdir())
    if not entries:
        return True
    if not force:
        raise OutputError(
            f"output folder {folder} already holds {len(entries)} files; use --force "
            "(force=True) to replace the series, or choose another output folder"
        )
    others = [p.name for p in entries if not (p.is_file() and looks_like_dicom(p))]
    if others:
        raise OutputError(
            f"output folder {folder} holds files that are not DICOM ({', '.join(others[:3])}"
            f"{' ...' if len(others) > 3 else ''}); it is not replaced even with --force: "
            "choose a new folder for the DICOM series"
        )
    return True


class _SeriesUids(NamedTuple):
    """The fresh UIDs of a written CT series."""

    study: str
    series: str
    frame_of_reference: str


def write_ct_series(
    folder: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    force: bool = False,
    description: str = "hirescam3d: CT converted from NIfTI",
    patient_id: str = "",
    patient_name: str = "",
    series_number: int = 1,
) -> DicomSource:
    """Write an ``(I, J, K)`` HU volume as a DICOM CT series, one file per K slice.

    ``affine``: voxel -> RAS mm. Slice ``k`` (file ``CT00001.dcm`` ... in K order) holds
    ``array[:, :, k].T`` as int16 with RescaleSlope/Intercept (exact for whole HU; see
    :func:`ct_rescale`), and ImagePositionPatient / ImageOrientationPatient / PixelSpacing /
    SliceThickness from the affine (see the module docstring). Fresh Study, Series, Frame
    of Reference and SOP Instance UIDs. All files are written into a temporary folder
    beside ``folder`` which then replaces it, so an error leaves no partial folder. An
    existing non-empty ``folder`` is an :class:`~hirescam3d.io.scans.OutputError` unless
    ``force`` (and even then if it holds anything but DICOM files). ``patient_id`` (LO,
    cut to 64 characters): PatientID, which DICOMDIR records and PACS need; the command
    line passes the scan's file name. Returns the series' :class:`DicomSource` (files in
    K order).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    data = _ct_volume(folder, array)
    geometry = frame_geometry(affine, data.shape, str(folder))
    rescale = ct_rescale(data)
    replace = _refuse_existing_folder(folder, force)
    ensure_folder(folder.parent)

    uids = _SeriesUids(*(generate_uid(prefix=None) for _ in range(3)))
    base = _ct_series_base(
        uids, description=description, patient_id=patient_id, patient_name=patient_name,
        series_number=series_number,
    )
    base.update(_ct_image_attributes(geometry, rescale))
    names = [f"CT{k + 1:05d}.dcm" for k in range(geometry.shape[2])]
    _write_ct_folder(
        folder, replace, lambda tmp: _write_ct_slices(tmp, names, base, data, geometry, rescale)
    )
    return DicomSource(
        files=tuple(folder / name for name in names),
        study_uid=uids.study,
        series_uid=uids.series,
        frame_of_reference_uid=uids.frame_of_reference,
    )


def _ct_volume(folder: Path, array: np.ndarray) -> np.ndarray:
    """``array`` if it is a 3D ``(I, J, K)`` volume of finite values, else
    :class:`DicomOutputError` (naming ``folder``)."""
    data = np.asarray(array)
    if data.ndim != 3 or min(data.shape) < 1:
        raise DicomOutputError(f"{folder}: expected a 3D (I, J, K) volume; got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DicomOutputError(
            f"{folder}: the volume has NaN or infinite voxels; fill them (e.g. with -1000 HU) "
            "before writing a CT series"
        )
    return data


def _ct_series_base(
    uids: _SeriesUids,
    *,
    description: str,
    patient_id: str,
    patient_name: str,
    series_number: int,
) -> Any:
    """The pydicom Dataset of who, what and when every slice of the CT series shares:
    patient, study, series and equipment, frame of reference, dated now."""
    from pydicom.dataset import Dataset

    from hirescam3d import __version__

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.SOPClassUID = CT_IMAGE_STORAGE
    base.StudyDate = base.SeriesDate = base.ContentDate = date
    base.StudyTime = base.SeriesTime = base.ContentTime = time
    base.AccessionNumber = ""
    base.Modality = "CT"
    base.Manufacturer = MANUFACTURER
    base.ReferringPhysicianName = ""
    base.SeriesDescription = _text(description)
    base.DerivationDescription = "converted to DICOM by hirescam3d"
    base.PatientName = patient_name
    base.PatientID = _text(patient_id)
    base.PatientBirthDate = ""
    base.PatientSex = ""
    base.SoftwareVersions = _text(f"hirescam3d {__version__}")
    base.StudyInstanceUID = uids.study
    base.SeriesInstanceUID = uids.series
    base.StudyID = date + time  # 14 characters (SH: 16); DICOMDIR records need one
    base.SeriesNumber = series_number
    base.Laterality = ""  # type 2C: the body part, and so its laterality, is unknown
    base.PatientPosition = ""  # type 2C for CT: unknown (NIfTI does not record it)
    base.AcquisitionNumber = ""
    base.FrameOfReferenceUID = uids.frame_of_reference
    base.PositionReferenceIndicator = ""
    return base


def _ct_image_attributes(geometry: FrameGeometry, rescale: tuple[float, float]) -> Any:
    """The pydicom Dataset of the image attributes every slice shares: plane orientation
    and spacing (mm), int16 pixels with ``rescale`` = (RescaleSlope, RescaleIntercept) to
    HU, a soft-tissue window."""
    from pydicom.dataset import Dataset

    slope, intercept = rescale
    image = Dataset()
    image.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    image.KVP = ""
    image.ImageOrientationPatient = [_ds(x) for x in geometry.orientation]
    image.SamplesPerPixel = 1
    image.PhotometricInterpretation = "MONOCHROME2"
    image.Rows, image.Columns = geometry.shape[1], geometry.shape[0]
    image.PixelSpacing = [_ds(s) for s in geometry.pixel_spacing]
    image.SliceThickness = _ds(geometry.slice_spacing)
    image.BitsAllocated = 16
    image.BitsStored = 16
    image.HighBit = 15
    image.PixelRepresentation = 1
    image.WindowCenter = "40"
    image.WindowWidth = "400"
    image.RescaleIntercept = _ds(intercept)
    image.RescaleSlope = _ds(slope)
    image.RescaleType = "HU"
    image.BurnedInAnnotation = "NO"
    return image


def _write_ct_slices(
    folder: Path,
    names: list[str],
    base: Any,
    data: np.ndarray,
    geometry: FrameGeometry,
    rescale: tuple[float, float],
) -> None:
    """Write slice ``k`` of ``data`` ``(I, J, K)`` to ``folder / names[k]``: ``base`` plus
    its SOP Instance UID, number, position and int16 pixels (``rescale`` = slope,
    intercept)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    normal = np.cross(geometry.orientation[:3], geometry.orientation[3:])
    for k, name in enumerate(names):
        ds = Dataset()
        ds.update(base)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(None)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(x) for x in geometry.positions[k]]
        ds.SliceLocation = _ds(float(geometry.positions[k] @ normal))
        ds.PixelData = _ct_frame(data[:, :, k], *rescale)
        atomic_write(
            folder / name,
            lambda path, ds=ds: ds.save_as(path, enforce_file_format=True),
        )


def _write_ct_folder(folder: Path, replace: bool, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp)`` on a temporary folder beside ``folder``, then rename it to
    ``folder`` (an existing ``folder``, which ``replace`` says is there, is moved aside
    and removed last); on any error put everything back as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old: Path | None = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if replace:
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as err:
        _restore(tmp, old, folder)
        raise OutputError(f"cannot write the CT series to {folder}: {err.strerror or err}") from err
    except BaseException:
        _restore(tmp, old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _restore(tmp: Path, old: Path | None, folder: Path) -> None:
    """Undo a failed :func:`_write_ct_folder`: drop the temporary folder, put back the old."""
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and old.exists() and not folder.exists():
        os.replace(old, folder)
