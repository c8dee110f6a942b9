"""2D images through 2D models: picture -> preprocessing -> one explained pass -> maps
on the picture's pixels -> 2D NIfTI or PNG maps and PNG overlays.

The 2D counterpart of :mod:`hirescam3d.pipeline` (which explains 3D scans):

1. :func:`explain_picture` reads the image (:mod:`hirescam3d.io.image2d`);
2. :func:`explain_image2d` matches its channels to the model (grayscale repeated for a
   3-channel network; RGB to luminance, ITU-R 601, for a 1-channel one), puts its axes in
   the order the model was trained on (rows, columns for the zoo's photo networks, as
   torchvision reads images; columns, rows for other 2D models, as MONAI's ``LoadImage``
   reads PNG and NIfTI files), applies the model's MONAI preprocessing, runs the
   :class:`~hirescam3d.core.explainer.Explainer` once for every finding and method, places the
   maps on the model's input grid by the layer's traced geometry and takes them back to
   the picture's pixels with MONAI's ``Invertd``;
3. :func:`explain_picture` writes each map as a 2D NIfTI (``(I, J, 1)`` = columns, rows,
   with the image's affine) and/or a 16-bit grayscale PNG of the image's size, a PNG
   overlay with ``png=True``, and ``report.json`` last. Every path is checked before
   the first is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hirescam3d.errors import InputError
from hirescam3d.io.image2d import Image2D, read_image2d
from hirescam3d.pipeline.classification import explain_classes
from hirescam3d.pipeline.explanation import ExplainedPass, method_section, model_section
from hirescam3d.pipeline.options import (
    VALUES,
    Pair,
    audit_verdict,
    check_findings,
    check_methods,
    resolve_device,
    resolve_model,
    software_versions,
    step,
)

# MONAI dictionary transforms a 2D model's preprocessing may hold (LoadImaged and
# EnsureChannelFirstd are the reader's job here). Spatial ones are undone by Invertd.
_SPATIAL = ("Resized", "ResizeWithPadOrCropd", "SpatialPadd", "CenterSpatialCropd", "Zoomd")
_INTENSITY = ("ScaleIntensityRanged", "ScaleIntensityd", "NormalizeIntensityd", "EnsureTyped")
FORMATS_2D = {"nifti": ".nii.gz", "png": ".png"}
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class PictureExplanation:
    """What :func:`explain_image2d` returns. ``maps``: ``{(finding, method): float32
    (H, W)}`` on the image's pixels ([0, 1] display maps, or logits per pixel with
    ``values="logit"``); ``raw``: the methods' cell maps; ``contributions``: HiResCAM's
    parts in logits at a guaranteed layer (``total + bias = logit``)."""

    image: Image2D
    model: Any
    layer: str
    methods: list[str]
    values: str
    logits: dict[str, float]
    probabilities: dict[str, float]
    explained: list[str]
    selection: str
    maps: dict[Pair, np.ndarray]
    raw: dict[Pair, torch.Tensor]
    contributions: dict[str, dict[str, Any]]
    verdict: Any
    model_shape: tuple[int, ...]
    axes: str
    device: str
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pairs(self) -> list[Pair]:
        return list(self.raw)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (``report.json`` before file details)."""
        return {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model_section(self.model),
            "input": {
                "path": str(self.image.path.resolve()), "sha256": self.image.sha256,
                "kind": self.image.source, "mode": self.image.mode,
                "shape": list(self.image.shape), "affine": self.image.affine.tolist(),
                "spacing_mm": list(self.image.spacing), "model_grid_shape": list(self.model_shape),
                "model_axes": self.axes,
            },
            **method_section(self.layer, self.verdict, self.values, self.methods, self.selection),
            "findings": {
                n: {"logit": self.logits[n], "probability": self.probabilities[n],
                    "explained": n in self.explained}
                for n in self.logits
            },
            "explained": self.explained,
            "contributions": self.contributions,
            "device": self.device,
            "timings_s": dict(self.timings),
            "versions": software_versions(),
            "warnings": self.warnings,
        }  # fmt: skip


def model_axes(info: Any) -> str:
    """``"rows"``: the model reads ``(C, H, W)`` as torchvision does (the zoo's photo
    networks); ``"columns"``: ``(C, W, H)``, MONAI ``LoadImage``'s order (2D bundles)."""
    return "rows" if info.input.modality == "photograph" else "columns"


