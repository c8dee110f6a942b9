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
from typing import TYPE_CHECKING

import torch
from torch import nn

from hirescam3d.core import postprocess
from hirescam3d.core.capture import model_state_restored
from hirescam3d.core.methods import get_method
from hirescam3d.core.regions import (
    check_not_empty,
    check_region,
    class_scores,
    region_scores,
    resolve_task,
    target_masks,
)
from hirescam3d.core.trace import LayerGeometry
from hirescam3d.errors import InputError, TargetError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.core.explainer import Explainer, ExplanationResult, Region, Targets


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


def sliding_window_explain(
    explainer: Explainer,
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
    from monai.inferers import sliding_window_inference
    from monai.utils import fall_back_tuple

    from hirescam3d.core.explainer import ExplanationResult

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
    names = [m.name for m in chosen]
    warn_window_statistics(explainer.model)
    if callable(getattr(x, "as_tensor", None)):  # a MONAI MetaTensor: plain results
        x = x.as_tensor()
    x = explainer._check_input(x)
    b = x.shape[0]
    spatial = tuple(x.shape[2:])
    if isinstance(roi_size, Sequence) and len(roi_size) != len(spatial):
        raise InputError(
            f"roi_size {tuple(roi_size)} has {len(roi_size)} axes for an input with "
            f"{len(spatial)} spatial axes {spatial}"
        )
    roi = tuple(int(r) for r in fall_back_tuple(roi_size, spatial))
    if region is None:
        raise InputError(
            "sliding_window explains a segmentation model's region scores: pass region=... "
            "(a (B or 1, 1 or K, *spatial) mask or weight map on the input grid) or "
            "region='predicted'"
        )
    rows = _target_rows(targets, b)
    k = len(rows[0])
    kwargs = forward_kwargs or {}
    model = explainer.model
    swi = {
        "roi_size": roi, "sw_batch_size": sw_batch_size, "overlap": overlap, "mode": mode,
        "sigma_scale": sigma_scale, "padding_mode": padding_mode, "cval": cval,
        "progress": progress is True,
    }  # fmt: skip
    report = progress if callable(progress) else None
    total = _window_count(spatial, roi, overlap) * b * (2 if isinstance(region, str) else 1)
    done = [0]

    def counted(run: Callable) -> Callable:
        """``run`` (a predictor), reporting the windows done after each call."""
        if report is None:
            return run

        def call(window: torch.Tensor, *args: object) -> object:
            out = run(window, *args)
            done[0] += int(window.shape[0])
            report(min(done[0], total), total)
            return out

        return call

    def predict(window: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = explainer._output(model(window, **kwargs))
        if out.ndim != window.ndim or tuple(out.shape[2:]) != tuple(window.shape[2:]):
            raise InputError(
                f"sliding windows need a segmentation output on the input's grid; the model "
                f"returns {tuple(out.shape)} for a window of {tuple(window.shape)}"
            )
        return out

    state: dict[str, object] = {"tgt": None, "acts": ()}
    task_name = None
    with model_state_restored(model):
        if isinstance(region, str):
            if region != "predicted":
                raise InputError(
                    f"region must be a mask or weight map (B or 1, 1 or K, *spatial), or "
                    f"'predicted'; got the string {region!r}"
                )
            pred = sliding_window_inference(x, predictor=counted(predict), **swi)
            c = pred.shape[1]
            tgt = explainer._target_matrix(rows, pred, shape=(b, c))
            task_name = resolve_task(task if task is not None else explainer.task, c)
            reg = target_masks(pred, tgt, task_name)
            explainer._check_predicted(reg, tgt, task_name)
            state["tgt"] = tgt
        else:
            pred = None
            reg = check_region(region, (b, 1, *spatial), k, spatial).to(x.device)
            check_not_empty(reg)
        padded = _padded(reg, _monai_pad(spatial, roi))

        def predictor(window: torch.Tensor, coords: list) -> dict[str, torch.Tensor]:
            items = [int(c[0].start) for c in coords]
            crop = torch.cat(
                [padded[(slice(i, i + 1) if padded.shape[0] > 1 else slice(0, 1), slice(None),
                         *c[2:])] for i, c in zip(items, coords, strict=True)]
            )  # fmt: skip
            out: dict[str, torch.Tensor] = {}
            tgt = state["tgt"]
            if tgt is not None and not bool((crop != 0).any()):  # the region misses them
                if pred is None:
                    out["pred"] = predict(window)
                zeros = window.new_zeros((window.shape[0], k, *window.shape[2:]))
                return out | {f"map:{n}": zeros for n in names}
            window_targets = tgt[items] if tgt is not None else [rows[i] for i in items]
            results = explainer._explain(
                window, window_targets, names, False, kwargs, crop, None, allow_empty=True
            )
            first = results[names[0]]
            if tgt is None:  # first window: resolve names and check indices once
                state["tgt"] = explainer._target_matrix(
                    rows, first.output, shape=(b, first.output.shape[1])
                )
            state["acts"] = first.activation_shape
            if pred is None:
                out["pred"] = first.output
            for n in names:
                res = results[n]
                geo = res.geometry or explainer.geometry(window, forward_kwargs=kwargs)
                size = tuple(window.shape[2:])
                raw = res.raw
                if not is_identity(geo, size):
                    raw = postprocess.density(raw, geo, size)
                out[f"map:{n}"] = raw.to(window.dtype)
            return out

        blended = sliding_window_inference(
            x, predictor=counted(predictor), with_coord=True, **swi
        )
    if pred is None:
        pred = blended["pred"]
    tgt = state["tgt"]
    region_out = reg.expand(b, k, *spatial)
    explained = region_scores(pred, tgt, reg)
    reported = class_scores(pred, tgt, reg, explained, task_name)
    geometry = postprocess.stretch_geometry(spatial, spatial)  # the identity
    results = {}
    for n in names:
        raw = blended[f"map:{n}"].float()
        with torch.no_grad():
            if not maps:
                placed = None
            elif explainer.postprocessing is postprocess.unit_maps:  # the same, on the grid
                placed = postprocess.scale_to_max(postprocess.relu(raw), len(spatial))
            else:
                placed = explainer.postprocessing(raw, geometry, spatial)
        results[n] = ExplanationResult(
            raw=raw,
            maps=placed,
            scores=reported,
            targets=tgt,
            method=n,
            layer=explainer.layer_name,
            class_names=explainer.class_names,
            activation_shape=tuple(state["acts"]),
            geometry=geometry,
            region=region_out,
            region_scores=explained,
            output=pred,
            task=task_name,
        )
    return results
