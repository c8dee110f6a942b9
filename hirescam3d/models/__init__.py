"""Network architectures of the model zoo: the allow-list of classes a bundle may build.

Importing this package is cheap: it holds plain data (:data:`VOC_CLASSES`,
:data:`TINY_KWARGS`, the allow-listed ``_target_`` strings) and loads the architecture
modules, which import MONAI, only when one of their names is first used
(``from hirescam3d.models import AxialNet`` works as usual). Listing the zoo therefore
never imports an architecture.

Which layers of a network HiResCAM is faithful at is computed, not declared: see
:mod:`hirescam3d.audit` and :meth:`hirescam3d.handle.ModelHandle.layers`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from .axialnet import AxialNet, ToVolume, TripletMean, axialnet_tiny
    from .baselines import CAMNet
    from .voc import VOCNet

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_TARGETS",
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
    "hirescam3d.models.axialnet.AxialNet",
    "hirescam3d.models.voc.VOCNet",
    "hirescam3d.models.baselines.CAMNet",
)

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


def architecture(target: str, source: str = "network_def") -> type[nn.Module]:
    """The class an allow-listed ``_target_`` names (ModelError for anything else)."""
    if target not in ARCHITECTURE_TARGETS:
        raise ModelError(
            f"{source}: refusing to build _target_ {target!r}: only hirescam3d architectures "
            f"can be loaded ({', '.join(ARCHITECTURE_TARGETS)})"
        )
    module, _, cls = target.rpartition(".")
    return getattr(importlib.import_module(module), cls)


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

    Raises:
        ModelError: ``target`` is not a hirescam3d architecture, or the arguments are wrong.
    """
    cls = architecture(target, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelError(f"{source}: cannot build {target} with {kwargs}: {err}") from err
