"""Save and load hirescam3d models as MONAI bundle folders.

Layout::

    configs/metadata.json   MONAI metadata + a "hirescam3d" section (layer, guarantee, input)
    configs/inference.json  network_def (_target_ + kwargs), preprocessing transforms
    models/model.pt         a plain state dict (tensors only)
    docs/README.md, LICENSE

Loading is safe by construction: the network is built only from the allow-lists
:data:`hirescam3d.models.nets.ARCHITECTURE_TARGETS` and
:data:`hirescam3d.models.nets.MONAI_NETWORKS`
(a bundle's ``_target_`` is never imported or executed otherwise), with literal arguments
only (no ``$`` expression, ``@`` reference or ``%`` macro), preprocessing only from
:data:`PREPROCESSING_TRANSFORMS`, and weights only with ``torch.load(...,
weights_only=True)``.

Two formats are read:

- **hirescam3d bundles** (saved by :func:`save_bundle`): the metadata has a
  ``"hirescam3d"`` section (class names, layer, guarantee, task, input).
- **MONAI bundles** (no ``"hirescam3d"`` section), as MONAI's model zoo publishes them:
  ``configs/inference.json``, ``.yaml`` or ``.yml`` (or ``config=NAME``) is resolved by
  :mod:`hirescam3d.models.bundle_config` (references, macros, a safe subset of ``$``
  expressions; with ``trust=True`` by MONAI's own ``ConfigParser``) and read by
  :mod:`hirescam3d.models.bundle_monai` (network_def, preprocessing, inferer, postprocessing
  only). ``network_def`` names any network of ``monai.networks.nets`` (``"UNet"`` or
  ``"monai.networks.nets.UNet"``; any importable class with trust); the preprocessing
  may use any MONAI dictionary transform; weights may be ``{"model": state_dict}``; weights,
  configs and macro files must lie inside the bundle folder unless trusted. From
  ``metadata.json``'s ``network_data_format``:

  - class names: ``outputs.pred.class_names`` (a list, e.g. for classifiers) if present,
    else ``outputs.pred.channel_def`` (``{"0": "background", "1": "liver"}``);
  - kind: segmentation when ``outputs.pred.type`` is ``"image"`` or ``format`` is
    ``"segmentation"``; classification when ``type`` is ``"probabilities"``, ``"vector"``
    or ``"scalar"`` or ``format`` is ``"classes"``/``"labels"``; otherwise from
    ``spatial_shape`` (several axes: segmentation) and ``is_patch_data``. Checked
    against the network's output when it is loaded;
  - activation (:attr:`ModelInfo.task`): the literal ``sigmoid``/``softmax`` flag of an
    ``Activationsd`` in ``inference.json``'s ``postprocessing`` (read, never run); else
    ``outputs.pred.activation`` (``"sigmoid"`` or ``"softmax"``, a hirescam3d key); else
    sigmoid for one output channel and softmax for more (recorded in
    :attr:`ModelInfo.notes`);
  - input: ``inputs.image.num_channels`` and ``spatial_shape`` (numbers: the network's
    input, or its sliding window when ``is_patch_data``), ``spatial_dims`` from the
    ``network_def``; orientation, spacing and intensity window from the preprocessing;
  - preprocessing: the config's ``preprocessing`` (a ``Compose`` or a list), resolved;
  - inferer (:attr:`ModelInfo.inferer`): ``SimpleInferer`` or ``SlidingWindowInferer``
    (its window, overlap, mode and batch become the sliding-window explanation), or
    ``SliceInferer`` (a 2D network over volumes; orientation and spacing then describe
    the volume, not the network's input, and are not recorded in ``input``);
  - postprocessing (:attr:`ModelInfo.postprocessing`): with ``Invertd``, the steps that
    put the prediction on the scan's grid, in the bundle's order.

  The default layer is not recorded: :meth:`hirescam3d.models.handle.ModelHandle.load` chooses
  it with the audit (``target_layer`` is ``""`` until then).

This module is persistence only: the metadata record (:class:`ModelInfo`, with its
:class:`InputSpec`), reading it without weights (:func:`read_info`,
:func:`read_class_names`), and saving and loading folders. Resolving names, checking
findings and layers, and the HiResCAM audit live in :mod:`hirescam3d.models.handle`; the
``guaranteed`` flag stored here is only a cache of that audit, checked on load there.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hirescam3d.errors import ModelError
from hirescam3d.models.nets import (
    build_network,
    canonical_target,
    literal_error,
    literal_problem,
    target_of,
)

if TYPE_CHECKING:  # torch loads only with the functions that use it (fast listings)
    from collections.abc import Sequence

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


KINDS = ("classification", "segmentation")


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- saving -------------------------------------------------------------------------------
def _pred_format(info: ModelInfo) -> dict[str, Any]:
    """``network_data_format.outputs.pred`` for ``info``'s kind."""
    names = {str(i): n for i, n in enumerate(info.class_names)}
    if info.segmentation:
        return {
            "type": "image",
            "format": "segmentation",
            "num_channels": len(info.class_names),
            "spatial_shape": list(info.input.spatial_size),
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": info.patch,
            "activation": info.activation,
            "channel_def": names,
        }
    return {
        "type": "probabilities",
        "format": "classes",
        "num_channels": len(info.class_names),
        "spatial_shape": [1],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_onehot": False,
        "activation": info.activation,
        "channel_def": names,
    }


