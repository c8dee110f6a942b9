"""Post-processing of raw maps ``(B, K, *S)``: ReLU, min-max, n-D upsampling.

Each step is optional and separate, so callers choose what a map means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def relu(maps: torch.Tensor) -> torch.Tensor:
    """Keep the positive evidence only."""
    return maps.clamp_min(0)


def normalize(maps: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Min-max each map over its last ``spatial_dims`` axes to [0, 1].

    The maximum maps to 1 (not inverted, unlike MONAI's ``default_normalizer``).
    A constant map (all zeros included) becomes all zeros, never NaN.
    """
    flat = maps.flatten(start_dim=maps.ndim - spatial_dims)
    lo = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return out.reshape(maps.shape)


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(B, K, *S)`` maps to ``(B, K, *size)`` with (bi/tri)linear interpolation.

    Uses ``align_corners=False``: each map cell covers the same share of the
    input as its receptive grid cell. Linear interpolation keeps values in the
    range of the input, so a [0, 1] map stays in [0, 1].
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = _MODES.get(len(size))
    if mode is None or maps.ndim != len(size) + 2:
        raise ValueError(f"cannot upsample maps of shape {tuple(maps.shape)} to size {size}")
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def to_unit_maps(raw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The default chain for display: ReLU -> upsample -> min-max to [0, 1]."""
    return normalize(upsample(relu(raw), size), spatial_dims=len(size))
