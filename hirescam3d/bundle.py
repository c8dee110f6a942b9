"""Save and load hirescam3d models as MONAI bundle folders.

Layout::

    configs/metadata.json   MONAI metadata + a "hirescam3d" section (layer, guarantee, input)
    configs/inference.json  network_def (_target_ + kwargs), preprocessing transforms
    models/model.pt         a plain state dict (tensors only)
    docs/README.md, LICENSE

Loading is safe by construction: the network is built only from the allow-list in
:data:`hirescam3d.models.ARCHITECTURE_TARGETS` (a bundle's ``_target_`` is never imported
or executed) and weights load only with ``torch.load(..., weights_only=True)``.

This module is persistence only: the metadata record (:class:`ModelInfo`, with its
:class:`InputSpec`), reading it without weights (:func:`read_info`,
:func:`read_class_names`), and saving and loading folders. Resolving names, checking
findings and layers, and the HiResCAM audit live in :mod:`hirescam3d.handle`; the
``guaranteed`` flag stored here is only a cache of that audit, checked on load there.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError
from .models import build_network, target_of

if TYPE_CHECKING:  # torch loads only with the functions that use it (fast listings)
    import torch
    from torch import nn

METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
README = Path("docs") / "README.md"
LICENSE = Path("LICENSE")

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


def _torch() -> Any:
    import torch

    return torch


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
    (:meth:`hirescam3d.handle.ModelHandle.load` checks it against the computed audit).
    ``weights_sha256`` is the checksum of the loaded weights (after :func:`load_bundle`)
    or the one the metadata records (after :func:`read_info`).
    """

    name: str
    description: str
    class_names: tuple[str, ...]
    target_layer: str
    input: InputSpec
    preprocessing: list[dict[str, Any]]
    task: str
    guaranteed: bool
    trained: bool
    weights_sha256: str | None = None
    bundle_path: Path | None = None
    version: str = "0.1.0"
    training: dict[str, Any] = field(default_factory=dict)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- saving -------------------------------------------------------------------------------
def _metadata(network: nn.Module, info: ModelInfo, sha: str) -> dict[str, Any]:
    import monai

    spec = info.input
    spatial = list(spec.spatial_size)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": info.version,
        "changelog": {info.version: "initial release"},
        "monai_version": monai.__version__,
        "pytorch_version": _torch().__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"hirescam3d": "0.1.0"},
        "name": info.name,
        "task": info.description,
        "description": info.description,
        "authors": "hirescam3d",
        "copyright": "Copyright (c) hirescam3d contributors",
        "data_source": "synthetic phantoms (hirescam3d.phantom)" if info.trained else "none",
        "data_type": "nibabel" if spec.modality == "CT" else "image",
        "image_classes": f"{spec.in_channels} channel(s), scaled to [0, 1]",
        "label_classes": ", ".join(info.class_names),
        "pred_classes": ", ".join(info.class_names),
        "intended_use": "research and teaching only; not for clinical use",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if spec.modality == "CT" else "magnitude",
                    "modality": spec.modality,
                    "num_channels": spec.in_channels,
                    "spatial_shape": spatial,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): "image" for i in range(spec.in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(info.class_names),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): n for i, n in enumerate(info.class_names)},
                }
            },
        },
        "hirescam3d": {
            "name": info.name,
            "class_names": list(info.class_names),
            "target_layer": info.target_layer,
            "guaranteed": info.guaranteed,
            "task": info.task,
            "trained": info.trained,
            "input": spec.to_dict(),
            "weights_sha256": sha,
            "training": info.training,
        },
    }


def _inference(network: nn.Module, info: ModelInfo) -> dict[str, Any]:
    activation = {"sigmoid": True} if info.task == "multilabel" else {"softmax": True}
    return {
        "imports": ["$import hirescam3d"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": target_of(network), **network.config},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": info.preprocessing},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", **activation}],
        },
        "explain": {"target_layer": info.target_layer, "method": "hirescam"},
    }


