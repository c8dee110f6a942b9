"""CAM-architecture baselines: convolutional features -> global average pooling -> one linear.

For this architecture CAM, Grad-CAM and HiResCAM coincide (up to a constant factor) at
the last feature block, and all three are faithful there: pooling and the linear layer
are linear. 2D and 3D versions of MONAI's ResNet-18 and DenseNet-121 features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hirescam3d.errors import InputError
from hirescam3d.models.nets.voc import backbone_features


class CAMNet(nn.Module):
    """``features -> pool (GAP) -> flatten -> fc``: ``(B, C_in, *spatial)`` -> ``(B, C)``.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"densenet121"``.
        class_names: one logit per class.
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for CT, 3 for photographs).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        backbone: str = "resnet18",
        spatial_dims: int = 3,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
        self.backbone = backbone
        self.class_names = tuple(class_names)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.input_ndim = spatial_dims + 2
        self.config = {
            "class_names": list(self.class_names),
            "backbone": backbone,
            "spatial_dims": int(spatial_dims),
            "in_channels": int(in_channels),
        }
        self.features, channels = backbone_features(backbone, spatial_dims, in_channels)
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.pool = pool(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, len(self.class_names))

    @property
    def default_layer(self) -> str:
        """The last feature block's output (after its ReLU)."""
        return "features.layer4" if self.backbone.startswith("resnet") else "features.relu5"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial)`` -> logits ``(B, n_classes)``."""
        if x.ndim != self.input_ndim or x.shape[1] != self.in_channels:
            raise InputError(
                f"this {self.spatial_dims}D CAM network expects (B, {self.in_channels}, "
                f"{', '.join('*' * self.spatial_dims)}) input; got shape {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < 32:
            raise InputError(
                f"input spatial size {tuple(x.shape[2:])} is too small: each axis needs at "
                "least 32 voxels (the features have total stride 32)"
            )
        return self.fc(self.flatten(self.pool(self.features(x))))
