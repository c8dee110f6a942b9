"""Scan -> MONAI preprocessing -> one explained forward pass -> maps on the scan's grid.

The data path, top to bottom:

1. :func:`explain_scan` reads the scan (and organ map) from files;
2. :func:`explain_arrays` preprocesses it with the model's MONAI dictionary transforms
   (:func:`preprocess_transforms`), runs the :class:`~hirescam3d.core.explainer.Explainer`
   (one pass for every finding and method) and computes contributions and organ shares
   on the explanation grid (:mod:`hirescam3d.core.attribution`; the organ map is pooled onto
   the cells straight from the scan's grid), returning a typed :class:`Explanation`;
3. :meth:`Explanation.scan_map` puts one map at a time on the scan's grid: placed by the
   layer's traced geometry and resampled as MONAI ``Invertd`` would, in one separable
   pass (:class:`~hirescam3d.core.placement.ModelGrid`; ``Invertd`` itself,
   :func:`~hirescam3d.core.placement.invert_maps`, is the reference and the fallback);
   :meth:`Explanation.model_map` gives it on the model's grid;
4. :func:`explain_scan` streams the maps to :mod:`hirescam3d.io.outputs` and writes
   ``report.json`` last.

:func:`explain_image` (every map on the scan's grid in memory) serves the napari widget
and ``compare``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hirescam3d.core.methods import get_method
from hirescam3d.core.placement import _SLAB_VOXELS, ModelGrid, _fast_extent, invert_maps  # noqa: F401
from hirescam3d.errors import HiResCAMError, InputError, ModelError, TargetError
from hirescam3d.io.outputs import _json_safe, output_paths  # noqa: F401 - kept importable from here
from hirescam3d.models.bundle import PREPROCESSING_TRANSFORMS, ModelInfo, preprocessing_transforms
from hirescam3d.models.handle import ModelHandle, match_findings, output_selector_of
from hirescam3d.pipeline import stages
from hirescam3d.pipeline.stages import organs_key, scan_key

Progress = Callable[[str, float], None]
ModelArg = str | Path | tuple[nn.Module, ModelInfo] | ModelHandle | None

PROBABILITY_THRESHOLD = 0.5
# Intensity transforms touch images only; spatial ones also move label maps (nearest).
_IMAGE_ONLY = ("ScaleIntensityRanged",)
_INTERPOLATING = ("Spacingd", "Resized")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass
class ScanExplanation:
    """Explanations of one scan.

    ``maps``: ``{(finding, method): float32 (I, J, K)}`` on the scan's grid: in [0, 1]
    (``values == "unit"``) or logits per voxel (``values == "logit"``). A dict from
    :func:`explain_image`; from :func:`explain_scan` a mapping that computes each map when
    it is read (the run streamed them to disk and kept none).
    ``probabilities`` / ``logits``: ``{finding: value}`` for every class of the model.
    ``report``: JSON-ready dict (what ``report.json`` holds).
    ``warnings``: texts of everything worth telling the user (also in the report).
    ``model_grid_maps``: ``{(finding, method): (S, H, W)}`` on the model's input grid.
    ``organs`` / ``organ_names``: the organ labels on the scan's grid, if given.
    ``raw``: ``{(finding, method): tensor}`` each method's raw map before any
    post-processing, on the explained layer's grid (cells; the input grid for methods
    that work at input resolution), on the CPU: signed, logits per cell for HiResCAM at
    a guaranteed layer. What :func:`hirescam3d.evaluate.metrics.l2_to_exact` compares.
    ``masks``: segmentation models with ``region="predicted"``: ``{finding: uint8 (I, J,
    K)}`` the predicted mask each finding's score was summed over, on the scan's grid.
    """

    maps: dict[tuple[str, str], np.ndarray]
    probabilities: dict[str, float]
    logits: dict[str, float]
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    model_grid_maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    organs: np.ndarray | None = None
    organ_names: dict[int, str] | None = None
    values: str = "unit"
    raw: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def findings(self) -> list[str]:
        """The explained findings, in the order they were requested (else class order)."""
        return list(dict.fromkeys(finding for finding, _ in self.maps))

    @property
    def methods(self) -> list[str]:
        """The methods used, in the order requested."""
        return list(dict.fromkeys(method for _, method in self.maps))


# -- model and options --------------------------------------------------------------------
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


# -- MONAI pipeline -----------------------------------------------------------------------
def preprocess_transforms(
    info: ModelInfo,
    keys: str | Sequence[str] = "image",
    label_keys: str | Sequence[str] = (),
    from_array: bool = False,
):
    """The model's preprocessing as MONAI dictionary transforms (a ``Compose``).

    Built from ``info.preprocessing`` (the bundle's transform specs), by default
    ``LoadImaged -> EnsureChannelFirstd -> Orientationd(axcodes) -> Spacingd(pixdim,
    bilinear) -> ScaleIntensityRanged(window, clip) -> ResizeWithPadOrCropd(size)``.
    ``label_keys`` (organ maps) follow the spatial steps with nearest interpolation and
    skip intensity scaling. ``from_array=True`` drops ``LoadImaged`` and expects each key
    to hold an ``(I, J, K)`` MetaTensor with its affine (a channel axis is added).
    The result is invertible: ``Invertd(transform=this, ...)`` undoes the spatial steps.
    """
    import monai.transforms as mt

    image_keys = [keys] if isinstance(keys, str) else list(keys)
    label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    all_keys = image_keys + label_keys
    specs = info.preprocessing or preprocessing_transforms(info.input)
    transforms = []
    if from_array and not any(s.get("_target_") == "EnsureChannelFirstd" for s in specs):
        transforms.append(mt.EnsureChannelFirstd(all_keys, channel_dim="no_channel"))
    for spec in specs:
        name = spec.get("_target_")
        if name not in PREPROCESSING_TRANSFORMS:  # a MONAI bundle's own transform
            transforms.append(_bundle_transform(spec, image_keys, all_keys, info.trusted))
            continue
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "keys")}
        if name == "LoadImaged":
            if from_array:
                continue
            kwargs.setdefault("image_only", True)
        if name == "EnsureChannelFirstd" and from_array:
            kwargs["channel_dim"] = "no_channel"
        if name == "Orientationd":
            kwargs.setdefault("labels", _RAS_LABELS)
        if name == "Spacingd":
            # float32 resampling grids: half the memory and time of MONAI's float64
            # default on full-size CT, with sub-0.001-voxel coordinate error.
            kwargs.setdefault("dtype", torch.float32)
        if name in _INTERPOLATING and label_keys:
            mode = kwargs.pop("mode", "bilinear" if name == "Spacingd" else "area")
            kwargs["mode"] = [mode] * len(image_keys) + ["nearest"] * len(label_keys)
        selected = image_keys if name in _IMAGE_ONLY else all_keys
        transforms.append(getattr(mt, name)(keys=selected, **kwargs))
    return mt.Compose(transforms)


def _bundle_transform(
    spec: dict[str, Any], image_keys: list[str], all_keys: list[str], trusted: bool
) -> Any:
    """A MONAI bundle's transform beyond :data:`PREPROCESSING_TRANSFORMS`
    (:func:`hirescam3d.models.bundle_monai.build_transform`): spatial (invertible) transforms
    act on every key, nearest-neighbour for label keys; others on the image only."""
    from monai.transforms import InvertibleTransform

    from hirescam3d.models.bundle_monai import build_transform, dictionary_transform

    name = str(spec["_target_"])
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "keys")}
    cls = dictionary_transform(name)
    spatial = cls is not None and issubclass(cls, InvertibleTransform)
    if spatial and "mode" in kwargs and len(all_keys) > len(image_keys):
        kwargs["mode"] = [kwargs["mode"]] * len(image_keys) + ["nearest"] * (
            len(all_keys) - len(image_keys)
        )
    keys = all_keys if spatial else image_keys
    return build_transform(name, {"keys": keys, **kwargs}, trusted)


def _preprocess(pre: Any, data: dict[str, Any]) -> Any:
    """The preprocessed ``"image"`` of :func:`_preprocess_all`."""
    return _preprocess_all(pre, data)["image"]


def _preprocess_all(pre: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Apply ``pre`` (a ``Compose``) to ``data``; return the preprocessed dict (label
    keys, e.g. a region, ride along as ``pre`` says).

    MONAI 1.6.1's ``ResizeWithPadOrCropd`` can leave the affine of an image that went
    through ``Orientationd``/``Spacingd`` without the translation of some padded or
    cropped axes (the voxels are moved, the affine is not): maps would land up to the
    padding's width away from their place. The affine is therefore recomputed from the
    one before that step and the recorded padding and cropping, and set on the image
    (``Invertd`` then undoes the steps correctly too).
    """
    before = None
    for transform in pre.transforms:
        if type(transform).__name__ == "ResizeWithPadOrCropd":
            before = np.asarray(data["image"].affine, dtype=np.float64)
        data = transform(data)
    image = data["image"]
    ops = image.applied_operations
    if before is not None and ops and ops[-1].get("class") == "ResizeWithPadOrCrop":
        shape = tuple(image.shape[1:])
        lo, _ = _fast_extent([ops[-1]], shape) or ((0.0,) * len(shape), None)
        shift = np.eye(4)
        shift[: len(shape), 3] = [-v for v in lo]
        correct = before @ shift
        if not np.allclose(np.asarray(image.affine, np.float64), correct, atol=1e-6):
            image.affine = torch.as_tensor(correct, dtype=image.affine.dtype)
    return data


def _crop_warning(image: Any, info: ModelInfo) -> str | None:
    """Text if ``ResizeWithPadOrCrop`` cut part of the scan off (it gets no explanation)."""
    for op in getattr(image, "applied_operations", []):
        if op.get("class") != "ResizeWithPadOrCrop":
            continue
        crop = op.get("extra_info", {}).get("crop_info", {})
        cropped = list(crop.get("extra_info", {}).get("cropped", []) if crop else [])
        if not any(cropped):
            return None
        spacing = info.input.spacing or (1.0,) * info.input.spatial_dims
        axes = info.input.axcodes or "".join(str(i) for i in range(info.input.spatial_dims))
        parts = [
            f"{axes[i]}: {cropped[2 * i] * spacing[i]:.0f} + {cropped[2 * i + 1] * spacing[i]:.0f}"
            for i in range(len(cropped) // 2)
            if cropped[2 * i] or cropped[2 * i + 1]
        ]
        return (
            "the scan extends beyond the model's field of view; it was centre-cropped "
            f"({', '.join(parts)} mm cut off per axis) and the cut-off parts have no "
            "explanation (their maps are 0)"
        )
    return None


def _probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if task == "multiclass" else torch.sigmoid(logits)


VALUES = ("unit", "logit")
Pair = tuple[str, str]


# -- the typed result ---------------------------------------------------------------------
@dataclass
class FindingScore:
    """The model's output for one finding. Segmentation models: ``logit`` is the region
    score (the finding's logits summed over its region, in logits), ``probability`` the
    mean probability over the region (NaN for an empty one) and ``region_voxels`` the
    region's size (model-grid voxels, or the sum of its weights)."""

    logit: float
    probability: float
    explained: bool
    region_voxels: float | None = None


@dataclass
class Explanation:
    """What :func:`explain_arrays` returns: scores, units, organ shares and the maps, which
    are put on a grid only when asked (one at a time, so a caller can stream them).

    ``raw``: ``{(finding, method): tensor (*grid)}`` each method's raw map on its grid
    (the explained layer's cells; the model's input grid for input-resolution methods), on
    the CPU. ``contributions``: per finding and method, HiResCAM's parts in logits (at a
    guaranteed layer). ``organ_shares``: per finding and method, the shares of positive
    evidence per organ (None without organs). ``grid``: the model grid on the scan.
    Segmentation models: ``masks``: ``{finding: bool (S, H, W)}`` the predicted mask each
    explained finding's score was summed over (``region="predicted"``), on the model's
    grid (:meth:`mask_on_scan` puts one on the scan's grid); ``region``: what the report
    says about the region (None for classifiers); ``prediction``: the model's logits ``(C,
    *grid)`` on its input grid, kept for a MONAI bundle whose postprocessing inverts its
    prediction onto the scan's grid (``Invertd``), else None.
    """

    model: ModelInfo
    layer: str
    methods: list[str]
    values: str
    scores: dict[str, FindingScore]
    explained: list[str]
    selection: str
    verdict: Any
    contributions: dict[str, dict[str, dict[str, Any]]]
    organ_shares: dict[str, dict[str, dict[str, Any]]] | None
    raw: dict[Pair, torch.Tensor]
    geometry: dict[str, Any]
    grid: ModelGrid
    coverage: float
    device: str
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    region: dict[str, Any] | None = None
    prediction: torch.Tensor | None = field(default=None, repr=False)
    _on_scan: Any = field(default=None, repr=False)

    @property
    def pairs(self) -> list[Pair]:
        """``(finding, method)`` of every map, findings first, in the requested order."""
        return list(self.raw)

    @property
    def probabilities(self) -> dict[str, float]:
        return {n: s.probability for n, s in self.scores.items()}

    @property
    def logits(self) -> dict[str, float]:
        return {n: s.logit for n, s in self.scores.items()}

    def _placed(self, pair: Pair) -> tuple[torch.Tensor, float]:
        """``(model-grid map before scaling, scale)`` for ``pair``: the placed ReLU map and
        its maximum (``unit``), or the logit density and 1 (``logit``)."""
        from hirescam3d.core import postprocess

        cells = self.raw[pair][None, None].float()
        geometry = self.geometry[pair[1]]
        if self.values == "logit":
            return postprocess.density(cells, geometry, self.grid.shape)[0, 0], 1.0
        placed = postprocess.place(postprocess.relu(cells), geometry, self.grid.shape)[0, 0]
        return placed, float(placed.max())

    def model_map(self, pair: Pair) -> np.ndarray:
        """Float32 ``(S, H, W)`` on the model's input grid (affine ``grid.affine``): a [0, 1]
        display map (``unit``) or logits per model voxel (``logit``)."""
        placed, top = self._placed(pair)
        if self.values == "logit":
            return placed.numpy().astype(np.float32)
        out = placed / top if top > 0 else torch.zeros_like(placed)
        return out.numpy().astype(np.float32)

    def scan_map(self, pair: Pair) -> np.ndarray:
        """Float32 ``(I, J, K)`` on the scan's grid (F-ordered): a [0, 1] display map, or
        logits per scan voxel summing to the model-grid contributions inside the scan."""
        unit = self.values == "unit"
        if not self.grid.fast:
            volume = self.grid.invert(torch.from_numpy(self.model_map(pair)), clip=unit)
        elif unit:
            _, top = self._placed(pair)
            if top <= 0:
                return np.zeros(self.grid.scan_shape, np.float32, order="F")
            cells = self.raw[pair].float().clamp_min(0) / top
            volume = self.grid.to_scan(cells, self.geometry[pair[1]], "place")
            np.clip(volume, 0.0, 1.0, out=volume)
            return volume
        else:
            volume = self.grid.to_scan(self.raw[pair], self.geometry[pair[1]], "density")
        if unit:
            return volume
        density, _ = self._placed(pair)
        ratio = abs(np.linalg.det(self.grid.scan_affine[:3, :3])) / abs(
            np.linalg.det(self.grid.affine[:3, :3])
        )
        volume *= np.float32(ratio)
        factors = _conserve(volume, density, self.grid.inside())
        self.contributions[pair[0]][pair[1]]["resampling_correction"] = factors
        return volume

    def mask_on_scan(self, finding: str) -> np.ndarray:
        """The predicted mask of ``finding`` on the scan's grid: uint8 ``(I, J, K)``, 1
        inside. A MONAI bundle that inverts its prediction (``Invertd``) gets its own
        postprocessing, in its order (:mod:`hirescam3d.pipeline.scan_prediction`: e.g. softmax,
        ``Invertd`` of the probabilities, argmax). Otherwise each scan voxel takes the
        value of the model-grid voxel nearest to its centre (index rounded half up; 0
        where the model's grid does not reach, e.g. a cropped-away part of the scan)."""
        if self.prediction is not None and self.model.postprocessing:
            if self._on_scan is None:
                from hirescam3d.pipeline.scan_prediction import ScanPrediction

                self._on_scan = ScanPrediction(self.prediction, self.grid,
                                               self.model.postprocessing, self.model.activation)
            if finding not in self.masks:
                raise KeyError(finding)
            return self._on_scan.mask(list(self.model.class_names).index(finding))
        return self.grid.nearest_on_scan(self.masks[finding])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (what ``report.json`` holds, before file details)."""
        info = self.model
        report: dict[str, Any] = {
            "created": self.created,
            "model": {
                "name": info.name,
                "weights_sha256": info.weights_sha256,
                "trained": info.trained,
                "task": info.task,
                "bundle": None if info.bundle_path is None else str(info.bundle_path),
                "input": info.input.to_dict(),
            },
            "image": {
                "shape": list(self.grid.scan_shape),
                "affine": self.grid.scan_affine.tolist(),
                "model_grid_shape": list(self.grid.shape),
                "model_grid_affine": self.grid.affine.tolist(),
                "model_field_of_view_covered": self.coverage,
            },
            "layer": self.layer,
            "hirescam_guaranteed_faithful": self.verdict.guaranteed,
            "audit": self.verdict.to_dict(),
            "values": self.values,
            "methods": self.methods,
            "finding_selection": self.selection,
            "findings": {
                n: {"logit": s.logit, "probability": s.probability, "explained": s.explained}
                for n, s in self.scores.items()
            },
            "explained": self.explained,
            "contributions": self.contributions,
            "device": self.device,
            "timings_s": dict(self.timings),
            "versions": software_versions(),
            "warnings": self.warnings,
        }
        if self.organ_shares is not None:
            report["organs"] = self.organ_shares
        if self.region is not None:
            for n, s in self.scores.items():
                report["findings"][n] = {
                    "region_score": s.logit,
                    "region_voxels": s.region_voxels,
                    "mean_probability": None if math.isnan(s.probability) else s.probability,
                    **report["findings"][n],
                }
            report["region"] = dict(self.region)
        return report


class _LazyMaps(Mapping):
    """``{(finding, method): (I, J, K)}`` computed on access (nothing held in memory)."""

    def __init__(self, explanation: Explanation) -> None:
        self._explanation = explanation

    def __getitem__(self, pair: Pair) -> np.ndarray:
        if pair not in self._explanation.raw:
            raise KeyError(pair)
        return self._explanation.scan_map(pair)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._explanation.raw)

    def __len__(self) -> int:
        return len(self._explanation.raw)


# -- segmentation models: regions and sliding windows ----------------------------------------
#: A region on the scan's grid must match it this closely (largest voxel offset, mm).
REGION_TOLERANCE_MM = 1e-3
RegionArg = str | Path | np.ndarray | None


def grid_text(shape: Sequence[int], affine: np.ndarray) -> str:
    """One grid in words: ``64x64x48 voxels of 5 x 5 x 6 mm, LPS, origin (x, y, z) mm``."""
    import nibabel as nib

    affine = np.asarray(affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    codes = "".join(nib.aff2axcodes(affine))
    origin = ", ".join(f"{v:.4g}" for v in affine[:3, 3])
    size = "x".join(str(int(n)) for n in shape)
    mm = " x ".join(f"{v:.4g}" for v in spacing)
    return f"{size} voxels of {mm} mm, {codes}, origin ({origin}) mm"


def check_region_grid(
    shape: Sequence[int],
    affine: np.ndarray,
    scan_shape: Sequence[int],
    scan_affine: np.ndarray,
    what: str = "region",
) -> None:
    """InputError naming both grids unless ``shape``/``affine`` is the scan's grid (same
    shape, every voxel within :data:`REGION_TOLERANCE_MM`). A region is never resampled:
    a mask made on another grid would explain other voxels than the user drew."""
    from hirescam3d.io.nifti import affine_distance_mm, grid_differences

    shape, scan_shape = tuple(int(n) for n in shape), tuple(int(n) for n in scan_shape)
    same = shape == scan_shape
    if same and affine_distance_mm(affine, scan_affine, shape) <= REGION_TOLERANCE_MM:
        return
    differ = grid_differences(shape, affine, scan_shape, scan_affine, atol=REGION_TOLERANCE_MM)
    if not differ:
        off = affine_distance_mm(affine, scan_affine, shape)
        differ = [f"voxel positions up to {off:.3g} mm apart"]
    raise InputError(
        f"{what} is not on the scan's grid: region grid {grid_text(shape, affine)}; scan grid "
        f"{grid_text(scan_shape, scan_affine)} ({'; '.join(differ)}); a region must have the "
        f"scan's shape and affine (within {REGION_TOLERANCE_MM:g} mm): resample it onto the "
        "scan's grid with nearest-neighbour interpolation first"
    )


def load_region(
    path: str | Path, scan_shape: Sequence[int], scan_affine: np.ndarray
) -> np.ndarray:
    """A region mask file (nonzero = region) on the scan's grid: bool ``(I, J, K)``.

    InputError if it is not on the scan's grid (:func:`check_region_grid`), not finite or
    empty; ScanError if it cannot be read."""
    from hirescam3d.io.scans import as_volume, read_image

    path = Path(path)
    arr, region_affine, _, _ = read_image(path)
    arr = as_volume(arr, path)
    check_region_grid(arr.shape, region_affine, scan_shape, scan_affine, f"region {path}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"region {path} has non-finite values (NaN or Inf); pass a 0/1 mask")
    mask = arr != 0
    if not mask.any():
        raise InputError(f"region {path} is empty (every voxel is 0): there is nothing to explain")
    return mask


def _region_array(region: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A region given as an array on the scan's grid, checked: bool (a mask) or float32
    (weights)."""
    r = np.asarray(region)
    if r.shape != tuple(shape):
        raise InputError(
            f"region {r.shape} is not on the scan's grid {tuple(shape)}: pass a mask or "
            "weight map with the scan's shape (and affine)"
        )
    if r.dtype == bool:
        mask = r
    elif r.dtype.kind in "iu":
        values = np.unique(r)
        if not set(values.tolist()) <= {0, 1}:
            raise InputError(
                f"region is an integer array with values {', '.join(map(str, values[:6]))}: "
                "pass a 0/1 mask (e.g. labels == k) or floating-point weights"
            )
        mask = r.astype(bool)
    elif r.dtype.kind == "f":
        if not np.isfinite(r).all():
            raise InputError("region has non-finite values (NaN or Inf); pass a mask or weights")
        if not r.any():
            raise InputError("region is empty (all zero): there is nothing to explain")
        return r.astype(np.float32, copy=False)
    else:
        raise InputError(f"region must be a bool, 0/1 or floating-point array, not {r.dtype}")
    if not mask.any():
        raise InputError("region is empty (all zero): there is nothing to explain")
    return mask


def _window(
    info: ModelInfo, shape: tuple[int, ...], roi_size: Sequence[int] | None, overlap: float
) -> tuple[int, ...] | None:
    """The sliding window on the model's grid: ``roi_size`` as given, else the bundle's
    patch size when the model sees patches (as MONAI's bundle inferer runs it) and the
    volume is not exactly one patch; None: the whole volume in one pass."""
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"overlap must lie in [0, 1); got {overlap}")
    if roi_size is None:
        if not info.patch:
            return None
        patch = tuple(int(n) for n in info.input.spatial_size)
        return None if tuple(shape) == patch else patch
    roi = tuple(int(n) for n in roi_size)
    if len(roi) != len(shape) or any(n <= 0 for n in roi):
        raise InputError(
            f"roi_size {tuple(roi_size)} must be {len(shape)} positive whole numbers (voxels "
            "of the model's grid, its axes in the model's order)"
        )
    return roi


