"""Capture a layer's output during one forward pass, leaving the model untouched.

The forward pass runs under ``torch.no_grad()`` up to the target layer, so the
network before it builds no autograd graph. The layer's output is replaced by a
copy of a fresh leaf tensor that requires grad; grad mode is switched on from
there, so only the part after the layer is recorded, and gradients are taken
with respect to that leaf alone (parameters never receive ``.grad``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hirescam3d.errors import LayerError


def resolve_layer(model: nn.Module, target_layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for a layer given by name or as a module."""
    named = dict(model.named_modules())
    if isinstance(target_layer, nn.Module):
        for name, module in named.items():
            if module is target_layer:
                return name, module
        raise LayerError(f"the given {type(target_layer).__name__} module is not part of the model")
    if target_layer in named and target_layer != "":
        return target_layer, named[target_layer]
    close = difflib.get_close_matches(str(target_layer), [n for n in named if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise LayerError(
        f"the model has no layer named {target_layer!r}{hint} "
        "(list the names with `hirescam3d layers` or model.named_modules())"
    )


@contextmanager
def model_state_restored(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block with the model in eval mode and restore every module's mode after.

    ``requires_grad`` flags are checked too, so a method can never leave them changed.
    """
    modules = list(model.modules())
    modes = [(m, m.training) for m in modules]
    flags = [(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
    if eval_mode and any(training for _, training in modes):
        model.eval()
    try:
        yield
    finally:
        # Only touch what changed: nn.Module.__setattr__ is slow on large models.
        for m, training in modes:
            if m.training != training:
                m.training = training
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


class LayerCapture:
    """Context manager: hook ``layer`` so its output becomes a grad-requiring leaf.

    After the forward pass, ``activations`` holds the leaf ``(B, F, *S)`` (the
    layer's output values, unaffected by later in-place ops). The hook is
    removed and grad mode restored on exit, also when the forward pass raises.
    """

    def __init__(self, layer: nn.Module, name: str):
        self.layer = layer
        self.name = name
        self.activations: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._grad_mode = torch.is_grad_enabled()

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise LayerError(
                f"layer {self.name!r} returns a {type(output).__name__}, not a tensor; "
                "choose a convolutional layer whose output is (B, F, *spatial)"
            )
        if output.ndim < 3:
            raise LayerError(
                f"layer {self.name!r} outputs shape {tuple(output.shape)} with no spatial "
                "dimension; choose a convolutional layer whose output is (B, F, *spatial)"
            )
        leaf = output.detach().requires_grad_(True)
        self.activations = leaf
        torch.set_grad_enabled(True)
        # A non-leaf copy, so in-place ops after the layer (ReLU(inplace=True)) are legal
        # and the captured values stay as the layer produced them.
        return leaf.clone()

    def __enter__(self) -> LayerCapture:
        self._grad_mode = torch.is_grad_enabled()
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        torch.set_grad_enabled(self._grad_mode)
