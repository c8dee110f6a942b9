"""Network architectures of the model zoo: the allow-list of classes a bundle may build.

Importing this package is cheap: it holds plain data (:data:`VOC_CLASSES`,
:data:`TINY_KWARGS`, the allow-listed ``_target_`` strings) and loads the architecture
modules, which import MONAI, only when one of their names is first used
(``from hirescam3d.models.nets import AxialNet`` works as usual). Listing the zoo therefore
never imports an architecture.

A bundle may also name a network of :mod:`monai.networks.nets` from the allow-list
:data:`MONAI_NETWORKS` (``"UNet"`` or ``"monai.networks.nets.UNet"``), built from literal
keyword arguments only (:func:`literal_problem`): no ``$`` expression, ``@`` reference or
``%`` macro, no nested ``_target_``, and no ``pretrained`` download (weights come from the
bundle's ``models/model.pt``).

Which layers of a network HiResCAM is faithful at is computed, not declared: see
:mod:`hirescam3d.core.audit` and :meth:`hirescam3d.models.handle.ModelHandle.layers`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hirescam3d.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from hirescam3d.models.nets.axialnet import AxialNet, ToVolume, TripletMean, axialnet_tiny
    from hirescam3d.models.nets.baselines import CAMNet
    from hirescam3d.models.nets.voc import VOCNet

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_TARGETS",
    "MONAI_NETWORKS",
    "MONAI_TARGETS",
    "AxialNet",
    "CAMNet",
    "TINY_KWARGS",
    "ToVolume",
    "TripletMean",
    "VOCNet",
    "VOC_CLASSES",
    "architecture",
    "axialnet_tiny",
    "build_network",
    "canonical_target",
    "literal_error",
    "literal_problem",
    "target_of",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# AxialNet scaled for CPU (the demo model's architecture), see models.axialnet.axialnet_tiny.
TINY_KWARGS: dict[str, Any] = {
    "input_size": (96, 128, 128),
    "trunk_widths": (16, 32, 64),
    "trunk_blocks": (1, 1, 1),
    "trunk_strides": (1, 2, 2),
    "stem_stride": 2,
    "stem_pool": True,
    "stem_kernel": 4,
    "reduce_channels": (32, 16, 16, 16),
    "reduce_norm": True,
    "reduce_kernel": 1,
    "pool_downsample": True,
}

# The only classes a bundle's network_def may name: nothing else is ever imported or built.
ARCHITECTURE_TARGETS: tuple[str, ...] = (
    "hirescam3d.models.nets.axialnet.AxialNet",
    "hirescam3d.models.nets.voc.VOCNet",
    "hirescam3d.models.nets.baselines.CAMNet",
)

# Bundles written before the subpackage layout name the old module of each architecture.
LEGACY_TARGETS: dict[str, str] = {
    t.replace(".models.nets.", ".models."): t for t in ARCHITECTURE_TARGETS
}

# monai.networks.nets classes (and resnet functions) a bundle's network_def may name, as
# "X" (how MONAI bundles spell it) or "monai.networks.nets.X". Their constructors only
# build modules: none reads a file, and the ``pretrained`` downloads are refused.
MONAI_PREFIX = "monai.networks.nets."
MONAI_SEGMENTATION: tuple[str, ...] = (
    "UNet", "BasicUNet", "AttentionUnet", "SegResNet", "DynUNet", "UNETR", "SwinUNETR",
    "VNet", "HighResNet",
)  # fmt: skip
MONAI_CLASSIFICATION: tuple[str, ...] = (
    "DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264",
    "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    "SEResNet50", "SEResNet101", "SEResNet152", "SEResNext50", "SEResNext101",
)  # fmt: skip
MONAI_NETWORKS: tuple[str, ...] = MONAI_SEGMENTATION + MONAI_CLASSIFICATION
MONAI_TARGETS: tuple[str, ...] = tuple(MONAI_PREFIX + n for n in MONAI_NETWORKS)

# Keys MONAI's config parser gives a meaning to; only these carry no code.
_HARMLESS_SPECIAL_KEYS = ("_desc_",)

# Public names defined in the architecture modules, imported on first use.
_LAZY = {
    "AxialNet": "axialnet",
    "ToVolume": "axialnet",
    "TripletMean": "axialnet",
    "axialnet_tiny": "axialnet",
    "VOCNet": "voc",
    "CAMNet": "baselines",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name == "ARCHITECTURES":
        return {target: architecture(target) for target in ARCHITECTURE_TARGETS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def canonical_target(target: str) -> str | None:
    """The allow-listed spelling of ``target`` (``"UNet"`` -> ``"monai.networks.nets.UNet"``),
    or None when it is not on the allow-list."""
    if target in ARCHITECTURE_TARGETS or target in MONAI_TARGETS:
        return target
    if target in LEGACY_TARGETS:
        return LEGACY_TARGETS[target]
    if target in MONAI_NETWORKS:
        return MONAI_PREFIX + target
    name = target.removeprefix(MONAI_PREFIX)
    if isinstance(target, str) and name.isidentifier() and not name.startswith("_"):
        # any other network class of monai.networks.nets (constructors only build modules)
        nets = importlib.import_module(MONAI_PREFIX[:-1])
        cls = getattr(nets, name, None)
        if isinstance(cls, type) and issubclass(cls, importlib.import_module("torch").nn.Module):
            return MONAI_PREFIX + name
    return None


def _refusal(target: str, source: str) -> ModelError:
    return ModelError(
        f"{source}: refusing to build _target_ {target!r}: only hirescam3d architectures "
        f"({', '.join(ARCHITECTURE_TARGETS)}) and monai.networks.nets networks (e.g. "
        f"{', '.join(MONAI_NETWORKS[:4])}) are built; nothing else is imported or run "
        "without --trust-bundle"
    )


def architecture(target: str, source: str = "network_def") -> Callable[..., nn.Module]:
    """The class (or MONAI ``resnet*`` function) an allow-listed ``_target_`` names
    (ModelError for anything else)."""
    canonical = canonical_target(target)
    if canonical is None:
        raise _refusal(target, source)
    module, _, cls = canonical.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def literal_problem(value: Any, where: str) -> str | None:
    """Why ``value`` (a JSON config value at ``where``) is not a plain literal, or None.

    Refused: strings MONAI's config parser would evaluate (``$`` expressions), resolve
    (``@`` references) or expand (``%`` macros), and objects with special keys
    (``_target_``, ``_requires_``, ``_mode_``, ``_disabled_``; ``_desc_`` is allowed).
    """
    if isinstance(value, str):
        text = value.lstrip()
        if text[:1] in ("$", "@", "%"):
            kind = {"$": "expression", "@": "reference", "%": "macro"}[text[0]]
            return f"{where} is the MONAI {kind} {value!r}"
        return None
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = literal_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            key = str(key)
            if key.startswith("_") and key.endswith("_") and key not in _HARMLESS_SPECIAL_KEYS:
                return f"{where} holds the special key {key!r} ({item!r})"
            problem = literal_problem(item, f"{where}.{key}")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__name__}, not a JSON literal"


def literal_error(problem: str, source: str) -> ModelError:
    """The one-line refusal for a :func:`literal_problem`."""
    return ModelError(
        f"{source}: refused: {problem}; hirescam3d evaluates no MONAI expressions, references "
        "or nested objects: write the literal value instead"
    )


def target_string(cls: type) -> str:
    """``module.QualName`` of a class (what a bundle's ``_target_`` holds)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def target_of(network: nn.Module) -> str:
    """The allow-listed ``_target_`` string of a hirescam3d network."""
    target = target_string(type(network))
    if target not in ARCHITECTURE_TARGETS or architecture(target) is not type(network):
        raise ModelError(
            f"{type(network).__name__} is not a hirescam3d zoo architecture; "
            f"only {', '.join(ARCHITECTURE_TARGETS)} can be saved as bundles"
        )
    return target


def build_network(target: str, kwargs: dict[str, Any], source: str = "network_def") -> nn.Module:
    """Construct an allow-listed architecture from its ``_target_`` and keyword arguments.

    ``target``: a hirescam3d architecture or a MONAI network of :data:`MONAI_NETWORKS`;
    ``kwargs``: literals only (see :func:`literal_problem`). A MONAI network's
    ``pretrained`` is set to False (its weights come from the bundle); a true value, which
    would download weights, is refused.

    Raises:
        ModelError: ``target`` is not on the allow-list, an argument is not a literal, or
            the arguments are wrong.
    """
    canonical = canonical_target(target)
    if canonical is None:
        raise _refusal(target, source)
    problem = literal_problem(dict(kwargs), "network_def")
    if problem:
        raise literal_error(problem, source)
    kwargs = dict(kwargs)
    kwargs.pop("_desc_", None)
    cls = architecture(canonical, source)
    if canonical.startswith(MONAI_PREFIX) and "pretrained" in inspect.signature(cls).parameters:
        if kwargs.get("pretrained") not in (None, False):
            raise ModelError(
                f"{source}: refused: pretrained={kwargs['pretrained']!r} would download "
                "weights; the bundle's models/model.pt holds them: set it to false"
            )
        kwargs["pretrained"] = False
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, IndexError, AttributeError) as err:
        text = " ".join(str(err).split())[:300]
        raise ModelError(f"{source}: cannot build {target} with {kwargs}: {text}") from err
