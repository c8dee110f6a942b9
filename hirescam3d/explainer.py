"""Explainer: model + layer + method(s) -> explanation maps, in one forward pass.

Data path: validate input -> forward with the layer captured -> class scores ->
K target gradients from one graph -> pure method functions -> place on the input by the
layer's traced geometry -> post-process.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import postprocess
from .capture import LayerCapture, model_state_restored, resolve_layer
from .errors import InputError, LayerError, TargetError
from .methods import get_method
from .trace import LayerGeometry, TraceResult, probe_geometry, trace

PostProcessing = Callable[[torch.Tensor, LayerGeometry, Sequence[int]], torch.Tensor]

Targets = int | str | Sequence[int | str] | Sequence[Sequence[int | str]] | torch.Tensor | None


@dataclass
class ExplanationResult:
    """Explanations of K targets for a batch of B inputs.

    ``raw``: ``(B, K, *feature_spatial)`` float32, straight from the method (for
    HiResCAM at a guaranteed layer: each cell's contribution to the logit).
    ``maps``: ``(B, K, *input_spatial)`` from the explainer's post-processing, by default
    float32 in [0, 1] placed by ``geometry`` (:func:`hirescam3d.postprocess.unit_maps`);
    None when maps were not requested. ``scores``: ``(B, C)`` logits; ``targets``:
    ``(B, K)`` class indices. ``geometry``: where the raw cells lie in the input.
    """

    raw: torch.Tensor
    maps: torch.Tensor | None
    scores: torch.Tensor
    targets: torch.Tensor
    method: str
    layer: str
    class_names: tuple[str, ...] | None = None
    activation_shape: tuple[int, ...] = field(default=())
    geometry: LayerGeometry | None = None

    def target_names(self) -> list[list[str]]:
        """Class names of ``targets`` (indices as strings when the model has no names)."""
        names = self.class_names
        return [[names[t] if names else str(t) for t in row] for row in self.targets.tolist()]


def _first_conv_rank(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.weight.ndim
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Explainer:
    """Explain a classifier's scores at one layer with CAM, Grad-CAM or HiResCAM.

    Args:
        model: any ``nn.Module`` mapping ``(B, C_in, *spatial)`` to logits ``(B, C)``
            (or to something ``output_selector`` turns into logits).
        target_layer: dotted module name (as in ``model.named_modules()``) or the module.
        method: a registered method name (``"hirescam"``, ``"gradcam"``, ``"cam"``).
        class_names: names of the C classes; defaults to ``model.class_names`` if set.
        output_selector: maps the model's output (tuple, dict) to ``(B, C)`` logits.
        fc_layer: for CAM, the linear layer after global pooling (name or module);
            defaults to the last ``nn.Linear`` whose input size matches the layer's F.
        postprocessing: ``f(raw, geometry, input_size) -> maps``, what ``result.maps``
            holds; default :func:`hirescam3d.postprocess.unit_maps` (ReLU, placed by the
            layer's geometry, divided by the maximum). Use
            :func:`hirescam3d.postprocess.density` for maps in the raw map's units.

    The model is run in eval mode and every module's mode, ``requires_grad`` flag
    and hook set is restored afterwards, also when the forward pass raises.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module,
        method: str = "hirescam",
        class_names: Sequence[str] | None = None,
        output_selector: Callable[[object], torch.Tensor] | None = None,
        fc_layer: str | nn.Module | None = None,
        postprocessing: PostProcessing = postprocess.unit_maps,
    ):
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, target_layer)
        self.method = get_method(method).name
        names = class_names if class_names is not None else getattr(model, "class_names", None)
        self.class_names = tuple(names) if names is not None else None
        self.output_selector = output_selector
        self.fc_layer = fc_layer
        self.postprocessing = postprocessing
        self._geometries: dict[tuple, LayerGeometry] = {}

    # -- input and targets -------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input must be a torch.Tensor, not {type(x).__name__}")
        if x.ndim < 3:
            raise InputError(
                "input must be (B, C, *spatial) with 1 to 3 spatial dims; "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"input has {bad} non-finite values (NaN or Inf); clean or mask them")
        return x.detach().to(_model_device(self.model))

    def _class_index(self, t: int | str, n_classes: int) -> int:
        if isinstance(t, str):
            if not self.class_names:
                raise TargetError(f"target {t!r} is a name but the model has no class names")
            if t not in self.class_names:
                close = difflib.get_close_matches(t, self.class_names, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise TargetError(
                    f"unknown class {t!r}.{hint} Valid classes: {', '.join(self.class_names)}"
                )
            return self.class_names.index(t)
        t = int(t)
        if not 0 <= t < n_classes:
            raise TargetError(f"target index {t} is out of range for {n_classes} classes")
        return t

    def _target_matrix(self, targets: Targets, scores: torch.Tensor) -> torch.Tensor:
        """Targets as a ``(B, K)`` long tensor of class indices."""
        b, c = scores.shape
        if targets is None:
            return scores.argmax(dim=1, keepdim=True)
        if isinstance(targets, torch.Tensor):
            targets = targets.tolist()
        if isinstance(targets, (int, str)):
            targets = [targets]
        rows = list(targets)
        if rows and isinstance(rows[0], (list, tuple)):
            if len(rows) != b:
                raise TargetError(f"per-item targets have {len(rows)} rows for a batch of {b}")
            idx = [[self._class_index(t, c) for t in row] for row in rows]
            if len({len(r) for r in idx}) != 1:
                raise TargetError("per-item targets must have the same number K for every item")
        else:
            if not rows:
                raise TargetError("targets is empty; give at least one class")
            idx = [[self._class_index(t, c) for t in rows]] * b
        return torch.tensor(idx, dtype=torch.long, device=scores.device)

    # -- the forward pass ----------------------------------------------------------------
    def _scores(self, output: object) -> torch.Tensor:
        if self.output_selector is not None:
            output = self.output_selector(output)
        if not isinstance(output, torch.Tensor) or output.ndim != 2:
            kind = type(output).__name__
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ""
            raise InputError(
                f"the model returned {kind}{shape}, not (B, C) logits; pass "
                "output_selector=... to pick the logits from the model's output"
            )
        return output

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass; returns ``(activations leaf, scores)``."""
        with LayerCapture(self.layer, self.layer_name) as capture:
            try:
                with torch.no_grad():
                    output = self.model(x)
            except LayerError:
                raise
            except RuntimeError as err:
                rank = _first_conv_rank(self.model)
                if rank is not None and x.ndim != rank and not hasattr(self.model, "input_ndim"):
                    raise InputError(
                        f"the model's first convolution expects a {rank}-D input "
                        f"(B, C, *{rank - 2} spatial dims); got shape {tuple(x.shape)}"
                    ) from err
                expected = getattr(self.model, "input_ndim", None)
                if expected is not None and x.ndim != expected:
                    raise InputError(
                        f"the model expects a {expected}-D input; got shape {tuple(x.shape)}"
                    ) from err
                raise
            scores = self._scores(output)
        acts = capture.activations
        if acts is None:
            raise LayerError(f"layer {self.layer_name!r} was not called during the forward pass")
        if acts.shape[0] != x.shape[0]:
            raise LayerError(
                f"layer {self.layer_name!r} outputs {acts.shape[0]} maps for a batch of "
                f"{x.shape[0]} inputs (it runs on slices or patches, not on whole inputs); "
                "choose a layer whose output is (B, F, *spatial), e.g. the model's default layer"
            )
        return acts, scores

    def _gradients(
        self, acts: torch.Tensor, scores: torch.Tensor, tgt: torch.Tensor
    ) -> torch.Tensor:
        """d score[b, tgt[b, k]] / d acts, as ``(K, B, F, *S)`` from one graph."""
        if not scores.requires_grad:
            raise LayerError(
                f"the class scores do not depend on layer {self.layer_name!r}; "
                "choose a layer on the path to the output"
            )
        k = tgt.shape[1]
        onehot = torch.zeros((k, *scores.shape), dtype=scores.dtype, device=scores.device)
        onehot.scatter_(2, tgt.T.unsqueeze(-1), 1.0)
        try:
            if k == 1:
                (grad,) = torch.autograd.grad(
                    scores, acts, grad_outputs=onehot[0], allow_unused=True
                )
                grads = None if grad is None else grad.unsqueeze(0)
            else:
                (grads,) = torch.autograd.grad(
                    scores, acts, grad_outputs=onehot, is_grads_batched=True, allow_unused=True
                )
        except RuntimeError as err:
            raise LayerError(
                "could not differentiate the scores with respect to layer "
                f"{self.layer_name!r}: {err}"
            ) from err
        if grads is None:
            raise LayerError(
                f"the class scores do not depend on layer {self.layer_name!r}; "
                "choose a layer on the path to the output"
            )
        return grads

    def _class_weights(self, acts: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """CAM weights ``(K, B, F)`` from the linear layer after global pooling."""
        n_features = acts.shape[1]
        if self.fc_layer is not None:
            _, fc = resolve_layer(self.model, self.fc_layer)
        else:
            linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
            fc = next((m for m in reversed(linears) if m.in_features == n_features), None)
        if not isinstance(fc, nn.Linear) or fc.in_features != n_features:
            raise LayerError(
                f"CAM needs a global-average-pooling + linear head whose input size equals "
                f"the {n_features} features of layer {self.layer_name!r}; this model has none. "
                "Use hirescam (exact for any network ending in one linear layer) or gradcam."
            )
        return fc.weight.detach()[tgt.T]

    # -- public API -----------------------------------------------------------------------
    def geometry(self, x: torch.Tensor) -> LayerGeometry:
        """Where the layer's cells lie in an input shaped like ``x`` ``(B, C, *spatial)``.

        Traced from the network itself (convolutions, pooling, strides, padding,
        dilation, reshapes; :mod:`hirescam3d.trace`) on one item of ``x``, once per input
        shape; where the trace cannot follow an axis, a gradient probe measures it.
        :meth:`explain` traces during its own forward pass, at no extra pass.
        """
        key = tuple(x.shape[1:])
        if key not in self._geometries:
            x = self._check_input(x)[:1]
            with model_state_restored(self.model):
                result = trace(self.model, x, self.output_selector, stop_at=self.layer_name)
            self._remember(key, result, x)
        return self._geometries[key]

    def _remember(self, key: tuple, result: TraceResult, x: torch.Tensor) -> None:
        try:
            self._geometries[key] = result.layer_geometry(self.layer_name)
        except LayerError:
            self._geometries[key] = probe_geometry(self.model, self.layer, x[:1])

    def explain(
        self,
        x: torch.Tensor,
        targets: Targets = None,
        methods: Sequence[str] | None = None,
        maps: bool = True,
    ) -> dict[str, ExplanationResult]:
        """Explain ``x`` ``(B, C_in, *spatial)`` for K targets with several methods.

        All methods and targets share ONE forward pass and one backward graph.
        ``maps=False`` skips placing maps on the input (``result.maps`` is None).
        """
        methods = [get_method(m) for m in (methods or [self.method])]
        x = self._check_input(x)
        key = tuple(x.shape[1:])
        with model_state_restored(self.model):
            if maps and key not in self._geometries:
                # First input of this shape: trace the geometry during the forward pass.
                held: dict[str, torch.Tensor] = {}

                def forward(t: torch.Tensor) -> torch.Tensor:
                    held["acts"], held["scores"] = self._forward(t)
                    return held["scores"]

                self._remember(key, trace(self.model, x, forward=forward), x)
                acts, scores = held["acts"], held["scores"]
            else:
                acts, scores = self._forward(x)
            geometry = self._geometries[key] if maps else None
            tgt = self._target_matrix(targets, scores.detach())
            grads = None
            if any(m.needs == "gradients" for m in methods):
                grads = self._gradients(acts, scores, tgt)
            results = {}
            for m in methods:
                with torch.no_grad():
                    other = grads if m.needs == "gradients" else self._class_weights(acts, tgt)
                    raw = m.fn(acts.detach(), other).movedim(0, 1).float().contiguous()
                    placed = (
                        None
                        if geometry is None
                        else self.postprocessing(raw, geometry, tuple(x.shape[2:]))
                    )
                results[m.name] = ExplanationResult(
                    raw=raw,
                    maps=placed,
                    scores=scores.detach(),
                    targets=tgt,
                    method=m.name,
                    layer=self.layer_name,
                    class_names=self.class_names,
                    activation_shape=tuple(acts.shape),
                    geometry=geometry,
                )
        return results

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> ExplanationResult:
        """Explain ``x`` with this explainer's method; see :meth:`explain`."""
        return self.explain(x, targets)[self.method]