def _metadata(info: ModelInfo, sha: str) -> dict[str, Any]:
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
        "data_source": "synthetic phantoms (hirescam3d.data.phantom)" if info.trained else "none",
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
                    "is_patch_data": info.patch,
                    "channel_def": {str(i): "image" for i in range(spec.in_channels)},
                }
            },
            "outputs": {"pred": _pred_format(info)},
        },
        "hirescam3d": {
            "name": info.name,
            "class_names": list(info.class_names),
            "target_layer": info.target_layer,
            "guaranteed": info.guaranteed,
            "task": info.task,
            "kind": info.kind,
            "patch": info.patch,
            "trained": info.trained,
            "input": spec.to_dict(),
            "weights_sha256": sha,
            "training": info.training,
            **({"mask_postprocessing": info.mask_postprocessing.to_dict()}
               if info.mask_postprocessing is not None else {}),
        },
    }


def _inference(network_def: dict[str, Any], info: ModelInfo) -> dict[str, Any]:
    activation = {"sigmoid": True} if info.task == "multilabel" else {"softmax": True}
    return {
        "imports": ["$import hirescam3d"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": network_def,
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
    per = " per voxel" if info.segmentation else ""
    lines += [
        "",
        "## Output",
        f"- logits{per} for: {', '.join(info.class_names)} ({act})",
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


def save_bundle(
    network: nn.Module,
    info: ModelInfo | str | Path | None = None,
    path: str | Path | None = None,
    network_def: dict[str, Any] | None = None,
    *,
    sample: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    task: str | None = None,
    name: str | None = None,
    input: InputSpec | None = None,
) -> Path:
    """Write ``network`` and ``info`` as a MONAI bundle folder (hirescam3d format).

    ``network``: a hirescam3d architecture (its ``config`` is the ``network_def``), or a
    MONAI network of :data:`hirescam3d.models.nets.MONAI_NETWORKS` with ``network_def``
    ``{"_target_": "UNet", **literal kwargs}`` it was built from (checked: the network
    rebuilt from it must have the same state-dict keys and shapes). Returns the folder.
    The state dict is saved as plain tensors, so it loads with ``weights_only=True``.

    Without ``info``, ``save_bundle(network, path, network_def, sample=x)`` infers it
    from the network and ``sample``, one input ``(1, C, *spatial)``: the kind
    (classification for logits ``(1, K)``, segmentation for ``(1, K, *spatial)``), the
    class count K (names ``class_names`` or ``class_0``..), the default layer (the
    audit's deepest certified layer) and its verdict. ``task``: ``"multiclass"``
    (softmax; the default for K > 1) or ``"multilabel"`` (sigmoid; the default for K = 1).
    ``input``: an :class:`InputSpec` (orientation, spacing, window) if known; default the
    sample's channels and size only. The saved bundle is then loaded back and must
    reproduce the network's output on ``sample``.
    """
    if isinstance(info, (str, Path)):  # save_bundle(network, path[, network_def], ...)
        if isinstance(path, dict) and network_def is None:
            network_def, path = path, None
        if path is None:
            info, path = None, info
    if path is None:
        raise ModelError("save_bundle: give the folder to write (path=)")
    if info is None:
        if sample is None:
            raise ModelError(
                "save_bundle: give info= (a ModelInfo) or sample= (one input (1, C, *spatial)) "
                "to infer it from"
            )
        info = infer_info(network, sample, class_names, task, name, input)
    elif not isinstance(info, ModelInfo):
        raise ModelError(f"save_bundle: info must be a ModelInfo, not {type(info).__name__}")
    if info.kind not in KINDS:
        raise ModelError(f"kind {info.kind!r} is not one of {', '.join(KINDS)}")
    if network_def is None:
        network_def = {"_target_": target_of(network), **network.config}
    else:
        target = network_def.get("_target_")
        kwargs = {k: v for k, v in network_def.items() if k != "_target_"}
        rebuilt = build_network(str(target), kwargs, "network_def")
        try:
            check_state_dict(rebuilt, network.state_dict(), Path("network_def"))
        except ModelError as err:
            raise ModelError(f"network_def does not build the given network: {err}") from err
        network_def = {"_target_": canonical_target(str(target)), **kwargs}
    root = Path(path)
    for sub in ("configs", "models", "docs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    _torch().save(state, root / WEIGHTS)
    sha = sha256_of(root / WEIGHTS)
    (root / METADATA).write_text(json.dumps(_metadata(info, sha), indent=2) + "\n")
    (root / INFERENCE).write_text(json.dumps(_inference(network_def, info), indent=2) + "\n")
    (root / README).write_text(_readme(info))
    (root / LICENSE).write_text(LICENSE_TEXT)
    if sample is not None:
        _check_reloaded(network, root, sample)
    return root


def infer_info(
    network: nn.Module,
    sample: torch.Tensor,
    class_names: Sequence[str] | None = None,
    task: str | None = None,
    name: str | None = None,
    input: InputSpec | None = None,
) -> ModelInfo:
    """A :class:`ModelInfo` for ``network`` from one input ``sample`` ``(1, C, *spatial)``
    (see :func:`save_bundle`); the default layer is chosen by the audit."""
    from hirescam3d.models.handle import ModelHandle

    torch = _torch()
    x = torch.as_tensor(sample)
    if x.ndim not in (4, 5) or x.shape[0] != 1:
        raise ModelError(
            f"save_bundle: sample must be one input (1, C, *spatial) with 2 or 3 spatial axes, "
            f"got shape {tuple(x.shape)}"
        )
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            out = network(x)
    finally:
        network.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, x.ndim) or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"save_bundle: the network returns {shape} for a sample of {tuple(x.shape)}; "
            "expected logits (1, K) or (1, K, *spatial)"
        )
    k = int(out.shape[1])
    names = tuple(str(n) for n in class_names) if class_names else tuple(
        f"class_{i}" for i in range(k)
    )
    if len(names) != k:
        raise ModelError(f"save_bundle: {len(names)} class_names for {k} output channels")
    task = task or ("multilabel" if k == 1 else "multiclass")
    if task not in TASKS:
        raise ModelError(f"save_bundle: task {task!r} is not one of {', '.join(TASKS)}")
    spec = input or InputSpec(x.ndim - 2, int(x.shape[1]), tuple(x.shape[2:]), modality="image")
    title = name or type(network).__name__
    kind = "segmentation" if out.ndim > 2 else "classification"
    info = ModelInfo(
        name=title, description=f"{title}: {kind} of {', '.join(names)}",
        class_names=names, target_layer="", input=spec,
        preprocessing=preprocessing_transforms(spec), task=task, guaranteed=False,
        trained=None, kind=kind,
    )  # fmt: skip
    import dataclasses

    loaded = ModelHandle.from_network(network, info=info).load()[1]
    return dataclasses.replace(loaded, kind=kind)


def _check_reloaded(network: nn.Module, root: Path, sample: torch.Tensor) -> None:
    """ModelError if the bundle at ``root``, loaded back, does not reproduce ``network``'s
    output on ``sample``."""
    torch = _torch()
    rebuilt, _ = load_bundle(root)
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            expected, got = network(sample), rebuilt(sample)
    finally:
        network.train(was_training)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise ModelError(
            f"{root}: the saved bundle does not reproduce the network's output on the sample "
            "(does network_def build the same network?)"
        )


# -- loading ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    from hirescam3d.models.bundle_config import inside

    if not path.exists() and not path.is_symlink():
        raise ModelError(f"bundle file {path} is missing")
    inside(path, path.parents[1], "bundle file")  # configs/x.json: the bundle is 2 up
    if not path.exists():
        raise ModelError(f"{path}: a symbolic link to {path.resolve()}, which is missing")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
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
    if not path.exists():
        raise ModelError(f"weights file {path} is missing")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file; give the weights as a file")
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
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # MONAI's CheckpointSaver: {"model": state_dict, ...}
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
        first = next(
            (a if a is not None else b)
            for a, b in zip_longest(expected, state)
            if a != b
        )
        raise ModelError(
            f"{source}: weights do not match the network in the bundle config: first "
            f"differing key {first!r}; keys " + "; ".join(parts)
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ModelError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)}, the network "
                f"expects {tuple(expected[key].shape)}"
            )