def _readme(info: ModelInfo) -> str:
    spec = info.input
    lines = [
        f"# {info.name}",
        "",
        info.description,
        "",
        "## Input",
        f"- {spec.in_channels} channel(s), {spec.spatial_dims}D, size "
        f"{' x '.join(map(str, spec.spatial_size))}",
    ]
    if spec.axcodes:
        lines.append(f"- orientation {spec.axcodes} (the direction each array axis points to)")
    if spec.spacing:
        lines.append(f"- spacing {' x '.join(f'{s:g}' for s in spec.spacing)} mm")
    if spec.window:
        lines.append(f"- intensities {spec.window[0]:g} .. {spec.window[1]:g} scaled to [0, 1]")
    act = "sigmoid per class" if info.task == "multilabel" else "softmax"
    lines += [
        "",
        "## Output",
        f"- logits for: {', '.join(info.class_names)} ({act})",
        "",
        "## Explanation",
        f"- default layer `{info.target_layer}`; HiResCAM faithfulness guaranteed there: "
        f"{'yes' if info.guaranteed else 'no'}",
    ]
    if info.training:
        lines += ["", "## Training", "```", json.dumps(info.training, indent=2), "```"]
    lines += ["", "Research and teaching only; not for clinical use.", ""]
    return "\n".join(lines)


LICENSE_TEXT = """Apache License, Version 2.0

The weights and configuration in this bundle are distributed under the Apache License,
Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0). They were trained on synthetic
data only and are provided as-is, without warranty, for research and teaching; they are
not a medical device.
"""


def save_bundle(network: nn.Module, info: ModelInfo, path: str | Path) -> Path:
    """Write ``network`` (a hirescam3d architecture) and ``info`` as a MONAI bundle folder.

    Returns the folder. The state dict is saved as plain tensors, so it loads with
    ``weights_only=True``.
    """
    root = Path(path)
    for sub in ("configs", "models", "docs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    _torch().save(state, root / WEIGHTS)
    sha = sha256_of(root / WEIGHTS)
    (root / METADATA).write_text(json.dumps(_metadata(network, info, sha), indent=2) + "\n")
    (root / INFERENCE).write_text(json.dumps(_inference(network, info), indent=2) + "\n")
    (root / README).write_text(_readme(info))
    (root / LICENSE).write_text(LICENSE_TEXT)
    return root


# -- loading ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"bundle file {path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(
            f"{path}: invalid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], dotted: str, source: Path) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ModelError(f"{source}: missing key {dotted!r}")
        node = node[key]
    return node


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; refuse anything but named tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} is missing")
    try:
        state = _torch().load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1][:200]
        raise ModelError(
            f"{path}: refused: the checkpoint holds pickled Python objects, not only tensors "
            f"(weights-only load failed: {reason}). Save a plain model.state_dict()."
        ) from err
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError... for bad files
        raise ModelError(
            f"{path}: cannot read the checkpoint (truncated, corrupt or not a PyTorch file: "
            f"{type(err).__name__}: {str(err)[:200]})"
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, _torch().Tensor) for k, v in state.items()
    ):
        nested = isinstance(state, dict) and "state_dict" in state
        hint = " (it has a 'state_dict' entry: save that instead)" if nested else ""
        raise ModelError(
            f"{path}: not a plain state dict of named tensors{hint}"
            if isinstance(state, dict)
            else f"{path}: holds a {type(state).__name__}, not a state dict of named tensors"
        )
    return state


def check_state_dict(network: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise ModelError naming ``source`` if keys or shapes differ from ``network``'s."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ModelError(
            f"{source}: weights do not match the network in the bundle config: keys "
            + "; ".join(parts)
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ModelError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)}, the network "
                f"expects {tuple(expected[key].shape)}"
            )


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names recorded in a bundle's metadata, without reading network or weights."""
    meta_path = Path(path) / METADATA
    names = _get(_read_json(meta_path), "hirescam3d.class_names", meta_path)
    if not isinstance(names, list):
        raise ModelError(f"{meta_path}: hirescam3d.class_names must be a list")
    return tuple(str(n) for n in names)


def _bundle_root(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"bundle folder {root} does not exist")
    return root


