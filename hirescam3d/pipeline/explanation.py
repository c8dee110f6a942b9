"""The typed results of the pipeline.

- :class:`ExplainedPass`: what the classification or the segmentation path found on the
  model's grid (raw maps, scores, the findings explained);
- :class:`Explanation`: what :func:`~hirescam3d.pipeline.arrays.explain_arrays` returns;
  its maps are put on a grid only when asked (:mod:`hirescam3d.pipeline.to_scan_grid`);
- :class:`ScanExplanation`: what :func:`~hirescam3d.pipeline.scan.explain_scan` and
  :func:`~hirescam3d.pipeline.scan.explain_image` return, every map on the scan's grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hirescam3d.core.placement import ModelGrid
from hirescam3d.models.bundle import ModelInfo
from hirescam3d.pipeline import to_scan_grid
from hirescam3d.pipeline.options import Pair, software_versions


@dataclass
class ScanExplanation:
    """Explanations of one scan.

    ``maps``: ``{(finding, method): float32 (I, J, K)}`` on the scan's grid: in [0, 1]
    (``values == "unit"``) or logits per voxel (``values == "logit"``). A dict from
    :func:`explain_image`; from :func:`explain_scan` a mapping that computes each map when
    it is read (the run streamed them to disk and kept none).
    ``probabilities`` / ``logits``: ``{finding: value}`` for every class of the model.
    ``report``: JSON-ready dict (what ``report.json`` holds).
    ``warnings``: texts of everything worth telling the user (also in the report).
    ``model_grid_maps``: ``{(finding, method): (S, H, W)}`` on the model's input grid, a
    mapping that computes each map when it is read.
    ``organs`` / ``organ_names``: the organ labels on the scan's grid, if given.
    ``raw``: ``{(finding, method): tensor}`` each method's raw map before any
    post-processing, on the explained layer's grid (cells; the input grid for methods
    that work at input resolution), on the CPU: signed, logits per cell for HiResCAM at
    a guaranteed layer. What :func:`hirescam3d.evaluate.metrics.l2_to_exact` compares.
    ``masks``: segmentation models with ``region="predicted"``: ``{finding: uint8 (I, J,
    K)}`` the predicted mask each finding's score was summed over, on the scan's grid.
    """

    maps: dict[tuple[str, str], np.ndarray]
    probabilities: dict[str, float]
    logits: dict[str, float]
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    model_grid_maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    organs: np.ndarray | None = None
    organ_names: dict[int, str] | None = None
    values: str = "unit"
    raw: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def findings(self) -> list[str]:
        """The explained findings, in the order they were requested (else class order)."""
        return list(dict.fromkeys(finding for finding, _ in self.maps))

    @property
    def methods(self) -> list[str]:
        """The methods used, in the order requested."""
        return list(dict.fromkeys(method for _, method in self.maps))


@dataclass
class FindingScore:
    """The model's output for one finding. Segmentation models: ``logit`` is the region
    score (the finding's logits summed over its region, in logits), ``probability`` the
    mean probability over the region (NaN for an empty one) and ``region_voxels`` the
    region's size (model-grid voxels, or the sum of its weights)."""

    logit: float
    probability: float
    explained: bool
    region_voxels: float | None = None


@dataclass
class ExplainedPass:
    """What one explained pass found on the model's grid, for every class of the model:
    ``logits`` (segmentation: region scores) and ``probabilities`` (segmentation: mean over
    the region); ``chosen``: the findings explained, ``selection`` how they were chosen;
    ``raw``: ``{(finding, method): tensor}`` on the CPU; ``layer_geometry``: the grid of the
    layer's maps; ``notes``: warnings. Segmentation models also: ``region_sizes`` per
    class, the predicted ``masks`` ``{finding: bool (*grid)}``, the report's ``region``
    section and the kept ``prediction`` ``(C, *grid)`` (else empty / None)."""

    raw: dict[Pair, torch.Tensor]
    chosen: list[str]
    selection: str
    logits: dict[str, float]
    probabilities: dict[str, float]
    layer_geometry: Any
    notes: list[str] = field(default_factory=list)
    region_sizes: dict[str, float] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    region: dict[str, Any] | None = None
    prediction: torch.Tensor | None = None


@dataclass
class Explanation:
    """What :func:`explain_arrays` returns: scores, units, organ shares and the maps, which
    are put on a grid only when asked (one at a time, so a caller can stream them).

    ``raw``: ``{(finding, method): tensor (*grid)}`` each method's raw map on its grid
    (the explained layer's cells; the model's input grid for input-resolution methods), on
    the CPU. ``contributions``: per finding and method, HiResCAM's parts in logits (at a
    guaranteed layer). ``organ_shares``: per finding and method, the shares of positive
    evidence per organ (None without organs). ``grid``: the model grid on the scan.
    Segmentation models: ``masks``: ``{finding: bool (S, H, W)}`` the predicted mask each
    explained finding's score was summed over (``region="predicted"``), on the model's
    grid (:meth:`mask_on_scan` puts one on the scan's grid); ``region``: what the report
    says about the region (None for classifiers); ``prediction``: the model's logits ``(C,
    *grid)`` on its input grid, kept for a MONAI bundle whose postprocessing inverts its
    prediction onto the scan's grid (``Invertd``), else None.
    """

    model: ModelInfo
    layer: str
    methods: list[str]
    values: str
    scores: dict[str, FindingScore]
    explained: list[str]
    selection: str
    verdict: Any
    contributions: dict[str, dict[str, dict[str, Any]]]
    organ_shares: dict[str, dict[str, dict[str, Any]]] | None
    raw: dict[Pair, torch.Tensor]
    geometry: dict[str, Any]
    grid: ModelGrid
    coverage: float
    device: str
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    region: dict[str, Any] | None = None
    prediction: torch.Tensor | None = field(default=None, repr=False)
    _on_scan: Any = field(default=None, repr=False)

    @property
    def pairs(self) -> list[Pair]:
        """``(finding, method)`` of every map, findings first, in the requested order."""
        return list(self.raw)

    @property
    def probabilities(self) -> dict[str, float]:
        return {n: s.probability for n, s in self.scores.items()}

    @property
    def logits(self) -> dict[str, float]:
        return {n: s.logit for n, s in self.scores.items()}

    def model_map(self, pair: Pair) -> np.ndarray:
        """Float32 ``(S, H, W)`` on the model's input grid (affine ``grid.affine``): a [0, 1]
        display map (``unit``) or logits per model voxel (``logit``)."""
        geometry = self.geometry[pair[1]]
        return to_scan_grid.model_map(self.raw[pair], geometry, self.grid.shape, self.values)

    def scan_map(self, pair: Pair, out: np.ndarray | None = None) -> np.ndarray:
        """Float32 ``(I, J, K)`` on the scan's grid (F-ordered): a [0, 1] display map, or
        logits per scan voxel summing to the model-grid contributions inside the scan.
        ``out``: an array of that kind to reuse (the result may or may not be it)."""
        return self.on_scan(pair, out).volume

    def on_scan(self, pair: Pair, out: np.ndarray | None = None) -> to_scan_grid.ScanMap:
        """:meth:`scan_map` as a :class:`~hirescam3d.pipeline.to_scan_grid.ScanMap` (with
        whether its values are known clean)."""
        geometry = self.geometry[pair[1]]
        on_scan = to_scan_grid.scan_map(self.raw[pair], geometry, self.grid, self.values, out)
        if on_scan.correction is not None:
            self.contributions[pair[0]][pair[1]]["resampling_correction"] = on_scan.correction
        return on_scan

    def mask_on_scan(self, finding: str) -> np.ndarray:
        """The predicted mask of ``finding`` on the scan's grid: uint8 ``(I, J, K)``, 1
        inside. A MONAI bundle that inverts its prediction (``Invertd``) gets its own
        postprocessing, in its order (:mod:`hirescam3d.pipeline.scan_prediction`: e.g. softmax,
        ``Invertd`` of the probabilities, argmax). Otherwise each scan voxel takes the
        value of the model-grid voxel nearest to its centre (index rounded half up; 0
        where the model's grid does not reach, e.g. a cropped-away part of the scan)."""
        if self.prediction is not None and self.model.postprocessing:
            if self._on_scan is None:
                from hirescam3d.pipeline.scan_prediction import ScanPrediction

                self._on_scan = ScanPrediction(self.prediction, self.grid,
                                               self.model.postprocessing, self.model.activation)
            if finding not in self.masks:
                raise KeyError(finding)
            return self._on_scan.mask(list(self.model.class_names).index(finding))
        return self.grid.nearest_on_scan(self.masks[finding])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (what ``report.json`` holds, before file details)."""
        report: dict[str, Any] = {
            "created": self.created,
            "model": model_section(self.model),
            "image": {
                "shape": list(self.grid.scan_shape),
                "affine": self.grid.scan_affine.tolist(),
                "model_grid_shape": list(self.grid.shape),
                "model_grid_affine": self.grid.affine.tolist(),
                "model_field_of_view_covered": self.coverage,
            },
            **method_section(self.layer, self.verdict, self.values, self.methods, self.selection),
            "findings": {
                n: {"logit": s.logit, "probability": s.probability, "explained": s.explained}
                for n, s in self.scores.items()
            },
            "explained": self.explained,
            "contributions": self.contributions,
            "device": self.device,
            "timings_s": dict(self.timings),
            "versions": software_versions(),
            "warnings": self.warnings,
        }
        if self.organ_shares is not None:
            report["organs"] = self.organ_shares
        if self.region is not None:
            for n, s in self.scores.items():
                report["findings"][n] = {
                    "region_score": s.logit,
                    "region_voxels": s.region_voxels,
                    "mean_probability": None if math.isnan(s.probability) else s.probability,
                    **report["findings"][n],
                }
            report["region"] = dict(self.region)
        return report


class LazyMaps(Mapping):
    """``{(finding, method): map}`` computed on access (nothing held in memory): on the
    scan's grid ``(I, J, K)`` (``grid="scan"``) or the model's input grid ``(S, H, W)``
    (``"model"``)."""

    def __init__(self, explanation: Explanation, grid: str = "scan") -> None:
        self._explanation = explanation
        self._grid = grid

    def __getitem__(self, pair: Pair) -> np.ndarray:
        if pair not in self._explanation.raw:
            raise KeyError(pair)
        if self._grid == "model":
            return self._explanation.model_map(pair)
        return self._explanation.scan_map(pair)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._explanation.raw)

    def __len__(self) -> int:
        return len(self._explanation.raw)


def scan_explanation(
    result: Explanation,
    maps: Mapping[Pair, np.ndarray],
    organs: np.ndarray | None,
    organ_names: dict[int, str] | None,
) -> ScanExplanation:
    """``result`` as a :class:`ScanExplanation` holding ``maps`` (scan grid) and the report."""
    return ScanExplanation(
        maps=maps,  # type: ignore[arg-type]  # a dict, or computed on access
        probabilities=result.probabilities,
        logits=result.logits,
        report=result.to_dict(),
        warnings=result.warnings,
        model_grid_maps=LazyMaps(result, "model"),  # type: ignore[arg-type]
        organs=organs,
        organ_names=organ_names,
        values=result.values,
        raw=result.raw,
    )


def method_section(
    layer: str, verdict: Any, values: str, methods: list[str], selection: Any
) -> dict[str, Any]:
    """The keys of a report that say how it explained: the layer, the audit's verdict on
    it, the map values, the methods and how the findings were chosen."""
    return {
        "layer": layer,
        "hirescam_guaranteed_faithful": verdict.guaranteed,
        "audit": verdict.to_dict(),
        "values": values,
        "methods": methods,
        "finding_selection": selection,
    }


def model_section(info: ModelInfo) -> dict[str, Any]:
    """The ``model`` section of a report: name, weights, task, bundle and input spec."""
    return {
        "name": info.name,
        "weights_sha256": info.weights_sha256,
        "trained": info.trained,
        "task": info.task,
        "bundle": None if info.bundle_path is None else str(info.bundle_path),
        "input": info.input.to_dict(),
    }