def _bundle_schedule(
    inferer: dict[str, Any], window: tuple[int, ...]
) -> tuple[tuple[int, ...], Any, int, dict[str, Any]]:
    """``(roi, overlap, sw_batch_size, {mode, sigma_scale, padding_mode, cval})`` of a
    bundle's ``SlidingWindowInferer`` (see :func:`hirescam3d.models.bundle_monai.inferer_spec`)."""
    if inferer.get("kind") != "sliding":
        return window, 0.25, 1, {"mode": "gaussian"}
    schedule = {k: inferer[k] for k in ("mode", "sigma_scale", "padding_mode", "cval")}
    return tuple(inferer["roi_size"]), inferer["overlap"], inferer["sw_batch_size"], schedule


@dataclass
class _SegmentationRun:
    """What :func:`_explain_segmentation` found: raw maps, per-class region statistics
    (``stats[c] = (region score in logits, region size in voxels, mean probability)``),
    the predicted masks of the explained findings and the report's ``region`` section."""

    raw: dict[Pair, torch.Tensor]
    chosen: list[str]
    selection: str
    stats: list[tuple[float, float, float]]
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    notes: list[str]
    output: torch.Tensor | None = None  # (C, *spatial) logits, kept when asked


def _class_stats(
    output: torch.Tensor, region: torch.Tensor | None, task: str
) -> list[tuple[float, float, float]]:
    """Per class of ``output`` ``(1, C, *spatial)``: ``(sum of its logits over its region,
    region size, mean probability over the region)``; the region is ``region``
    ``(*spatial)`` (mask or weights) or, if None, the class's predicted mask. NaN
    probability for an empty region."""
    from hirescam3d.core.regions import predicted_masks

    out = output[0].detach().float()
    # softmax one class at a time: exp(logit - logsumexp), one volume-sized temporary
    norm = torch.logsumexp(out, dim=0) if task == "softmax" else None
    masks = predicted_masks(output.detach(), task)[0] if region is None else None
    stats = []
    for c in range(out.shape[0]):
        w = (masks[c] if masks is not None else region).to(out.device, torch.float64)
        p = torch.exp(out[c] - norm) if norm is not None else torch.sigmoid(out[c])
        size = float(w.sum())
        score = float((out[c].double() * w).sum())
        mean = float((p.double() * w).sum()) / size if size > 0 else math.nan
        stats.append((score, size, mean))
    return stats


