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

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hirescam3d.errors import ModelError
from hirescam3d.models.bundle_read import (
    INFERENCE,
    LICENSE,
    METADATA,
    README,
    WEIGHTS,
    _torch,
    check_state_dict,
    is_hirescam3d_metadata,
    load_bundle,
    load_weights,
    monai_bundle_title,
    monai_preprocessing_specs,
    preprocessing_specs,
    read_class_names,
    read_info,
    read_network_def,
    sha256_of,
    short_transform_name,
    weights_file,
)
from hirescam3d.models.handle import ModelHandle
from hirescam3d.models.model_info import (
    KINDS,
    PREPROCESSING_TRANSFORMS,
    TASKS,
    InputSpec,
    ModelInfo,
    apply_window,
    preprocessing_transforms,
)
from hirescam3d.models.nets import build_network, canonical_target, target_of

if TYPE_CHECKING:  # torch loads only with the functions that use it (fast listings)
    from collections.abc import Sequence

    import torch
    from torch import nn

__all__ = [
    "INFERENCE",
    "KINDS",
    "LICENSE",
    "LICENSE_TEXT",
    "METADATA",
    "PREPROCESSING_TRANSFORMS",
    "README",
    "TASKS",
    "WEIGHTS",
    "InputSpec",
    "ModelInfo",
    "apply_window",
    "check_state_dict",
    "infer_info",
    "is_hirescam3d_metadata",
    "load_bundle",
    "load_weights",
    "monai_bundle_title",
    "monai_preprocessing_specs",
    "preprocessing_specs",
    "preprocessing_transforms",
    "read_class_names",
    "read_info",
    "read_network_def",
    "save_bundle",
    "sha256_of",
    "short_transform_name",
    "weights_file",
]


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


def readme_text(info: ModelInfo) -> str:
    """The bundle's ``docs/README.md``: its input, output, layer and training record."""
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
    (root / README).write_text(readme_text(info))
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
