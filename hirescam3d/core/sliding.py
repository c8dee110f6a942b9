"""Sliding-window explanations of volumes larger than a segmentation network's window.

MONAI predicts such volumes with :func:`monai.inferers.sliding_window_inference`: it cuts
the (padded) input into overlapping windows of ``roi_size`` (its own scheduling), runs
the network on ``sw_batch_size`` windows at a time and blends the window outputs with an
importance map (constant or gaussian): ``P = sum_i w_i * p_i / sum_i w_i``.

:func:`sliding_window_explain` explains the same prediction through the same function:
its predictor explains each batch of windows (:meth:`hirescam3d.Explainer.explain`, one
forward and one batched backward pass per batch) for the region cropped to the window,
places each window's raw map on the window's input grid with the layer's traced geometry
(:func:`hirescam3d.core.postprocess.density`: score units per input voxel, i.e. logits per
voxel for HiResCAM), and returns it next to the window's logits. MONAI then blends the
maps with the very weights it blends the prediction with. Nothing is normalised per
window, so the stitched map has one global scale, comparable across windows and cases.

Faithfulness: with a layer after which only linear operations follow and whose grid is
the output grid (the last feature map before a 1x1 convolution), each window's map is
``R * (p_i - b)`` and the stitched map is exactly ``R * (P - b)``: it sums to the region
score of the blended prediction minus ``b * |R|``. Where every window covering a voxel
sees the whole receptive field around it (the network's receptive field fits in the
overlap), and the network has no statistics taken over the whole window, the stitched
map equals the whole-volume explanation; near a window's inner faces the window's zero
padding changes its prediction (MONAI's prediction differs from the whole-volume one
there as well) and its map, by that window's blending weight. Instance and group norm
(MONAI's ``UNet`` and ``SegResNet`` defaults) normalise with each window's own statistics,
so every window predicts, and is explained, differently from the whole volume: the
stitched map explains exactly the stitched prediction (what MONAI returns), not the
whole-volume one. :func:`sliding_window_explain` warns once per network that has them.

Memory: the volume-sized state is MONAI's accumulators (the blended logits, one map per
method, a weight sum each) and the region; everything else is per window.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from hirescam3d.core import postprocess
from hirescam3d.core.capture import model_state_restored
from hirescam3d.core.methods import get_method
from hirescam3d.core.postprocess import PostProcessing
from hirescam3d.core.regions import (
    check_not_empty,
    check_region,
    class_scores,
    region_scores,
    resolve_task,
    target_masks,
)
from hirescam3d.core.results import ExplanationResult, Region, Targets
from hirescam3d.core.trace import LayerGeometry
from hirescam3d.errors import InputError, TargetError


class WindowExplainer(Protocol):
    """What :func:`sliding_window_explain` needs of an explainer: a
    :class:`~hirescam3d.core.explainer.Explainer` (which imports this module, so it is not
    imported here), or one adapted to windows (:mod:`hirescam3d.core.slices`)."""

    model: nn.Module
    method: str
    layer_name: str
    class_names: tuple[str, ...] | None
    task: str | None
    postprocessing: PostProcessing

    def _check_input(self, x: torch.Tensor) -> torch.Tensor: ...

    def _output(self, output: object) -> torch.Tensor: ...

    def _target_matrix(
        self, targets: Targets, scores: torch.Tensor, shape: tuple[int, int] | None = None
    ) -> torch.Tensor: ...

    def _check_predicted(self, masks: torch.Tensor, tgt: torch.Tensor, task: str) -> None: ...

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
    ) -> dict[str, ExplanationResult]: ...

    def geometry(self, x: torch.Tensor, forward_kwargs: dict | None = None) -> LayerGeometry: ...


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def window_statistics_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s layers that normalise with statistics of their own input in
    eval mode: ``InstanceNorm`` without running statistics, and ``GroupNorm``."""
    found = []
    for name, module in model.named_modules():
        instance = isinstance(module, nn.modules.instancenorm._InstanceNorm)
        if (instance and not module.track_running_stats) or isinstance(module, nn.GroupNorm):
            found.append(name)
    return found


