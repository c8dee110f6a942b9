"""What is recorded about a model: :class:`ModelInfo` (a bundle's metadata or a zoo entry's
card) and :class:`InputSpec` (what the network expects after preprocessing).

Both are read and written as bundle folders by :mod:`hirescam3d.models.bundle`, which also
exports every name of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hirescam3d.errors import ModelError

if TYPE_CHECKING:  # torch loads only with the functions that use it (fast listings)
    import torch

TASKS = ("multilabel", "multiclass")

# MONAI dictionary transforms a bundle's preprocessing may name.
PREPROCESSING_TRANSFORMS = (
    "LoadImaged",
    "EnsureChannelFirstd",
    "Orientationd",
    "Spacingd",
    "ScaleIntensityRanged",
    "ResizeWithPadOrCropd",
    "Resized",
    "EnsureTyped",
)


KINDS = ("classification", "segmentation")


@dataclass(frozen=True)
class InputSpec:
    """What a network expects, per array axis after preprocessing.

    ``spatial_size``: array shape without channels, e.g. ``(96, 128, 128)`` (S, H, W).
    ``axcodes``: orientation codes the axes point to, e.g. ``"SPL"``; None for photos.
    ``spacing``: mm per array axis; None for photos.
    ``window``: intensity range ``(a_min, a_max)`` (HU for CT) scaled to [0, 1] with clipping.
    ``size_mode``: ``"pad_or_crop"`` (keeps the spacing) or ``"resize"`` (photos).
    """

    spatial_dims: int
    in_channels: int
    spatial_size: tuple[int, ...]
    axcodes: str | None = None
    spacing: tuple[float, ...] | None = None
    window: tuple[float, float] | None = None
    modality: str = "CT"
    size_mode: str = "pad_or_crop"

    def to_dict(self) -> dict[str, Any]:
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "spatial_size": list(self.spatial_size),
            "axcodes": self.axcodes,
            "spacing": None if self.spacing is None else list(self.spacing),
            "window": None if self.window is None else list(self.window),
            "modality": self.modality,
            "size_mode": self.size_mode,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "input spec") -> InputSpec:
        """Parse and check ``to_dict()`` output; raises ModelError naming ``source``."""
        try:
            spec = cls(
                spatial_dims=int(data["spatial_dims"]),
                in_channels=int(data["in_channels"]),
                spatial_size=tuple(int(n) for n in data["spatial_size"]),
                axcodes=data.get("axcodes"),
                spacing=None if data.get("spacing") is None else tuple(map(float, data["spacing"])),
                window=None if data.get("window") is None else tuple(map(float, data["window"])),
                modality=str(data.get("modality", "CT")),
                size_mode=str(data.get("size_mode", "pad_or_crop")),
            )
        except KeyError as err:
            raise ModelError(f"{source}: missing key {err.args[0]!r}") from err
        except (TypeError, ValueError) as err:
            raise ModelError(f"{source}: malformed input spec {data!r}: {err}") from err
        n = spec.spatial_dims
        problems = []
        if len(spec.spatial_size) != n:
            problems.append(f"spatial_size {spec.spatial_size} has not {n} axes")
        if spec.spacing is not None and len(spec.spacing) != n:
            problems.append(f"spacing {spec.spacing} has not {n} axes")
        if spec.axcodes is not None and len(spec.axcodes) != n:
            problems.append(f"axcodes {spec.axcodes!r} has not {n} letters")
        if spec.window is not None and (len(spec.window) != 2 or spec.window[0] >= spec.window[1]):
            problems.append(f"window {spec.window} is not (a_min, a_max) with a_min < a_max")
        if spec.size_mode not in ("pad_or_crop", "resize"):
            problems.append(f"size_mode {spec.size_mode!r} is not 'pad_or_crop' or 'resize'")
        if problems:
            raise ModelError(f"{source}: " + "; ".join(problems))
        return spec


def preprocessing_transforms(spec: InputSpec, keys: str = "image") -> list[dict[str, Any]]:
    """MONAI dictionary-transform specs (bundle config style) that produce the input.

    File -> channel first -> orientation -> spacing -> window to [0, 1] -> size. Scaling
    comes before padding so that padded voxels read 0 (air for CT).
    """
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
    ]
    if spec.axcodes is not None:
        # Codes name the direction each axis points to, in RAS+ terms (nibabel's convention).
        transforms.append(
            {
                "_target_": "Orientationd",
                "keys": keys,
                "axcodes": spec.axcodes,
                "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
            }
        )
    if spec.spacing is not None:
        transforms.append(
            {"_target_": "Spacingd", "keys": keys, "pixdim": list(spec.spacing), "mode": "bilinear"}
        )
    if spec.window is not None:
        a_min, a_max = spec.window
        transforms.append(
            {
                "_target_": "ScaleIntensityRanged",
                "keys": keys,
                "a_min": a_min,
                "a_max": a_max,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        )
    size = list(spec.spatial_size)
    if spec.size_mode == "resize":
        transforms.append({"_target_": "Resized", "keys": keys, "spatial_size": size})
    else:
        transforms.append({"_target_": "ResizeWithPadOrCropd", "keys": keys, "spatial_size": size})
    return transforms


def apply_window(image: np.ndarray | torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """``ScaleIntensityRanged(a_min, a_max, 0, 1, clip=True)`` as one function, float32."""
    a_min, a_max = window
    import torch

    x = torch.as_tensor(image, dtype=torch.float32)
    return ((x - a_min) / (a_max - a_min)).clamp_(0.0, 1.0)


@dataclass
class ModelInfo:
    """What is recorded about a model: a bundle's metadata, or a zoo entry's card.

    ``guaranteed`` is the cached HiResCAM verdict at ``target_layer``
    (:meth:`hirescam3d.models.handle.ModelHandle.load` checks it against the computed audit).
    ``weights_sha256`` is the checksum of the loaded weights (after :func:`load_bundle`)
    or the one the metadata records (after :func:`read_info`).
    ``task``: ``"multilabel"`` (sigmoid per class) or ``"multiclass"`` (softmax over
    classes); :attr:`activation` is the same as ``Explainer(task=...)`` spells it.
    ``kind``: ``"classification"`` (logits ``(B, C)``) or ``"segmentation"`` (logits
    ``(B, C, *spatial)``). ``patch``: the network sees windows of ``input.spatial_size``
    of a larger volume (MONAI's ``is_patch_data``: explain with a sliding window).
    ``notes``: what a front end should tell the user (e.g. that no layer has a guarantee
    and the default layer was chosen otherwise). ``bundle_format``: ``"hirescam3d"`` or
    ``"monai"``.
    """

    name: str
    description: str
    class_names: tuple[str, ...]
    target_layer: str
    input: InputSpec
    preprocessing: list[dict[str, Any]]
    task: str
    guaranteed: bool
    trained: bool | None  # None: unknown (a user's bundle or network)
    weights_sha256: str | None = None
    bundle_path: Path | None = None
    version: str = "0.1.0"
    training: dict[str, Any] = field(default_factory=dict)
    kind: str = "classification"
    patch: bool = False
    notes: tuple[str, ...] = ()
    bundle_format: str = "hirescam3d"
    inferer: dict[str, Any] | None = None  # a MONAI bundle's inferer (resolved spec)
    trusted: bool = False  # the config was resolved by MONAI's ConfigParser (--trust-bundle)
    # a MONAI bundle's steps to the scan's grid (bundle_monai.scan_postprocessing); [] none
    postprocessing: list[dict[str, Any]] = field(default_factory=list)
    # the predicted masks' thresholds and component sizes (seg_postprocess); None: logit >= 0
    mask_postprocessing: Any = None

    @property
    def activation(self) -> str:
        """``"sigmoid"`` or ``"softmax"``: the ``task`` to give ``Explainer(task=...)``."""
        return "sigmoid" if self.task == "multilabel" else "softmax"

    @property
    def segmentation(self) -> bool:
        """True for a segmentation network (logits ``(B, C, *spatial)``)."""
        return self.kind == "segmentation"
