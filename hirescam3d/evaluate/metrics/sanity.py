"""Sanity checks: does an explanation depend on the model? Adebayo et al.'s cascading
model-parameter randomisation (:func:`randomisation_check`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hirescam3d.core.capture import model_state_restored, resolve_layer
from hirescam3d.errors import InputError, LayerError
from hirescam3d.evaluate.metrics._common import TargetsArg, model_device
from hirescam3d.evaluate.metrics.similarity import spearman

__all__ = ["RandomisationResult", "randomisation_check"]


@dataclass
class RandomisationResult:
    """Cascading model-parameter randomisation (Adebayo et al., 2018).

    ``layers``: names of the modules re-initialised, in order (``layers[i]`` at step
    ``i + 1``). ``correlations``: ``(steps, B, K)`` float32 Spearman correlation of each
    map with the original, ``steps = len(layers) + 1``; step 0 compares the original with
    itself (1, or NaN for a constant map). ``targets``: ``(B, K)`` the explained classes
    (those of the original model, kept fixed). A method that depends on the model shows
    correlations that fall as layers are randomised.
    """

    layers: tuple[str, ...]
    correlations: torch.Tensor
    targets: torch.Tensor
    method: str
    order: str


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Modules that own parameters, in the order a forward pass first calls them."""
    seen: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):

            def hook(_m, _i, _o, name=name):
                if name not in seen:
                    seen.append(name)

            handles.append(module.register_forward_hook(hook))
    try:
        with model_state_restored(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _reinitialise(module: nn.Module, seed: int) -> None:
    """New random parameters for ``module``: its ``reset_parameters()`` under a fixed seed
    (the caller's RNG state is restored), else normal noise of each tensor's own std."""
    params = list(module.parameters(recurse=False))
    device = params[0].device if params else torch.device("cpu")
    if hasattr(module, "reset_parameters"):
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            module.reset_parameters()
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            std = std if math.isfinite(std) and std > 0 else 0.02
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * std)


def _checked_layer(model: nn.Module, layer: str | nn.Module | None, order: str, use: str) -> str:
    """Check ``order`` and ``use`` (InputError); the name of the explained layer (default
    ``model.default_layer``, else LayerError)."""
    if order not in ("top-down", "bottom-up", "independent"):
        raise InputError(f"order must be 'top-down', 'bottom-up' or 'independent', not {order!r}")
    if use not in ("raw", "maps"):
        raise InputError(f"use must be 'raw' or 'maps', not {use!r}")
    if layer is None:
        layer = getattr(model, "default_layer", None)
        if not layer:
            raise LayerError("give layer=...: the model has no default_layer")
    return resolve_layer(model, layer)[0]


def _randomisation_order(model: nn.Module, x: torch.Tensor, order: str) -> list[str]:
    """The modules that own parameters, in the order ``order`` re-initialises them."""
    x_dev = x.detach().to(model_device(model))
    if not x_dev.is_floating_point():
        x_dev = x_dev.float()
    names = _execution_order(model, x_dev)
    return names if order == "bottom-up" else names[::-1]


def _randomised(
    model: nn.Module, work: nn.Module, name: str, independent: bool, seed: int
) -> nn.Module:
    """The network with module ``name`` re-initialised: a new copy of ``model`` if
    ``independent``, else ``work`` itself (cascading)."""
    net = copy.deepcopy(model) if independent else work
    _reinitialise(dict(net.named_modules())[name], seed)
    return net


def randomisation_check(
    model: nn.Module,
    x: torch.Tensor,
    targets: TargetsArg | None = None,
    method: str = "hirescam",
    layer: str | nn.Module | None = None,
    order: Literal["top-down", "bottom-up", "independent"] = "top-down",
    seed: int = 0,
    use: Literal["raw", "maps"] = "raw",
    absolute: bool = False,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> RandomisationResult:
    """Adebayo et al.'s model-parameter randomisation test for an explanation method.

    A deep copy of ``model`` is explained with :class:`hirescam3d.Explainer` at
    ``layer``; then its parameterised modules are re-initialised one by one and the
    explanation is recomputed after each, and each map's Spearman rank correlation with
    the original map is recorded. The user's model is never modified (nor the global
    RNG state).

    Args:
        model: the network; ``x``: ``(B, C_in, *S)``.
        targets: classes to explain (as for :class:`~hirescam3d.Explainer`); None = each
            item's top class under the original model. Kept fixed at every step.
        method: a registered method name.
        layer: the explained layer (name or module of ``model``); default
            ``model.default_layer``.
        order: ``"top-down"`` (cascading from the output towards the input, as in the
            paper), ``"bottom-up"`` (cascading from the input), or ``"independent"``
            (one module at a time, the others original). Module order is the order in
            which one forward pass first calls the modules that own parameters.
        seed: re-initialisation seed (module ``i`` uses ``seed + i``). Modules with
            ``reset_parameters()`` use it; others get normal noise with the standard
            deviation of each of their parameter tensors.
        use: correlate the ``"raw"`` maps on the layer's grid (default; signed, few
            ties) or the display ``"maps"`` on the input (ReLU'd: ties at 0 share their
            average rank).
        absolute: correlate absolute values (Adebayo et al. report both).
        output_selector: as for :class:`~hirescam3d.Explainer`.

    Returns:
        :class:`RandomisationResult`. Ranks are average ranks for ties (Spearman as in
        ``scipy.stats.spearmanr``); a map made constant by randomisation gives NaN.

    Cost: ``1 + len(layers)`` explanations (one forward and one backward pass each),
    plus one forward pass to find the module order.
    """
    from hirescam3d.core.explainer import Explainer

    layer_name = _checked_layer(model, layer, order, use)
    work = copy.deepcopy(model)

    def explain(
        net: nn.Module, explainer: Explainer | None, tgt: TargetsArg | None
    ) -> tuple[torch.Tensor, torch.Tensor, Explainer]:
        """The map that is correlated, the explained targets and the explainer used."""
        explainer = explainer or Explainer(net, layer_name, method, output_selector=output_selector)
        res = explainer.explain(x, targets=tgt, maps=use == "maps")[explainer.method]
        out = res.raw if use == "raw" else res.maps
        return (out.abs() if absolute else out), res.targets, explainer

    first, tgt, explainer = explain(work, None, targets)
    names = _randomisation_order(work, x, order)
    correlations = [spearman(first, first)]
    independent = order == "independent"
    for step, name in enumerate(names):
        net = _randomised(model, work, name, independent, seed + step)
        current, _, _ = explain(net, None if independent else explainer, tgt)
        correlations.append(spearman(current, first))
    return RandomisationResult(
        layers=tuple(names),
        correlations=torch.stack(correlations),
        targets=tgt,
        method=explainer.method,
        order=order,
    )
