"""A segmentation bundle's mask post-processing: per-class probability thresholds and
removal of small connected components, as nnU-Net and MONAI bundles store with a model.

A bundle's metadata may hold, in its ``"hirescam3d"`` section::

    "mask_postprocessing": {
        "threshold": {"nodule": 0.7, ...},   # probability; classes not named: 0.5
        "min_voxels": {"nodule": 20, ...},   # components (face-connected) smaller are
        "chosen_on": "..."                   # removed; classes not named: none removed
    }

Class ``c``'s mask is ``sigmoid(logit_c) >= threshold_c`` (``logit_c >= log(t / (1 - t))``)
with every face-connected component of fewer than ``min_voxels_c`` voxels removed. Only
sigmoid (multi-label) heads: each channel is its own mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hirescam3d.errors import ModelError


@dataclass(frozen=True)
class MaskPostprocessing:
    """Per-class probability thresholds and smallest kept component sizes (voxels)."""

    threshold: dict[str, float] = field(default_factory=dict)
    min_voxels: dict[str, int] = field(default_factory=dict)
    chosen_on: str = ""

    @classmethod
    def from_dict(
        cls, data: Any, class_names: Sequence[str], where: str
    ) -> MaskPostprocessing:
        """Read and check the metadata entry; ModelError naming ``where`` if malformed."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: mask_postprocessing must be an object")
        threshold = data.get("threshold") or {}
        min_voxels = data.get("min_voxels") or {}
        for key, table in (("threshold", threshold), ("min_voxels", min_voxels)):
            if not isinstance(table, dict):
                raise ModelError(f"{where}: mask_postprocessing.{key} must be an object")
            unknown = sorted(set(table) - set(class_names))
            if unknown:
                raise ModelError(
                    f"{where}: mask_postprocessing.{key} names {', '.join(unknown)}, which "
                    f"the model does not output (classes: {', '.join(class_names)})"
                )
        for name, t in threshold.items():
            if not isinstance(t, (int, float)) or not 0 < float(t) < 1:
                raise ModelError(
                    f"{where}: mask_postprocessing.threshold.{name} must be a probability "
                    f"strictly between 0 and 1; got {t!r}"
                )
        for name, n in min_voxels.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ModelError(
                    f"{where}: mask_postprocessing.min_voxels.{name} must be a whole number "
                    f">= 0; got {n!r}"
                )
        return cls(
            {k: float(v) for k, v in threshold.items()},
            {k: int(v) for k, v in min_voxels.items()},
            str(data.get("chosen_on", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": dict(self.threshold), "min_voxels": dict(self.min_voxels),
                "chosen_on": self.chosen_on}  # fmt: skip

    def describe(self) -> str:
        """One line for reports: what makes a voxel part of a class's mask."""
        parts = [f"{k} >= {v:g}" for k, v in self.threshold.items()]
        sizes = [f"{k} {v}" for k, v in self.min_voxels.items() if v > 0]
        text = "sigmoid >= 0.5" + (f" ({', '.join(parts)})" if parts else "")
        if sizes:
            text += f"; components under N voxels removed ({', '.join(sizes)})"
        return text

    def logit_thresholds(self, class_names: Sequence[str]) -> torch.Tensor:
        """``(C,)`` float64: the logit each class's probability threshold corresponds to."""
        t = [self.threshold.get(n, 0.5) for n in class_names]
        return torch.tensor([math.log(p / (1 - p)) for p in t], dtype=torch.float64)

    def masks(self, logits: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Bool ``(B, C, *spatial)`` masks of logits ``(B, C, *spatial)``."""
        if logits.shape[1] != len(class_names):
            raise ValueError(f"logits have {logits.shape[1]} classes, not {len(class_names)}")
        cut = self.logit_thresholds(class_names).to(logits.device)
        out = logits.double() >= cut.view(1, -1, *[1] * (logits.ndim - 2))
        for c, name in enumerate(class_names):
            n = self.min_voxels.get(name, 0)
            if n > 1:
                for b in range(out.shape[0]):
                    out[b, c] = remove_small_components(out[b, c], n)
        return out


def remove_small_components(mask: torch.Tensor, min_voxels: int) -> torch.Tensor:
    """``mask`` ``(*spatial)`` bool without its face-connected components of fewer than
    ``min_voxels`` voxels (``scipy.ndimage.label``)."""
    from scipy import ndimage

    m = mask.detach().cpu().numpy()
    labels, n = ndimage.label(m)
    if n == 0:
        return mask.clone()
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return torch.from_numpy(keep[labels]).to(mask.device)
