"""Output files of an explanation: names, atomic writes and the writers.

One place for everything :func:`hirescam3d.pipeline.explain_scan`, ``hirescam3d batch``
and the napari plugin put on disk:

- naming: ``<stem>_<finding>_<method>.nii.gz`` per map (:func:`map_file_name`,
  :func:`output_paths`) and the parsing of those names back (:func:`parse_map_name`,
  which prefers the ``report.json`` beside a map over guessing);
- atomic writes (:func:`atomic_write`, from :mod:`hirescam3d.io.atomic`): a temporary file
  beside the target, renamed into place, so a crash or a bad input never leaves a partial
  output;
- writers: NIfTI explanation maps (:func:`write_map`, streamed and compressed on every
  core), label maps (:func:`write_labels`), ``report.json`` (:func:`write_json`).

Storage types of a map (:data:`DTYPES`): ``float32`` (exact), ``int16`` and ``uint8``
(scaled integers with ``scl_slope``; ``uint8`` only for [0, 1] display maps, with
``scl_slope = 1/255``). NIfTI has no half-float type (nibabel refuses ``float16`` and
ITK reads none), so the 16-bit choice is ``int16``. :data:`FORMATS` lists the map
formats: NIfTI, and DICOM Parametric Maps and Segmentations (:class:`DicomMaps`, written
with :mod:`hirescam3d.io.dicom_write`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.errors import HiResCAMError
from hirescam3d.io.atomic import (  # noqa: F401 - check_writable, ensure_folder kept importable here
    atomic_write,
    atomic_write_text,
    check_writable,
    ensure_folder,
)
from hirescam3d.io.gzip_stream import write_gzip
from hirescam3d.io.nifti import _matrix_problem, affine_distance_mm
from hirescam3d.io.scans import SCAN_SUFFIXES, OutputError  # noqa: F401 - kept importable here

# An output's qform is written (code 1) only where it matches the sform this closely.
QFORM_TOLERANCE_MM = 1e-4
# Map formats and their file-name endings: NIfTI maps, DICOM Parametric Maps, and DICOM
# Segmentations of the maps thresholded at --seg-threshold.
FORMATS = {"nifti": ".nii.gz", "dicom": "_pm.dcm", "dicom-seg": "_seg.dcm"}
DICOM_FORMATS = ("dicom", "dicom-seg")
DTYPES = ("float32", "int16", "uint8")
# The findings of the chest models (hirescam3d.models.zoo takes them from here): without a
# report.json beside a map, parse_map_name splits its name by these.
CHEST_FINDINGS = (
    "atelectasis",
    "pleural_effusion",
    "cardiomegaly",
    "nodule",
    "pericardial_effusion",
)
GRIDS = ("scan", "model")
VALUES = ("unit", "logit")
# Deflate level per storage type, chosen from measurements on a 300 x 512 x 512 map
# (benchmarks/bench_scale.py): float32 compresses only ~4.5:1 whatever the level, and
# level 6 takes 2x the time of level 1 for 3 % less; integer maps are mostly runs, where
# level 6 halves the uint8 file for little time.
# Levels are zlib's; levels 0-1 are deflated by ISA-L's igzip at the same size, 7.5x faster
# (hirescam3d.io.gzip_stream, benchmarks/bench_write.py).
COMPRESSLEVEL = {"float32": 1, "int16": 1, "uint8": 6}
# Bytes per compressed block: blocks are deflated in parallel (one stream, pigz-style,
# hirescam3d.io.gzip_stream).
_BLOCK = 8 << 20
_INT_MAX = {"int16": 32767, "uint8": 255}
_NIFTI_HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4-byte (empty) extension flag


# -- names --------------------------------------------------------------------------------
def map_file_name(stem: str, finding: str, method: str, fmt: str = "nifti") -> str:
    """``<stem>_<finding>_<method>`` plus the format's suffix (``.nii.gz`` for NIfTI)."""
    if fmt not in FORMATS:
        raise HiResCAMError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    return f"{stem}_{finding}_{method}{FORMATS[fmt]}"


def mask_file_name(stem: str, finding: str) -> str:
    """``<stem>_<finding>_predicted_mask.nii.gz``: a finding's predicted mask (label map)."""
    return f"{stem}_{finding}_predicted_mask.nii.gz"


def split_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti, PNG"`` or a list -> lower-case names, in order, once each (not checked)."""
    parts = formats.split(",") if isinstance(formats, str) else list(formats)
    return tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))


