"""The classification path: one score per finding, explained in one pass on the model's grid.

Used for 3D scans (:func:`~hirescam3d.pipeline.arrays.explain_arrays`) and 2D images
(:func:`~hirescam3d.pipeline.explain2d.explain_image2d`). Without requested findings, every
finding with probability >= :data:`~hirescam3d.pipeline.options.PROBABILITY_THRESHOLD` is
explained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hirescam3d.pipeline.explanation import ExplainedPass
from hirescam3d.pipeline.options import PROBABILITY_THRESHOLD


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Softmax over the classes of a multiclass model's ``logits``, else the sigmoid."""
    return torch.softmax(logits, dim=-1) if task == "multiclass" else torch.sigmoid(logits)


def _choose(
    class_names: Sequence[str], requested: list[str] | None, prob_of: dict[str, float]
) -> tuple[list[str], str, list[str]]:
    """``(findings to explain, how they were chosen, notes)``: the requested ones, else
    every finding with probability >= :data:`PROBABILITY_THRESHOLD`."""
    if requested is not None:
        return requested, "requested", []
    chosen = [n for n in class_names if prob_of[n] >= PROBABILITY_THRESHOLD]
    notes = [] if chosen else [
        f"no finding has probability >= {PROBABILITY_THRESHOLD}; nothing was explained "
        "(name findings explicitly to explain them anyway)"
    ]  # fmt: skip
    return chosen, f"every finding with probability >= {PROBABILITY_THRESHOLD}", notes


def explain_classes(
    explainer: Any,
    x: torch.Tensor,
    class_names: list[str],
    requested: list[str] | None,
    methods: list[str],
    task: str,
) -> ExplainedPass:
    """Explain a classifier on its input ``x`` ``(1, C_in, *spatial)``: one pass for every
    method, over the requested findings (else all, to choose them by probability; ``task``
    as :func:`probabilities` takes it); raw maps on the CPU."""
    targets = requested or class_names  # all classes when choosing by probability
    results = explainer.explain(x, targets, methods, maps=False)
    layer_geometry = explainer.geometry(x)
    logits = results[methods[0]].scores[0].detach().float().cpu()
    probs = probabilities(logits, task)
    logit_of = {n: float(v) for n, v in zip(class_names, logits.tolist(), strict=True)}
    prob_of = {n: float(v) for n, v in zip(class_names, probs.tolist(), strict=True)}
    chosen, selection, notes = _choose(class_names, requested, prob_of)
    raw = {
        (f, m): results[m].raw[0, targets.index(f)].detach().cpu()
        for f in chosen
        for m in methods
    }
    return ExplainedPass(raw, chosen, selection, logit_of, prob_of, layer_geometry, notes)
