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

import numpy as np
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


def _shares_record(by_label: dict[str, float] | None, outside_scan: float) -> dict[str, Any]:
    """The shares record of :func:`positive_shares`; ``by_label`` None: no positive mass."""
    if by_label is None:
        return {
            "by_label": None,
            "by_group": None,
            "outside_labels": None,
            "outside_scan": None,
            "no_positive_evidence": True,
        }
    return {
        "by_label": by_label,
        "by_group": group_fractions(by_label),
        "outside_labels": max(0.0, 1.0 - sum(by_label.values())),
        "outside_scan": outside_scan,
        "no_positive_evidence": False,
    }


def positive_shares(raw: torch.Tensor, regions: CellRegions) -> dict[str, Any]:
    """Shares of the positive mass: ``{"by_label", "by_group", "outside_labels",
    "outside_scan", "no_positive_evidence"}``; shares are None without positive mass."""
    positive = raw.double().clamp_min(0)
    mass = float(positive.sum())
    if mass <= 0:
        return _shares_record(None, 0.0)
    by_label = {name: float((positive * s).sum()) / mass for name, s in regions.organs.items()}
    return _shares_record(by_label, float((positive * (1 - regions.inside)).sum()) / mass)


def voxel_label_sums(
    volume: np.ndarray, labels: np.ndarray, names: dict[int, str], slab: int = 1 << 23
) -> dict[str, Any]:
    """A map and an organ label map on one voxel grid (a map already on the scan's grid,
    no cells): ``{"by_organ", "outside_organs"}``, the map's sums per organ name and
    outside every label (the map's units), and ``"shares"``, the shares of its positive
    mass as :func:`positive_shares` gives them (nothing lies outside the scan here).

    ``volume`` and ``labels``: same shape, any memory order; read in slabs of ``slab``
    voxels, so no full-size temporary."""
    if volume.shape != labels.shape:
        raise ValueError(f"map {volume.shape} and labels {labels.shape} differ in shape")
    flat_v, flat_l = volume.reshape(-1, order="F"), labels.reshape(-1, order="F")
    n = int(labels.max()) + 1
    sums, positive = np.zeros(n), np.zeros(n)
    for start in range(0, flat_v.size, slab):
        v = flat_v[start : start + slab].astype(np.float64)
        lab = flat_l[start : start + slab].astype(np.intp)
        sums += np.bincount(lab, weights=v, minlength=n)
        positive += np.bincount(lab, weights=np.maximum(v, 0), minlength=n)
    by_organ: dict[str, float] = {}
    by_label: dict[str, float] = {}
    mass = float(positive.sum())
    for value, name in names.items():
        if 0 < value < n:
            by_organ[name] = by_organ.get(name, 0.0) + float(sums[value])
            by_label[name] = by_label.get(name, 0.0) + float(positive[value]) / max(mass, 1e-300)
    shares = _shares_record(by_label if mass > 0 else None, 0.0)
    return {"by_organ": by_organ, "outside_organs": float(sums[0]), "shares": shares}