def check_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,dicom"`` or ``["nifti", "dicom-seg"]`` -> the formats, in order, once each.

    Raises :class:`HiResCAMError` for an unknown or empty choice."""
    chosen = split_formats(formats)
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise HiResCAMError(
            f"unknown output format {', '.join(unknown) or '(none)'}; choose one or more of "
            f"{', '.join(FORMATS)}, separated by commas (e.g. nifti,dicom)"
        )
    return chosen


def map_key(finding: str, method: str, fmt: str = "nifti") -> str:
    """The key of a map in :func:`output_paths`: ``"<finding>/<method>"`` for NIfTI,
    ``"<finding>/<method>/<fmt>"`` for the others."""
    return f"{finding}/{method}" if fmt == "nifti" else f"{finding}/{method}/{fmt}"


def output_paths(
    out_dir: str | Path,
    stem: str,
    findings: Sequence[str],
    methods: Sequence[str],
    png: bool = False,
    report_name: str = "report.json",
    formats: Sequence[str] = ("nifti",),
    ct_series: bool = False,
    masks: bool = False,
) -> dict[str, Path]:
    """Every file an explanation run writes: keys ``"<finding>/<method>"`` (NIfTI maps),
    ``"<finding>/<method>/<format>"`` (DICOM maps), ``"<finding>/<method>/png"``
    (montages), ``"<finding>/mask"`` (with ``masks``: a segmentation model's predicted
    mask of the finding, :func:`mask_file_name`), ``"ct_dicom"`` (with ``ct_series``: the
    folder of the scan written as a DICOM CT series) and ``"report"``."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for f in findings:
        if masks:
            paths[f"{f}/mask"] = out / mask_file_name(stem, f)
        for m in methods:
            for fmt in formats:
                paths[map_key(f, m, fmt)] = out / map_file_name(stem, f, m, fmt)
            if png:
                paths[f"{f}/{m}/png"] = out / f"{stem}_{f}_{m}.png"
    if ct_series:
        paths["ct_dicom"] = out / f"{stem}_ct_dicom"
    paths["report"] = out / report_name
    return paths


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (*SCAN_SUFFIXES, *FORMATS.values(), ".png"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _from_report(path: Path) -> tuple[str, str] | None:
    """``(finding, method)`` of ``path`` from the ``report.json`` beside it, if it lists it."""
    report = path.parent / "report.json"
    try:
        outputs = json.loads(report.read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(outputs, dict):
        return None
    for finding, by_method in outputs.items():
        for method, name in (by_method if isinstance(by_method, dict) else {}).items():
            if name == path.name:
                return str(finding), str(method)
    return None


def parse_map_name(
    path: str | Path,
    findings: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
) -> tuple[str | None, str | None, str | None]:
    """``(stem, finding, method)`` of a map file named by :func:`map_file_name`.

    The ``report.json`` written beside the maps names each file's finding and method
    exactly; without it the name is split by the known ``methods`` (default: every
    registered method) and ``findings`` (default: the chest zoo's), longest match first,
    since stems and findings may hold underscores. Parts that cannot be told are None.
    """
    path = Path(path)
    base = _strip_suffix(path.name)
    known = _from_report(path)
    if known is not None:
        finding, method = known
        tail = f"_{finding}_{method}"
        return (base[: -len(tail)] if base.endswith(tail) else None), finding, method
    if methods is None:
        from hirescam3d.core.methods import METHODS

        methods = list(METHODS)
    if findings is None:
        findings = list(CHEST_FINDINGS)
    method = max((m for m in methods if base.endswith(f"_{m}")), key=len, default=None)
    if method is None:
        return None, None, None
    rest = base[: -len(method) - 1]
    finding = max((f for f in findings if rest.endswith(f"_{f}")), key=len, default=None)
    if finding is None:
        return None, None, method
    return rest[: -len(finding) - 1] or None, finding, method


def _json_safe(value: Any) -> Any:
    """Replace NaN/Inf floats (not valid JSON) with None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Any, force: bool = False) -> Path:
    """Write ``data`` as indented JSON (NaN/Inf as null), atomically."""
    text = json.dumps(_json_safe(data), indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)


# -- NIfTI --------------------------------------------------------------------------------
def _check_geometry(volume: np.ndarray, affine: np.ndarray, what: str) -> np.ndarray:
    """The affine as float64 after checking it and the volume's rank (HiResCAMError)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise HiResCAMError(f"{what}: the affine must be a 4x4 matrix; got shape {affine.shape}")
    problem = _matrix_problem(affine, ("row x", "row y", "row z"))
    if problem:
        raise HiResCAMError(f"{what}: the affine is unusable: {problem}; pass the scan's affine")
    if volume.ndim != 3:
        raise HiResCAMError(f"{what}: expected a 3D (I, J, K) volume; got shape {volume.shape}")
    return affine


def _nifti_image(data: np.ndarray, affine: np.ndarray, source_header: Any = None):
    """A NIfTI-1 image with sform = ``affine`` (code 1) and no intensity scaling.

    The qform holds the same affine with code 1 where it can, i.e. where the nearest
    rotation + zooms puts every voxel within :data:`QFORM_TOLERANCE_MM` of the sform; a
    sheared affine gets qform_code 0 (a viewer reading a qform would misplace the map).
    Only the spatial unit is taken from ``source_header`` (so the affine keeps its
    meaning); nothing else of the source (scaling, intent, extensions) carries over.
    ``data`` may be a zero-strided placeholder: only its shape and dtype are used when
    the header alone is needed.
    """
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    hdr = img.header
    if affine_distance_mm(hdr.get_qform(), hdr.get_sform(), data.shape) > QFORM_TOLERANCE_MM:
        img.set_qform(affine, code=0)
    img.header.set_slope_inter(np.nan, np.nan)
    unit = "mm"
    if source_header is not None and hasattr(source_header, "get_xyzt_units"):
        source_unit = source_header.get_xyzt_units()[0]
        unit = source_unit if source_unit != "unknown" else unit
    img.header.set_xyzt_units(unit, "sec")
    return img


def storage(volume: np.ndarray, values: str, dtype: str) -> tuple[float, float, float]:
    """``(scl_slope, cal_min, cal_max)`` for storing ``volume`` as ``dtype``.

    ``unit`` maps: ``cal`` 0..1; slope 1/255 (uint8), 1/32767 (int16), NaN (float32: no
    scaling). ``logit`` maps: ``cal`` symmetric about 0; slope max|x|/32767 for int16.
    Raises :class:`HiResCAMError` for ``uint8`` with logit maps (signed values).
    """
    if dtype not in DTYPES:
        raise HiResCAMError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if values not in VALUES:
        raise HiResCAMError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    check_dtype(values, dtype)
    if values == "unit":
        low, high = 0.0, 1.0
    else:
        high = _abs_max(volume)
        low = -high
    if dtype == "float32":
        return math.nan, low, high
    top = _INT_MAX[dtype]
    # float32, as the header stores it, so that writing and reading scale alike
    slope = float(np.float32(1.0 / top if values == "unit" else (high / top if high > 0 else 1.0)))
    return slope, low, high


def check_dtype(values: str, dtype: str) -> None:
    """Refuse storage types that cannot hold the values (uint8 for signed logit maps)."""
    if dtype == "uint8" and values == "logit":
        raise HiResCAMError(
            "--dtype uint8 stores [0, 1] display maps (255 steps, scl_slope = 1/255); logit "
            "maps are signed contributions: use --dtype float32 (exact) or int16 (65535 "
            "steps over -max..max)"
        )


def _abs_max(volume: np.ndarray) -> float:
    if volume.size == 0:
        return 0.0
    return float(max(abs(float(np.nanmin(volume))), abs(float(np.nanmax(volume)))))


def nifti_header(
    shape: Sequence[int],
    affine: np.ndarray,
    dtype: str,
    method: str,
    values: str = "unit",
    slope: float = math.nan,
    cal: tuple[float, float] = (0.0, 1.0),
    source_header: Any = None,
) -> Any:
    """The NIfTI-1 header of an explanation map (single file, data at byte 352).

    Intent "estimate" named ``method`` (``unit`` maps) or ``logit/voxel`` (``logit``),
    ``cal_min``/``cal_max`` from ``cal``, ``scl_slope`` = ``slope`` (NaN: no scaling) and
    ``scl_inter`` 0, sform (and qform unless sheared) = ``affine``.
    """
    placeholder = np.broadcast_to(np.zeros((), dtype=np.dtype(dtype)), tuple(shape))
    img = _nifti_image(placeholder, affine, source_header)
    hdr = img.header
    if values == "unit":
        name, text = method[:16], f"hirescam3d {method} explanation"
    else:
        name, text = "logit/voxel", f"hirescam3d {method} contribution, logit per voxel"
    hdr.set_intent("estimate", (), name=name)
    hdr["cal_min"], hdr["cal_max"] = cal
    hdr["descrip"] = text[:80].encode()
    if math.isfinite(slope):
        hdr.set_slope_inter(slope, 0.0)
    hdr["vox_offset"] = _NIFTI_HEADER_BYTES
    return hdr


def _encode(
    volume: np.ndarray, dtype: str, slope: float, values: str, checked: bool = False
) -> Iterator[bytes | memoryview]:
    """The voxels as NIfTI bytes (Fortran order: i fastest), one slab of k at a time.

    Values are NaN-free (NaN -> 0); ``unit`` maps are clipped to [0, 1]; integer types
    are ``round(x / slope)``. ``checked``: the values are known to be so already.
    """
    k_total = volume.shape[2]
    per_k = max(1, _BLOCK // max(1, volume.shape[0] * volume.shape[1] * 4))
    native = np.dtype(np.float32).newbyteorder("<")
    for k0 in range(0, k_total, per_k):
        slab = volume[:, :, k0 : k0 + per_k].transpose(2, 1, 0)  # (k, j, i): C order = F bytes
        if dtype == "float32" and slab.dtype == native and slab.flags.c_contiguous:
            if checked:
                yield memoryview(slab).cast("B")
                continue
            lo, hi = float(slab.min()), float(slab.max())  # NaN shows in both
            if math.isfinite(lo) and math.isfinite(hi) and (values != "unit" or 0 <= lo <= hi <= 1):
                yield memoryview(slab).cast("B")  # already what is stored: no copy
                continue
        data = np.nan_to_num(np.asarray(slab, dtype=np.float32), nan=0.0)
        if values == "unit":
            np.clip(data, 0.0, 1.0, out=data)
        if dtype != "float32":
            top = _INT_MAX[dtype]
            data = np.clip(np.rint(data / np.float32(slope)), -top if dtype == "int16" else 0, top)
        yield np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def write_map(
    path: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    method: str,
    values: str = "unit",
    dtype: str = "float32",
    source_header: Any = None,
    force: bool = False,
    level: int | None = None,
    checked: bool = False,
) -> Path:
    """Write an explanation map ``(I, J, K)`` as NIfTI (``.nii.gz`` or ``.nii``), atomically.

    ``values="unit"``: [0, 1] display maps (clipped), intent name ``method``, ``cal``
    0..1; ``"logit"``: signed logits per voxel of this grid, intent name ``logit/voxel``,
    ``cal`` symmetric about 0 so viewers centre a diverging colormap on 0. ``dtype``:
    see :func:`storage`; integer maps carry ``scl_slope`` so every reader gets the values
    back within half a step. ``affine``: voxel -> RAS mm, stored exactly as the sform
    (code 1) and as the qform (code 1) unless sheared. ``.nii.gz`` is deflated at
    ``level`` (default :data:`COMPRESSLEVEL`) on every core. An existing file is an
    :class:`OutputError` unless ``force``; a bad input raises before the file exists.
    An F-ordered ``volume`` (as the pipeline makes them) is encoded without copies.
    ``checked``: the caller vouches that every value is finite and, for ``unit`` maps, in
    [0, 1] (the pipeline's clipped maps of finite cells), so a float32 map is written
    without the check, one pass over the map less.
    """
    volume = np.asarray(volume)
    affine = _check_geometry(volume, affine, str(path))
    if not np.issubdtype(volume.dtype, np.floating) and not np.issubdtype(
        volume.dtype, np.integer
    ):
        raise HiResCAMError(f"{path}: expected a real-valued map; got dtype {volume.dtype}")
    slope, low, high = storage(volume, values, dtype)
    hdr = nifti_header(volume.shape, affine, dtype, method, values, slope, (low, high),
                       source_header)
    head = hdr.binaryblock + b"\x00" * 4
    level = COMPRESSLEVEL[dtype] if level is None else int(level)

    def pieces() -> Iterator[bytes | memoryview]:
        yield head
        yield from _encode(volume, dtype, slope, values, checked)

    def write(tmp: Path) -> None:
        if tmp.name.lower().endswith(".gz"):
            write_gzip(tmp, pieces(), level)
        else:
            with open(tmp, "wb") as f:
                for piece in pieces():
                    f.write(piece)

    return atomic_write(path, write, force=force)


def write_explanation(
    path: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    method: str,
    source_header: Any = None,
    force: bool = False,
    values: str = "unit",
    dtype: str = "float32",
) -> Path:
    """:func:`write_map` with the argument order of earlier releases (kept for callers)."""
    return write_map(path, volume, affine, method, values, dtype, source_header, force)


def write_labels(
    path: str | Path,
    labels: np.ndarray,
    affine: np.ndarray,
    force: bool = False,
    name: str = "organs",
) -> Path:
    """Write a label map ``(I, J, K)`` (uint8) as NIfTI with ``affine`` (sform code 1; qform
    code 1 unless sheared, as in :func:`write_map`); ``name``: the intent name."""
    labels = np.asarray(labels)
    affine = _check_geometry(labels, affine, str(path))
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise HiResCAMError(f"{path}: labels must lie in 0..255 to be stored as uint8")
    data = np.ascontiguousarray(labels, dtype=np.uint8)

    def write(tmp: Path) -> None:
        import nibabel as nib

        img = _nifti_image(data, affine)
        img.header.set_intent("label", (), name=name)
        img.header["cal_min"] = 0.0
        img.header["cal_max"] = float(data.max()) if data.size else 0.0
        nib.save(img, str(tmp))

    return atomic_write(path, write, force=force)


# -- DICOM --------------------------------------------------------------------------------
class DicomMaps:
    """The DICOM outputs of one run: a Parametric Map (``"dicom"``) and/or a Segmentation
    at ``seg_threshold`` (``"dicom-seg"``) per map, referencing the scan's series.

    A scan read from DICOM is referenced as it is (maps on its grid reference each source
    slice). Any other scan is first written as a DICOM CT series into ``ct_folder`` with
    fresh UIDs, reoriented to axial slices (LPS: rows anterior to posterior, columns
    right to left, slices inferior to superior), so PACS can load the pair; the maps
    are reoriented the same way. Positions in the patient frame do not change.
    """

    def __init__(
        self,
        scan: Any,
        formats: Sequence[str],
        seg_threshold: float,
        ct_folder: Path | None,
        stem: str,
        force: bool = False,
    ) -> None:
        from hirescam3d import __version__
        from hirescam3d.io import dicom_write as dicom_out
        from hirescam3d.io.scans import reorient

        self.formats = [f for f in formats if f in DICOM_FORMATS]
        self.seg_threshold = float(seg_threshold)
        self.force = force
        self.version = __version__
        self.axial = scan.dicom is None
        self._series = 900
        if scan.dicom is not None:
            self.source = scan.dicom
        else:
            if ct_folder is None:
                raise HiResCAMError("DICOM outputs of a non-DICOM scan need a CT series folder")
            array, affine = reorient(scan.array, scan.affine, "LPS")
            self.source = dicom_out.write_ct_series(
                ct_folder, array, affine, force=force, description=f"hirescam3d: {stem}",
                patient_id=stem,  # the scan's name: a PACS files each scan as its own patient
            )

    def write(
        self,
        paths: dict[str, Path],
        volume: np.ndarray,
        affine: np.ndarray,
        finding: str,
        method: str,
        values: str,
    ) -> dict[str, Path]:
        """Write ``volume`` ``(I, J, K)`` (voxel -> RAS ``affine``) in each DICOM format;
        returns ``{key: path}``."""
        from hirescam3d.io import dicom_write as dicom_out
        from hirescam3d.io.scans import reorient

        if self.axial:
            volume, affine = reorient(volume, affine, "LPS")
        written = {}
        for fmt in self.formats:
            key = map_key(finding, method, fmt)
            self._series += 1
            common = {"finding": finding, "method": method, "version": self.version,
                      "force": self.force, "series_number": self._series}  # fmt: skip
            if fmt == "dicom":
                written[key] = dicom_out.write_parametric_map(
                    paths[key], volume, affine, self.source, values_kind=values, **common
                )
            else:
                empty = not bool(np.any(volume >= self.seg_threshold))
                if empty:  # ours, in place of the DICOM library's log line
                    import warnings

                    warnings.warn(
                        f"{Path(paths[key]).name}: no voxel of the {finding} {method} map "
                        f"reaches --seg-threshold {self.seg_threshold:g}, so its Segmentation "
                        "is empty; lower --seg-threshold to segment the map", stacklevel=2,
                    )  # fmt: skip
                with _quiet_logger("highdicom.image", empty):
                    written[key] = dicom_out.write_segmentation(
                        paths[key], volume, affine, self.source, threshold=self.seg_threshold,
                        **common,
                    )  # fmt: skip
        return written


@contextlib.contextmanager
def _quiet_logger(name: str, quiet: bool = True) -> Iterator[None]:
    """Silence the ``logging`` logger ``name`` below ERROR for the block (if ``quiet``)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