def check_model_2d(info: Any, what: str) -> None:
    """InputError (one line) unless ``info`` is a 2D model; ``what`` names the input."""
    n = info.input.spatial_dims
    if n != 2:
        size = " x ".join(map(str, info.input.spatial_size))
        raise InputError(
            f"{what} is a 2D image; {info.name} is a {n}D model (input {size}): pass a 3D "
            "scan (NIfTI, NRRD, MHA/MHD or a DICOM series), or choose a 2D model such as "
            "resnet34v or densenet121v"
        )


def _match_channels(image: Image2D, channels: int, notes: list[str]) -> np.ndarray:
    arr = image.array
    if arr.shape[0] == channels:
        return arr
    if arr.shape[0] == 1:
        return np.repeat(arr, channels, axis=0)
    if channels == 1 and arr.shape[0] == 3:
        notes.append(f"{image.path}: an RGB image for a 1-channel model: converted to "
                     "luminance (0.299 R + 0.587 G + 0.114 B)")  # fmt: skip
        return np.tensordot(np.asarray(_LUMA, np.float32), arr, axes=1)[None]
    raise InputError(
        f"{image.path}: {arr.shape[0]} channels, and the model takes {channels}; pass a "
        "grayscale or RGB image"
    )


def preprocessing_2d(info: Any) -> Any:
    """The model's preprocessing for an image already ``(C, *spatial)``: a MONAI
    ``Compose`` of its dictionary transforms on key ``"image"`` (InputError naming a
    transform that is not supported for 2D images)."""
    import monai.transforms as mt

    steps = []
    for spec in info.preprocessing:
        name = spec.get("_target_")
        name = str(name).rsplit(".", 1)[-1]
        if name in ("LoadImaged", "EnsureChannelFirstd"):
            continue
        if name not in _SPATIAL + _INTENSITY:
            raise InputError(
                f"{info.name}: preprocessing transform {name!r} is not supported for 2D "
                f"images; supported: {', '.join(_SPATIAL + _INTENSITY)}"
            )
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "keys")}
        steps.append(getattr(mt, name)(keys="image", **kwargs))
    return mt.Compose(steps)


def _invert(pre: Any, image: Any, model_map: torch.Tensor) -> np.ndarray:
    """A model-grid map ``(*model)`` back on the image's grid with MONAI ``Invertd``."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    maps = MetaTensor(model_map[None].float(), meta=dict(image.meta))
    inverter = Invertd("maps", transform=pre, orig_keys="image", nearest_interp=False)
    back = inverter({"maps": maps, "image": image})["maps"]
    plain = back.as_tensor() if isinstance(back, MetaTensor) else torch.as_tensor(back)
    return plain[0].detach().cpu().numpy().astype(np.float32)


def _conserve(plane: np.ndarray, density: torch.Tensor) -> np.ndarray:
    """Scale the positive and the negative part of a resampled logit density so each sums
    to its model-grid total (linear resampling does not preserve sums)."""
    out = plane.astype(np.float64)
    for sign in (1.0, -1.0):
        part = np.clip(sign * out, 0, None)
        have, want = part.sum(), float((sign * density.double()).clamp_min(0).sum())
        if have > 0:
            out = np.where(sign * out > 0, out * (want / have), out)
    return out.astype(np.float32)


class _Picture(NamedTuple):
    """The checked inputs of :func:`explain_image2d`: the model, the picture, the requested
    findings (None: chosen by probability), methods and layer."""

    network: torch.nn.Module
    info: Any
    picture: Image2D
    requested: list[str] | None
    methods: list[str]
    layer: str


def _check_picture(
    image: Image2D | str | Path,
    model: Any,
    findings: Sequence[str] | None,
    methods: Sequence[str],
    layer: str | None,
    values: str,
) -> _Picture:
    """The arguments of :func:`explain_image2d`, checked in order (the picture is read, the
    model resolved); InputError for a 3D or a segmentation model."""
    if values not in VALUES:
        raise InputError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    network, info = resolve_model(model)
    picture = image if isinstance(image, Image2D) else read_image2d(image)
    check_model_2d(info, str(picture.path))
    if info.segmentation:
        raise InputError(
            f"{info.name} is a 2D segmentation model; the 2D image path explains classifiers "
            "(use hirescam3d.Explainer with region=... for a segmentation network)"
        )
    requested = check_findings(findings, list(info.class_names))
    methods = check_methods(methods)
    return _Picture(network, info, picture, requested, methods, layer or info.target_layer)


def _audit_2d(request: _Picture, values: str) -> Any:
    """The audit's verdict at the explained layer; InputError if ``values="logit"`` but
    HiResCAM's guarantee does not hold there (or other methods are asked for)."""
    verdict = audit_verdict(request.network, request.info, request.layer)
    if values == "logit" and (request.methods != ["hirescam"] or not verdict.guaranteed):
        raise InputError(
            "logit values need HiResCAM at a layer where its guarantee holds; use the "
            "default unit values, or --method hirescam at a guaranteed layer"
        )
    return verdict


