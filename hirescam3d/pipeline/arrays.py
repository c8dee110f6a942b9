"""Explain a scan held in memory: the stages of :func:`explain_arrays`, in order.

check the arguments (:func:`~hirescam3d.pipeline.options.check_request`) -> audit the layer
-> preprocess onto the model's grid (:mod:`~hirescam3d.pipeline.to_model_grid`) -> one
explained pass (:mod:`~hirescam3d.pipeline.classification` or
:mod:`~hirescam3d.pipeline.segmentation`) -> contributions and organ shares
(:mod:`~hirescam3d.pipeline.contributions`) -> the typed
:class:`~hirescam3d.pipeline.explanation.Explanation`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from hirescam3d.errors import ModelError
from hirescam3d.models.handle import output_selector_of
from hirescam3d.pipeline.classification import explain_classes
from hirescam3d.pipeline.contributions import Attribution, attribute
from hirescam3d.pipeline.explanation import ExplainedPass, Explanation, FindingScore
from hirescam3d.pipeline.options import (
    ArrayRequest,
    ModelArg,
    Progress,
    audit_verdict,
    check_request,
    resolve_device,
    step,
)
from hirescam3d.pipeline.regions import RegionArg
from hirescam3d.pipeline.segmentation import explain_segmenter, inference_of
from hirescam3d.pipeline.to_model_grid import ModelInput, to_model_grid


def audit(request: ArrayRequest, values: str) -> Any:
    """The audit's verdict at the explained layer; ModelError if ``values="logit"`` but
    HiResCAM's guarantee does not hold there (or other methods are asked for)."""
    verdict = audit_verdict(request.network, request.info, request.layer)
    methods = request.methods
    if values == "logit" and (methods != ["hirescam"] or not verdict.guaranteed):
        why = (
            f"methods {', '.join(m for m in methods if m != 'hirescam')} have no units"
            if methods != ["hirescam"]
            else verdict.text()
        )
        raise ModelError(
            f"logit values need HiResCAM at a layer where its guarantee holds ({why}); "
            "use the default unit values, or --method hirescam at a guaranteed layer "
            "(see `hirescam3d audit`)"
        )
    return verdict


def explain_on_model_grid(
    request: ArrayRequest,
    model_input: ModelInput,
    dev: torch.device,
    progress: Progress | None,
    roi_size: Sequence[int] | None,
    overlap: float,
    sw_batch_size: int,
) -> ExplainedPass:
    """One explained pass on the model's grid, every finding and method: the
    classification or the segmentation path (``roi_size``, ``overlap``, ``sw_batch_size``:
    its sliding window)."""
    from hirescam3d.core.explainer import Explainer

    info, network = request.info, request.network
    x = model_input.image.as_tensor()[None].to(dev)

    def passes(done: int, total: int) -> None:  # perturbation methods: many model passes
        step(progress, f"explain: {done}/{total} model passes", 0.3 + 0.15 * done / max(total, 1))

    def windows(done: int, total: int) -> None:  # sliding windows: one call per batch
        step(progress, f"explain: window {done}/{total}", 0.3 + 0.15 * done / max(total, 1))

    explainer = Explainer(
        network, request.layer, request.methods[0], class_names=list(info.class_names),
        progress=passes, task=info.activation if info.segmentation else None,
        output_selector=output_selector_of(network),
    )  # fmt: skip
    if not info.segmentation:
        return explain_classes(explainer, x, list(info.class_names), request.requested,
                               request.methods, info.task)  # fmt: skip
    inference = inference_of(info, model_input.grid.shape, roi_size, overlap, sw_batch_size,
                             request.slices)  # fmt: skip
    return explain_segmenter(explainer, x, info, request.requested, request.methods,
                             model_input, inference, windows)  # fmt: skip