def read_info(path: str | Path) -> ModelInfo:
    """A bundle's :class:`ModelInfo` from its configs only: no network built, no weights read.

    ``weights_sha256`` is the checksum the metadata records. ModelError naming the file
    for anything missing or malformed.
    """
    root = _bundle_root(path)
    meta_path, inf_path = root / METADATA, root / INFERENCE
    meta = _read_json(meta_path)
    section = _get(meta, "hirescam3d", meta_path)
    if not isinstance(section, dict):
        raise ModelError(f"{meta_path}: 'hirescam3d' must be an object")
    names = _get(section, "class_names", meta_path)
    if not isinstance(names, list):
        raise ModelError(f"{meta_path}: hirescam3d.class_names must be a list")
    target_layer = str(_get(section, "target_layer", meta_path))
    task = str(_get(section, "task", meta_path))
    if task not in TASKS:
        raise ModelError(f"{meta_path}: task {task!r} is not one of {', '.join(TASKS)}")
    spec = InputSpec.from_dict(_get(section, "input", meta_path), f"{meta_path} hirescam3d.input")
    guaranteed = _get(section, "guaranteed", meta_path)
    transforms = _get(_read_json(inf_path), "preprocessing.transforms", inf_path)
    if not isinstance(transforms, list) or not all(
        isinstance(t, dict) and t.get("_target_") in PREPROCESSING_TRANSFORMS for t in transforms
    ):
        raise ModelError(
            f"{inf_path}: preprocessing.transforms must be a list of "
            f"{', '.join(PREPROCESSING_TRANSFORMS)} specs"
        )
    return ModelInfo(
        name=str(section.get("name", meta.get("name", root.name))),
        description=str(meta.get("description", "")),
        class_names=tuple(str(n) for n in names),
        target_layer=target_layer,
        input=spec,
        preprocessing=transforms,
        task=task,
        guaranteed=bool(guaranteed),
        trained=bool(section.get("trained", True)),
        weights_sha256=section.get("weights_sha256") or None,
        bundle_path=root.resolve(),
        version=str(meta.get("version", "")),
        training=dict(section.get("training") or {}),
    )


def read_network_def(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(_target_, kwargs)`` of a bundle's ``network_def`` (nothing imported or built)."""
    inf_path = _bundle_root(path) / INFERENCE
    net_def = _get(_read_json(inf_path), "network_def", inf_path)
    if not isinstance(net_def, dict) or not isinstance(net_def.get("_target_"), str):
        raise ModelError(f"{inf_path}: network_def must be an object with a '_target_' string")
    return net_def["_target_"], {k: v for k, v in net_def.items() if k != "_target_"}


def load_bundle(path: str | Path) -> tuple[nn.Module, ModelInfo]:
    """Load a bundle folder: ``(network in eval mode, info)``; ModelError on any problem.

    Persistence only: the recorded ``guaranteed`` flag is returned as stored (use
    :meth:`hirescam3d.handle.ModelHandle.load` to have it checked against the audit).
    """
    root = _bundle_root(path)
    meta_path, inf_path = root / METADATA, root / INFERENCE
    info = read_info(root)
    target, kwargs = read_network_def(root)
    network = build_network(target, kwargs, f"{inf_path} network_def")

    weights_path = root / WEIGHTS
    state = load_weights(weights_path)
    sha = sha256_of(weights_path)
    recorded = info.weights_sha256
    if recorded and recorded != sha:
        raise ModelError(
            f"{weights_path}: sha256 {sha[:12]}... differs from {recorded[:12]}... recorded in "
            f"{meta_path} (the weights were changed or damaged)"
        )
    check_state_dict(network, state, weights_path)
    network.load_state_dict(state)
    network.eval()

    if info.target_layer not in dict(network.named_modules()):
        raise ModelError(
            f"{meta_path}: target_layer {info.target_layer!r} is not a layer of the network"
        )
    if tuple(getattr(network, "class_names", info.class_names)) != info.class_names:
        raise ModelError(f"{meta_path}: class_names differ from the network's in {inf_path}")
    info.weights_sha256 = sha
    return network, info
