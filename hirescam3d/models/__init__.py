"""Network architectures of the model zoo, and which of their layers HiResCAM is faithful at.

HiResCAM's guarantee: when only linear (affine) operations follow a layer, the class
score is ``sum_{f,p} W_fp * A_fp + b`` and the HiResCAM map ``sum_f G_f * A_f`` is exactly
each location's contribution to the score. :func:`explanation_layers` checks this
structurally along each architecture's top-level path (its ``spine()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ModelError
from .axialnet import AxialNet, ToVolume, TripletMean, axialnet_tiny
from .baselines import CAMNet
from .voc import VOC_CLASSES, VOCNet

__all__ = [
    "ARCHITECTURES",
    "AxialNet",
    "CAMNet",
    "LayerInfo",
    "ToVolume",
    "TripletMean",
    "VOCNet",
    "VOC_CLASSES",
    "axialnet_tiny",
    "build_network",
    "explanation_layers",
    "is_linear",
    "target_of",
]

# The only classes a bundle's network_def may name: nothing else is ever constructed.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "hirescam3d.models.axialnet.AxialNet": AxialNet,
    "hirescam3d.models.voc.VOCNet": VOCNet,
    "hirescam3d.models.baselines.CAMNet": CAMNet,
}

# Modules whose output is an affine function of their input (eval mode).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Flatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


def is_linear(module: nn.Module) -> bool:
    """True when ``module`` is affine in its input (containers: all children affine)."""
    if getattr(module, "is_linear", False) or isinstance(module, LINEAR_TYPES):
        return True
    if type(module) is nn.Sequential:
        return all(is_linear(m) for m in module.children())
    return False


@dataclass(frozen=True)
class LayerInfo:
    """A layer that can be explained.

    ``guaranteed``: True when only linear operations follow it (HiResCAM is exactly the
    locations the model used), False when a nonlinearity follows, None when unknown
    (a network that is not a hirescam3d architecture).
    """

    name: str
    module: str
    guaranteed: bool | None
    default: bool = False
    note: str = ""


def target_of(network: nn.Module) -> str:
    """The allow-listed ``_target_`` string of a hirescam3d network."""
    for target, cls in ARCHITECTURES.items():
        if type(network) is cls:
            return target
    raise ModelError(
        f"{type(network).__name__} is not a hirescam3d zoo architecture; "
        f"only {', '.join(ARCHITECTURES)} can be saved as bundles"
    )


def explanation_layers(network: nn.Module) -> list[LayerInfo]:
    """Candidate explanation layers in execution order, each with its HiResCAM guarantee.

    For hirescam3d architectures the guarantee is derived from the modules that follow
    the layer on the network's top-level path; for other networks every convolution is
    listed with ``guaranteed=None``.
    """
    modules = dict(network.named_modules())
    spine = getattr(network, "spine", None)
    if spine is None:
        return [
            LayerInfo(name, type(m).__name__, None, note="not a hirescam3d architecture")
            for name, m in modules.items()
            if isinstance(m, nn.modules.conv._ConvNd)
        ]
    path = spine()
    default = getattr(network, "default_layer", None)
    notes = network.layer_notes() if hasattr(network, "layer_notes") else {}
    stop = path.index(network.head_start)
    layers = []
    for i, name in enumerate(path[:stop]):
        after = path[i + 1 :]
        guaranteed = all(is_linear(modules[n]) for n in after)
        follow = ""
        if guaranteed:
            follow = "only " + ", ".join(type(modules[n]).__name__ for n in after) + " follow"
        note = "; ".join(s for s in (notes.get(name, ""), follow) if s)
        layers.append(
            LayerInfo(name, type(modules[name]).__name__, guaranteed, name == default, note)
        )
    return layers


def build_network(target: str, kwargs: dict[str, Any], source: str = "network_def") -> nn.Module:
    """Construct an allow-listed architecture from its ``_target_`` and keyword arguments.

    Raises:
        ModelError: ``target`` is not a hirescam3d architecture, or the arguments are wrong.
    """
    cls = ARCHITECTURES.get(target)
    if cls is None:
        raise ModelError(
            f"{source}: refusing to build _target_ {target!r}: only hirescam3d architectures "
            f"can be loaded ({', '.join(ARCHITECTURES)})"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelError(f"{source}: cannot build {target} with {kwargs}: {err}") from err