class _Prepared(NamedTuple):
    """The picture on the model's grid: ``pre`` the preprocessing (a ``Compose``),
    ``image`` its result ``(C, *model)``, ``axes`` the model's axis order."""

    pre: Any
    image: Any
    axes: str


def _prepare(picture: Image2D, info: Any, notes: list[str]) -> _Prepared:
    """Channels matched to the model, axes in its order, through its preprocessing; a
    note (in ``notes``) for values outside the model's input window."""
    from monai.data import MetaTensor

    arr = _match_channels(picture, info.input.in_channels, notes)
    axes = model_axes(info)
    if axes == "columns":
        arr = arr.transpose(0, 2, 1)
    lo, hi = float(arr.min()), float(arr.max())
    window = info.input.window
    if window is not None and (lo < window[0] - 0.5 or hi > window[1] + 0.5):
        notes.append(
            f"{picture.path}: values range {lo:g} .. {hi:g}, outside the model's input "
            f"window {window[0]:g} .. {window[1]:g} ({info.input.modality}); they are "
            "clipped to it, so the explanation may say little"
        )
    spacing = picture.spacing if axes == "rows" else picture.spacing[::-1]
    affine2d = torch.diag(torch.tensor([spacing[0], spacing[1], 1.0], dtype=torch.float64))
    pre = preprocessing_2d(info)
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), affine=affine2d)
    return _Prepared(pre, pre({"image": tensor})["image"], axes)


def _on_picture(
    run: ExplainedPass,
    raw: dict[Pair, torch.Tensor],
    prepared: _Prepared,
    verdict: Any,
    values: str,
    class_names: list[str],
) -> tuple[dict[Pair, np.ndarray], dict[str, dict[str, Any]]]:
    """``(maps, contributions)``: every raw map on the picture's pixels ``(H, W)`` (placed
    on the model's grid, brought back with ``Invertd``), and HiResCAM's contributions."""
    from hirescam3d.core import attribution, postprocess
    from hirescam3d.core.methods import get_method

    shape = tuple(int(n) for n in prepared.image.shape[1:])
    identity = postprocess.stretch_geometry(shape, shape)
    contributions: dict[str, dict[str, Any]] = {}
    maps: dict[Pair, np.ndarray] = {}
    for (finding, method), cells in raw.items():
        geo = identity if get_method(method).resolution == "input" else run.layer_geometry
        if method == "hirescam" and verdict.guaranteed and verdict.bias is not None:
            regions = attribution.CellRegions(torch.ones(cells.shape, dtype=torch.float64), {})
            contributions.setdefault(finding, {})[method] = attribution.contributions(
                cells, regions, run.logits[finding], verdict.bias[class_names.index(finding)]
            )
        if values == "logit":
            density = postprocess.density(cells[None, None], geo, shape)[0, 0]
            plane = _conserve(_invert(prepared.pre, prepared.image, density), density)
        else:
            placed = postprocess.place(postprocess.relu(cells[None, None]), geo, shape)[0, 0]
            top = float(placed.max())
            unit = placed / top if top > 0 else torch.zeros_like(placed)
            plane = np.clip(_invert(prepared.pre, prepared.image, unit), 0.0, 1.0)
        columns = prepared.axes == "columns"
        maps[(finding, method)] = np.ascontiguousarray(plane.T if columns else plane)
    return maps, contributions


