"""Reading and loading bundle folders (both formats; see :mod:`hirescam3d.models.bundle`).

The folder layout (:data:`METADATA`, :data:`INFERENCE`, :data:`WEIGHTS`, ...), a bundle's
:class:`~hirescam3d.models.model_info.ModelInfo` from its configs only (:func:`read_info`,
:func:`read_class_names`, :func:`read_network_def`), and the network with its weights
(:func:`load_bundle`). Saving is :func:`hirescam3d.models.bundle.save_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hirescam3d.errors import ModelError
from hirescam3d.models.model_info import (
    KINDS,
    PREPROCESSING_TRANSFORMS,
    TASKS,
    InputSpec,
    ModelInfo,
)
from hirescam3d.models.nets import (
    build_network,
    canonical_target,
    literal_error,
    literal_problem,
)

if TYPE_CHECKING:  # torch loads only with the functions that use it (fast listings)
    import torch
    from torch import nn

METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
README = Path("docs") / "README.md"
LICENSE = Path("LICENSE")


def _torch() -> Any:
    import torch

    return torch


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    activation, note = _monai_activation(inference, pred, len(names), meta_path, inf_path)
    image = _monai_image(meta, meta_path)
    spec = _monai_input(image, kwargs, specs, inferer, meta_path)
    sliding = inferer is not None and inferer["kind"] == "sliding"
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
        notes=() if note is None else (note,),
        bundle_format="monai",
        inferer=inferer,
        trusted=trust,
        postprocessing=scan_postprocessing(resolved.postprocessing),
    )


def _monai_activation(
    inference: dict[str, Any], pred: dict[str, Any], classes: int, meta_path: Path, inf_path: Path
) -> tuple[str, str | None]:
    """The output activation, ``"sigmoid"`` or ``"softmax"``, and a note when it is guessed:
    what the bundle's postprocessing applies, else the metadata's, else sigmoid for one
    class and softmax for more."""
    flags = set(_activation_flags(inference.get("postprocessing")))
    declared = str(pred.get("activation", "")).lower() or None
    if len(flags) == 1:
        return flags.pop(), None
    if declared in ("sigmoid", "softmax"):
        return declared, None
    if declared is not None:
        raise ModelError(
            f"{meta_path}: network_data_format.outputs.pred.activation {pred['activation']!r} "
            "is not 'sigmoid' or 'softmax'"
        )
    activation = "sigmoid" if classes == 1 else "softmax"
    return activation, (
        f"the bundle states no output activation (no Activationsd in {inf_path.name} "
        f"postprocessing, no outputs.pred.activation); assuming {activation}"
    )


def _monai_image(meta: dict[str, Any], meta_path: Path) -> dict[str, Any]:
    """``network_data_format.inputs.image`` (or the first input, whatever its name)."""
    inputs = _get(meta, "network_data_format.inputs", meta_path)
    if not isinstance(inputs, dict) or not inputs:
        raise ModelError(f"{meta_path}: network_data_format.inputs must describe the input")
    image = inputs.get("image", next(iter(inputs.values())))
    if not isinstance(image, dict):
        raise ModelError(f"{meta_path}: network_data_format.inputs.image must be an object")
    return image


def _monai_input(
    image: dict[str, Any],
    kwargs: dict[str, Any],
    specs: list[dict[str, Any]],
    inferer: dict[str, Any] | None,
    meta_path: Path,
) -> InputSpec:
    """The network's input: channels and size from the metadata's ``image`` (the size: the
    sliding window's, if any), axes from the ``network_def`` ``kwargs``, orientation,
    spacing and intensity window from the preprocessing ``specs``."""
    dims = kwargs.get("spatial_dims", kwargs.get("dimensions"))
    shape = image.get("spatial_shape")
    if not isinstance(dims, int):
        dims = len(shape) if isinstance(shape, list) and shape else 3
    channels = image.get("num_channels", kwargs.get("in_channels", kwargs.get("n_input_channels")))
    size = _monai_input_size(shape, dims, specs, inferer, meta_path)
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
    return InputSpec.from_dict(
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


def _monai_input_size(
    shape: Any,
    dims: int,
    specs: list[dict[str, Any]],
    inferer: dict[str, Any] | None,
    meta_path: Path,
) -> list[int]:
    """The network's spatial input size: the sliding window's, else the metadata's
    ``spatial_shape``, else the preprocessing's resize; ModelError if none is ``dims``
    positive whole numbers."""
    size = shape if isinstance(shape, list) else None
    sliding = inferer is not None and inferer["kind"] == "sliding"
    if sliding and len(inferer["roi_size"]) == dims:
        size = inferer["roi_size"]  # the network sees the inferer's windows
    if (
        size is not None
        and len(size) == dims
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        return size
    resize = _spec_of(specs, "ResizeWithPadOrCropd") or _spec_of(specs, "Resized")
    fallback = resize and resize.get("spatial_size")
    if (
        isinstance(fallback, list)
        and len(fallback) == dims
        and all(isinstance(n, int) and n > 0 for n in fallback)
    ):
        return fallback
    raise ModelError(
        f"{meta_path}: network_data_format.inputs.image.spatial_shape {shape!r} is not "
        f"{dims} positive whole numbers: give the network's input size (or its "
        "sliding-window size, with is_patch_data true)"
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
