"""Scan -> MONAI preprocessing -> one explained forward pass -> Invertd -> scan-grid maps.

The CLI and the napari plugin are thin shells over :func:`explain_image` (arrays in
memory) and :func:`explain_scan` (a file in; NIfTI maps and ``report.json`` out).
:func:`preprocess_transforms` builds the model's input with MONAI dictionary transforms;
the :class:`~hirescam3d.explainer.Explainer` gives the raw maps; contributions and organ
shares are computed on the explanation grid (:mod:`hirescam3d.attribution`); the maps
are placed on the model's grid by the layer's traced geometry and brought back to the
scan's grid with ``Invertd`` (linear interpolation).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bundle import PREPROCESSING_TRANSFORMS, ModelInfo, preprocessing_transforms
from .errors import HiResCAMError, InputError, ModelError, TargetError
from .handle import ModelHandle, match_findings
from .methods import get_method

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
    (``values == "unit"``) or logits per voxel (``values == "logit"``).
    ``probabilities`` / ``logits``: ``{finding: value}`` for every class of the model.
    ``report``: JSON-ready dict (what ``report.json`` holds).
    ``warnings``: texts of everything worth telling the user (also in the report).
    ``model_grid_maps``: ``{(finding, method): (S, H, W)}`` on the model's input grid.
    ``organs`` / ``organ_names``: the organ labels on the scan's grid, if given.
    ``raw``: ``{(finding, method): tensor}`` each method's raw map before any
    post-processing, on the explained layer's grid (cells; the input grid for methods
    that work at input resolution), on the CPU: signed, logits per cell for HiResCAM at
    a guaranteed layer. What :func:`hirescam3d.metrics.l2_to_exact` compares.
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

    A thin wrapper over :meth:`hirescam3d.handle.ModelHandle.resolve` and ``load()``;
    pairs are returned as given.
    """
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], nn.Module):
            raise ModelError("model must be a zoo name, a bundle folder or (network, info)")
        return model
    return ModelHandle.resolve(model).load()


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

    from . import __version__

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
        if name not in PREPROCESSING_TRANSFORMS:
            raise ModelError(
                f"preprocessing transform {name!r} is not supported; allowed: "
                f"{', '.join(PREPROCESSING_TRANSFORMS)}"
            )
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