def _explanation(
    request: ArrayRequest,
    values: str,
    verdict: Any,
    model_input: ModelInput,
    run: ExplainedPass,
    found: Attribution,
    with_organs: bool,
    dev: torch.device,
    timings: dict[str, float],
) -> Explanation:
    """The stages' results as one :class:`Explanation` (warnings in the order they arose)."""
    if run.region is not None:
        run.region["verdict_bias"] = (
            "HiResCAM's total = region score - bias per voxel x region size"
            + ("" if verdict.bias_uniform is not False else
               " (approximately: the output at zero activations varies over voxels; the "
               "mean bias per voxel is used)")
        )  # fmt: skip
    scores = {
        n: FindingScore(run.logits[n], run.probabilities[n], n in run.chosen,
                        run.region_sizes.get(n))
        for n in request.info.class_names
    }  # fmt: skip
    return Explanation(
        model=request.info, layer=request.layer, methods=request.methods, values=values,
        scores=scores, explained=run.chosen, selection=run.selection, verdict=verdict,
        contributions=found.contributions,
        organ_shares=found.shares if with_organs else None,
        raw=run.raw, geometry=found.geometry, grid=model_input.grid, coverage=found.coverage,
        device=str(dev), warnings=model_input.notes + run.notes + found.notes,
        timings=timings, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        masks=run.masks, region=run.region, prediction=run.prediction,
    )  # fmt: skip


def explain_arrays(
    image: np.ndarray,
    affine: np.ndarray,
    model: ModelArg = "demo",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    organs: np.ndarray | None = None,
    organ_names: dict[int, str] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    values: str = "unit",
    region: RegionArg = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> Explanation:
    """Explain a scan held in memory: one forward pass, every finding and method.

    ``image``: ``(I, J, K)`` intensities (HU for CT); ``affine``: voxel -> RAS mm;
    ``organs``: integer labels ``(I, J, K)`` on the same grid, named by ``organ_names``.
    ``findings=None``: every finding with probability >= 0.5 (none -> no maps, a warning).
    The scan goes through the model's MONAI preprocessing; contributions (HiResCAM at a
    guaranteed layer, in logits) and organ shares are computed on the explanation grid,
    the organ map pooled onto the cells once per grid. No map is put on the scan's grid
    here: :meth:`Explanation.scan_map` and :meth:`Explanation.model_map` do that per map.
    ``values="logit"`` needs HiResCAM at a layer where the audit proves the guarantee
    (ModelError otherwise). ``progress(stage, fraction)`` is called as stages start; the
    network is moved to ``device`` ("auto": CUDA if available) and left there.

    Segmentation models (``info.segmentation``: logits ``(1, C, *spatial)``) explain a
    finding's *region score*, its logits summed over a region (in logits):

    - ``region``: a bool/0-1 mask or float weights ``(I, J, K)`` on the scan's grid,
      carried through the same preprocessing as the scan with nearest-neighbour
      interpolation onto the model's grid; or ``"predicted"`` (the default): each
      finding's own predicted mask (``info.activation``: argmax for softmax models,
      logit >= 0 for sigmoid ones), kept in :attr:`Explanation.masks`;
    - ``findings=None``: with ``"predicted"`` every class the model segments (a non-empty
      mask), with a given region every class whose mean probability over it is >= 0.5;
    - ``roi_size`` (voxels of the model's grid) and ``overlap``: explain window by
      window as MONAI's ``sliding_window_inference`` predicts (gaussian blending,
      ``sw_batch_size`` windows per pass); by default the bundle's patch size when the
      model sees patches (``info.patch``) and the volume is not one patch. Sliding-window maps
      are on the model's input grid (logits per voxel for HiResCAM);
    - a MONAI bundle whose inferer is ``SliceInferer`` (a 2D network over the volume) is
      predicted and explained slice by slice on its schedule (:mod:`hirescam3d.core.slices`).
    """
    request = check_request(image, affine, model, findings, methods, layer, organs, values,
                            region, roi_size)  # fmt: skip
    dev = resolve_device(device)
    request.network.to(dev)
    timings: dict[str, float] = {}
    step(progress, "audit", 0.05)
    t = time.perf_counter()
    verdict = audit(request, values)
    timings["audit_s"] = time.perf_counter() - t
    step(progress, "preprocess", 0.1)
    t = time.perf_counter()
    model_input = to_model_grid(request.image, request.affine, request.region, request.info)
    timings["preprocess_s"] = time.perf_counter() - t
    step(progress, "explain", 0.3)
    t = time.perf_counter()
    run = explain_on_model_grid(request, model_input, dev, progress, roi_size, overlap,
                                sw_batch_size)  # fmt: skip
    timings["explain_s"] = time.perf_counter() - t
    step(progress, "attribute", 0.45)
    t = time.perf_counter()
    found = attribute(run, model_input, request, organs, organ_names, verdict)
    timings["attribute_s"] = time.perf_counter() - t
    return _explanation(request, values, verdict, model_input, run, found, organs is not None,
                        dev, timings)  # fmt: skip
