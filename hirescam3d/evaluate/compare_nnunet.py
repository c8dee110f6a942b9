"""``compare`` for an nnU-Net model folder: several methods on nnU-Net's own tiles.

nnU-Net predicts the scan once (its folds and mirrored passes); each method then explains
that prediction's region for the class on the same tiles, folds and flips, each tile's
map weighted with nnU-Net's Gaussian as its logits are
(:func:`hirescam3d.pipeline.nnunet_explain.explain_preprocessed`). The maps go back to the
scan's grid with nnU-Net's export steps and are scored and drawn exactly as
:func:`hirescam3d.evaluate.compare.compare_scan` scores and draws a MONAI model's maps;
``l2_to_exact`` compares the raw maps on nnU-Net's preprocessed grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hirescam3d.evaluate import compare

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.models.nnunet_handle import NnunetHandle
    from hirescam3d.pipeline import Progress


@dataclass
class NnunetCompared:
    """What the comparison reads of the explanations (the fields of
    :class:`hirescam3d.pipeline.ScanExplanation` it uses): display maps ``(I, J, K)`` on the
    scan's grid and raw maps on the preprocessed grid, per ``(class, method)``."""

    maps: dict[tuple[str, str], np.ndarray]
    raw: dict[tuple[str, str], torch.Tensor]
    probabilities: dict[str, float]
    logits: dict[str, float]
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def explain_methods(
    scan: Path, handle: NnunetHandle, finding: str, methods: Sequence[str], layer: str | None
) -> NnunetCompared:
    """nnU-Net's prediction of ``scan`` explained for ``finding`` by each method."""
    from hirescam3d.models.nnunet import predict_logits, preprocess, to_scan
    from hirescam3d.pipeline.nnunet_explain import explain_preprocessed

    model = handle.model
    layer = handle.check_layer(layer)
    pre = preprocess(model, scan)
    logits = predict_logits(model, pre.data, handle.mirror)
    maps, raw = {}, {}
    for method in methods:
        e = explain_preprocessed(model, pre, layer, [finding], handle.mirror, method, logits)
        name = e.names[0]
        volume = to_scan(model, e.raw.numpy(), pre.properties)[0].transpose(2, 1, 0)
        positive = np.maximum(volume, 0)
        top = float(positive.max())
        maps[(name, method)] = positive / top if top > 0 else positive
        raw[(name, method)] = e.raw[0]
    c = e.targets[0]
    if model.task == "sigmoid":
        probability = torch.sigmoid(logits[c].float())
    else:
        probability = torch.softmax(logits.float(), 0)[c]
    region = e.region[0] > 0
    report = {"model": str(handle.bundle_path), "layer": layer, "region": "predicted",
              "hirescam_guaranteed_faithful": handle.audit(layer).guaranteed}  # fmt: skip
    return NnunetCompared(maps, raw, {name: float(probability[region].mean())},
                          {name: float(e.region_scores[0])}, report)  # fmt: skip


def compare_nnunet_scan(
    scan_path: str | Path,
    finding: str,
    out_dir: str | Path,
    handle: NnunetHandle,
    methods: Sequence[str] = ("hirescam", "gradcam"),
    layer: str | None = None,
    organs_path: str | Path | None = None,
    organ_names_path: str | Path | None = None,
    mask_path: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """:func:`hirescam3d.evaluate.compare.compare_scan` for an nnU-Net model folder: the
    same figure and ``compare.json``, on nnU-Net's predicted region of ``finding`` (the
    probability: nnU-Net's mean probability of the class inside it; the logit: the
    region score). Returns ``(record, {"png": path, "json": path})``."""
    from hirescam3d.pipeline import check_methods

    methods = check_methods(methods)

    def explain(inputs: Any, name: str, run: list[str]) -> NnunetCompared:
        if progress is not None:
            progress("explaining", 0.1)
        return explain_methods(Path(scan_path), handle, name, run, layer)

    extra = {
        "maps": "display maps on the scan's grid (ReLU, divided by the maximum): each method "
        "on nnU-Net's tiles, folds and flips, weighted with nnU-Net's Gaussian, then "
        "nnU-Net's export steps back to the scan's grid",
        "nnunet": {"folds": [str(f) for f in handle.folds], "mirror": handle.mirror},
    }
    sources = (scan_path, mask_path, organs_path, organ_names_path)
    return compare.compared(sources, finding, handle.model.class_names, out_dir, methods,
                            explain, force, progress, "predicted", extra)  # fmt: skip
