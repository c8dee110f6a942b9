"""What the metric modules share: input checks, the model's device and the targets type."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hirescam3d.errors import InputError

TargetsArg = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def spatial_dims(maps: torch.Tensor, name: str = "maps") -> int:
    """The number of spatial dims (1 to 3) of ``(B, K, *S)`` ``maps``; InputError if not."""
    if not isinstance(maps, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, not {type(maps).__name__}")
    nd = maps.ndim - 2
    if not 1 <= nd <= 3:
        raise InputError(
            f"{name} must be (B, K, *spatial) with 1 to 3 spatial dims; got {tuple(maps.shape)}"
        )
    return nd


def as_float(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` as float32, unless already float32 or float64."""
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU if it has none."""
    for p in model.parameters():
        return p.device
    for buf in model.buffers():
        return buf.device
    return torch.device("cpu")