def _rule_stats(output: torch.Tensor, masks: torch.Tensor) -> list[tuple[float, float, float]]:
    """:func:`_class_stats` over post-processed masks ``(C, *spatial)`` (sigmoid heads)."""
    out = output[0].detach().float()
    stats = []
    for c in range(out.shape[0]):
        w = masks[c].to(out.device, torch.float64)
        size = float(w.sum())
        score = float((out[c].double() * w).sum())
        mean = float((torch.sigmoid(out[c]).double() * w).sum()) / size if size > 0 else math.nan
        stats.append((score, size, mean))
    return stats


def _explain_segmentation(
    explainer: Any,
    x: torch.Tensor,
    class_names: list[str],
    requested: list[str] | None,
    methods: list[str],
    region: str | torch.Tensor,
    task: str,
    roi: tuple[int, ...] | None,
    overlap: float,
    sw_batch_size: int,
    schedule: dict[str, Any] | None = None,
    windows: Callable[[int, int], None] | None = None,
    slice_inferer: dict[str, Any] | None = None,
    keep_output: bool = False,
    mask_rule: Any = None,
) -> _SegmentationRun:
    """Explain a segmentation model's region scores on the model's input ``x`` ``(1, C_in,
    *spatial)``: one explained pass (or one sliding-window explanation with ``roi``).

    ``region``: ``"predicted"`` or a ``(*spatial)`` mask/weights on the model's grid.
    Without ``requested`` findings, every class the model segments (``"predicted"``: a
    non-empty predicted mask), or whose mean probability over the given region is >= 0.5,
    is explained: this costs one prediction more, to choose them.
    ``slice_inferer``: a bundle's ``SliceInferer`` entry (a 2D network over the volume
    ``x``): predicted and explained slice by slice on its schedule
    (:mod:`hirescam3d.core.slices`); ``roi`` is then None. ``keep_output``: keep the explained
    pass's logits ``(C, *spatial)`` (on the CPU) in the result's ``output``.
    ``mask_rule``: the bundle's :class:`~hirescam3d.models.seg_postprocess.MaskPostprocessing`;
    with ``"predicted"``, each class's mask is the post-processed one (found by one
    prediction more), and that mask is the region explained.
    """
    from monai.inferers import sliding_window_inference

    from hirescam3d.core.capture import model_state_restored
    from hirescam3d.core.slices import slice_inferer_explain, slice_options, slice_predict
    from hirescam3d.core.sliding import sliding_window_explain

    network = explainer.model
    schedule = schedule or {"mode": "gaussian"}  # mode, sigma_scale, padding_mode, cval
    given = None if isinstance(region, str) else region
    arg = region if given is None else given[None, None]
    notes: list[str] = []
    rule_masks = None  # (C, *spatial) bool: the bundle's post-processed predicted masks
    if requested is None or (given is None and mask_rule is not None):
        with torch.no_grad(), model_state_restored(network):
            if slice_inferer is not None:
                output = slice_predict(network, x, slice_inferer, explainer._output)
            elif roi is None:
                output = explainer._output(network(x))
            else:
                output = sliding_window_inference(
                    x, roi, sw_batch_size, lambda w: explainer._output(network(w)),
                    overlap=overlap, **schedule,
                )  # fmt: skip
        if given is None and mask_rule is not None:
            rule_masks = mask_rule.masks(output.detach(), class_names)[0].cpu()
            stats = _rule_stats(output, rule_masks)
        else:
            stats = _class_stats(output, given, task)
        del output
        if requested is not None:
            chosen, selection = requested, "requested"
        elif given is None:
            chosen = [n for n, s in zip(class_names, stats, strict=True) if s[1] > 0]
            selection = "every finding the model segments (a non-empty predicted mask)"
            why = "the model segments no finding"
        else:
            chosen = [n for n, s in zip(class_names, stats, strict=True)
                      if s[2] >= PROBABILITY_THRESHOLD]  # fmt: skip
            selection = (
                f"every finding with mean probability >= {PROBABILITY_THRESHOLD} over the region"
            )
            why = f"no finding has mean probability >= {PROBABILITY_THRESHOLD} over the region"
        if not chosen:
            notes.append(
                f"{why}; nothing was explained (name findings explicitly to explain them anyway)"
            )
    else:
        chosen, selection, stats = requested, "requested", []
    if rule_masks is not None and chosen:  # explain exactly the post-processed masks
        arg = rule_masks[[class_names.index(f) for f in chosen]][None].to(x.device)
    raw: dict[Pair, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    kept = None
    if chosen:
        if slice_inferer is not None:
            results = slice_inferer_explain(
                explainer, x, targets=chosen, region=arg, methods=methods, maps=False,
                task=task, **slice_options(slice_inferer),
            )  # fmt: skip
        elif roi is None:
            results = explainer.explain(x, chosen, methods, maps=False, region=arg, task=task)
        else:
            results = sliding_window_explain(
                explainer, x, targets=chosen, region=arg, roi_size=roi, overlap=overlap,
                sw_batch_size=sw_batch_size, methods=methods, maps=False,
                task=task, progress=windows or False, **schedule,
            )  # fmt: skip
        first = results[methods[0]]
        if tuple(first.output.shape[2:]) != tuple(x.shape[2:]):
            raise InputError(
                f"the model's output grid {tuple(first.output.shape[2:])} is not its input "
                f"grid {tuple(x.shape[2:])}: the pipeline explains segmentation models whose "
                "masks lie on their input (use hirescam3d.Explainer with a region on the "
                "output grid instead)"
            )
        if not stats:
            stats = _class_stats(first.output, given, task)
        raw = {(f, m): results[m].raw[0, k].detach().cpu()
               for k, f in enumerate(chosen) for m in methods}  # fmt: skip
        if rule_masks is not None:
            masks = {f: rule_masks[class_names.index(f)] for f in chosen}
        elif given is None:
            masks = {f: first.region[0, k].detach().cpu().bool() for k, f in enumerate(chosen)}
        if keep_output:
            kept = first.output[0].detach().cpu()
        del results, first
    report: dict[str, Any] = {
        "source": "predicted" if given is None else "given",
        "task": task,
        "grid": "model input",
        "score": "sum over the region's voxels of the finding's logits (logits)",
    }
    if given is None:
        report["predicted_by"] = (
            "argmax over classes" if task == "softmax" else "logit >= 0 (sigmoid >= 0.5)"
        )
        if mask_rule is not None:
            report["predicted_by"] = mask_rule.describe()
    report["sliding_window"] = None if roi is None else {
        "roi_size": list(roi), "overlap": overlap, "sw_batch_size": int(sw_batch_size),
        "mode": str(schedule["mode"]),
    }  # fmt: skip
    if slice_inferer is not None:  # MONAI SliceInferer: a 2D network over the volume
        report["slice_inferer"] = slice_options(slice_inferer)
    return _SegmentationRun(raw, chosen, selection, stats, masks, report, notes, kept)


# -- explaining arrays --------------------------------------------------------------------
def _check_arrays(
    image: np.ndarray, affine: np.ndarray, organs: np.ndarray | None, values: str
) -> tuple[np.ndarray, np.ndarray]:
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


def explain_arrays(
    image: np.ndarray,
    affine: np.ndarray,
    model: ModelArg = "demo",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    organs: np.ndarray | None = None,
    organ_names: dict[int, str] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    values: str = "unit",
    region: RegionArg = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> Explanation:
    """Explain a scan held in memory: one forward pass, every finding and method.

    ``image``: ``(I, J, K)`` intensities (HU for CT); ``affine``: voxel -> RAS mm;
    ``organs``: integer labels ``(I, J, K)`` on the same grid, named by ``organ_names``.
    ``findings=None``: every finding with probability >= 0.5 (none -> no maps, a warning).
    The scan goes through the model's MONAI preprocessing; contributions (HiResCAM at a
    guaranteed layer, in logits) and organ shares are computed on the explanation grid,
    the organ map pooled onto the cells once per grid. No map is put on the scan's grid
    here: :meth:`Explanation.scan_map` and :meth:`Explanation.model_map` do that per map.
    ``values="logit"`` needs HiResCAM at a layer where the audit proves the guarantee
    (ModelError otherwise). ``progress(stage, fraction)`` is called as stages start; the
    network is moved to ``device`` ("auto": CUDA if available) and left there.

    Segmentation models (``info.segmentation``: logits ``(1, C, *spatial)``) explain a
    finding's *region score*, its logits summed over a region (in logits):

    - ``region``: a bool/0-1 mask or float weights ``(I, J, K)`` on the scan's grid,
      carried through the same preprocessing as the scan with nearest-neighbour
      interpolation onto the model's grid; or ``"predicted"`` (the default): each
      finding's own predicted mask (``info.activation``: argmax for softmax models,
      logit >= 0 for sigmoid ones), kept in :attr:`Explanation.masks`;
    - ``findings=None``: with ``"predicted"`` every class the model segments (a non-empty
      mask), with a given region every class whose mean probability over it is >= 0.5;
    - ``roi_size`` (voxels of the model's grid) and ``overlap``: explain window by
      window as MONAI's ``sliding_window_inference`` predicts (gaussian blending,
      ``sw_batch_size`` windows per pass); by default the bundle's patch size when the
      model sees patches (``info.patch``) and the volume is not one patch. Sliding-window maps
      are on the model's input grid (logits per voxel for HiResCAM);
    - a MONAI bundle whose inferer is ``SliceInferer`` (a 2D network over the volume) is
      predicted and explained slice by slice on its schedule (:mod:`hirescam3d.core.slices`).
    """
    from monai.data import MetaTensor

    from hirescam3d.core import attribution, postprocess
    from hirescam3d.core.explainer import Explainer

    def step(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    image, affine = _check_arrays(image, affine, organs, values)
    network, info = resolve_model(model)
    slices = info.inferer is not None and info.inferer.get("kind") == "slice"
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
    class_names = list(info.class_names)
    segmentation = info.segmentation
    scan_region = None
    if not segmentation and (region is not None or roi_size is not None):
        what = "region" if region is not None else "roi_size (sliding windows)"
        raise InputError(
            f"{what} applies to segmentation models; {info.name} is a classifier (its "
            "output is one score per finding): drop it"
        )
    if segmentation:
        region = "predicted" if region is None else region
        if isinstance(region, str):
            if region != "predicted":
                raise InputError(
                    f"region must be a mask array on the scan's grid or 'predicted'; got "
                    f"{region!r} (explain_scan reads a region file)"
                )
        else:
            scan_region = _region_array(region, image.shape)
    requested = check_findings(findings, class_names)
    methods = check_methods(methods)
    layer = layer or info.target_layer
    dev = resolve_device(device)
    network.to(dev)
    timings: dict[str, float] = {}
    notes: list[str] = []

    step("audit", 0.05)
    t = time.perf_counter()
    verdict = _verdict(network, info, layer)
    if values == "logit" and (methods != ["hirescam"] or not verdict.guaranteed):
        why = (
            f"methods {', '.join(m for m in methods if m != 'hirescam')} have no units"
            if methods != ["hirescam"]
            else verdict.text()
        )
        raise ModelError(
            f"logit values need HiResCAM at a layer where its guarantee holds ({why}); "
            "use the default unit values, or --method hirescam at a guaranteed layer "
            "(see `hirescam3d audit`)"
        )
    timings["audit_s"] = time.perf_counter() - t

    step("preprocess", 0.1)
    t = time.perf_counter()
    pre = preprocess_transforms(info, "image", from_array=True)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    data = {"image": MetaTensor(volume, affine=torch.as_tensor(affine))}
    model_region = None
    if scan_region is None:
        preprocessed = _preprocess(pre, data)
    else:  # the region follows the scan's spatial steps, nearest-neighbour
        data["region"] = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(scan_region, dtype=np.float32)),
            affine=torch.as_tensor(affine),
        )
        both = preprocess_transforms(info, "image", label_keys="region", from_array=True)
        done = _preprocess_all(both, data)
        preprocessed, model_region = done["image"], done["region"].as_tensor()[0].cpu()
        if scan_region.dtype == bool:
            model_region = model_region > 0.5
        if not bool((model_region != 0).any()):
            raise InputError(
                f"the region ({int(np.count_nonzero(scan_region))} scan voxels) lies outside "
                "the model's field of view after preprocessing (it was cropped away): there "
                "is nothing to explain"
            )
        del done
    del volume, data
    grid = ModelGrid.of(preprocessed, pre, image.shape, affine)
    crop = _crop_warning(preprocessed, info)
    if crop:
        notes.append(crop)
    timings["preprocess_s"] = time.perf_counter() - t

    step("explain", 0.3)
    t = time.perf_counter()
    x = preprocessed.as_tensor()[None].to(dev)

    def passes(done: int, total: int) -> None:  # perturbation methods: many model passes
        step(f"explain: {done}/{total} model passes", 0.3 + 0.15 * done / max(total, 1))

    def windows(done: int, total: int) -> None:  # sliding windows: one call per batch
        step(f"explain: window {done}/{total}", 0.3 + 0.15 * done / max(total, 1))

    explainer = Explainer(
        network, layer, methods[0], class_names=class_names, progress=passes,
        task=info.activation if segmentation else None,
        output_selector=output_selector_of(network),
    )  # fmt: skip
    seg = window = None
    identity = postprocess.stretch_geometry(grid.shape, grid.shape)
    if segmentation:
        window = _window(info, grid.shape, roi_size, overlap)
        schedule = {"mode": "gaussian"}
        if slices:  # a MONAI bundle's SliceInferer: slice by slice on its own schedule
            window = None
        elif roi_size is None and window is not None and info.inferer:
            # a MONAI bundle's SlidingWindowInferer: explained on its own schedule
            window, overlap, sw_batch_size, schedule = _bundle_schedule(info.inferer, window)
        seg = _explain_segmentation(
            explainer, x, class_names, requested, methods,
            "predicted" if model_region is None else model_region.to(dev), info.activation,
            window, overlap, sw_batch_size, schedule, windows,
            info.inferer if slices else None, keep_output=bool(info.postprocessing),
            mask_rule=info.mask_postprocessing,
        )  # fmt: skip
        chosen, selection, raw = seg.chosen, seg.selection, seg.raw
        notes.extend(seg.notes)
        logit_of = {n: s[0] for n, s in zip(class_names, seg.stats, strict=True)}
        prob_of = {n: s[2] for n, s in zip(class_names, seg.stats, strict=True)}
        # sliding windows and slices: maps blended on the model's input grid (identity)
        layer_geometry = identity if window is not None or slices else explainer.geometry(x)
    else:
        targets = requested or class_names  # all classes when choosing by probability
        results = explainer.explain(x, targets, methods, maps=False)
        layer_geometry = explainer.geometry(x)
        logits = results[methods[0]].scores[0].detach().float().cpu()
        probs = _probabilities(logits, info.task)
        logit_of = {n: float(v) for n, v in zip(class_names, logits.tolist(), strict=True)}
        prob_of = {n: float(v) for n, v in zip(class_names, probs.tolist(), strict=True)}
    if not segmentation and requested is None:
        chosen = [n for n in class_names if prob_of[n] >= PROBABILITY_THRESHOLD]
        selection = f"every finding with probability >= {PROBABILITY_THRESHOLD}"
        if not chosen:
            notes.append(
                f"no finding has probability >= {PROBABILITY_THRESHOLD}; nothing was explained "
                "(name findings explicitly to explain them anyway)"
            )
    elif not segmentation:
        chosen, selection = requested, "requested"
    if not segmentation:
        raw = {
            (f, m): results[m].raw[0, targets.index(f)].detach().cpu()
            for f in chosen
            for m in methods
        }
        del results
    del x
    timings["explain_s"] = time.perf_counter() - t

    step("attribute", 0.45)
    t = time.perf_counter()
    # Maps live on the layer's grid, or (guided methods) on the input grid itself.
    grid_of = {
        m: identity if get_method(m).resolution == "input" else layer_geometry for m in methods
    }
    used = {id(grid_of[m]): grid_of[m] for f, m in raw}
    if not grid.fast:  # the region map rides the preprocessing onto the model grid instead
        grid.support = _support_on_model_grid(image, affine, organs, info)
        regions_of = {
            k: attribution.cell_regions(grid.support, g, organ_names) for k, g in used.items()
        }
    else:
        regions_of = {k: grid.cell_regions(g, organs, organ_names) for k, g in used.items()}
    coverage = float(grid.inside().float().mean())
    if coverage < 0.5:
        notes.append(
            f"the scan covers only {100 * coverage:.2g} % of the model's field of view (the "
            "rest is padding the model sees as air); explanations of such a scan say little"
        )
    units = verdict.guaranteed and verdict.bias is not None
    contributions: dict[str, Any] = {}
    shares: dict[str, Any] = {}
    for (finding, method), cells in raw.items():
        regions = regions_of[id(grid_of[method])]
        if method == "hirescam" and units:
            bias = verdict.bias[class_names.index(finding)]
            if seg is not None:  # the bias per voxel over the region: bias x region size
                bias *= seg.stats[class_names.index(finding)][1]
            contributions.setdefault(finding, {})[method] = attribution.contributions(
                cells, regions, logit_of[finding], bias
            )
        shares.setdefault(finding, {})[method] = attribution.positive_shares(cells, regions)
    empty = [f"{finding} ({method})" for finding, by_method in shares.items()
             for method, entry in by_method.items() if entry["no_positive_evidence"]]  # fmt: skip
    if raw and len(empty) == len(raw):
        notes.append(
            "no explained map has positive evidence (every map is 0 or negative): the maps of "
            f"{', '.join(empty)} are all zeros"
        )
    else:  # one warning per map, so a silent all-zero map cannot pass for a result
        notes += [f"the map of {e} has no positive evidence (every cell is 0 or negative): "
                  "it is all zeros" for e in empty]  # fmt: skip
    timings["attribute_s"] = time.perf_counter() - t
    sizes: dict[str, float] = {}
    if seg is not None:
        sizes = {n: s[1] for n, s in zip(class_names, seg.stats, strict=True)}
        seg.report["verdict_bias"] = (
            "HiResCAM's total = region score - bias per voxel x region size"
            + ("" if verdict.bias_uniform is not False else
               " (approximately: the output at zero activations varies over voxels; the "
               "mean bias per voxel is used)")
        )  # fmt: skip

    return Explanation(
        model=info,
        layer=layer,
        methods=methods,
        values=values,
        scores={
            n: FindingScore(logit_of[n], prob_of[n], n in chosen, sizes.get(n))
            for n in class_names
        },
        explained=chosen,
        selection=selection,
        verdict=verdict,
        contributions=contributions,
        organ_shares=shares if organs is not None else None,
        raw=raw,
        geometry=grid_of,
        grid=grid,
        coverage=coverage,
        device=str(dev),
        warnings=notes,
        timings=timings,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        masks=seg.masks if seg is not None else {},
        region=seg.report if seg is not None else None,
        prediction=seg.output if seg is not None and seg.masks else None,
    )


def _support_on_model_grid(
    image: np.ndarray, affine: np.ndarray, organs: np.ndarray | None, info: ModelInfo
) -> torch.Tensor:
    """The region map (0 padding, 1 scan, ``label + 1`` organ) taken through the model's
    preprocessing with nearest interpolation: ``(S, H, W)``. Only for preprocessing the
    separable path does not reproduce."""
    from monai.data import MetaTensor

    support = np.ones(image.shape, np.int16) if organs is None else organs.astype(np.int16) + 1
    pre = preprocess_transforms(info, "image", label_keys="support", from_array=True)
    data = pre({
        "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image, np.float32)),
                            affine=torch.as_tensor(affine)),
        "support": MetaTensor(torch.from_numpy(support), affine=torch.as_tensor(affine)),
    })
    return data["support"].as_tensor()[0].cpu()