def explain_image2d(
    image: Image2D | str | Path,
    model: Any = "resnet34v",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    device: str | torch.device = "cpu",
    values: str = "unit",
    progress: Callable[[str, float], None] | None = None,
) -> PictureExplanation:
    """Explain a 2D image with a 2D classification model: one forward pass, every finding
    and method; maps ``(H, W)`` on the image's pixels.

    ``image``: an :class:`~hirescam3d.io.image2d.Image2D` or a path; ``model``: zoo name,
    bundle folder, handle or ``(network, info)``. ``findings=None``: every finding with
    probability >= 0.5. ``values="logit"``: HiResCAM at a guaranteed layer only; maps in
    logits per pixel, summing to the contributions. The network is never changed.
    """
    from hirescam3d.core.explainer import Explainer

    request = _check_picture(image, model, findings, methods, layer, values)
    info, class_names = request.info, list(request.info.class_names)
    dev = resolve_device(device)
    request.network.to(dev)
    notes = list(request.picture.warnings)
    timings: dict[str, float] = {}
    step(progress, "audit", 0.05)
    t = time.perf_counter()
    verdict = _audit_2d(request, values)
    timings["audit_s"] = time.perf_counter() - t
    step(progress, "preprocess", 0.1)
    t = time.perf_counter()
    prepared = _prepare(request.picture, info, notes)
    timings["preprocess_s"] = time.perf_counter() - t
    step(progress, "explain", 0.3)
    t = time.perf_counter()
    x = prepared.image.as_tensor()[None].to(dev)
    explainer = Explainer(request.network, request.layer, request.methods[0],
                          class_names=class_names)  # fmt: skip
    run = explain_classes(explainer, x, class_names, request.requested, request.methods,
                          info.task)  # fmt: skip
    notes += run.notes
    raw = {pair: cells.float() for pair, cells in run.raw.items()}
    del x
    timings["explain_s"] = time.perf_counter() - t
    step(progress, "invert", 0.6)
    t = time.perf_counter()
    maps, contributions = _on_picture(run, raw, prepared, verdict, values, class_names)
    timings["invert_s"] = time.perf_counter() - t
    return PictureExplanation(
        request.picture, info, request.layer, request.methods, values, run.logits,
        run.probabilities, run.chosen, run.selection, maps, raw, contributions, verdict,
        tuple(int(n) for n in prepared.image.shape[1:]), prepared.axes, str(dev), notes,
        timings,
    )  # fmt: skip