def _bundle_root(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"bundle folder {root} does not exist")
    return root


def is_hirescam3d_metadata(meta: dict[str, Any]) -> bool:
    """True for metadata saved by hirescam3d (it has a ``"hirescam3d"`` section)."""
    return "hirescam3d" in meta


def _pred(meta: dict[str, Any], meta_path: Path) -> dict[str, Any]:
    """``network_data_format.outputs.pred`` (or the only output, whatever its name)."""
    outputs = _get(meta, "network_data_format.outputs", meta_path)
    if isinstance(outputs, dict) and "pred" not in outputs and len(outputs) == 1:
        pred = next(iter(outputs.values()))
    else:
        pred = _get(meta, "network_data_format.outputs.pred", meta_path)
    if not isinstance(pred, dict):
        raise ModelError(f"{meta_path}: network_data_format.outputs.pred must be an object")
    return pred


def _monai_class_names(meta: dict[str, Any], meta_path: Path) -> tuple[str, ...]:
    """Class names of a MONAI bundle: ``outputs.pred.class_names`` or ``channel_def``."""
    pred = _pred(meta, meta_path)
    where = "network_data_format.outputs.pred"
    names = pred.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ModelError(f"{meta_path}: {where}.class_names must be a list of names")
        result = tuple(names)
    else:
        channels = pred.get("channel_def")
        if not isinstance(channels, dict) or not channels:
            raise ModelError(
                f'{meta_path}: {where} has neither a channel_def ({{"0": "background", '
                '"1": "liver"}) nor a class_names list: add one so that classes have names'
            )
        try:
            order = sorted((int(k), str(v)) for k, v in channels.items())
        except (TypeError, ValueError) as err:
            raise ModelError(
                f"{meta_path}: {where}.channel_def keys must be channel numbers: {err}"
            ) from err
        if [i for i, _ in order] != list(range(len(order))):
            raise ModelError(
                f"{meta_path}: {where}.channel_def must name channels 0..{len(order) - 1} "
                f"once each, got {sorted(channels)}"
            )
        result = tuple(n for _, n in order)
    count = pred.get("num_channels")
    if isinstance(count, int) and count != len(result):
        raise ModelError(
            f"{meta_path}: {where} names {len(result)} classes but num_channels is {count}"
        )
    if len(set(result)) != len(result):
        raise ModelError(f"{meta_path}: {where} repeats a class name: {', '.join(result)}")
    return result


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names recorded in a bundle's metadata, without reading network or weights."""
    meta_path = Path(path) / METADATA
    meta = _read_json(meta_path)
    if not is_hirescam3d_metadata(meta):
        return _monai_class_names(meta, meta_path)
    names = _get(meta, "hirescam3d.class_names", meta_path)
    if not isinstance(names, list):
        raise ModelError(f"{meta_path}: hirescam3d.class_names must be a list")
    return tuple(str(n) for n in names)


