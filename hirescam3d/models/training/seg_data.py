"""What ``demo_seg`` learns from a phantom: its training seeds and the target masks, one per
network channel, shared by :mod:`~hirescam3d.models.training.train_seg` and
:mod:`~hirescam3d.models.training.tune_seg_masks`."""

from __future__ import annotations

import numpy as np
import torch

from hirescam3d.models.zoo import SEG_CHANNELS

SEG_SEED0 = 200_000


def seg_targets(organs: np.ndarray, organ_names: dict[int, str], findings: dict) -> np.ndarray:
    """Bool ``(len(SEG_CHANNELS), *organs.shape)``: one mask per channel of the network."""
    label_of = {name: k for k, name in organ_names.items()}
    out = np.zeros((len(SEG_CHANNELS), *organs.shape), dtype=bool)
    for c, name in enumerate(SEG_CHANNELS):
        if name in label_of:
            out[c] = organs == label_of[name]
        elif name in findings:
            out[c] = findings[name]
    return out


def pack(masks: np.ndarray) -> np.ndarray:
    """``(8, *S)`` bool -> ``(*S)`` uint8 with channel c in bit c."""
    bits = np.zeros(masks.shape[1:], dtype=np.uint8)
    for c, m in enumerate(masks):
        bits |= m.astype(np.uint8) << c
    return bits


def unpack(bits: torch.Tensor) -> torch.Tensor:
    """``(B, *S)`` uint8 -> float32 ``(B, 8, *S)`` (inverse of :func:`pack`)."""
    shifts = torch.arange(len(SEG_CHANNELS), dtype=torch.uint8).view(1, -1, *[1] * (bits.ndim - 1))
    return ((bits.unsqueeze(1) >> shifts) & 1).float()