def explain_image(
    image: np.ndarray,
    affine: np.ndarray,
    model: ModelArg = "demo",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    organs: np.ndarray | None = None,
    organ_names: dict[int, str] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    values: str = "unit",
    region: RegionArg = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> ScanExplanation:
    """Explain a scan on its own grid: :func:`explain_arrays` with every map on the scan's
    grid, held in memory (what the napari widget and ``compare`` show). ``region``,
    ``roi_size``, ``overlap``, ``sw_batch_size``: for segmentation models, as in
    :func:`explain_arrays`; the predicted masks are in ``ScanExplanation.masks``.

    Maps are placed on the model's grid by the layer's traced geometry and brought back to
    ``(I, J, K)`` with linear interpolation, as MONAI ``Invertd`` does (and by ``Invertd``
    itself for preprocessing the separable path does not cover):

    - ``values="unit"``: display maps in [0, 1] (ReLU, divided by the maximum);
    - ``values="logit"``: signed contribution density in logits per scan voxel, summing
      (over the scan) to the part of the contributions inside the scan.

    The report holds, per finding and method, the logit contributions (HiResCAM at a
    guaranteed layer: total, bias, outside the scan and per organ) and, with ``organs``,
    each map's shares of positive evidence per organ, all on the explanation grid.
    """
    result = explain_arrays(image, affine, model, findings, methods, layer, organs,
                            organ_names, device, progress, values, region, roi_size, overlap,
                            sw_batch_size)  # fmt: skip
    if progress is not None:
        progress("invert", 0.6)
    t = time.perf_counter()
    maps = {p: result.scan_map(p) for p in result.pairs}
    result.timings["invert_s"] = time.perf_counter() - t
    explanation = _scan_explanation(result, maps, organs, organ_names)
    explanation.masks = {f: result.mask_on_scan(f) for f in result.masks}
    return explanation


def _scan_explanation(
    result: Explanation,
    maps: Mapping[Pair, np.ndarray],
    organs: np.ndarray | None,
    organ_names: dict[int, str] | None,
) -> ScanExplanation:
    return ScanExplanation(
        maps=maps,  # type: ignore[arg-type]  # a dict, or computed on access
        probabilities=result.probabilities,
        logits=result.logits,
        report=result.to_dict(),
        warnings=result.warnings,
        model_grid_maps={p: result.model_map(p) for p in result.pairs},
        organs=organs,
        organ_names=organ_names,
        values=result.values,
        raw=result.raw,
    )


def _conserve(
    volume: np.ndarray, density: torch.Tensor, inside: torch.Tensor
) -> list[float]:
    """Scale a resampled logit density (in place) so it sums exactly to the model-grid
    contributions inside the scan; returns the two factors (positive, negative part).

    Linear resampling of a density that is constant on each cell's tile is not mass
    preserving where tiles are only a few scan voxels across (sampling error, a few
    percent for a focal map). The positive and the negative parts are therefore each
    scaled to their model-grid totals (1 for an empty part; NaN, null in JSON, if
    resampling lost a part). Works in slabs: no full-size temporary.
    """
    flat = torch.from_numpy(volume.reshape(-1, order="A"))
    density = density.double() * inside
    have = [0.0, 0.0]
    for chunk in flat.split(_SLAB_VOXELS):
        have[0] += float(chunk.clamp_min(0).sum(dtype=torch.float64))
        have[1] += float((-chunk).clamp_min(0).sum(dtype=torch.float64))
    factors = []
    for sign, part in zip((1.0, -1.0), have, strict=True):
        target = float((sign * density).clamp_min(0).sum())
        factors.append(target / part if part > 0 else (1.0 if target == 0 else math.nan))
    scale = [0.0 if math.isnan(f) else f for f in factors]
    for chunk in flat.split(_SLAB_VOXELS):
        chunk.mul_(torch.where(chunk > 0, scale[0], scale[1]).to(chunk.dtype))
    return factors


def _verdict(network: nn.Module, info: ModelInfo, layer: str) -> Any:
    """The audit's verdict at ``layer`` for this model's input (cached per network)."""
    return ModelHandle.of(network, info).audit(layer)


# -- files in, files out ------------------------------------------------------------------
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


def explain_scan(
    scan_path: str | Path,
    out_dir: str | Path,
    model: ModelArg = "demo",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    organs_path: str | Path | None = None,
    organ_names_path: str | Path | None = None,
    png: bool = False,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    report_name: str = "report.json",
    values: str = "unit",
    dtype: str = "float32",
    grid: str = "scan",
    formats: str | Sequence[str] = ("nifti",),
    seg_threshold: float = 0.5,
    series: str | None = None,
    region: RegionArg = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> tuple[ScanExplanation, dict[str, Path]]:
    """Explain a scan file and write the results into ``out_dir``.

    Writes ``<scan-stem>_<finding>_<method>.nii.gz`` per explained finding and method, one
    map at a time (computed, written, dropped), optional PNG montages, and
    ``report.json`` last. ``grid="scan"``: the scan's exact shape and affine;
    ``"model"``: the model's input grid with its own affine (viewers place it by affine;
    small files). ``dtype``: ``float32`` (exact), ``int16`` or ``uint8`` (scaled
    integers, see :func:`hirescam3d.io.outputs.write_map`). ``formats``: any of ``nifti``,
    ``dicom`` (a DICOM Parametric Map per map) and ``dicom-seg`` (a DICOM Segmentation of
    each map at ``seg_threshold``, in the map's units); for a scan that is not DICOM
    these also write the scan as a DICOM CT series (``<stem>_ct_dicom/``) for the maps
    to reference (see :class:`hirescam3d.io.outputs.DicomMaps`). ``series``: the series UID
    to read from a DICOM folder holding several. Every target path is checked
    before the first is written: an existing one without ``force`` is an
    :class:`~hirescam3d.io.scans.OutputError` and nothing is written.

    Segmentation models (see :func:`explain_arrays`): ``region`` is a mask file
    (nonzero = region) on the scan's grid (same shape, affine within 1e-3 mm, else an
    InputError naming both grids), a mask array, or ``"predicted"`` (the default); with
    ``"predicted"``, each explained finding's predicted mask is also written, on the
    scan's grid with its affine, as the label map ``<stem>_<finding>_predicted_mask.nii.gz``.
    ``report.json`` holds each finding's region score (logits) and the ``region``
    section. ``roi_size``/``overlap``/``sw_batch_size``: the sliding window.

    Returns the explanation (its ``maps`` computed on access) and ``{key: path}`` of the
    written files (keys as in :func:`hirescam3d.io.outputs.output_paths`).
    """
    from hirescam3d.io import outputs
    from hirescam3d.io import scans as io
    from hirescam3d.io.organs import align_organs, load_organ_map
    from hirescam3d.io.staging import Staging

    def step(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    timings: dict[str, float] = {}
    start = time.perf_counter()
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
    region_path = None
    if isinstance(region, (str, Path)) and str(region) != "predicted":
        region_path = Path(region)
        if not info.segmentation:
            raise InputError(
                f"region applies to segmentation models; {info.name} is a classifier: drop it"
            )
        if not region_path.exists():
            raise InputError(f"region {region_path}: no such file; check the path")
    masks = info.segmentation and (region is None or (isinstance(region, str)
                                                      and region == "predicted"))
    # a CT series is written for the DICOM maps to reference unless the scan is DICOM
    ct_series = dicom_out and not Path(scan_path).is_dir() and not io.looks_like_dicom(
        Path(scan_path))  # fmt: skip

    def paths_of(explained: Sequence[str]) -> dict[str, Path]:
        return outputs.output_paths(
            out_dir, stem, explained, methods, png, report_name, formats, ct_series, masks
        )

    outputs.ensure_folder(out_dir)
    if requested is not None:  # fail before any work when outputs exist
        outputs.check_writable(paths_of(requested).values(), force)
    step("read", 0.0)
    organs = organ_names = labels = None
    t = time.perf_counter()
    if organs_path is not None:  # first: the reader's temporaries never meet the scan's
        # stages.read: the result read ahead while the scan before was explained (batch)
        labels, labels_affine, organ_names = stages.read(
            organs_key(organs_path, organ_names_path), load_organ_map, organs_path,
            organ_names_path,
        )  # fmt: skip
    timings["read_organs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scan = stages.read(scan_key(scan_path, series), io.read_scan, scan_path, series)
    notes = list(scan.warnings)
    timings["read_s"] = time.perf_counter() - t
    if labels is not None:
        t = time.perf_counter()
        organs, note = align_organs(
            labels, labels_affine, scan.array.shape, scan.affine, f"organ map {organs_path}"
        )
        labels = None
        if note:
            notes.append(note)
        timings["read_organs_s"] += time.perf_counter() - t
    if region_path is not None:
        region = load_region(region_path, scan.array.shape, scan.affine)

    result = explain_arrays(
        scan.array, scan.affine, (network, info), requested, methods, layer, organs,
        organ_names, device, progress, values, region, roi_size, overlap, sw_batch_size,
    )
    region = None  # the scan-grid region is not needed any more
    result.warnings[:0] = notes
    paths = paths_of(result.explained)
    outputs.check_writable(paths.values(), force)
    # Everything is written into a temporary folder inside out_dir and moved into place
    # whole at the end: an error or a kill leaves out_dir as it was (hirescam3d.io.staging).
    stage = Staging(out_dir)
    paths = stage.redirect(paths)
    try:
        step("write", 0.9)
        written: dict[str, Path] = {}
        dicom = None
        if dicom_out:  # before the scan's voxels are freed: a non-DICOM scan is written first
            dicom = outputs.DicomMaps(scan, formats, seg_threshold, paths.get("ct_dicom"), stem,
                                      force)  # fmt: skip
            if ct_series:
                written["ct_dicom"] = paths["ct_dicom"]
        ct = scan.array if png else None
        scan.array = np.empty((0, 0, 0), np.float32)  # not needed any more: free it early

        timings["invert_s"] = timings["write_s"] = 0.0

        def write_pair(finding: str, method: str, volume: np.ndarray, volume_affine: Any,
                       on_scan: np.ndarray | None) -> None:  # fmt: skip
            key = f"{finding}/{method}"
            if "nifti" in formats:
                written[key] = outputs.write_map(
                    paths[key], volume, volume_affine, method, values, dtype, scan.header,
                    force=force,
                )  # fmt: skip
            if dicom is not None:
                written.update(dicom.write(paths, volume, volume_affine, finding, method, values))
            if png:
                from hirescam3d.evaluate.figures import save_montage

                written[key + "/png"] = save_montage(
                    ct, on_scan, paths[key + "/png"], affine=scan.affine,
                    title=f"{stem}: {finding} ({method}, p = {result.probabilities[finding]:.2f})",
                    force=force,
                )

        # each map is written in the background while the next one is placed (at most one
        # map being written, hirescam3d.pipeline.stages); written in order, all before the report
        with stages.background_writer() as writer:
            for finding, method in result.pairs:
                t = time.perf_counter()
                if grid == "scan":
                    volume, volume_affine = result.scan_map((finding, method)), scan.affine
                else:
                    volume, volume_affine = (result.model_map((finding, method)),
                                             result.grid.affine)  # fmt: skip
                on_scan = None
                if png:
                    on_scan = volume if grid == "scan" else result.scan_map((finding, method))
                timings["invert_s"] += time.perf_counter() - t
                writer.submit(write_pair, finding, method, volume, volume_affine, on_scan)
                del volume, on_scan
        timings["write_s"] += writer.seconds
        t = time.perf_counter()
        for finding in result.masks:  # the predicted masks, on the scan's grid
            written[f"{finding}/mask"] = outputs.write_labels(
                paths[f"{finding}/mask"], result.mask_on_scan(finding), scan.affine, force=force,
                name="predicted",
            )  # fmt: skip
        timings["write_s"] += time.perf_counter() - t
        timings.update(result.timings)
        timings["total_s"] = time.perf_counter() - start
        result.timings = timings

        report = result.to_dict()
        report["input"] = {
            **report.pop("image", {}),
            "path": str(Path(scan_path).resolve()),
            "sha256": scan.sha256,
            "spacing_mm": list(scan.spacing),
            "axcodes": scan.axcodes,
        }
        if result.region is not None:
            report["region"]["path"] = None if region_path is None else str(region_path.resolve())
            if result.masks:
                report["region"]["masks"] = {
                    f: paths[f"{f}/mask"].name for f in result.masks
                }  # fmt: skip
        if organs_path is not None:
            report["organ_map"] = {
                "path": str(Path(organs_path).resolve()),
                "names": {str(k): v for k, v in (organ_names or {}).items()},
            }
        if "nifti" in formats:
            report["outputs"] = {
                f: {m: paths[f"{f}/{m}"].name for m in methods} for f in result.explained
            }
        if dicom is not None:
            report["dicom"] = {
                fmt: {f: {m: paths[outputs.map_key(f, m, fmt)].name for m in methods}
                      for f in result.explained}
                for fmt in dicom.formats
            }  # fmt: skip
            report["dicom"]["source_series_uid"] = dicom.source.series_uid
            if ct_series:
                report["dicom"]["ct_series"] = paths["ct_dicom"].name
            if "dicom-seg" in formats:
                report["dicom"]["seg_threshold"] = float(seg_threshold)
        report["storage"] = {
            "formats": list(formats),
            "grid": grid,
            "dtype": dtype,
            "compresslevel": outputs.COMPRESSLEVEL[dtype],
            "affine": (scan.affine if grid == "scan" else result.grid.affine).tolist(),
        }
        if png:
            report["png"] = {
                f: {m: paths[f"{f}/{m}/png"].name for m in methods} for f in result.explained
            }
        written["report"] = outputs.write_json(paths["report"], report, force=force)
        written = stage.commit(written)
    except BaseException:
        stage.discard()
        raise
    step("done", 1.0)
    explanation = _scan_explanation(result, _LazyMaps(result), organs, organ_names)
    explanation.report = json.loads(json.dumps(_json_safe(report), default=str))
    return explanation, written