def monai_bundle_title(path: str | Path) -> str | None:
    """``"name version"`` a MONAI-format bundle's ``metadata.json`` records (nothing else
    read); None for a hirescam3d bundle."""
    root = Path(path)
    meta = _read_json(root / METADATA)
    if is_hirescam3d_metadata(meta):
        return None
    return f"{meta.get('name') or root.name} {meta.get('version', '')}".rstrip()


def short_transform_name(target: Any) -> Any:
    """``"monai.transforms.Spacingd"`` -> ``"Spacingd"`` (other values unchanged)."""
    if isinstance(target, str) and target.startswith("monai.transforms."):
        return target.rpartition(".")[2]
    return target


def preprocessing_specs(node: Any, source: Path) -> list[dict[str, Any]]:
    """Checked transform specs of a bundle's ``preprocessing`` (a ``Compose`` or a list).

    Each ``_target_`` must be in :data:`PREPROCESSING_TRANSFORMS` (``"Spacingd"`` or
    ``"monai.transforms.Spacingd"``) and every argument a literal; ``_desc_`` is dropped
    and ``"_disabled_": true`` transforms are left out, as MONAI does. ModelError (one
    line naming ``source``) for anything else.
    """
    where = "preprocessing"
    if isinstance(node, dict):
        target = short_transform_name(node.get("_target_"))
        if target != "Compose":
            raise ModelError(
                f"{source}: preprocessing must be a Compose of transforms or a list, got "
                f"_target_ {node.get('_target_')!r}"
            )
        where, node = "preprocessing.transforms", node.get("transforms")
    if not isinstance(node, list):
        problem = literal_problem(node, where)
        if problem:
            raise literal_error(problem, str(source))
        raise ModelError(f"{source}: {where} must be a list of transform specs")
    specs = []
    allowed = ", ".join(PREPROCESSING_TRANSFORMS)
    for i, spec in enumerate(node):
        if not isinstance(spec, dict):
            raise ModelError(f"{source}: {where}[{i}] must be an object with a '_target_'")
        target = short_transform_name(spec.get("_target_"))
        if target not in PREPROCESSING_TRANSFORMS:
            raise ModelError(
                f"{source}: {where}[{i}] has _target_ {spec.get('_target_')!r}, which is not "
                f"allowed: {where} may only use the MONAI transforms {allowed}"
            )
        if spec.get("_disabled_") is True:
            continue
        args = {k: v for k, v in spec.items() if k not in ("_target_", "_desc_", "_disabled_")}
        problem = literal_problem(args, f"{where}[{i}] ({target})")
        if problem:
            raise literal_error(problem, str(source))
        specs.append({"_target_": target, **args})
    return specs


