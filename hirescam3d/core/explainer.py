"""Explainer: model + layer + method(s) -> explanation maps, in one forward pass.

Data path: validate input -> forward with the layer captured -> class scores ->
K target gradients from one graph -> pure method functions -> place on the input by the
layer's traced geometry -> post-process.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hirescam3d.core import postprocess
from hirescam3d.core.capture import LayerCapture, model_state_restored, resolve_layer
from hirescam3d.core.methods import Method, ModelAccess, get_method
from hirescam3d.core.postprocess import PostProcessing
from hirescam3d.core.regions import (
    TASKS,
    check_not_empty,
    check_region,
    class_scores,
    region_cotangents,
    region_scores,
    resolve_task,
    target_masks,
)
from hirescam3d.core.results import ExplanationResult, Region, Targets
from hirescam3d.core.sliding import sliding_window_explain
from hirescam3d.core.trace import LayerGeometry, TraceResult, probe_geometry, trace
from hirescam3d.errors import InputError, LayerError, TargetError


@dataclass
class _Objective:
    """What one explanation differentiates.

    ``scores[b, index[b, k]]`` is target k's score (``scores`` ``(B, M)``: a classifier's
    logits with ``index`` = the class, differentiated directly; or a segmentation model's
    ``(B, K)`` region scores with ``index`` = k, differentiated through ``graph_output``
    with the regions as cotangents). ``score_all(out)``: the ``(B, M)`` matrix for a new
    output of the same B inputs; ``score_any(out)``: ``(n, M)`` for any n inputs (None
    when regions or targets differ between items). ``reported``: ``(B, C)`` for
    ``ExplanationResult.scores``.
    """

    scores: torch.Tensor
    index: torch.Tensor
    targets: torch.Tensor
    reported: torch.Tensor
    score_all: Callable[[torch.Tensor], torch.Tensor]
    score_any: Callable[[torch.Tensor], torch.Tensor] | None
    region: torch.Tensor | None = None
    output: torch.Tensor | None = None
    task: str | None = None
    graph_output: torch.Tensor | None = None  # segmentation: the logits, with their graph

    @property
    def segmentation(self) -> bool:
        return self.output is not None


def _first_conv_rank(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.weight.ndim
    return None


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the gradient."""

    @staticmethod
    def forward(ctx: object, y: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return y.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad.clamp_min(0)


def _guide(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a ReLU: guided backpropagation, ``relu'(x) * relu(g)``."""
    return _PositiveGradient.apply(output)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Explainer:
    """Explain a classifier's or segmentation model's scores at one layer with CAM,
    Grad-CAM, HiResCAM and more.

    Args:
        model: any ``nn.Module`` mapping ``(B, C_in, *spatial)`` to logits ``(B, C)``
            (a classifier), or to logits ``(B, C, *out_spatial)`` (a segmentation model,
            explained through a region: see :meth:`explain`), or to something
            ``output_selector`` turns into either.
        target_layer: dotted module name (as in ``model.named_modules()``) or the module.
        method: a registered method name (``"hirescam"``, ``"gradcam"``, ``"cam"``, ...;
            ``hirescam3d.core.methods.METHODS`` lists them).
        class_names: names of the C classes; defaults to ``model.class_names`` if set.
        output_selector: maps the model's output (tuple, dict) to the logits.
        fc_layer: for CAM, the linear layer after global pooling (name or module);
            defaults to the last ``nn.Linear`` whose input size matches the layer's F.
        postprocessing: ``f(raw, geometry, input_size) -> maps``, what ``result.maps``
            holds; default :func:`hirescam3d.core.postprocess.unit_maps` (ReLU, placed by the
            layer's geometry, divided by the maximum). Use
            :func:`hirescam3d.core.postprocess.density` for maps in the raw map's units.
        batch_size: for perturbation methods (``scorecam``, ``ablationcam``,
            ``occlusion``): at most this many perturbed inputs per model call (the memory
            cap; each method's cost in calls is in its docstring).
        progress: for perturbation methods, ``progress(done, total)`` after each call.
        task: for segmentation models, how the output becomes the model's own mask
            (``region="predicted"``): ``"softmax"`` (argmax over classes) or ``"sigmoid"``
            / ``"multilabel"`` (each class where its logit >= 0). Defaults to
            ``model.task`` when that is one of these names.

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
        batch_size: int = 32,
        progress: Callable[[int, int], None] | None = None,
        task: str | None = None,
    ):
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, target_layer)
        self.method = get_method(method).name
        names = class_names if class_names is not None else getattr(model, "class_names", None)
        self.class_names = tuple(names) if names is not None else None
        self.output_selector = output_selector
        self.fc_layer = fc_layer
        self.postprocessing = postprocessing
        self.batch_size = batch_size
        self.progress = progress
        if task is None and getattr(model, "task", None) in TASKS:
            task = model.task
        self.task = None if task is None else resolve_task(task, 2)
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

    def _target_matrix(
        self, targets: Targets, scores: torch.Tensor, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Targets as a ``(B, K)`` long tensor of class indices; ``shape``: ``(B, C)``
        when ``scores`` is not (the default target, the top class, needs scores)."""
        b, c = shape if shape is not None else scores.shape
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
    def _output(self, output: object) -> torch.Tensor:
        """The logits: ``(B, C)`` (classifier) or ``(B, C, *spatial)`` (segmentation)."""
        if self.output_selector is not None:
            output = self.output_selector(output)
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            kind = type(output).__name__
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ""
            raise InputError(
                f"the model returned {kind}{shape}, not (B, C) logits nor (B, C, *spatial) "
                "segmentation logits; pass output_selector=... to pick the logits from the "
                "model's output"
            )
        return output

    def _objective(
        self,
        output: torch.Tensor,
        targets: Targets,
        region: Region,
        task: str | None,
        input_shape: tuple[int, ...],
        allow_empty: bool = False,
    ) -> _Objective:
        """The scores to explain: a classifier's target logits, or region scores."""
        if output.ndim == 2:
            if region is not None:
                raise InputError(
                    f"region= applies to segmentation models (output (B, C, *spatial)); this "
                    f"model returns class scores of shape {tuple(output.shape)}: drop region="
                )
            tgt = self._target_matrix(targets, output.detach())
            return _Objective(output, tgt, tgt, output.detach(), lambda o: o, lambda o: o)
        b, c = output.shape[:2]
        if region is None:
            raise InputError(
                f"the model returns a segmentation output of shape {tuple(output.shape)}: "
                "say which voxels' scores to explain with region=... (a (B or 1, 1 or K, "
                "*spatial) mask or weight map on the output grid) or region='predicted' "
                "(the model's own mask of each target class)"
            )
        if targets is None:
            raise TargetError(
                "a segmentation model needs targets=...: the class(es) whose logits are "
                "summed over the region"
            )
        tgt = self._target_matrix(targets, output, shape=(b, c))
        k = tgt.shape[1]
        task_name = None
        if isinstance(region, str):
            if region != "predicted":
                raise InputError(
                    f"region must be a mask or weight map (B or 1, 1 or K, *spatial), or "
                    f"'predicted'; got the string {region!r}"
                )
            task_name = resolve_task(task if task is not None else self.task, c)
            with torch.no_grad():
                reg = target_masks(output.detach(), tgt, task_name)
            if not allow_empty:
                self._check_predicted(reg, tgt, task_name)
        else:
            reg = check_region(region, output.shape, k, input_shape[2:]).to(output.device)
            if not allow_empty:
                check_not_empty(reg)
        with torch.no_grad():
            explained = region_scores(output.detach(), tgt, reg)
        reported = class_scores(output, tgt, reg, explained, task_name)
        shared = (reg.shape[0] == 1 or b == 1) and bool((tgt == tgt[:1]).all())

        def score_all(out: torch.Tensor) -> torch.Tensor:
            return region_scores(out, tgt, reg)

        def score_any(out: torch.Tensor) -> torch.Tensor:
            n = out.shape[0]
            return region_scores(out, tgt[:1].expand(n, k), reg[:1])

        return _Objective(
            scores=explained,
            index=torch.arange(k, device=tgt.device).expand(b, k),
            targets=tgt,
            reported=reported,
            score_all=score_all,
            score_any=score_any if shared else None,
            region=reg.expand(b, k, *reg.shape[2:]),
            output=output.detach(),
            task=task_name,
            graph_output=output,
        )

    def _check_predicted(self, masks: torch.Tensor, tgt: torch.Tensor, task: str) -> None:
        """InputError naming the class when the model predicts none of its voxels."""
        empty = ~masks.flatten(2).any(dim=2)  # (B, K)
        if bool(empty.any()):
            b, k = (int(i) for i in empty.nonzero()[0])
            c = int(tgt[b, k])
            name = repr(self.class_names[c]) if self.class_names else str(c)
            raise InputError(
                f"the model predicts no voxel of class {name} for item {b} (task={task!r}): "
                "region='predicted' is empty; explain another class or pass a region"
            )

    def _forward(
        self, x: torch.Tensor, forward_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass ``model(x, **forward_kwargs)``; returns ``(activations leaf, scores)``."""
        with LayerCapture(self.layer, self.layer_name) as capture:
            try:
                with torch.no_grad():
                    output = self.model(x, **(forward_kwargs or {}))
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
            scores = self._output(output)
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
        k = tgt.shape[1]
        onehot = torch.zeros((k, *scores.shape), dtype=scores.dtype, device=scores.device)
        onehot.scatter_(2, tgt.T.unsqueeze(-1), 1.0)
        return self._vjp(acts, scores, onehot)

    def _objective_gradients(self, acts: torch.Tensor, obj: _Objective) -> torch.Tensor:
        """``(K, B, F, *S)`` gradients of the K target scores: of the logits (classifier)
        or of the region scores, through the output with the region as cotangent."""
        if obj.graph_output is None:
            return self._gradients(acts, obj.scores, obj.index)
        return self._vjp(
            acts, obj.graph_output, region_cotangents(obj.graph_output, obj.targets, obj.region)
        )

    def _vjp(
        self, acts: torch.Tensor, outputs: torch.Tensor, cotangents: torch.Tensor
    ) -> torch.Tensor:
        """``(K, B, F, *S)`` vector-Jacobian products of ``outputs`` with the K cotangents
        ``(K, *outputs.shape)``, with respect to ``acts``: one batched backward pass."""
        if not outputs.requires_grad:
            raise LayerError(
                f"the class scores do not depend on layer {self.layer_name!r}; "
                "choose a layer on the path to the output"
            )
        k = cotangents.shape[0]
        try:
            if k == 1:
                (grad,) = torch.autograd.grad(
                    outputs, acts, grad_outputs=cotangents[0], allow_unused=True
                )
                grads = None if grad is None else grad.unsqueeze(0)
            else:
                (grads,) = torch.autograd.grad(
                    outputs, acts, grad_outputs=cotangents, is_grads_batched=True,
                    allow_unused=True,
                )  # fmt: skip
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

    def _class_weights(
        self, acts: torch.Tensor, tgt: torch.Tensor, segmentation: bool = False
    ) -> torch.Tensor:
        """CAM weights ``(K, B, F)`` from the linear layer after global pooling."""
        if segmentation:
            raise LayerError(
                "CAM needs a classifier's global-average-pooling + linear head; a "
                "segmentation model has none. Use hirescam (exact where only linear "
                "operations follow the layer) or gradcam."
            )
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
    def geometry(self, x: torch.Tensor, forward_kwargs: dict | None = None) -> LayerGeometry:
        """Where the layer's cells lie in an input shaped like ``x`` ``(B, C, *spatial)``.

        Traced from the network itself (convolutions, pooling, strides, padding,
        dilation, reshapes; :mod:`hirescam3d.core.trace`) on one item of ``x``, once per input
        shape; where the trace cannot follow an axis, a gradient probe measures it.
        :meth:`explain` traces during its own forward pass, at no extra pass.
        ``forward_kwargs``: keyword arguments the model's forward needs (see :meth:`explain`).
        """
        key = tuple(x.shape[1:])
        if key not in self._geometries:
            x = self._check_input(x)[:1]
            kwargs = forward_kwargs or {}
            forward = (lambda t: self.model(t, **kwargs)) if kwargs else None
            with model_state_restored(self.model):
                result = trace(
                    self.model, x, self.output_selector, stop_at=self.layer_name, forward=forward
                )
            self._remember(key, result, x)
        return self._geometries[key]

    def _remember(
        self, key: tuple, result: TraceResult, x: torch.Tensor, required: bool = True
    ) -> None:
        """Cache the traced geometry; where the trace cannot place the layer, probe it
        (only when ``required``: maps are asked for; else leave it for :meth:`geometry`)."""
        try:
            self._geometries[key] = result.layer_geometry(self.layer_name)
        except LayerError:
            if required:
                self._geometries[key] = probe_geometry(self.model, self.layer, x[:1])

    def explain(
        self,
        x: torch.Tensor,
        targets: Targets = None,
        methods: Sequence[str] | None = None,
        maps: bool = True,
        forward_kwargs: dict | None = None,
        *,
        region: Region = None,
        task: str | None = None,
    ) -> dict[str, ExplanationResult]:
        """Explain ``x`` ``(B, C_in, *spatial)`` for K targets with several methods.

        All methods and targets share ONE forward pass and one backward graph; methods
        that need only the activations (``eigencam``) add no backward pass, and their map
        is the same for every target. ``maps=False`` skips placing maps on the input
        (``result.maps`` is None). ``forward_kwargs``: keyword arguments passed on to the
        model, ``model(x, **forward_kwargs)`` (tensors in them are used as given: put them
        on the model's device).

        Segmentation models (logits ``(B, C, *out_spatial)``) need ``targets`` (class
        names or indices) and ``region``; target k's score is ``sum_v R_k[v] *
        logits[target_k, v]`` (logits summed over voxels):

        - ``region``: a ``(B or 1, 1 or K, *out_spatial)`` tensor or array on the output
          grid (bool or 0/1: a mask; floating: weights), or ``(*out_spatial)`` alone;
        - ``region="predicted"``: each target class's own predicted mask, by ``task``
          (``"softmax"``: argmax; ``"sigmoid"`` / ``"multilabel"``: logit >= 0; default:
          the explainer's ``task``).

        K targets or regions still cost one forward pass and one batched backward pass.
        An empty region, a region on another grid and an unknown class each raise one
        error (InputError, InputError, TargetError).
        """
        return self._explain(x, targets, methods, maps, forward_kwargs, region, task)

    def _explain(
        self,
        x: torch.Tensor,
        targets: Targets,
        methods: Sequence[str] | None,
        maps: bool,
        forward_kwargs: dict | None,
        region: Region,
        task: str | None,
        allow_empty: bool = False,
    ) -> dict[str, ExplanationResult]:
        """:meth:`explain`; ``allow_empty``: an empty region explains to zero maps (the
        windows of :mod:`hirescam3d.core.sliding` that the region does not reach)."""
        methods = [get_method(m) for m in (methods or [self.method])]
        x = self._check_input(x)
        key = tuple(x.shape[1:])
        with model_state_restored(self.model):
            if key not in self._geometries:
                # First input of this shape: trace the geometry during the forward pass
                # (Python overhead only), so later calls and geometry() reuse it.
                held: dict[str, torch.Tensor] = {}

                def forward(t: torch.Tensor) -> torch.Tensor:
                    held["acts"], held["scores"] = self._forward(t, forward_kwargs)
                    return held["scores"]

                self._remember(key, trace(self.model, x, forward=forward), x, required=maps)
                acts, output = held["acts"], held["scores"]
            else:
                acts, output = self._forward(x, forward_kwargs)
            geometry = self._geometries.get(key)
            obj = self._objective(output, targets, region, task, tuple(x.shape), allow_empty)
            grads = None
            if any(m.needs == "gradients" for m in methods):
                grads = self._objective_gradients(acts, obj)
            access = None
            if any(m.needs == "model" for m in methods):
                access = self._model_access(x, acts, obj, grads, forward_kwargs)
            results = {}
            for m in methods:
                with torch.no_grad():
                    raw = self._raw(m, acts.detach(), grads, obj, access)
                    geo = geometry
                    if m.resolution == "input" and geometry is not None:
                        size = tuple(x.shape[2:])
                        geo = postprocess.stretch_geometry(size, size)  # the identity
                    placed = (
                        self.postprocessing(raw, geo, tuple(x.shape[2:]))
                        if maps and geo is not None
                        else None
                    )
                results[m.name] = ExplanationResult(
                    raw=raw,
                    maps=placed,
                    scores=obj.reported,
                    targets=obj.targets,
                    method=m.name,
                    layer=self.layer_name,
                    class_names=self.class_names,
                    activation_shape=tuple(acts.shape),
                    geometry=geo,
                    region=obj.region,
                    region_scores=obj.scores.detach() if obj.segmentation else None,
                    output=obj.output,
                    task=obj.task,
                )
        return results

    def _model_access(
        self,
        x: torch.Tensor,
        acts: torch.Tensor,
        obj: _Objective,
        grads: torch.Tensor | None,
        kwargs: dict | None,
    ) -> ModelAccess:
        """Model calls for ``needs="model"`` methods; every hook is removed after use."""
        kwargs = kwargs or {}
        cache = {"layer": grads}
        if obj.score_any is None:
            raise InputError(
                "perturbation methods re-run the model on altered inputs and need one region "
                "and one target list for all items; explain the items one at a time"
            )
        score_any = obj.score_any

        def layer_gradients() -> torch.Tensor:
            if cache["layer"] is None:
                cache["layer"] = self._objective_gradients(acts, obj)
            return cache["layer"]

        def input_gradients(guided: bool) -> torch.Tensor:
            key = ("input", guided)
            if key not in cache:
                cache[key] = self._input_gradients(x, obj, guided, kwargs)
            return cache[key]

        def run_input(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return score_any(self._output(self.model(inputs, **kwargs))).detach()

        def run_from_layer(acts: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            def replace(_m: nn.Module, _i: object, _o: object) -> torch.Tensor:
                return acts

            handle = self.layer.register_forward_hook(replace)
            try:
                return run_input(x[items])
            finally:
                handle.remove()

        return ModelAccess(
            x=x, scores=obj.scores.detach(), targets=obj.index,
            geometry=self.geometry(x, forward_kwargs=kwargs),
            run_input=run_input, run_from_layer=run_from_layer,
            batch_size=self.batch_size, progress=self.progress,
            layer_gradients=layer_gradients, input_gradients=input_gradients,
        )

    def _input_gradients(
        self, x: torch.Tensor, obj: _Objective, guided: bool, kwargs: dict
    ) -> torch.Tensor:
        """``(K, B, C, *spatial)`` d score / d input; guided through ``nn.ReLU`` modules."""
        handles = []
        if guided:
            for module in self.model.modules():
                if isinstance(module, nn.ReLU):
                    handles.append(module.register_forward_hook(_guide))
        try:
            with torch.enable_grad():
                xi = x.detach().clone().requires_grad_(True)
                out = self._output(self.model(xi, **kwargs))
                chosen = obj.score_all(out).gather(1, obj.index)  # (B, K)
                k = obj.index.shape[1]
                grads = [
                    torch.autograd.grad(chosen[:, i].sum(), xi, retain_graph=i < k - 1)[0]
                    for i in range(k)
                ]
        finally:
            for h in handles:
                h.remove()
        return torch.stack(grads)

    def _raw(
        self,
        m: Method,
        acts: torch.Tensor,
        grads: torch.Tensor | None,
        obj: _Objective,
        access: ModelAccess | None = None,
    ) -> torch.Tensor:
        """One method's raw maps ``(B, K, *S)`` float32."""
        tgt = obj.targets
        if m.needs == "gradients":
            raw = m.fn(acts, grads)
        elif m.needs == "model":
            raw = m.fn(acts, access)
        elif m.needs == "class_weights":
            raw = m.fn(acts, self._class_weights(acts, tgt, obj.segmentation))
        else:  # "activations": one class-agnostic map per item, shared by the K targets
            raw = m.fn(acts, None)
            raw = raw.unsqueeze(0).expand(tgt.shape[1], *raw.shape)
        return raw.movedim(0, 1).float().contiguous()

    def sliding_window(
        self,
        x: torch.Tensor,
        targets: Targets = None,
        region: Region = None,
        roi_size: Sequence[int] | int = 96,
        overlap: Sequence[float] | float = 0.25,
        sw_batch_size: int = 4,
        mode: str = "gaussian",
        **options: object,
    ) -> ExplanationResult:
        """Explain a volume larger than the network's window, window by window, the way
        MONAI's ``sliding_window_inference`` predicts it; see
        :func:`hirescam3d.core.sliding.sliding_window_explain` (``options``: ``sigma_scale``,
        ``padding_mode``, ``cval``, ``maps``, ``forward_kwargs``, ``task``, ``progress``).

        Returns this explainer's method's result: ``raw`` ``(B, K, *spatial)`` on the input
        grid in score units per voxel (logits per voxel for HiResCAM), blended with the
        prediction's weights; ``output``: the blended logits, equal to
        ``sliding_window_inference``'s.
        """
        results = sliding_window_explain(
            self, x, targets=targets, region=region, roi_size=roi_size, overlap=overlap,
            sw_batch_size=sw_batch_size, mode=mode, methods=[self.method], **options,
        )  # fmt: skip
        return results[self.method]

    def __call__(
        self,
        x: torch.Tensor,
        targets: Targets = None,
        *,
        region: Region = None,
        task: str | None = None,
        **forward_kwargs: object,
    ) -> ExplanationResult:
        """Explain ``x`` with this explainer's method; see :meth:`explain`.

        ``region`` and ``task``: for segmentation models (see :meth:`explain`). Other
        keyword arguments go to the model: ``explainer(x, 2, mask=m)`` runs
        ``model(x, mask=m)``.
        """
        results = self.explain(x, targets, forward_kwargs=forward_kwargs, region=region, task=task)
        return results[self.method]
