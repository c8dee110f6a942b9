"""Similarity of two maps: the HiResCAM paper's Table 1 distance to the exact contributions
(:func:`l2_to_exact`) and the Spearman rank correlation (:func:`spearman`)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from hirescam3d.core import postprocess
from hirescam3d.errors import InputError
from hirescam3d.evaluate.metrics._common import spatial_dims

__all__ = ["l2_to_exact", "spearman"]

Normalization = Literal["relu-minmax", "relu-max", "minmax", "none"]


def _normalise(maps: torch.Tensor, how: Normalization, nd: int) -> torch.Tensor:
    if how == "relu-minmax":
        return postprocess.normalize(maps.clamp_min(0), nd)
    if how == "relu-max":
        return postprocess.scale_to_max(maps.clamp_min(0), nd)
    if how == "minmax":
        return postprocess.normalize(maps, nd)
    if how == "none":
        return maps
    raise InputError(
        f"unknown normalization {how!r}; use 'relu-minmax', 'relu-max', 'minmax' or 'none'"
    )


def l2_to_exact(
    raw: torch.Tensor, exact: torch.Tensor, normalization: Normalization = "relu-minmax"
) -> torch.Tensor:
    """The HiResCAM paper's Table 1 distance between a method's map and the truth.

    Args:
        raw: ``(B, K, *S)`` a method's raw map on the explained layer's grid
            (``ExplanationResult.raw``).
        exact: ``(B, K, *S)`` the exact per-location contributions on the same grid
            (``sum_f W_k[f, s] * A[f, s]`` for a network ending in one linear layer).
        normalization: how both maps are normalised before the distance.

    Returns:
        ``(B, K)`` float32: ``|| norm(raw) - norm(exact) ||_2`` over the cells
        (dimensionless; at most ``sqrt(N)`` for N cells).

    Normalisation (default ``"relu-minmax"``): each map is passed through a ReLU and
    min-max scaled to [0, 1] over its cells (a map with no positive value becomes all
    zeros), then the L2 norm of the difference is taken over the cells of the explained
    layer's grid, before any upsampling. The paper does not spell out Table 1's
    normalisation; this is the post-processing it gives for every explanation (section
    3.3: "applying a ReLU and normalizing the attention values to the range [0, 1]";
    section 3.1: explanations have values in [0, 1]). Its reported distances (0.6 to 3.0)
    are of the size expected of [0, 1] maps over a feature grid of a few hundred cells,
    not over input pixels. Any normalisation applied to both maps leaves HiResCAM at 0
    on a network ending in one linear layer. ``"relu-max"`` divides by the maximum
    instead (the same unless every cell is positive), ``"minmax"`` skips the ReLU,
    ``"none"`` compares raw values (logits for HiResCAM).
    """
    nd = spatial_dims(raw, "raw")
    if not isinstance(exact, torch.Tensor) or exact.shape != raw.shape:
        shape = tuple(exact.shape) if isinstance(exact, torch.Tensor) else type(exact).__name__
        raise InputError(f"exact {shape} must have the shape of raw {tuple(raw.shape)}")
    a = _normalise(raw.double(), normalization, nd)
    e = _normalise(exact.to(device=raw.device, dtype=torch.float64), normalization, nd)
    return (a - e).flatten(2).pow(2).sum(-1).sqrt().to(torch.float32)


# -- rank correlation ------------------------------------------------------------------------
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 along the last axis of ``(M, N)``; tied values share their mean rank."""
    m, n = x.shape
    values, order = x.sort(dim=-1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.cumsum(-1) - 1  # tie group of each sorted position
    pos = torch.arange(n, dtype=torch.float64, device=x.device).expand(m, n)
    sums = torch.zeros(m, n, dtype=torch.float64, device=x.device).scatter_add_(1, group, pos)
    counts = torch.zeros_like(sums).scatter_add_(1, group, torch.ones_like(pos))
    mean = sums / counts.clamp_min(1)
    ranks = torch.empty(m, n, dtype=torch.float64, device=x.device)
    return ranks.scatter_(1, order, mean.gather(1, group))


def spearman(a: torch.Tensor, b: torch.Tensor, spatial_dims: int | None = None) -> torch.Tensor:
    """Spearman rank correlation of ``a`` and ``b`` over their last ``spatial_dims`` axes.

    Args:
        a: ``(..., *S)`` maps.
        b: ``(..., *S)``, the same shape as ``a``.
        spatial_dims: the number of trailing axes to correlate over; defaults to
            ``a.ndim - 2`` (maps ``(B, K, *S)``).

    Returns:
        ``(...)`` float32 in [-1, 1]: Pearson's correlation of the ranks, ties given
        their average rank (as ``scipy.stats.spearmanr``). NaN where either map is
        constant (its ranks have no variance).
    """
    if a.shape != b.shape:
        raise InputError(f"cannot correlate maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    nd = a.ndim - 2 if spatial_dims is None else spatial_dims
    lead = a.shape[: a.ndim - nd]
    ra = _average_ranks(a.detach().reshape(math.prod(lead), -1))
    rb = _average_ranks(b.detach().to(a.device).reshape(math.prod(lead), -1))
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()
    rho = torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), math.nan)
    return rho.clamp(-1, 1).reshape(lead).to(torch.float32)