def warn_window_statistics(model: nn.Module) -> None:
    """Warn (once per network) that window-wide normalisation makes the stitched
    prediction, and so its explanation, differ from the whole-volume one."""
    if model in _WARNED:
        return
    layers = window_statistics_layers(model)
    _WARNED.add(model)
    if not layers:
        return
    kinds = sorted({type(dict(model.named_modules())[n]).__name__ for n in layers})
    warnings.warn(
        f"{type(model).__name__} has {len(layers)} {'/'.join(kinds)} layer(s) (e.g. "
        f"{layers[0]!r}) that normalise with each window's own statistics: the stitched "
        "map explains exactly the stitched (sliding-window) prediction, which differs from "
        "the whole-volume prediction and its explanation everywhere, not only near window "
        "faces (see docs/segmentation.md, 'Sliding windows')",
        UserWarning,
        stacklevel=3,
    )


def _window_count(spatial: Sequence[int], roi: Sequence[int], overlap: object) -> int:
    """Windows per item of MONAI's sliding-window schedule over ``spatial``."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import ensure_tuple_rep

    size = tuple(max(int(s), int(r)) for s, r in zip(spatial, roi, strict=True))
    interval = _get_scan_interval(size, tuple(roi), len(size), ensure_tuple_rep(overlap, len(size)))
    return len(dense_patch_slices(size, tuple(roi), interval))


def _target_rows(targets: Targets, batch: int) -> list[list[int | str]]:
    """Targets as one list per item (names or indices, unresolved): ``B`` rows of K."""
    if targets is None:
        raise TargetError(
            "a segmentation model needs targets=...: the class(es) whose logits are summed "
            "over the region"
        )
    if isinstance(targets, torch.Tensor):
        targets = targets.tolist()
    if isinstance(targets, (int, str)):
        targets = [targets]
    rows = list(targets)
    if not rows:
        raise TargetError("targets is empty; give at least one class")
    if isinstance(rows[0], (list, tuple)):
        if len(rows) != batch:
            raise TargetError(f"per-item targets have {len(rows)} rows for a batch of {batch}")
        if len({len(r) for r in rows}) != 1:
            raise TargetError("per-item targets must have the same number K for every item")
        return [list(r) for r in rows]
    return [rows] * batch


def _monai_pad(shape: Sequence[int], roi: Sequence[int]) -> list[int]:
    """The ``F.pad`` widths MONAI's ``sliding_window_inference`` pads the input with when
    the window is larger than the input (half before, the rest after, last axis first)."""
    pad: list[int] = []
    for size, r in zip(reversed(shape), reversed(roi), strict=True):
        diff = max(int(r) - int(size), 0)
        pad += [diff // 2, diff - diff // 2]
    return pad


def _padded(region: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """``region`` zero-padded by ``F.pad`` widths ``pad`` (any dtype, bool included)."""
    if not any(pad):
        return region
    n = region.ndim
    shape = list(region.shape)
    index = [slice(None)] * n
    for j in range(len(pad) // 2):
        axis = n - 1 - j
        shape[axis] += pad[2 * j] + pad[2 * j + 1]
        index[axis] = slice(pad[2 * j], pad[2 * j] + region.shape[axis])
    out = region.new_zeros(shape)
    out[tuple(index)] = region
    return out


def is_identity(geometry: LayerGeometry, size: Sequence[int]) -> bool:
    return tuple(geometry.grid_shape) == tuple(size) and all(
        a.first == 0 and a.step == 1 for a in geometry.axes
    )


def _blendable_methods(explainer: WindowExplainer, methods: Sequence[str] | None) -> list[str]:
    """Names of the methods to explain with (default: the explainer's); InputError for a
    method whose window maps cannot be blended into one map."""
    chosen = [get_method(m) for m in (methods or [explainer.method])]
    for m in chosen:
        if m.needs in ("activations", "class_weights"):
            raise InputError(
                f"method {m.name!r} cannot be blended across windows: "
                + (
                    "its maps have an arbitrary scale and sign per window"
                    if m.needs == "activations"
                    else "it needs a classifier's pooling + linear head"
                )
                + "; use hirescam or gradcam"
            )
    return [m.name for m in chosen]


def _window_size(roi_size: Sequence[int] | int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """``roi_size`` as MONAI reads it: one size per spatial axis (non-positive: the input's)."""
    from monai.utils import fall_back_tuple

    if isinstance(roi_size, Sequence) and len(roi_size) != len(spatial):
        raise InputError(
            f"roi_size {tuple(roi_size)} has {len(roi_size)} axes for an input with "
            f"{len(spatial)} spatial axes {spatial}"
        )
    return tuple(int(r) for r in fall_back_tuple(roi_size, spatial))


@dataclass
class _Schedule:
    """MONAI's ``sliding_window_inference`` with fixed ``options`` (``roi_size``,
    ``overlap``, ...); ``report(done, total)`` after each batch of windows, over all runs."""

    options: dict[str, Any]
    report: Callable[[int, int], None] | None
    total: int
    done: int = 0

    def run(self, x: torch.Tensor, predictor: Callable, with_coord: bool = False) -> Any:
        """MONAI's blended ``predictor`` outputs over ``x`` ``(B, C_in, *spatial)``
        (``with_coord``: the predictor also takes the windows' coordinates)."""
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            x, predictor=self._counted(predictor), with_coord=with_coord, **self.options
        )

    def _counted(self, run: Callable) -> Callable:
        """``run`` (a predictor), reporting the windows done after each call."""
        if self.report is None:
            return run
        report = self.report

        def call(window: torch.Tensor, *args: object) -> object:
            out = run(window, *args)
            self.done += int(window.shape[0])
            report(min(self.done, self.total), self.total)
            return out

        return call


def _predict(
    explainer: WindowExplainer, window: torch.Tensor, forward_kwargs: dict
) -> torch.Tensor:
    """The logits ``(N, C, *window)`` of a batch of windows ``(N, C_in, *window)``;
    InputError unless the output lies on the window's grid."""
    with torch.no_grad():
        out = explainer._output(explainer.model(window, **forward_kwargs))
    if out.ndim != window.ndim or tuple(out.shape[2:]) != tuple(window.shape[2:]):
        raise InputError(
            f"sliding windows need a segmentation output on the input's grid; the model "
            f"returns {tuple(out.shape)} for a window of {tuple(window.shape)}"
        )
    return out


class _Explained(NamedTuple):
    """The region explained, ``(B or 1, 1 or K, *spatial)``, and what the prediction pass of
    ``region="predicted"`` settles: the blended logits ``(B, C, *spatial)``, the ``(B, K)``
    class indices and the task (None without that pass)."""

    region: torch.Tensor
    prediction: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    task: str | None = None


def _explained_region(
    explainer: WindowExplainer,
    x: torch.Tensor,
    region: Region,
    rows: list[list[int | str]],
    task: str | None,
    schedule: _Schedule,
    forward_kwargs: dict,
) -> _Explained:
    """``region`` checked on ``x``'s grid, or for ``"predicted"`` each target's mask in the
    blended prediction (one ``sliding_window_inference`` pass)."""
    b, k, spatial = x.shape[0], len(rows[0]), tuple(x.shape[2:])
    if not isinstance(region, str):
        reg = check_region(region, (b, 1, *spatial), k, spatial).to(x.device)
        check_not_empty(reg)
        return _Explained(reg)
    if region != "predicted":
        raise InputError(
            f"region must be a mask or weight map (B or 1, 1 or K, *spatial), or "
            f"'predicted'; got the string {region!r}"
        )
    pred = schedule.run(x, partial(_predict, explainer, forward_kwargs=forward_kwargs))
    c = pred.shape[1]
    tgt = explainer._target_matrix(rows, pred, shape=(b, c))
    task_name = resolve_task(task if task is not None else explainer.task, c)
    reg = target_masks(pred, tgt, task_name)
    explainer._check_predicted(reg, tgt, task_name)
    return _Explained(reg, pred, tgt, task_name)


@dataclass
class _WindowMaps:
    """MONAI's predictor of the explained pass (``with_coord=True``): per batch of windows,
    each method's map on the windows' grid in score units per voxel (``"map:<name>"``)
    and, without a prediction pass, the logits (``"pred"``)."""

    explainer: WindowExplainer
    names: list[str]
    rows: list[list[int | str]]  # B rows of K targets, unresolved
    region: torch.Tensor  # padded as MONAI pads the input
    forward_kwargs: dict
    targets: torch.Tensor | None  # (B, K) indices: from the prediction pass or 1st window
    predicted: bool  # the prediction pass ran: the logits are known
    activation_shape: tuple[int, ...] = ()

    def __call__(
        self, window: torch.Tensor, coords: Sequence[Sequence[slice]]
    ) -> dict[str, torch.Tensor]:
        """The outputs for windows ``(N, C_in, *window)`` of items ``coords[i][0]``."""
        items = [int(c[0].start) for c in coords]
        crop = self._crop(items, coords)
        out: dict[str, torch.Tensor] = {}
        if self.targets is not None and not bool((crop != 0).any()):  # the region misses them
            if not self.predicted:
                out["pred"] = _predict(self.explainer, window, self.forward_kwargs)
            zeros = window.new_zeros((window.shape[0], len(self.rows[0]), *window.shape[2:]))
            return out | {f"map:{n}": zeros for n in self.names}
        tgt = self.targets
        window_targets = tgt[items] if tgt is not None else [self.rows[i] for i in items]
        results = self.explainer._explain(
            window, window_targets, self.names, False, self.forward_kwargs, crop, None,
            allow_empty=True,
        )  # fmt: skip
        first = results[self.names[0]]
        if tgt is None:  # first window: resolve names and check indices once
            self.targets = self.explainer._target_matrix(
                self.rows, first.output, shape=(len(self.rows), first.output.shape[1])
            )
        self.activation_shape = first.activation_shape
        if not self.predicted:
            out["pred"] = first.output
        for n in self.names:
            out[f"map:{n}"] = self._on_window(results[n], window)
        return out

    def _crop(self, items: list[int], coords: Sequence[Sequence[slice]]) -> torch.Tensor:
        """The region under each window, ``(N, 1 or K, *window)``."""
        padded = self.region
        return torch.cat(
            [padded[(slice(i, i + 1) if padded.shape[0] > 1 else slice(0, 1), slice(None),
                     *c[2:])] for i, c in zip(items, coords, strict=True)]
        )  # fmt: skip

    def _on_window(self, result: ExplanationResult, window: torch.Tensor) -> torch.Tensor:
        """``result``'s raw map ``(N, K, *window)`` on the window's grid, in score units per
        voxel and the window's dtype."""
        geo = result.geometry or self.explainer.geometry(window, forward_kwargs=self.forward_kwargs)
        size = tuple(window.shape[2:])
        raw = result.raw
        if not is_identity(geo, size):
            raw = postprocess.density(raw, geo, size)
        return raw.to(window.dtype)


def _display_maps(
    explainer: WindowExplainer,
    raw: torch.Tensor,
    geometry: LayerGeometry,
    spatial: tuple[int, ...],
) -> torch.Tensor:
    """The explainer's post-processing of a blended map ``(B, K, *spatial)`` on the input
    grid (``geometry``: the identity)."""
    with torch.no_grad():
        if explainer.postprocessing is postprocess.unit_maps:  # the same, on the grid
            return postprocess.scale_to_max(postprocess.relu(raw), len(spatial))
        return explainer.postprocessing(raw, geometry, spatial)


def _assembled(
    explainer: WindowExplainer,
    blended: dict[str, torch.Tensor],
    explained: _Explained,
    windows: _WindowMaps,
    spatial: tuple[int, ...],
    maps: bool,
) -> dict[str, ExplanationResult]:
    """Per method, its blended map as an :class:`ExplanationResult` on the input grid, with
    the region scores of the blended logits."""
    pred = blended["pred"] if explained.prediction is None else explained.prediction
    tgt, reg = windows.targets, explained.region
    region_out = reg.expand(*tgt.shape, *spatial)
    explained_scores = region_scores(pred, tgt, reg)
    reported = class_scores(pred, tgt, reg, explained_scores, explained.task)
    geometry = postprocess.stretch_geometry(spatial, spatial)  # the identity
    results = {}
    for n in windows.names:
        raw = blended[f"map:{n}"].float()
        results[n] = ExplanationResult(
            raw=raw,
            maps=_display_maps(explainer, raw, geometry, spatial) if maps else None,
            scores=reported,
            targets=tgt,
            method=n,
            layer=explainer.layer_name,
            class_names=explainer.class_names,
            activation_shape=tuple(windows.activation_shape),
            geometry=geometry,
            region=region_out,
            region_scores=explained_scores,
            output=pred,
            task=explained.task,
        )
    return results


def sliding_window_explain(
    explainer: WindowExplainer,
    x: torch.Tensor,
    targets: Targets = None,
    region: Region = None,
    roi_size: Sequence[int] | int = 96,
    overlap: Sequence[float] | float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    methods: Sequence[str] | None = None,
    maps: bool = True,
    forward_kwargs: dict | None = None,
    task: str | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> dict[str, ExplanationResult]:
    """Explain a segmentation model's region scores on ``x`` ``(B, C_in, *spatial)``
    window by window, as :func:`monai.inferers.sliding_window_inference` predicts it.

    ``targets``: class names or indices (K per item). ``region``: a ``(B or 1, 1 or K,
    *spatial)`` mask or weight map on the input grid (the model's output must be on its
    input's grid), or ``"predicted"``: each target's mask in the blended prediction
    (``task`` as in :meth:`~hirescam3d.Explainer.explain`; costs one more
    ``sliding_window_inference`` pass first, and only windows the mask reaches are
    explained). Each window explains the region cropped to it. ``roi_size``,
    ``overlap``, ``sw_batch_size``, ``mode``, ``sigma_scale``, ``padding_mode``,
    ``cval``: as for ``sliding_window_inference``. ``progress``: True for MONAI's own
    progress bar, or a callable, called ``progress(done, total)`` after each batch of
    windows (``total`` counts both passes with ``region="predicted"``).

    Returns, per method, an :class:`~hirescam3d.ExplanationResult` on the input grid:
    ``raw`` ``(B, K, *spatial)`` float32, the blended maps in score units per voxel
    (logits per voxel for HiResCAM; identity ``geometry``); ``maps`` the explainer's
    post-processing of it (None with ``maps=False``); ``output`` the blended logits
    ``(B, C, *spatial)``, equal to ``sliding_window_inference``'s; ``region``,
    ``region_scores`` (``(B, K)``: the region scores of the blended logits) and
    ``scores`` (``(B, C)``) as for :meth:`~hirescam3d.Explainer.explain`.
    Methods with one arbitrary scale per window (``eigencam``) and CAM are refused.
    """
    names = _blendable_methods(explainer, methods)
    warn_window_statistics(explainer.model)
    if callable(getattr(x, "as_tensor", None)):  # a MONAI MetaTensor: plain results
        x = x.as_tensor()
    x = explainer._check_input(x)
    b, spatial = x.shape[0], tuple(x.shape[2:])
    roi = _window_size(roi_size, spatial)
    if region is None:
        raise InputError(
            "sliding_window explains a segmentation model's region scores: pass region=... "
            "(a (B or 1, 1 or K, *spatial) mask or weight map on the input grid) or "
            "region='predicted'"
        )
    rows = _target_rows(targets, b)
    kwargs = forward_kwargs or {}
    swi = {
        "roi_size": roi, "sw_batch_size": sw_batch_size, "overlap": overlap, "mode": mode,
        "sigma_scale": sigma_scale, "padding_mode": padding_mode, "cval": cval,
        "progress": progress is True,
    }  # fmt: skip
    total = _window_count(spatial, roi, overlap) * b * (2 if isinstance(region, str) else 1)
    schedule = _Schedule(swi, progress if callable(progress) else None, total)
    with model_state_restored(explainer.model):
        explained = _explained_region(explainer, x, region, rows, task, schedule, kwargs)
        windows = _WindowMaps(
            explainer, names, rows, _padded(explained.region, _monai_pad(spatial, roi)), kwargs,
            targets=explained.targets, predicted=explained.prediction is not None,
        )  # fmt: skip
        blended = schedule.run(x, windows, with_coord=True)
    return _assembled(explainer, blended, explained, windows, spatial, maps)