def check_formats_2d(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,png"`` -> the 2D map formats, once each (InputError for others)."""
    from hirescam3d.io.outputs import split_formats

    chosen = split_formats(formats)
    bad = [f for f in chosen if f not in FORMATS_2D]
    if bad or not chosen:
        raise InputError(
            f"output format {', '.join(bad) or '(none)'} is not available for 2D images; "
            f"choose {' or '.join(FORMATS_2D)} (e.g. --format nifti,png)"
        )
    return chosen


def picture_paths(
    out_dir: str | Path, stem: str, findings: Sequence[str], methods: Sequence[str],
    formats: Sequence[str], overlay: bool, report_name: str = "report.json",
) -> dict[str, Path]:
    """Every file :func:`explain_picture` writes: ``"<f>/<m>"`` (NIfTI map),
    ``"<f>/<m>/map_png"`` (PNG map), ``"<f>/<m>/png"`` (overlay), ``"report"``."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for f in findings:
        for m in methods:
            if "nifti" in formats:
                paths[f"{f}/{m}"] = out / f"{stem}_{f}_{m}.nii.gz"
            if "png" in formats:
                paths[f"{f}/{m}/map_png"] = out / f"{stem}_{f}_{m}_map.png"
            if overlay:
                paths[f"{f}/{m}/png"] = out / f"{stem}_{f}_{m}_overlay.png"
    paths["report"] = out / report_name
    return paths


def write_map_png(path: str | Path, plane: np.ndarray, force: bool = False) -> Path:
    """A [0, 1] map ``(H, W)`` as a 16-bit grayscale PNG (value * 65535, rounded)."""
    from PIL import Image

    from hirescam3d.io.outputs import atomic_write

    levels = np.round(np.clip(plane, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return atomic_write(path, lambda tmp: Image.fromarray(levels).save(tmp, format="PNG"),
                        force=force)  # fmt: skip


def write_overlay_png(
    image: Image2D, plane: np.ndarray, path: str | Path, force: bool = False, alpha: float = 0.5
) -> Path:
    """The image (grayscale windowed to its 1st..99th percentile, or RGB) with the map in
    a colormap on top, at the image's own size: ``inferno`` for [0, 1] maps, ``RdBu_r``
    centred on 0 for signed ones; pixels under 5 % of the top are left uncovered."""
    from matplotlib import colormaps
    from PIL import Image

    from hirescam3d.io.outputs import atomic_write

    arr = image.array
    if image.source == "photo" and float(arr.max()) <= 255.0 and float(arr.min()) >= 0.0:
        base = arr / 255.0
    else:
        lo, hi = np.percentile(arr, [1.0, 99.0])
        base = (arr - lo) / (hi - lo) if hi > lo else arr - lo
    base = np.clip(base, 0.0, 1.0)
    rgb = np.repeat(base, 3, axis=0) if base.shape[0] == 1 else base[:3]
    rgb = rgb.transpose(1, 2, 0)
    signed = bool((plane < 0).any())
    top = float(np.abs(plane).max()) or 1.0
    scaled = (plane / top + 1.0) / 2.0 if signed else np.clip(plane / top, 0.0, 1.0)
    heat = colormaps["RdBu_r" if signed else "inferno"](scaled)[..., :3]
    weight = alpha * (np.abs(plane) >= 0.05 * top)[..., None]
    blended = (1.0 - weight) * rgb + weight * heat
    pixels = np.round(blended * 255.0).astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(pixels, "RGB").save(tmp, format="PNG"),
                        force=force)  # fmt: skip


def explain_picture(
    path: str | Path,
    out_dir: str | Path,
    model: Any = "resnet34v",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    png: bool = False,
    device: str = "auto",
    force: bool = False,
    values: str = "unit",
    formats: str | Sequence[str] = ("nifti",),
    progress: Callable[[str, float], None] | None = None,
    report_name: str = "report.json",
) -> tuple[PictureExplanation, dict[str, Path]]:
    """Explain a 2D image file and write the maps into ``out_dir``.

    ``formats``: ``nifti`` (``<stem>_<finding>_<method>.nii.gz``, shape ``(W, H, 1)``
    with the image's affine) and/or ``png`` (``..._map.png``, 16-bit grayscale, the
    image's size; unit values only); ``png=True`` adds ``..._overlay.png``. An existing
    target without ``force`` is an :class:`~hirescam3d.io.scans.OutputError` before any work;
    ``report.json`` is written last. Returns the explanation and ``{key: path}``.
    """
    from hirescam3d.io import outputs
    from hirescam3d.io.scans import scan_stem

    start = time.perf_counter()
    chosen_formats = check_formats_2d(formats)
    if values == "logit" and "png" in chosen_formats:
        raise InputError("a PNG map holds [0, 1] values; --values logit maps are signed: "
                         "use --format nifti")  # fmt: skip
    methods = check_methods(methods)
    network, info = resolve_model(model)
    requested = check_findings(findings, info.class_names)
    stem = scan_stem(path)
    for suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)] or stem

    def paths_of(explained: Sequence[str]) -> dict[str, Path]:
        return picture_paths(out_dir, stem, explained, methods, chosen_formats, png, report_name)

    if requested is not None:
        outputs.check_writable(paths_of(requested).values(), force)
    picture = read_image2d(path)
    result = explain_image2d(picture, (network, info), requested, methods, layer, device,
                             values, progress)  # fmt: skip
    paths = paths_of(result.explained)
    outputs.ensure_folder(out_dir)
    outputs.check_writable(paths.values(), force)
    if progress is not None:
        progress("write", 0.9)
    t = time.perf_counter()
    written: dict[str, Path] = {}
    for (finding, method), plane in result.maps.items():
        key = f"{finding}/{method}"
        if key in paths:
            volume = np.ascontiguousarray(plane.T)[:, :, None]  # (I, J, 1): columns, rows
            written[key] = outputs.write_map(paths[key], volume, picture.affine, method,
                                             values, force=force)  # fmt: skip
        if key + "/map_png" in paths:
            written[key + "/map_png"] = write_map_png(paths[key + "/map_png"], plane, force)
        if key + "/png" in paths:
            written[key + "/png"] = write_overlay_png(picture, plane, paths[key + "/png"], force)
    result.timings["write_s"] = time.perf_counter() - t
    result.timings["total_s"] = time.perf_counter() - start
    report = result.to_dict()
    report["outputs"] = {k: p.name for k, p in written.items()}
    report["storage"] = {"formats": list(chosen_formats), "dtype": "float32",
                         "png_map": "uint16, value x 65535"}  # fmt: skip
    written["report"] = outputs.write_json(paths["report"], report, force=force)
    if progress is not None:
        progress("done", 1.0)
    return result, written


__all__ = [
    "PictureExplanation", "explain_image2d", "explain_picture", "check_model_2d",
    "model_axes", "preprocessing_2d",
]
