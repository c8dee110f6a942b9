"""Explanation methods as pure functions of tensors, and their registry.

Shapes: ``activations`` is ``(B, F, *S)`` with 1 to 3 spatial dims ``S``.
``gradients`` (the gradient of one class score with respect to the
activations) is ``(B, F, *S)`` or, for K targets at once, ``(K, B, F, *S)``.
Every method returns a raw map ``(B, *S)`` (or ``(K, B, *S)``) with no ReLU and
no normalisation: post-processing lives in :mod:`hirescam3d.postprocess`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import HiResCAMError


def _feature_dim(activations: torch.Tensor) -> int:
    """Index (negative) of the feature axis F, counted from the end."""
    n_spatial = activations.ndim - 2
    if n_spatial < 1:
        raise HiResCAMError(
            f"activations must be (B, F, *spatial) with at least one spatial dim; "
            f"got shape {tuple(activations.shape)}"
        )
    return -(n_spatial + 1)


def hirescam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM: ``sum_f G_f * A_f`` element-wise (Draelos & Carin, eq. 4).

    For a network whose only operation after the layer is one linear layer, the
    map's cells are the exact contributions of each location to the class score.
    """
    return (gradients * activations).sum(dim=_feature_dim(activations))


def gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: ``sum_f mean_S(G_f) * A_f`` (Selvaraju et al., eq. 1-2, before ReLU)."""
    fdim = _feature_dim(activations)
    spatial = tuple(range(fdim + 1, 0))
    alpha = gradients.mean(dim=spatial, keepdim=True)
    return (alpha * activations).sum(dim=fdim)


def cam(activations: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al.): ``sum_f w_f * A_f`` for a GAP + linear network.

    ``class_weights`` holds the linear layer's weight row of each explained
    class: ``(B, F)``, or ``(K, B, F)`` for K targets at once.
    """
    fdim = _feature_dim(activations)
    n_spatial = -fdim - 1
    w = class_weights.reshape(*class_weights.shape, *([1] * n_spatial))
    return (w * activations).sum(dim=fdim)


@dataclass(frozen=True)
class Method:
    """A registered method: ``fn(activations, x)`` where ``x`` is what ``needs`` names."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    needs: str  # "gradients" or "class_weights"
    description: str


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    needs: str = "gradients",
    description: str = "",
) -> None:
    """Add a method to the registry under ``name`` (used by Explainer, CLI and plugin)."""
    if needs not in ("gradients", "class_weights"):
        raise ValueError(f"needs must be 'gradients' or 'class_weights', not {needs!r}")
    METHODS[name] = Method(name, fn, needs, description or (fn.__doc__ or "").split("\n")[0])


def get_method(name: str) -> Method:
    """Look up a registered method; unknown names raise with the valid choices."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise HiResCAMError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}"
        ) from None


register_method("hirescam", hirescam)
register_method("gradcam", gradcam)
register_method("cam", cam, needs="class_weights")