def invert_maps(
    pre: Any,
    image: Any,
    model_grid: dict[tuple[str, str], torch.Tensor],
    shape: tuple[int, ...],
    affine: np.ndarray,
    clip: bool = True,
) -> dict[tuple[str, str], np.ndarray]:
    """Map ``(1, *model_grid)`` maps back to the scan's grid with ``Invertd`` (linear).

    ``pre`` is the preprocessing applied to ``image`` (the preprocessed MetaTensor whose
    applied operations are undone). Returns float32 ``shape`` volumes, clipped to [0, 1]
    with ``clip`` (display maps), else as resampled (signed values).
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    if not model_grid:
        return {}
    # One inverse for all maps (they share one resampling grid): stack them as the
    # channels of one MetaTensor; it runs on the image's device (fast on a GPU).
    stack = MetaTensor(torch.cat(list(model_grid.values())), meta=dict(image.meta))
    inverter = Invertd("maps", transform=pre, orig_keys="image", nearest_interp=False)
    inverted = inverter({"maps": stack, "image": image})["maps"]
    plain = inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted
    back = torch.as_tensor(plain).detach().cpu().numpy()
    if back.shape[1:] != tuple(shape) or (
        isinstance(inverted, MetaTensor)
        and not np.allclose(inverted.affine.cpu().numpy(), affine, atol=1e-3)
    ):
        raise HiResCAMError(
            f"internal error: the inverted maps (shape {back.shape[1:]}) are not on the "
            f"scan's grid (shape {tuple(shape)})"
        )
    if clip:
        back = np.clip(back, 0.0, 1.0)
    return {p: back[i].astype(np.float32) for i, p in enumerate(model_grid)}


VALUES = ("unit", "logit")


def _model_grid_maps(
    raw: torch.Tensor, geometry: Any, values: str, size: Sequence[int]
) -> torch.Tensor:
    """``(1, *size)`` on the model's input grid: a [0, 1] display map (``unit``) or the
    contribution density in logits per model voxel (``logit``)."""
    from . import postprocess

    grid = raw[None, None].float()
    if values == "logit":
        return postprocess.density(grid, geometry, size)[0]
    return postprocess.unit_maps(grid, geometry, size)[0]


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
) -> ScanExplanation:
    """Explain a scan on its own grid.

    ``image``: ``(I, J, K)`` intensities (HU for CT); ``affine``: voxel -> RAS mm.
    ``findings=None``: every finding with probability >= 0.5 (none -> no maps, a warning).
    All findings and methods come from one forward pass at the model grid. Each raw map
    is placed on the model's grid by the layer's traced geometry and mapped back with
    MONAI ``Invertd`` (linear interpolation) to ``(I, J, K)``:

    - ``values="unit"``: display maps in [0, 1] (ReLU, divided by the maximum);
    - ``values="logit"``: signed contribution density in logits per scan voxel, summing
      (over the scan) to the part of the contributions inside the scan. Only for
      HiResCAM at a layer where the audit proves the guarantee (ModelError otherwise).

    The report holds, per finding and method, the logit contributions (HiResCAM at a
    guaranteed layer: total, bias, outside the scan and per organ) and, with ``organs``
    (integer labels ``(I, J, K)`` on the same grid, named by ``organ_names``), each map's
    shares of positive evidence per organ, all computed on the explanation grid.
    ``progress(stage, fraction)`` is called as stages start. The network is moved to
    ``device`` ("auto": CUDA if available) and left there.
    """
    from monai.data import MetaTensor

    from . import attribution, postprocess
    from .explainer import Explainer

    def step(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

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
            "align them first with hirescam3d.organs.align_organs"
        )
    if values not in VALUES:
        raise InputError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    network, info = resolve_model(model)
    class_names = list(info.class_names)
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
    # The region map rides along the spatial steps (nearest): 0 outside the scan (padding),
    # 1 inside, label + 1 inside organ ``label``.
    support = np.ones(image.shape, np.int16) if organs is None else organs.astype(np.int16) + 1
    pre = preprocess_transforms(info, "image", label_keys="support", from_array=True)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    data = pre(
        {
            "image": MetaTensor(volume, affine=torch.as_tensor(affine)),
            "support": MetaTensor(torch.from_numpy(support), affine=torch.as_tensor(affine)),
        }
    )
    crop = _crop_warning(data["image"], info)
    if crop:
        notes.append(crop)
    timings["preprocess_s"] = time.perf_counter() - t

    step("explain", 0.3)
    t = time.perf_counter()
    x = data["image"].as_tensor()[None].to(dev)
    def passes(done: int, total: int) -> None:  # perturbation methods: many model passes
        step(f"explain: {done}/{total} model passes", 0.3 + 0.15 * done / max(total, 1))

    explainer = Explainer(network, layer, methods[0], class_names=class_names, progress=passes)
    targets = requested or class_names  # all classes when choosing by probability
    results = explainer.explain(x, targets, methods, maps=False)
    geometry = explainer.geometry(x)
    logits = results[methods[0]].scores[0].detach().float().cpu()
    probs = _probabilities(logits, info.task)
    logit_of = {n: float(v) for n, v in zip(class_names, logits.tolist(), strict=True)}
    prob_of = {n: float(v) for n, v in zip(class_names, probs.tolist(), strict=True)}
    if requested is None:
        chosen = [n for n in class_names if prob_of[n] >= PROBABILITY_THRESHOLD]
        selection = f"every finding with probability >= {PROBABILITY_THRESHOLD}"
        if not chosen:
            notes.append(
                f"no finding has probability >= {PROBABILITY_THRESHOLD}; nothing was explained "
                "(name findings explicitly to explain them anyway)"
            )
    else:
        chosen, selection = requested, "requested"
    raw = {
        (f, m): results[m].raw[0, targets.index(f)].detach().cpu()
        for f in chosen
        for m in methods
    }
    timings["explain_s"] = time.perf_counter() - t

    step("attribute", 0.45)
    t = time.perf_counter()
    # Maps live on the layer's grid, or (guided methods) on the input grid itself.
    size = tuple(x.shape[2:])
    identity = postprocess.stretch_geometry(size, size)
    grid_of = {m: identity if get_method(m).resolution == "input" else geometry for m in methods}
    support = data["support"].as_tensor()[0].cpu()
    regions_of = {
        id(g): attribution.cell_regions(support, g, organ_names) for g in {*grid_of.values()}
    }
    coverage = float((data["support"].as_tensor() > 0).float().mean())
    if coverage < 0.5:
        notes.append(
            f"the scan covers only {100 * coverage:.2g} % of the model's field of view (the "
            "rest is padding the model sees as air); explanations of such a scan say little"
        )
    units = verdict.guaranteed and verdict.bias is not None
    contributions: dict[str, Any] = {}
    shares: dict[str, Any] = {}
    for (finding, method), cells in raw.items():
        if method == "hirescam" and units:
            bias = verdict.bias[class_names.index(finding)]
            contributions.setdefault(finding, {})[method] = attribution.contributions(
                cells, regions_of[id(grid_of[method])], logit_of[finding], bias
            )
        regions = regions_of[id(grid_of[method])]
        shares.setdefault(finding, {})[method] = attribution.positive_shares(cells, regions)
    if raw and all(entry["no_positive_evidence"] for m in shares.values() for entry in m.values()):
        notes.append("no explained map has positive evidence (every map is 0 or negative)")
    timings["attribute_s"] = time.perf_counter() - t

    step("invert", 0.6)
    t = time.perf_counter()
    model_grid = {
        p: _model_grid_maps(cells, grid_of[p[1]], values, size) for p, cells in raw.items()
    }
    maps = invert_maps(pre, data["image"], model_grid, image.shape, affine, clip=values == "unit")
    if values == "logit":  # logits per model voxel -> logits per scan voxel
        model_voxel = abs(np.linalg.det(np.asarray(data["image"].affine)[:3, :3]))
        ratio = abs(np.linalg.det(affine[:3, :3])) / model_voxel
        inside = (data["support"].as_tensor()[0] > 0).cpu()
        for p in maps:
            maps[p], factors = _conserve(maps[p] * ratio, model_grid[p][0].cpu(), inside)
            contributions[p[0]][p[1]]["resampling_correction"] = factors
    timings["invert_s"] = time.perf_counter() - t

    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": info.name,
            "weights_sha256": info.weights_sha256,
            "trained": info.trained,
            "task": info.task,
            "bundle": None if info.bundle_path is None else str(info.bundle_path),
            "input": info.input.to_dict(),
        },
        "image": {
            "shape": list(image.shape),
            "affine": affine.tolist(),
            "model_grid_shape": list(size),
            "model_field_of_view_covered": coverage,
        },
        "layer": layer,
        "hirescam_guaranteed_faithful": verdict.guaranteed,
        "audit": verdict.to_dict(),
        "values": values,
        "methods": methods,
        "finding_selection": selection,
        "findings": {
            n: {"logit": logit_of[n], "probability": prob_of[n], "explained": n in chosen}
            for n in class_names
        },
        "explained": chosen,
        "contributions": contributions,
        "device": str(dev),
        "timings_s": timings,
        "versions": software_versions(),
        "warnings": notes,
    }
    if organs is not None:
        report["organs"] = shares
    return ScanExplanation(
        maps=maps,
        probabilities=prob_of,
        logits=logit_of,
        report=report,
        warnings=notes,
        model_grid_maps={p: m[0].detach().cpu().numpy() for p, m in model_grid.items()},
        organs=organs,
        organ_names=organ_names,
        values=values,
        raw=raw,
    )


def _conserve(
    resampled: np.ndarray, density: torch.Tensor, inside: torch.Tensor
) -> tuple[np.ndarray, list[float]]:
    """Logits per scan voxel from a resampled density, summing exactly to the model-grid
    contributions inside the scan.

    Linear resampling of a density that is constant on each cell's tile is not mass
    preserving where tiles are only a few scan voxels across (sampling error, a few
    percent for a focal map). The positive and the negative parts are therefore each
    scaled to their model-grid totals; the two factors are reported (1 for an empty part).
    """
    out = resampled.astype(np.float64)
    density = density.double() * inside
    factors = []
    for sign in (1.0, -1.0):
        part = np.clip(sign * out, 0.0, None)
        target = float((sign * density).clamp_min(0).sum())
        have = float(part.sum())
        # nothing to scale when the part is empty; NaN (null in JSON) if resampling lost it
        factor = target / have if have > 0 else (1.0 if target == 0 else math.nan)
        out = np.where(sign * out > 0, out * factor, out)
        factors.append(factor)
    return out.astype(np.float32), factors


def _verdict(network: nn.Module, info: ModelInfo, layer: str) -> Any:
    """The audit's verdict at ``layer`` for this model's input (cached per network)."""
    return ModelHandle.of(network, info).audit(layer)


# -- files in, files out ------------------------------------------------------------------
def output_paths(
    out_dir: str | Path,
    stem: str,
    findings: Sequence[str],
    methods: Sequence[str],
    png: bool = False,
    report_name: str = "report.json",
) -> dict[str, Path]:
    """Every file :func:`explain_scan` writes: keys ``"<finding>/<method>"`` (NIfTI),
    ``"<finding>/<method>/png"`` and ``"report"``."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for f in findings:
        for m in methods:
            paths[f"{f}/{m}"] = out / f"{stem}_{f}_{m}.nii.gz"
            if png:
                paths[f"{f}/{m}/png"] = out / f"{stem}_{f}_{m}.png"
    paths["report"] = out / report_name
    return paths


