"""Scan -> model grid: the model's MONAI preprocessing of a scan held in memory.

:func:`preprocess_transforms` builds the bundle's dictionary transforms (invertible: MONAI
``Invertd`` undoes the spatial steps); :func:`to_model_grid` runs them on the scan (and on
a segmentation model's region, nearest-neighbour) and returns the model's input with its
:class:`~hirescam3d.core.placement.ModelGrid` on the scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hirescam3d.core import postprocess
from hirescam3d.core.placement import ModelGrid, _fast_extent
from hirescam3d.errors import InputError
from hirescam3d.models.bundle import PREPROCESSING_TRANSFORMS, ModelInfo, preprocessing_transforms

# Intensity transforms touch images only; spatial ones also move label maps (nearest).
_IMAGE_ONLY = ("ScaleIntensityRanged",)
_INTERPOLATING = ("Spacingd", "Resized")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


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


def _meta(volume: np.ndarray, affine: np.ndarray, dtype: Any) -> Any:
    """``volume`` ``(I, J, K)`` as a MONAI MetaTensor of ``dtype`` (None: its own) with the
    scan's ``affine``."""
    from monai.data import MetaTensor

    data = torch.from_numpy(np.ascontiguousarray(volume, dtype=dtype))
    return MetaTensor(data, affine=torch.as_tensor(affine))


@dataclass
class ModelInput:
    """The scan on the model's grid. ``image``: the preprocessed MetaTensor ``(C, *grid)``;
    ``region``: a given region on the model's grid (bool mask or float weights ``(*grid)``,
    on the CPU), else None; ``grid``: the model grid on the scan; ``identity``: the model
    grid's own geometry (maps made at input resolution); ``notes``: warnings."""

    image: Any
    region: torch.Tensor | None
    grid: ModelGrid
    identity: Any
    notes: list[str] = field(default_factory=list)


def _with_region(
    info: ModelInfo, data: dict[str, Any], region: np.ndarray, affine: np.ndarray
) -> tuple[Any, torch.Tensor]:
    """``(image, region)`` on the model's grid: the region follows the scan's spatial
    steps, nearest-neighbour (InputError if preprocessing cropped all of it away)."""
    data["region"] = _meta(region, affine, np.float32)
    both = preprocess_transforms(info, "image", label_keys="region", from_array=True)
    done = _preprocess_all(both, data)
    image, model_region = done["image"], done["region"].as_tensor()[0].cpu()
    if region.dtype == bool:
        model_region = model_region > 0.5
    if not bool((model_region != 0).any()):
        raise InputError(
            f"the region ({int(np.count_nonzero(region))} scan voxels) lies outside "
            "the model's field of view after preprocessing (it was cropped away): there "
            "is nothing to explain"
        )
    return image, model_region


def to_model_grid(
    image: np.ndarray, affine: np.ndarray, region: np.ndarray | None, info: ModelInfo
) -> ModelInput:
    """The scan ``image`` ``(I, J, K)`` (voxel -> RAS mm ``affine``) and a segmentation
    model's ``region`` (same grid, mask or weights, or None) through the model's
    preprocessing; a note if preprocessing cropped part of the scan off."""
    pre = preprocess_transforms(info, "image", from_array=True)
    data = {"image": _meta(image, affine, np.float32)}
    model_region = None
    if region is None:
        preprocessed = _preprocess_all(pre, data)["image"]
    else:
        preprocessed, model_region = _with_region(info, data, region, affine)
    del data
    grid = ModelGrid.of(preprocessed, pre, image.shape, affine)
    crop = _crop_warning(preprocessed, info)
    identity = postprocess.stretch_geometry(grid.shape, grid.shape)
    return ModelInput(preprocessed, model_region, grid, identity, [crop] if crop else [])


def support_on_model_grid(
    image: np.ndarray, affine: np.ndarray, organs: np.ndarray | None, info: ModelInfo
) -> torch.Tensor:
    """The region map (0 padding, 1 scan, ``label + 1`` organ) taken through the model's
    preprocessing with nearest interpolation: ``(S, H, W)``. Only for preprocessing the
    separable path does not reproduce."""
    support = np.ones(image.shape, np.int16) if organs is None else organs.astype(np.int16) + 1
    pre = preprocess_transforms(info, "image", label_keys="support", from_array=True)
    data = pre({
        "image": _meta(image, affine, np.float32),
        "support": _meta(support, affine, None),
    })
    return data["support"].as_tensor()[0].cpu()
