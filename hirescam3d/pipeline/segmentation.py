"""The segmentation path: a finding's region score (its logits summed over a region),
explained on the model's grid in one pass, window by window or slice by slice.

The region is each finding's predicted mask (``"predicted"``: the bundle's mask
post-processing if it has one) or one given on the model's grid. Without requested
findings, one prediction more chooses them: every class the model segments (a non-empty
predicted mask), or whose mean probability over the given region is >= 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from hirescam3d.errors import InputError
from hirescam3d.models.bundle import ModelInfo
from hirescam3d.pipeline.explanation import ExplainedPass
from hirescam3d.pipeline.options import PROBABILITY_THRESHOLD, Pair
from hirescam3d.pipeline.to_model_grid import ModelInput

Stats = list[tuple[float, float, float]]  # per class: (region score, region size, mean prob.)


class Inference(NamedTuple):
    """How the model runs over the volume: ``roi`` the sliding window (None: the whole
    volume in one pass, or slice by slice with ``slice_inferer``, a bundle's
    ``SliceInferer`` entry); ``schedule``: ``{mode, sigma_scale, padding_mode, cval}``."""

    roi: tuple[int, ...] | None
    overlap: float
    sw_batch_size: int
    schedule: dict[str, Any]
    slice_inferer: dict[str, Any] | None


def _window(
    info: ModelInfo, shape: tuple[int, ...], roi_size: Sequence[int] | None, overlap: float
) -> tuple[int, ...] | None:
    """The sliding window on the model's grid: ``roi_size`` as given, else the bundle's
    patch size when the model sees patches (as MONAI's bundle inferer runs it) and the
    volume is not exactly one patch; None: the whole volume in one pass."""
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"overlap must lie in [0, 1); got {overlap}")
    if roi_size is None:
        if not info.patch:
            return None
        patch = tuple(int(n) for n in info.input.spatial_size)
        return None if tuple(shape) == patch else patch
    roi = tuple(int(n) for n in roi_size)
    if len(roi) != len(shape) or any(n <= 0 for n in roi):
        raise InputError(
            f"roi_size {tuple(roi_size)} must be {len(shape)} positive whole numbers (voxels "
            "of the model's grid, its axes in the model's order)"
        )
    return roi


def _bundle_schedule(
    inferer: dict[str, Any], window: tuple[int, ...]
) -> tuple[tuple[int, ...], Any, int, dict[str, Any]]:
    """``(roi, overlap, sw_batch_size, {mode, sigma_scale, padding_mode, cval})`` of a
    bundle's ``SlidingWindowInferer`` (see :func:`hirescam3d.models.bundle_monai.inferer_spec`)."""
    if inferer.get("kind") != "sliding":
        return window, 0.25, 1, {"mode": "gaussian"}
    schedule = {k: inferer[k] for k in ("mode", "sigma_scale", "padding_mode", "cval")}
    return tuple(inferer["roi_size"]), inferer["overlap"], inferer["sw_batch_size"], schedule


def inference_of(
    info: ModelInfo,
    shape: tuple[int, ...],
    roi_size: Sequence[int] | None,
    overlap: float,
    sw_batch_size: int,
    slices: bool,
) -> Inference:
    """The :class:`Inference` for a model grid of ``shape``: a bundle's ``SliceInferer``
    (``slices``) or ``SlidingWindowInferer`` runs on its own schedule, unless ``roi_size``
    is given."""
    window = _window(info, shape, roi_size, overlap)
    schedule = {"mode": "gaussian"}
    if slices:
        window = None
    elif roi_size is None and window is not None and info.inferer:
        window, overlap, sw_batch_size, schedule = _bundle_schedule(info.inferer, window)
    return Inference(window, overlap, sw_batch_size, schedule, info.inferer if slices else None)


def _class_stats(output: torch.Tensor, region: torch.Tensor | None, task: str) -> Stats:
    """Per class of ``output`` ``(1, C, *spatial)``: ``(sum of its logits over its region,
    region size, mean probability over the region)``; the region is ``region``
    ``(*spatial)`` (mask or weights) or, if None, the class's predicted mask. NaN
    probability for an empty region."""
    from hirescam3d.core.regions import predicted_masks

    out = output[0].detach().float()
    # softmax one class at a time: exp(logit - logsumexp), one volume-sized temporary
    norm = torch.logsumexp(out, dim=0) if task == "softmax" else None
    masks = predicted_masks(output.detach(), task)[0] if region is None else None
    stats = []
    for c in range(out.shape[0]):
        w = (masks[c] if masks is not None else region).to(out.device, torch.float64)
        p = torch.exp(out[c] - norm) if norm is not None else torch.sigmoid(out[c])
        size = float(w.sum())
        score = float((out[c].double() * w).sum())
        mean = float((p.double() * w).sum()) / size if size > 0 else math.nan
        stats.append((score, size, mean))
    return stats


def _rule_stats(output: torch.Tensor, masks: torch.Tensor) -> Stats:
    """:func:`_class_stats` over post-processed masks ``(C, *spatial)`` (sigmoid heads)."""
    out = output[0].detach().float()
    stats = []
    for c in range(out.shape[0]):
        w = masks[c].to(out.device, torch.float64)
        size = float(w.sum())
        score = float((out[c].double() * w).sum())
        mean = float((torch.sigmoid(out[c]).double() * w).sum()) / size if size > 0 else math.nan
        stats.append((score, size, mean))
    return stats


def _predict(explainer: Any, x: torch.Tensor, inference: Inference) -> torch.Tensor:
    """The model's logits ``(1, C, *spatial)`` on ``x`` as ``inference`` runs it (no
    gradients; the network's state is restored)."""
    from monai.inferers import sliding_window_inference

    from hirescam3d.core.capture import model_state_restored
    from hirescam3d.core.slices import slice_predict

    network = explainer.model
    with torch.no_grad(), model_state_restored(network):
        if inference.slice_inferer is not None:
            return slice_predict(network, x, inference.slice_inferer, explainer._output)
        if inference.roi is None:
            return explainer._output(network(x))
        return sliding_window_inference(
            x, inference.roi, inference.sw_batch_size, lambda w: explainer._output(network(w)),
            overlap=inference.overlap, **inference.schedule,
        )  # fmt: skip


class _Selection(NamedTuple):
    """The findings to explain and how they were chosen; ``stats`` per class (empty when
    no prediction was needed), the bundle's post-processed predicted masks ``(C, *spatial)``
    (or None) and notes."""

    chosen: list[str]
    selection: str
    stats: Stats
    rule_masks: torch.Tensor | None
    notes: list[str]


def _choose(class_names: list[str], stats: Stats, given: bool) -> tuple[list[str], str, str]:
    """``(chosen, selection, why none)``: every class with a non-empty predicted mask, or
    (a ``given`` region) with mean probability >= 0.5 over it."""
    if not given:
        chosen = [n for n, s in zip(class_names, stats, strict=True) if s[1] > 0]
        selection = "every finding the model segments (a non-empty predicted mask)"
        return chosen, selection, "the model segments no finding"
    chosen = [n for n, s in zip(class_names, stats, strict=True)
              if s[2] >= PROBABILITY_THRESHOLD]  # fmt: skip
    selection = f"every finding with mean probability >= {PROBABILITY_THRESHOLD} over the region"
    return chosen, selection, (
        f"no finding has mean probability >= {PROBABILITY_THRESHOLD} over the region"
    )


def _select(
    explainer: Any,
    x: torch.Tensor,
    class_names: list[str],
    requested: list[str] | None,
    given: torch.Tensor | None,
    task: str,
    inference: Inference,
    mask_rule: Any,
) -> _Selection:
    """The findings to explain: the requested ones, else chosen by one prediction more
    (also made for the bundle's post-processed masks, with ``"predicted"`` regions)."""
    if requested is not None and (given is not None or mask_rule is None):
        return _Selection(requested, "requested", [], None, [])
    output = _predict(explainer, x, inference)
    rule_masks = None
    if given is None and mask_rule is not None:
        rule_masks = mask_rule.masks(output.detach(), class_names)[0].cpu()
        stats = _rule_stats(output, rule_masks)
    else:
        stats = _class_stats(output, given, task)
    del output
    if requested is not None:
        return _Selection(requested, "requested", stats, rule_masks, [])
    chosen, selection, why = _choose(class_names, stats, given is not None)
    notes = [] if chosen else [
        f"{why}; nothing was explained (name findings explicitly to explain them anyway)"
    ]  # fmt: skip
    return _Selection(chosen, selection, stats, rule_masks, notes)


def _explain_pass(
    explainer: Any,
    x: torch.Tensor,
    chosen: list[str],
    methods: list[str],
    region: str | torch.Tensor,
    task: str,
    inference: Inference,
    on_window: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """``{method: result}`` of the explained pass over ``chosen`` (whole volume, slice by
    slice or window by window); InputError unless the output lies on the input grid."""
    from hirescam3d.core.slices import slice_inferer_explain, slice_options
    from hirescam3d.core.sliding import sliding_window_explain

    if inference.slice_inferer is not None:
        results = slice_inferer_explain(
            explainer, x, targets=chosen, region=region, methods=methods, maps=False,
            task=task, **slice_options(inference.slice_inferer),
        )  # fmt: skip
    elif inference.roi is None:
        results = explainer.explain(x, chosen, methods, maps=False, region=region, task=task)
    else:
        results = sliding_window_explain(
            explainer, x, targets=chosen, region=region, roi_size=inference.roi,
            overlap=inference.overlap, sw_batch_size=inference.sw_batch_size, methods=methods,
            maps=False, task=task, progress=on_window or False, **inference.schedule,
        )  # fmt: skip
    output = results[methods[0]].output
    if tuple(output.shape[2:]) != tuple(x.shape[2:]):
        raise InputError(
            f"the model's output grid {tuple(output.shape[2:])} is not its input "
            f"grid {tuple(x.shape[2:])}: the pipeline explains segmentation models whose "
            "masks lie on their input (use hirescam3d.Explainer with a region on the "
            "output grid instead)"
        )
    return results


def _region_report(
    given: bool, task: str, inference: Inference, mask_rule: Any
) -> dict[str, Any]:
    """The report's ``region`` section: where the region came from, the score, the
    sliding window or slice schedule."""
    from hirescam3d.core.slices import slice_options

    report: dict[str, Any] = {
        "source": "given" if given else "predicted",
        "task": task,
        "grid": "model input",
        "score": "sum over the region's voxels of the finding's logits (logits)",
    }
    if not given:
        report["predicted_by"] = (
            "argmax over classes" if task == "softmax" else "logit >= 0 (sigmoid >= 0.5)"
        )
        if mask_rule is not None:
            report["predicted_by"] = mask_rule.describe()
    roi = inference.roi
    report["sliding_window"] = None if roi is None else {
        "roi_size": list(roi), "overlap": inference.overlap,
        "sw_batch_size": int(inference.sw_batch_size), "mode": str(inference.schedule["mode"]),
    }  # fmt: skip
    if inference.slice_inferer is not None:  # MONAI SliceInferer: a 2D network over the volume
        report["slice_inferer"] = slice_options(inference.slice_inferer)
    return report


def explain_segmenter(
    explainer: Any,
    x: torch.Tensor,
    info: ModelInfo,
    requested: list[str] | None,
    methods: list[str],
    model_input: ModelInput,
    inference: Inference,
    on_window: Callable[[int, int], None] | None = None,
) -> ExplainedPass:
    """Explain a segmentation model's region scores on its input ``x`` ``(1, C_in,
    *spatial)``: one explained pass (slice by slice or window by window as ``inference``
    says) over ``model_input.region`` (None: each finding's predicted mask, post-processed
    as the bundle says). ``on_window(done, total)``: sliding-window progress."""
    class_names, task = list(info.class_names), info.activation
    given = None if model_input.region is None else model_input.region.to(x.device)
    rule = info.mask_postprocessing
    chosen, selection, stats, rule_masks, notes = _select(
        explainer, x, class_names, requested, given, task, inference, rule
    )
    region: str | torch.Tensor = "predicted" if given is None else given[None, None]
    if rule_masks is not None and chosen:  # explain exactly the post-processed masks
        region = rule_masks[[class_names.index(f) for f in chosen]][None].to(x.device)
    raw: dict[Pair, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    kept = None
    if chosen:
        results = _explain_pass(explainer, x, chosen, methods, region, task, inference, on_window)
        first = results[methods[0]]
        stats = stats or _class_stats(first.output, given, task)
        raw = {(f, m): results[m].raw[0, k].detach().cpu()
               for k, f in enumerate(chosen) for m in methods}  # fmt: skip
        if rule_masks is not None:
            masks = {f: rule_masks[class_names.index(f)] for f in chosen}
        elif given is None:
            masks = {f: first.region[0, k].detach().cpu().bool() for k, f in enumerate(chosen)}
        if info.postprocessing:  # kept for the bundle's own postprocessing (Invertd)
            kept = first.output[0].detach().cpu()
        del results, first
    whole = inference.roi is not None or inference.slice_inferer is not None
    return ExplainedPass(
        raw, chosen, selection,
        logits={n: s[0] for n, s in zip(class_names, stats, strict=True)},
        probabilities={n: s[2] for n, s in zip(class_names, stats, strict=True)},
        # sliding windows and slices: maps blended on the model's input grid (identity)
        layer_geometry=model_input.identity if whole else explainer.geometry(x),
        notes=notes, region_sizes={n: s[1] for n, s in zip(class_names, stats, strict=True)},
        masks=masks, region=_region_report(given is not None, task, inference, rule),
        prediction=kept if masks else None,
    )  # fmt: skip