def _json_safe(value: Any) -> Any:
    """Replace NaN/Inf floats (not valid JSON) with None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
) -> tuple[ScanExplanation, dict[str, Path]]:
    """Explain a scan file and write the results into ``out_dir``.

    Writes ``<scan-stem>_<finding>_<method>.nii.gz`` per explained finding and method
    (float32 in [0, 1], the scan's exact shape and affine), optional PNG montages, and
    ``report.json`` last. Every target path is checked before the first is written:
    an existing one without ``force`` is an :class:`~hirescam3d.io.OutputError` and
    nothing is written. Returns the explanation and ``{key: path}`` of written files
    (keys as in :func:`output_paths`).
    """
    from . import io
    from .organs import align_organs, load_organ_map

    def step(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    methods = check_methods(methods)
    network, info = resolve_model(model)
    requested = check_findings(findings, info.class_names)
    stem = io.scan_stem(scan_path)
    io.ensure_folder(out_dir)
    if requested is not None:  # fail before any work when outputs exist
        io.check_writable(
            output_paths(out_dir, stem, requested, methods, png, report_name).values(), force
        )
    step("read", 0.0)
    t = time.perf_counter()
    scan = io.read_scan(scan_path)
    notes = list(scan.warnings)
    organs = organ_names = None
    if organs_path is not None:
        labels, labels_affine, organ_names = load_organ_map(organs_path, organ_names_path)
        organs, note = align_organs(
            labels, labels_affine, scan.array.shape, scan.affine, f"organ map {organs_path}"
        )
        if note:
            notes.append(note)
    timings["read_s"] = time.perf_counter() - t

    result = explain_image(
        scan.array, scan.affine, (network, info), requested, methods, layer, organs,
        organ_names, device, progress, values,
    )
    result.warnings[:0] = notes
    paths = output_paths(out_dir, stem, result.findings, methods, png, report_name)
    io.check_writable(paths.values(), force)

    step("write", 0.9)
    t = time.perf_counter()
    written: dict[str, Path] = {}
    for (finding, method), volume in result.maps.items():
        key = f"{finding}/{method}"
        written[key] = io.write_explanation(
            paths[key], volume, scan.affine, method, scan.header, force=force, values=values
        )
        if png:
            from .figures import save_montage

            written[key + "/png"] = save_montage(
                scan.array, volume, paths[key + "/png"], affine=scan.affine,
                title=f"{stem}: {finding} ({method}, p = {result.probabilities[finding]:.2f})",
                force=force,
            )
    timings["write_s"] = time.perf_counter() - t
    timings.update(result.report["timings_s"])
    timings["total_s"] = time.perf_counter() - start

    report = result.report
    report["input"] = {
        **report.pop("image", {}),
        "path": str(Path(scan_path).resolve()),
        "sha256": scan.sha256,
        "shape": list(scan.array.shape),
        "spacing_mm": list(scan.spacing),
        "axcodes": scan.axcodes,
    }
    if organs_path is not None:
        report["organ_map"] = {
            "path": str(Path(organs_path).resolve()),
            "names": {str(k): v for k, v in (organ_names or {}).items()},
        }
    report["outputs"] = {
        f: {m: paths[f"{f}/{m}"].name for m in methods} for f in result.findings
    }
    if png:
        report["png"] = {
            f: {m: paths[f"{f}/{m}/png"].name for m in methods} for f in result.findings
        }
    report["timings_s"] = timings
    report["warnings"] = result.warnings
    text = json.dumps(_json_safe(report), indent=2) + "\n"
    written["report"] = io.atomic_write(
        paths["report"], lambda tmp: tmp.write_text(text), force=force
    )
    step("done", 1.0)
    return result, written
