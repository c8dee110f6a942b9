"""Contributions and shares of an explanation, per region, on the explanation grid.

Each explanation cell covers a *tile* of the model's input (see
:mod:`hirescam3d.core.postprocess`). A region map on the model's input grid (0 outside the
scan, 1 inside it, ``label + 1`` inside organ ``label``) is pooled once per cell into
the share of the cell's tile in each region, so a cell lying across an organ border is
split between the organs by how much of its tile lies in each. Sums over cells then
add up exactly: organ parts + the rest of the scan + what lies outside the scan =
the whole. This is also the AxialNet authors' convention of scoring at feature
resolution, and far cheaper than working on full-resolution maps.

Two readings of a raw map ``(*grid)``:

- :func:`contributions`: HiResCAM at a layer where the guarantee holds is each cell's
  additive contribution to the logit, so the parts are in logits and
  ``total + bias = logit``;
- :func:`positive_shares`: any method; the share of the map's positive mass in each
  region (what the organ fractions of display maps mean). A map with no positive value
  has no shares: it is reported as "no positive evidence".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hirescam3d.core.organ_groups import group_fractions
from hirescam3d.core.postprocess import pool_to_cells
from hirescam3d.core.trace import LayerGeometry


@dataclass
class CellRegions:
    """Per cell ``(*grid)``: the share of its tile inside the scan and in each organ."""

    inside: torch.Tensor
    organs: dict[str, torch.Tensor]


def cell_regions(
    support: torch.Tensor, geometry: LayerGeometry, names: dict[int, str] | None = None
) -> CellRegions:
    """Pool a region map ``(*input)`` (0 outside the scan, 1 scan, ``label + 1`` organ)
    on the model's input grid into per-cell shares. Labels sharing a name are summed."""
    support = support.to(torch.int64)
    counts = torch.bincount(support.flatten())
    values = [v for v in range(2, len(counts)) if counts[v] > 0]
    masks = torch.stack([support > 0] + [support == v for v in values]).float()
    pooled = pool_to_cells(masks, geometry).double()  # one pass: the scan and every label
    organs: dict[str, torch.Tensor] = {}
    for value, share in zip(values, pooled[1:], strict=True):
        name = (names or {}).get(value - 1, f"label_{value - 1}")
        organs[name] = organs[name] + share if name in organs else share
    inside = pooled[0]
    return CellRegions(inside, organs)


def contributions(
    raw: torch.Tensor, regions: CellRegions, logit: float, bias: float
) -> dict[str, Any]:
    """HiResCAM contributions in logits: ``{"unit", "logit", "bias", "total",
    "outside_scan", "by_organ", "outside_organs"}``.

    ``total`` is the sum of the cells (the logit minus ``bias``, the score with the
    layer's output set to 0); ``outside_scan + outside_organs + sum(by_organ) = total``.
    """
    raw = raw.double()
    total = float(raw.sum())
    by_organ = {name: float((raw * share).sum()) for name, share in regions.organs.items()}
    in_organs = sum(regions.organs.values()) if regions.organs else torch.zeros_like(raw)
    return {
        "unit": "logit",
        "logit": float(logit),
        "bias": float(bias),
        "total": total,
        "outside_scan": float((raw * (1 - regions.inside)).sum()),
        "by_organ": by_organ,
        "outside_organs": float((raw * (regions.inside - in_organs)).sum()),
    }


def positive_shares(raw: torch.Tensor, regions: CellRegions) -> dict[str, Any]:
    """Shares of the positive mass: ``{"by_label", "by_group", "outside_labels",
    "outside_scan", "no_positive_evidence"}``; shares are None without positive mass."""
    positive = raw.double().clamp_min(0)
    mass = float(positive.sum())
    if mass <= 0:
        return {
            "by_label": None,
            "by_group": None,
            "outside_labels": None,
            "outside_scan": None,
            "no_positive_evidence": True,
        }
    by_label = {name: float((positive * s).sum()) / mass for name, s in regions.organs.items()}
    return {
        "by_label": by_label,
        "by_group": group_fractions(by_label),
        "outside_labels": max(0.0, 1.0 - sum(by_label.values())),
        "outside_scan": float((positive * (1 - regions.inside)).sum()) / mass,
        "no_positive_evidence": False,
    }
