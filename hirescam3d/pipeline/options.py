"""The options of a run, checked before any work: model, device, findings, methods, storage.

:func:`check_request` checks what :func:`~hirescam3d.pipeline.arrays.explain_arrays` is
given (:class:`ArrayRequest`), :func:`check_scan_options` what
:func:`~hirescam3d.pipeline.scan.explain_scan` is given and where its files go
(:class:`ScanOptions`). Also the constants and type aliases the stages share, and
:func:`software_versions` (what the report records about the software).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hirescam3d.core.methods import get_method
from hirescam3d.errors import HiResCAMError, InputError, ModelError, TargetError
from hirescam3d.models.bundle import ModelInfo
from hirescam3d.models.handle import ModelHandle, match_findings
from hirescam3d.pipeline.regions import RegionArg, check_region_array

Progress = Callable[[str, float], None]
ModelArg = str | Path | tuple[nn.Module, ModelInfo] | ModelHandle | None
Pair = tuple[str, str]

PROBABILITY_THRESHOLD = 0.5
VALUES = ("unit", "logit")


def step(progress: Progress | None, stage: str, fraction: float) -> None:
    """Tell ``progress`` (if given) that ``stage`` starts, ``fraction`` of the way through."""
    if progress is not None:
        progress(stage, fraction)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else as given (checked)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was requested but no CUDA GPU is available; use cpu")
    return dev


def resolve_model(model: ModelArg) -> tuple[nn.Module, ModelInfo]:
    """A zoo name, bundle folder, handle or ``(network, info)`` pair -> ``(network, info)``.

    A thin wrapper over :meth:`hirescam3d.models.handle.ModelHandle.resolve` and ``load()``;
    pairs are returned as given.
    """
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], nn.Module):
            raise ModelError("model must be a zoo name, a bundle folder or (network, info)")
        pair = model
    else:
        pair = ModelHandle.resolve(model).load()
    from hirescam3d.models.nnunet import not_nnunet

    return not_nnunet(pair)


def check_findings(findings: Sequence[str] | None, class_names: Sequence[str]) -> list[str] | None:
    """Finding names as the model spells them (case-insensitive, spaces as underscores,
    duplicates removed); TargetError lists the valid ones. ``None`` stays None."""
    if findings is None:
        return None
    if not list(findings):
        raise TargetError(f"no finding given; valid findings: {', '.join(class_names)}")
    return match_findings(findings, class_names)


def check_methods(methods: Sequence[str]) -> list[str]:
    """Registered method names (HiResCAMError listing the valid ones for an unknown name)."""
    names = [get_method(m).name for m in methods]
    if not names:
        raise HiResCAMError("no method given; use hirescam, gradcam or cam")
    return list(dict.fromkeys(names))


def check_storage(values: str, dtype: str, grid: str) -> None:
    """InputError for a storage choice that cannot hold the maps (before any work)."""
    from hirescam3d.io import outputs

    if dtype not in outputs.DTYPES:
        raise InputError(f"dtype must be one of {', '.join(outputs.DTYPES)}; got {dtype!r}")
    if grid not in outputs.GRIDS:
        raise InputError(f"grid must be one of {', '.join(outputs.GRIDS)}; got {grid!r}")
    if values not in VALUES:
        raise InputError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    try:
        outputs.check_dtype(values, dtype)
    except HiResCAMError as err:
        raise InputError(str(err)) from err


def audit_verdict(network: nn.Module, info: ModelInfo, layer: str) -> Any:
    """The audit's verdict at ``layer`` for this model's input (cached per network)."""
    return ModelHandle.of(network, info).audit(layer)


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the result (read from package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    from hirescam3d import __version__

    out = {"hirescam3d": __version__}
    for name in ("torch", "monai", "numpy", "nibabel", "SimpleITK"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


# -- explain_arrays -----------------------------------------------------------------------
@dataclass
class ArrayRequest:
    """The checked inputs of :func:`~hirescam3d.pipeline.arrays.explain_arrays`: the scan
    ``image`` ``(I, J, K)`` and its ``affine`` (voxel -> RAS mm, float64), the model, the
    requested findings (None: chosen by score), methods and layer; ``region``: a
    segmentation model's region on the scan's grid (bool mask or float32 weights; None:
    each finding's predicted mask); ``slices``: a bundle that predicts slice by slice."""

    image: np.ndarray
    affine: np.ndarray
    network: nn.Module
    info: ModelInfo
    requested: list[str] | None
    methods: list[str]
    layer: str
    region: np.ndarray | None
    slices: bool


def _check_arrays(
    image: np.ndarray, affine: np.ndarray, organs: np.ndarray | None, values: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(image, float64 affine)``, InputError unless they make a 3D scan (and ``organs``
    lie on its grid, ``values`` is one of :data:`VALUES`)."""
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 3:
        raise InputError(f"image must be a 3D (I, J, K) volume; got shape {image.shape}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        bad = "not finite" if affine.shape == (4, 4) else f"of shape {affine.shape}"
        raise InputError(f"the scan's affine is {bad}; it must be a finite 4x4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError("the scan's affine is singular (a zero or collinear voxel axis)")
    if organs is not None and organs.shape != image.shape:
        raise InputError(
            f"organ labels {organs.shape} are not on the scan's grid {image.shape}; "
            "align them first with hirescam3d.io.organs.align_organs"
        )
    if values not in VALUES:
        raise InputError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    return image, affine


def _check_model_fits(
    info: ModelInfo,
    image: np.ndarray,
    slices: bool,
    region: RegionArg,
    roi_size: Sequence[int] | None,
) -> None:
    """InputError unless the model takes ``image`` (its dimensions) and the segmentation
    options (``region``, ``roi_size``) apply to it."""
    if info.input.spatial_dims != image.ndim and not slices:
        raise InputError(
            f"{info.name} is a {info.input.spatial_dims}D model (its network_def has "
            f"spatial_dims {info.input.spatial_dims}); the scan is {image.ndim}D "
            f"{tuple(image.shape)}: give it a {info.input.spatial_dims}D image"
        )
    if slices and roi_size is not None:
        raise InputError(
            f"{info.name} predicts slice by slice with its SliceInferer (roi_size "
            f"{info.inferer.get('roi_size')}): drop roi_size (--roi-size)"
        )
    if not info.segmentation and (region is not None or roi_size is not None):
        what = "region" if region is not None else "roi_size (sliding windows)"
        raise InputError(
            f"{what} applies to segmentation models; {info.name} is a classifier (its "
            "output is one score per finding): drop it"
        )


def _scan_region(region: RegionArg, shape: tuple[int, ...]) -> np.ndarray | None:
    """A segmentation model's ``region`` on the scan's grid, checked; None: predicted."""
    region = "predicted" if region is None else region
    if not isinstance(region, str):
        return check_region_array(region, shape)
    if region != "predicted":
        raise InputError(
            f"region must be a mask array on the scan's grid or 'predicted'; got "
            f"{region!r} (explain_scan reads a region file)"
        )
    return None


def check_request(
    image: np.ndarray,
    affine: np.ndarray,
    model: ModelArg,
    findings: Sequence[str] | None,
    methods: Sequence[str],
    layer: str | None,
    organs: np.ndarray | None,
    values: str,
    region: RegionArg,
    roi_size: Sequence[int] | None,
) -> ArrayRequest:
    """The arguments of :func:`~hirescam3d.pipeline.arrays.explain_arrays`, checked in
    order (the model is resolved: loaded if named); InputError, TargetError or
    HiResCAMError for the first that does not fit."""
    image, affine = _check_arrays(image, affine, organs, values)
    network, info = resolve_model(model)
    slices = info.inferer is not None and info.inferer.get("kind") == "slice"
    _check_model_fits(info, image, slices, region, roi_size)
    scan_region = _scan_region(region, image.shape) if info.segmentation else None
    requested = check_findings(findings, list(info.class_names))
    methods = check_methods(methods)
    return ArrayRequest(image, affine, network, info, requested, methods,
                        layer or info.target_layer, scan_region, slices)  # fmt: skip


# -- explain_scan -------------------------------------------------------------------------
@dataclass
class ScanOptions:
    """The checked options of one :func:`~hirescam3d.pipeline.scan.explain_scan` call and
    where its files go (:meth:`paths`). ``ct_series``: a CT series is written for the DICOM
    maps to reference (the scan is not DICOM); ``masks``: the predicted masks are written
    (segmentation models with predicted regions); ``region_path``: a region file."""

    scan_path: str | Path
    out_dir: str | Path
    organs_path: str | Path | None
    region_path: Path | None
    network: nn.Module
    info: ModelInfo
    requested: list[str] | None
    methods: list[str]
    stem: str
    formats: tuple[str, ...]
    dicom_out: bool
    ct_series: bool
    masks: bool
    png: bool
    values: str
    dtype: str
    grid: str
    seg_threshold: float
    report_name: str
    force: bool

    def paths(self, explained: Sequence[str]) -> dict[str, Path]:
        """Every file written when ``explained`` findings are (keys as in
        :func:`hirescam3d.io.outputs.output_paths`)."""
        from hirescam3d.io import outputs

        return outputs.output_paths(
            self.out_dir, self.stem, explained, self.methods, self.png, self.report_name,
            self.formats, self.ct_series, self.masks,
        )  # fmt: skip


def _region_path(region: RegionArg, info: ModelInfo) -> Path | None:
    """The region file ``region`` names (None for ``"predicted"``, an array or None);
    InputError for a classifier or a missing file."""
    if not isinstance(region, (str, Path)) or str(region) == "predicted":
        return None
    region_path = Path(region)
    if not info.segmentation:
        raise InputError(
            f"region applies to segmentation models; {info.name} is a classifier: drop it"
        )
    if not region_path.exists():
        raise InputError(f"region {region_path}: no such file; check the path")
    return region_path


def check_scan_options(
    scan_path: str | Path,
    out_dir: str | Path,
    model: ModelArg,
    findings: Sequence[str] | None,
    methods: Sequence[str],
    organs_path: str | Path | None,
    region: RegionArg,
    formats: str | Sequence[str],
    values: str,
    dtype: str,
    grid: str,
    png: bool,
    seg_threshold: float,
    report_name: str,
    force: bool,
) -> ScanOptions:
    """The options of :func:`~hirescam3d.pipeline.scan.explain_scan`, checked in order before
    any work; the output folder is created and, with requested findings, existing outputs
    are refused (OutputError without ``force``)."""
    from hirescam3d.io import outputs
    from hirescam3d.io import scans as io

    check_storage(values, dtype, grid)
    try:
        formats = outputs.check_formats(formats)
    except HiResCAMError as err:
        raise InputError(str(err)) from err
    dicom_out = any(f in outputs.DICOM_FORMATS for f in formats)
    methods = check_methods(methods)
    network, info = resolve_model(model)
    requested = check_findings(findings, info.class_names)
    stem = io.scan_stem(scan_path)
    region_path = _region_path(region, info)
    masks = info.segmentation and (region is None or (isinstance(region, str)
                                                      and region == "predicted"))
    # a CT series is written for the DICOM maps to reference unless the scan is DICOM
    ct_series = dicom_out and not Path(scan_path).is_dir() and not io.looks_like_dicom(
        Path(scan_path))  # fmt: skip
    options = ScanOptions(
        scan_path, out_dir, organs_path, region_path, network, info, requested, methods, stem,
        formats, dicom_out, ct_series, masks, png, values, dtype, grid, seg_threshold,
        report_name, force,
    )  # fmt: skip
    outputs.ensure_folder(out_dir)
    if requested is not None:  # fail before any work when outputs exist
        outputs.check_writable(options.paths(requested).values(), force)
    return options