def _spec_of(specs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    found = [s for s in specs if s["_target_"] == name]
    return found[-1] if found else None


def _activation_flags(node: Any) -> list[str]:
    """``"sigmoid"``/``"softmax"`` of every ``Activations(d)`` spec in ``node`` (nested
    ``transforms`` lists included) whose flag is a literal true; nothing is run."""
    found: list[str] = []
    if isinstance(node, list):
        for item in node:
            found += _activation_flags(item)
    elif isinstance(node, dict):
        if short_transform_name(node.get("_target_")) in ("Activationsd", "Activations"):
            sigmoid, softmax = node.get("sigmoid") is True, node.get("softmax") is True
            if sigmoid != softmax:
                found.append("sigmoid" if sigmoid else "softmax")
        for key in ("transforms", "postprocessing"):
            if key in node:
                found += _activation_flags(node[key])
    return found


def _number_list(value: Any) -> list[float] | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return [float(v) for v in value]
    return None


def _monai_kind(pred: dict[str, Any]) -> str:
    kind_type, kind_format = str(pred.get("type", "")).lower(), str(pred.get("format", "")).lower()
    if kind_type == "image" or kind_format == "segmentation":
        return "segmentation"
    if kind_type in ("probabilities", "vector", "scalar") or kind_format in ("classes", "labels"):
        return "classification"
    shape = pred.get("spatial_shape")
    if pred.get("is_patch_data") is True or (isinstance(shape, list) and len(shape) > 1):
        return "segmentation"
    return "classification"


def monai_preprocessing_specs(
    specs: list[dict[str, Any]], source: Path, trusted: bool = False
) -> list[dict[str, Any]]:
    """A published bundle's resolved preprocessing: each ``_target_`` a MONAI dictionary
    transform (with ``trusted``: anything), spelled short (``"Spacingd"``)."""
    from hirescam3d.models.bundle_monai import dictionary_transform

    out = []
    for i, spec in enumerate(specs):
        target = spec.get("_target_")
        if dictionary_transform(target) is None and not trusted:
            raise ModelError(
                f"{source}: preprocessing transform {i} has _target_ {target!r}, which is not a "
                "MONAI dictionary transform (monai.transforms.*d): pass --trust-bundle to "
                "build it"
            )
        name = short_transform_name(target) if dictionary_transform(target) else target
        out.append({**spec, "_target_": name})
    return out


def _read_monai_info(
    root: Path,
    meta: dict[str, Any],
    config: str | None = None,
    trust: bool = False,
    overrides: dict[str, Any] | None = None,
) -> ModelInfo:
    """:class:`ModelInfo` of a MONAI-format bundle (see the module docstring)."""
    from hirescam3d.models.bundle_monai import inferer_spec, resolve, scan_postprocessing

    meta_path = root / METADATA
    resolved = resolve(root, config, trust, overrides)
    inf_path, inference = resolved.source, resolved.as_inference()
    names = _monai_class_names(meta, meta_path)
    pred = _pred(meta, meta_path)
    target, kwargs = _network_def(inference, inf_path, trust)
    specs = monai_preprocessing_specs(resolved.preprocessing, inf_path, trust)
    inferer = inferer_spec(resolved.inferer, inf_path)
    notes: list[str] = []

    # activation: what the bundle's postprocessing applies, else the metadata, else a guess
    flags = set(_activation_flags(inference.get("postprocessing")))
    declared = str(pred.get("activation", "")).lower() or None
    if len(flags) == 1:
        activation = flags.pop()
    elif declared in ("sigmoid", "softmax"):
        activation = declared
    elif declared is not None:
        raise ModelError(
            f"{meta_path}: network_data_format.outputs.pred.activation {pred['activation']!r} "
            "is not 'sigmoid' or 'softmax'"
        )
    else:
        activation = "sigmoid" if len(names) == 1 else "softmax"
        notes.append(
            f"the bundle states no output activation (no Activationsd in {inf_path.name} "
            f"postprocessing, no outputs.pred.activation); assuming {activation}"
        )

    # input
    inputs = _get(meta, "network_data_format.inputs", meta_path)
    if not isinstance(inputs, dict) or not inputs:
        raise ModelError(f"{meta_path}: network_data_format.inputs must describe the input")
    image = inputs.get("image", next(iter(inputs.values())))
    if not isinstance(image, dict):
        raise ModelError(f"{meta_path}: network_data_format.inputs.image must be an object")
    dims = kwargs.get("spatial_dims", kwargs.get("dimensions"))
    shape = image.get("spatial_shape")
    if not isinstance(dims, int):
        dims = len(shape) if isinstance(shape, list) and shape else 3
    channels = image.get("num_channels", kwargs.get("in_channels", kwargs.get("n_input_channels")))
    size = shape if isinstance(shape, list) else None
    sliding = inferer is not None and inferer["kind"] == "sliding"
    if sliding and len(inferer["roi_size"]) == dims:
        size = inferer["roi_size"]  # the network sees the inferer's windows
    if (
        size is None
        or len(size) != dims
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        resize = _spec_of(specs, "ResizeWithPadOrCropd") or _spec_of(specs, "Resized")
        fallback = resize and resize.get("spatial_size")
        if (
            isinstance(fallback, list)
            and len(fallback) == dims
            and all(isinstance(n, int) and n > 0 for n in fallback)
        ):
            size = fallback
        else:
            raise ModelError(
                f"{meta_path}: network_data_format.inputs.image.spatial_shape {shape!r} is not "
                f"{dims} positive whole numbers: give the network's input size (or its "
                "sliding-window size, with is_patch_data true)"
            )
    orient = _spec_of(specs, "Orientationd")
    axcodes = orient.get("axcodes") if orient else None
    spacing_spec = _spec_of(specs, "Spacingd")
    spacing = _number_list(spacing_spec.get("pixdim")) if spacing_spec else None
    if spacing is not None and len(spacing) == 1:
        spacing = spacing * dims
    if inferer is not None and inferer["kind"] == "slice" and dims == 2:
        axcodes = spacing = None  # the volume's grid, not the 2D network's slices
    scale = _spec_of(specs, "ScaleIntensityRanged")
    window = None
    if scale and scale.get("b_min", 0) == 0 and scale.get("b_max", 1) == 1:
        lo, hi = _number_list(scale.get("a_min")), _number_list(scale.get("a_max"))
        window = [lo[0], hi[0]] if lo and hi else None
    spec = InputSpec.from_dict(
        {
            "spatial_dims": dims,
            "in_channels": channels if channels is not None else 1,
            "spatial_size": size,
            "axcodes": axcodes if isinstance(axcodes, str) else None,
            "spacing": spacing,
            "window": window,
            "modality": str(image.get("modality", "image")),
            "size_mode": "resize" if _spec_of(specs, "Resized") else "pad_or_crop",
        },
        f"{meta_path} network_data_format.inputs.image",
    )
    return ModelInfo(
        name=str(meta.get("name") or root.name),
        description=str(meta.get("description") or meta.get("task") or ""),
        class_names=names,
        target_layer="",  # chosen by the audit when the network is loaded
        input=spec,
        preprocessing=specs,
        task="multilabel" if activation == "sigmoid" else "multiclass",
        guaranteed=False,  # computed when the network is loaded
        trained=True,
        weights_sha256=None,
        bundle_path=root.resolve(),
        version=str(meta.get("version", "")),
        kind=_monai_kind(pred),
        patch=sliding
        or image.get("is_patch_data") is True
        or pred.get("is_patch_data") is True,
        notes=tuple(notes),
        bundle_format="monai",
        inferer=inferer,
        trusted=trust,
        postprocessing=scan_postprocessing(resolved.postprocessing),
    )


def read_info(
    path: str | Path,
    config: str | None = None,
    trust: bool = False,
    overrides: dict[str, Any] | None = None,
) -> ModelInfo:
    """A bundle's :class:`ModelInfo` from its configs only: no network built, no weights read.

    hirescam3d bundles: ``weights_sha256`` is the checksum the metadata records. MONAI
    bundles: see the module docstring (``target_layer`` is ``""``: the handle chooses it
    on load); ``config``: another file of ``configs/`` (default ``inference.json``,
    ``.yaml`` or ``.yml``); ``trust``: resolve it with MONAI's ConfigParser;
    ``overrides``: ``{config id: value}`` set first. ModelError naming the file for
    anything missing, malformed or refused.
    """
    root = _bundle_root(path)
    meta_path, inf_path = root / METADATA, root / INFERENCE
    meta = _read_json(meta_path)
    if not is_hirescam3d_metadata(meta):
        return _read_monai_info(root, meta, config, trust, overrides)
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
    kind = str(section.get("kind", "classification"))
    if kind not in KINDS:
        raise ModelError(f"{meta_path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    spec = InputSpec.from_dict(_get(section, "input", meta_path), f"{meta_path} hirescam3d.input")
    guaranteed = _get(section, "guaranteed", meta_path)
    preprocessing = _get(_read_json(inf_path), "preprocessing", inf_path)
    transforms = preprocessing_specs(preprocessing, inf_path)
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
        kind=kind,
        patch=bool(section.get("patch", False)),
        mask_postprocessing=_mask_postprocessing(section, names, meta_path),
    )


def _mask_postprocessing(section: dict[str, Any], names: list, meta_path: Path) -> Any:
    """The section's ``mask_postprocessing`` (:mod:`hirescam3d.models.seg_postprocess`), or None."""
    if section.get("mask_postprocessing") is None:
        return None
    from hirescam3d.models.seg_postprocess import MaskPostprocessing

    return MaskPostprocessing.from_dict(section["mask_postprocessing"], [str(n) for n in names],
                                        f"{meta_path} hirescam3d")  # fmt: skip


def _network_def(
    inference: dict[str, Any], inf_path: Path, trust: bool = False
) -> tuple[str, dict[str, Any]]:
    net_def = _get(inference, "network_def", inf_path)
    if trust and isinstance(net_def, dict) and isinstance(net_def.get("_target_"), str):
        return net_def["_target_"], {k: v for k, v in net_def.items() if k != "_target_"}
    if not isinstance(net_def, dict) or not isinstance(net_def.get("_target_"), str):
        problem = literal_problem(net_def, "network_def")
        if problem:
            raise literal_error(problem, str(inf_path))
        raise ModelError(f"{inf_path}: network_def must be an object with a '_target_' string")
    target = net_def["_target_"]
    return canonical_target(target) or target, {k: v for k, v in net_def.items() if k != "_target_"}


def read_network_def(
    path: str | Path,
    config: str | None = None,
    trust: bool = False,
    overrides: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(_target_, kwargs)`` of a bundle's ``network_def`` (nothing imported or built);
    an allow-listed target in its canonical spelling (``"monai.networks.nets.UNet"``)."""
    root = _bundle_root(path)
    if not is_hirescam3d_metadata(_read_json(root / METADATA)):
        return _monai_network_def(root, config, trust, overrides)[:2]
    inf_path = root / INFERENCE
    return _network_def(_read_json(inf_path), inf_path)


def _monai_network_def(
    root: Path, config: str | None, trust: bool, overrides: dict[str, Any] | None
) -> tuple[str, dict[str, Any], Path]:
    from hirescam3d.models.bundle_monai import resolve

    resolved = resolve(root, config, trust, overrides)
    return (*_network_def(resolved.as_inference(), resolved.source, trust), resolved.source)


def _trusted_network(target: str, kwargs: dict[str, Any], source: str) -> nn.Module:
    """``network_def`` built by MONAI's own ``ConfigComponent`` (``--trust-bundle``)."""
    from monai.bundle.config_item import ConfigComponent

    try:
        network = ConfigComponent({"_target_": target, **kwargs}).instantiate()
    except Exception as err:
        raise ModelError(f"{source}: MONAI cannot build {target!r}: {str(err)[:200]}") from err
    if not isinstance(network, _torch().nn.Module):
        raise ModelError(f"{source}: {target!r} built a {type(network).__name__}, not a network")
    return network


def weights_file(root: Path, trust: bool = False) -> Path:
    """``models/model.pt`` of a bundle, checked: inside the bundle (unless trusted), a
    regular file; a TorchScript-only bundle gets its own line."""
    from hirescam3d.models.bundle_config import inside

    path = root / WEIGHTS
    if not path.exists() and not path.is_symlink():
        if (root / "models" / "model.ts").exists():
            raise ModelError(
                f"{root / 'models' / 'model.ts'}: the bundle has only TorchScript weights; "
                "TorchScript modules cannot be hooked, so give models/model.pt (the state dict)"
            )
        raise ModelError(f"weights file {path} is missing")
    real = inside(path, root, "weights file", trust)
    if not real.exists():
        raise ModelError(f"{path}: a symbolic link to {real}, which is missing")
    if not real.is_file():
        raise ModelError(f"{path}: not a regular file ({real}); give the weights as a file")
    return path


def load_bundle(
    path: str | Path,
    config: str | None = None,
    trust: bool = False,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Load a bundle folder: ``(network in eval mode, info)``; ModelError on any problem.

    ``config``, ``trust``, ``overrides``: as for :func:`read_info` (MONAI bundles).
    Persistence only: the recorded ``guaranteed`` flag is returned as stored (use
    :meth:`hirescam3d.models.handle.ModelHandle.load` to have it checked against the audit, and
    to have a MONAI bundle's default layer chosen).
    """
    root = _bundle_root(path)
    meta_path, inf_path = root / METADATA, root / INFERENCE
    info = read_info(root, config, trust, overrides)
    if info.bundle_format == "monai":
        target, kwargs, inf_path = _monai_network_def(root, config, trust, overrides)
    else:
        target, kwargs = read_network_def(root)
    if trust and canonical_target(target) is None:
        network = _trusted_network(target, kwargs, f"{inf_path} network_def")
    else:
        network = build_network(target, kwargs, f"{inf_path} network_def")

    weights_path = weights_file(root, trust)
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

    if info.target_layer and info.target_layer not in dict(network.named_modules()):
        raise ModelError(
            f"{meta_path}: target_layer {info.target_layer!r} is not a layer of the network"
        )
    if tuple(getattr(network, "class_names", info.class_names)) != info.class_names:
        raise ModelError(f"{meta_path}: class_names differ from the network's in {inf_path}")
    info.weights_sha256 = sha
    return network, info
