"""Contributions and organ shares of every map, on the explanation grid.

HiResCAM's contributions at a guaranteed layer are in logits (total, bias, outside the
scan and per organ; :func:`hirescam3d.core.attribution.contributions`); every map gets its
shares of positive evidence per organ (:func:`hirescam3d.core.attribution.positive_shares`).
The organ map is pooled onto the cells once per grid, straight from the scan's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hirescam3d.core import attribution
from hirescam3d.core.methods import get_method
from hirescam3d.pipeline.explanation import ExplainedPass
from hirescam3d.pipeline.options import ArrayRequest, Pair
from hirescam3d.pipeline.to_model_grid import ModelInput, support_on_model_grid


@dataclass
class Attribution:
    """``geometry``: per method, the grid its raw maps lie on; ``contributions`` (HiResCAM
    at a guaranteed layer, logits) and ``shares`` (positive evidence per organ) per
    finding and method; ``coverage``: the part of the model's field of view the scan
    covers; ``notes``: warnings."""

    geometry: dict[str, Any]
    contributions: dict[str, Any]
    shares: dict[str, Any]
    coverage: float
    notes: list[str] = field(default_factory=list)


def _cell_regions(
    raw: dict[Pair, torch.Tensor],
    geometry: dict[str, Any],
    model_input: ModelInput,
    request: ArrayRequest,
    organs: np.ndarray | None,
    organ_names: dict[int, str] | None,
) -> dict[int, Any]:
    """``{id(grid): CellRegions}`` for every grid the maps lie on: the scan (and organs)
    pooled onto its cells. Preprocessing the separable path does not reproduce takes a
    region map through the preprocessing instead (kept as the grid's ``support``)."""
    grid = model_input.grid
    used = {id(geometry[m]): geometry[m] for f, m in raw}
    if not grid.fast:
        grid.support = support_on_model_grid(request.image, request.affine, organs, request.info)
        return {k: attribution.cell_regions(grid.support, g, organ_names) for k, g in used.items()}
    return {k: grid.cell_regions(g, organs, organ_names) for k, g in used.items()}


def _evidence_notes(shares: dict[str, Any], n_maps: int) -> list[str]:
    """Warnings for maps without positive evidence (all zeros), so none passes for a result."""
    empty = [f"{finding} ({method})" for finding, by_method in shares.items()
             for method, entry in by_method.items() if entry["no_positive_evidence"]]  # fmt: skip
    if n_maps and len(empty) == n_maps:
        return [
            "no explained map has positive evidence (every map is 0 or negative): the maps of "
            f"{', '.join(empty)} are all zeros"
        ]
    return [f"the map of {e} has no positive evidence (every cell is 0 or negative): "
            "it is all zeros" for e in empty]  # fmt: skip


def attribute(
    run: ExplainedPass,
    model_input: ModelInput,
    request: ArrayRequest,
    organs: np.ndarray | None,
    organ_names: dict[int, str] | None,
    verdict: Any,
) -> Attribution:
    """Contributions and organ shares of every raw map of ``run``; a segmentation model's
    bias counts once per voxel of the region (bias x region size)."""
    geometry = {
        m: model_input.identity if get_method(m).resolution == "input" else run.layer_geometry
        for m in request.methods
    }  # maps live on the layer's grid, or (guided methods) on the input grid itself
    regions_of = _cell_regions(run.raw, geometry, model_input, request, organs, organ_names)
    coverage = float(model_input.grid.inside().float().mean())
    notes = []
    if coverage < 0.5:
        notes.append(
            f"the scan covers only {100 * coverage:.2g} % of the model's field of view (the "
            "rest is padding the model sees as air); explanations of such a scan say little"
        )
    class_names = list(request.info.class_names)
    units = verdict.guaranteed and verdict.bias is not None
    contributions: dict[str, Any] = {}
    shares: dict[str, Any] = {}
    for (finding, method), cells in run.raw.items():
        regions = regions_of[id(geometry[method])]
        if method == "hirescam" and units:
            bias = verdict.bias[class_names.index(finding)]
            if run.region is not None:  # the bias per voxel over the region
                bias *= run.region_sizes[finding]
            contributions.setdefault(finding, {})[method] = attribution.contributions(
                cells, regions, run.logits[finding], bias
            )
        shares.setdefault(finding, {})[method] = attribution.positive_shares(cells, regions)
    notes += _evidence_notes(shares, len(run.raw))
    return Attribution(geometry, contributions, shares, coverage, notes)
