"""ResNet-34v and DenseNet-121v: the HiResCAM paper's PASCAL VOC models (appendix 7.1).

Standard ResNet-34 / DenseNet-121 convolutional layers, then ``head``: a 2x2 convolution
to 512 maps (stride 1, no padding), then ``flatten`` and one ``fc`` linear layer to the
classes. No global pooling, so HiResCAM and Grad-CAM differ (with pooling both reduce
to CAM). For 224 x 224 inputs the features are 7 x 7 and the head output 512 x 6 x 6.
Built untrained (no downloads): architectures for users' own training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from hirescam3d.errors import InputError
from hirescam3d.models.nets import VOC_CLASSES
from hirescam3d.models.nets.axialnet import conv_out, no_inplace

BACKBONES = ("resnet18", "resnet34", "densenet121")


def resnet_features(depth: int, spatial_dims: int, in_channels: int) -> tuple[nn.Sequential, int]:
    """Convolutional layers of a standard ResNet-18/34 (MONAI blocks): ``(module, channels)``.

    Children: ``conv1, bn1, act, maxpool, layer1 .. layer4``; total stride 32.
    """
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    net = ResNet(
        block="basic",
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        feed_forward=False,
        bias_downsample=False,
    )
    names = ["conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    features = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    return no_inplace(features), 512


def densenet_features(spatial_dims: int, in_channels: int) -> tuple[nn.Sequential, int]:
    """Convolutional layers of a standard DenseNet-121 plus its final ReLU (``relu5``).

    Children: ``conv0, norm0, relu0, pool0, denseblock1 .. denseblock4, transition1 ..
    transition3, norm5, relu5``; total stride 32, 1024 channels.
    """
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    features = net.features
    features.add_module("relu5", nn.ReLU())
    return no_inplace(features), 1024


def backbone_features(
    backbone: str, spatial_dims: int, in_channels: int
) -> tuple[nn.Sequential, int]:
    """``(features, channels)`` for one of :data:`BACKBONES`."""
    if backbone == "resnet18":
        return resnet_features(18, spatial_dims, in_channels)
    if backbone == "resnet34":
        return resnet_features(34, spatial_dims, in_channels)
    if backbone == "densenet121":
        return densenet_features(spatial_dims, in_channels)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def features_out(backbone: str, n: int) -> int:
    """Feature-map length along one axis for input length ``n`` (stride-32 backbones)."""
    n = conv_out(conv_out(n, 7, 2, 3), 3, 2, 1)  # stem conv + max-pool
    for _ in range(3):  # ResNet stride-2 3x3 convs, or DenseNet 2x2/2 average pools
        n = conv_out(n, 3, 2, 1) if backbone.startswith("resnet") else n // 2
    return n


class VOCNet(nn.Module):
    """``features -> head (2x2 conv, 512) -> flatten -> fc``: ``(B, 3, H, W)`` -> ``(B, C)``.

    Args:
        backbone: ``"resnet34"`` (ResNet-34v) or ``"densenet121"`` (DenseNet-121v).
        class_names: one logit per class (default: the 20 PASCAL VOC classes).
        input_size: ``(H, W)``; fixed by ``fc``.
        head_channels: output maps of the 2x2 convolution (512 in the paper).
    """

    default_layer = "head"

    def __init__(
        self,
        backbone: str = "resnet34",
        class_names: Sequence[str] = VOC_CLASSES,
        input_size: Sequence[int] = (224, 224),
        in_channels: int = 3,
        head_channels: int = 512,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.class_names = tuple(class_names)
        self.input_size = tuple(int(n) for n in input_size)
        self.input_ndim = 4
        self.config = {
            "backbone": backbone,
            "class_names": list(self.class_names),
            "input_size": list(self.input_size),
            "in_channels": int(in_channels),
            "head_channels": int(head_channels),
        }
        self.features, channels = backbone_features(backbone, 2, in_channels)
        h, w = (features_out(backbone, n) - 1 for n in self.input_size)
        if h < 1 or w < 1:
            raise ValueError(f"input_size {input_size} is too small for {backbone}")
        self.grid = (h, w)
        self.head = nn.Conv2d(channels, head_channels, kernel_size=2, stride=1, padding=0)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(head_channels * h * w, len(self.class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> logits ``(B, n_classes)``."""
        if x.ndim != 4 or tuple(x.shape[2:]) != self.input_size:
            raise InputError(
                f"{self.backbone}v expects (B, 3, {self.input_size[0]}, {self.input_size[1]}) "
                f"images; got shape {tuple(x.shape)} (resize to the model's input size)"
            )
        return self.fc(self.flatten(self.head(self.features(x))))
