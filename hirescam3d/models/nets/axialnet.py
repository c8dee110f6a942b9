"""AxialNet (Draelos & Carin, RAD-ChestCT): a 2D trunk over slice triplets of a CT volume.

Data path for an input ``(B, 1, S, H, W)``:

1. cut the volume into ``T = S / 3`` groups of 3 consecutive axial slices, used as the
   3 channels of a 2D image: ``(B * T, 3, H, W)``;
2. a 2D ResNet-18-style trunk without pooling or classifier: ``(B * T, 512, 14, 14)``
   for 420 x 420 slices;
3. four 3 x 3 convolutions + ReLU, stride 1, no padding (512 -> 64 -> 32 -> 16 -> 16):
   ``(B * T, 16, 6, 6)``;
4. ``to_volume``: the same values in volume layout ``(B, F, T, h, w)``: the default
   explanation layer;
5. ``fc``: one ``Conv3d`` whose kernel covers a whole ``(1, h, w)`` triplet plane, i.e. a
   fully connected layer applied to each triplet: ``(B, n, T, 1, 1)``;
6. ``pool``: mean over the T triplets: logits ``(B, n)``.

Steps 4-6 are linear, so HiResCAM at ``to_volume`` (or the last ReLU, its alias in
per-triplet layout) is exactly each location's contribution to the logit.

Geometry: with valid reduce convolutions the ``h x w`` grid covers only the centre of
the slice (cell ``i`` sits over trunk cell ``i + 4``); :meth:`AxialNet.grid_geometry`
says where each cell lies, for placing maps on the scan.

``axialnet_tiny`` (the demo model) keeps the design but is sized for a CPU and for local
evidence: a 3-stage trunk of total stride 16 (128 -> 8 x 8) that downsamples with 2 x 2
max-pools, so the grid tiles the slice exactly, and 1 x 1 reduce convolutions with batch
norm, so each grid cell's evidence comes from a receptive field of about 130 pixels
instead of the whole slice. (With 3 x 3 reduce convolutions the trained model spread lung
and heart evidence across whole slices; with strided convolutions the grid sat half a
cell off the pixels it was drawn on.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from hirescam3d.errors import InputError
from hirescam3d.models.nets import TINY_KWARGS

SLICES_PER_TRIPLET = 3


def conv_out(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one axis."""
    return (n + 2 * padding - kernel) // stride + 1


def no_inplace(module: nn.Module) -> nn.Module:
    """Switch off in-place activations so every layer's output survives for hooks."""
    for m in module.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    return module


class ToVolume(nn.Module):
    """Reshape per-triplet features ``(B * T, F, h, w)`` to volume layout ``(B, F, T, h, w)``.

    A pure re-indexing. ``n_triplets`` is set by the owning network on each
    forward pass, before this module runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.n_triplets = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt, f, h, w = x.shape
        t = self.n_triplets
        return x.reshape(bt // t, t, f, h, w).permute(0, 2, 1, 3, 4).contiguous()


class TripletMean(nn.Module):
    """Mean of per-triplet logits ``(B, n, T, 1, 1)`` over T: ``(B, n)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


def make_trunk(
    widths: Sequence[int],
    blocks: Sequence[int],
    strides: Sequence[int],
    stem_stride: int,
    stem_pool: bool,
    stem_kernel: int = 7,
    end_pool: bool = False,
    pool_downsample: bool = False,
    in_channels: int = SLICES_PER_TRIPLET,
) -> nn.Sequential:
    """A 2D ResNet trunk (MONAI ``ResNetBlock``s) without pooling head or classifier.

    Children: ``stem`` (conv, BN, ReLU, optional max-pool), ``layer1`` .. ``layerN``.
    With ``pool_downsample`` every stride-2 step is a 2x2/2 max-pool (stages then run at
    stride 1), so grid cells stay centred on the input pixels they summarise.
    """
    pad = (stem_kernel - 1) // 2
    stem: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(in_channels, widths[0], stem_kernel, stem_stride, pad, bias=False)),
        ("bn", nn.BatchNorm2d(widths[0])),
        ("relu", nn.ReLU()),
    ]
    if stem_pool:
        pool = nn.MaxPool2d(2, 2) if pool_downsample else nn.MaxPool2d(3, stride=2, padding=1)
        stem.append(("pool", pool))
    layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(OrderedDict(stem)))]
    in_planes = widths[0]
    for i, (width, n_blocks, stride) in enumerate(zip(widths, blocks, strides, strict=True)):
        stage: list[nn.Module] = []
        if pool_downsample and stride != 1:
            stage.append(nn.MaxPool2d(stride, stride))
            stride = 1
        for j in range(n_blocks):
            s = stride if j == 0 else 1
            down = None
            if s != 1 or in_planes != width:
                down = nn.Sequential(
                    nn.Conv2d(in_planes, width, 1, stride=s, bias=False), nn.BatchNorm2d(width)
                )
            stage.append(ResNetBlock(in_planes, width, spatial_dims=2, stride=s, downsample=down))
            in_planes = width
        layers.append((f"layer{i + 1}", nn.Sequential(*stage)))
    if end_pool:
        layers.append(("pool", nn.MaxPool2d(2, stride=2)))
    trunk = nn.Sequential(OrderedDict(layers))
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return no_inplace(trunk)


def trunk_ops(cfg: dict) -> list[tuple[int, int, int]]:
    """``(kernel, stride, padding)`` of the ops that set size and alignment, input to grid.

    Stride-1 3x3 convolutions with padding 1 change neither, so they are left out.
    """
    k = cfg["stem_kernel"]
    pooled = cfg.get("pool_downsample", False)
    ops = [(k, cfg["stem_stride"], (k - 1) // 2)]
    if cfg["stem_pool"]:
        ops.append((2, 2, 0) if pooled else (3, 2, 1))
    for s in cfg["trunk_strides"]:
        if s != 1:
            ops.append((s, s, 0) if pooled else (3, s, 1))
    if cfg["trunk_pool"]:
        ops.append((2, 2, 0))
    ops += [(cfg["reduce_kernel"], 1, cfg["reduce_padding"])] * len(cfg["reduce_channels"])
    return ops


class AxialNet(nn.Module):
    """AxialNet for ``(B, 1, S, H, W)`` CT volumes -> logits ``(B, n_findings)``.

    Args:
        class_names: the findings, one logit each (multi-label, sigmoid).
        input_size: ``(S, H, W)`` the network is built for; ``H, W`` are fixed by ``fc``,
            ``S`` may vary but must be divisible by 3.
        trunk_widths, trunk_blocks, trunk_strides: per ResNet stage.
        stem_stride, stem_pool: stem conv stride and whether a 3x3/2 max-pool follows.
        reduce_channels: output channels of the reduce convolutions (four in the paper).
        reduce_norm: batch-normalise each of them before its ReLU (the last ReLU still
            comes last, so the guarantee at ``to_volume`` is unchanged).
        reduce_padding: zero padding of those convolutions. 0 is the original design:
            the valid convolutions shrink the grid (14 -> 6), and grid cell ``i`` sits over
            trunk cell ``i + 4``, i.e. the grid covers only the central part of the slice.
            1 keeps the trunk's grid, so the cells tile the whole slice.
        reduce_kernel: kernel size of those convolutions (3 originally; 1 keeps each grid
            cell's evidence local, adding nothing to the receptive field).
        stem_kernel: kernel size of the stem convolution (7 in ResNet).
        trunk_pool: end the trunk with a 2x2/2 max-pool (doubles the stride, keeps the
            receptive field small).
        pool_downsample: make every stride-2 step a 2x2/2 max-pool, so that grid cell
            ``i`` is centred on the middle of the input pixels it covers (strided 3x3
            convolutions centre it on the block's first pixel instead).

    The defaults are the full model (ResNet-18 trunk, 405 x 420 x 420 -> grid 135 x 6 x 6).
    """

    default_layer = "to_volume"

    def __init__(
        self,
        class_names: Sequence[str],
        input_size: Sequence[int] = (405, 420, 420),
        trunk_widths: Sequence[int] = (64, 128, 256, 512),
        trunk_blocks: Sequence[int] = (2, 2, 2, 2),
        trunk_strides: Sequence[int] = (1, 2, 2, 2),
        stem_stride: int = 2,
        stem_pool: bool = True,
        reduce_channels: Sequence[int] = (64, 32, 16, 16),
        reduce_norm: bool = False,
        reduce_padding: int = 0,
        reduce_kernel: int = 3,
        stem_kernel: int = 7,
        trunk_pool: bool = False,
        pool_downsample: bool = False,
    ) -> None:
        super().__init__()
        if len(input_size) != 3 or input_size[0] % SLICES_PER_TRIPLET:
            raise ValueError(
                f"input_size must be (S, H, W) with S divisible by 3; got {input_size}"
            )
        self.class_names = tuple(class_names)
        self.input_size = tuple(int(n) for n in input_size)
        self.input_ndim = 5
        # Constructor arguments as JSON data: a bundle's network_def rebuilds the network.
        self.config = {
            "class_names": list(self.class_names),
            "input_size": list(self.input_size),
            "trunk_widths": [int(n) for n in trunk_widths],
            "trunk_blocks": [int(n) for n in trunk_blocks],
            "trunk_strides": [int(n) for n in trunk_strides],
            "stem_stride": int(stem_stride),
            "stem_pool": bool(stem_pool),
            "reduce_channels": [int(n) for n in reduce_channels],
            "reduce_norm": bool(reduce_norm),
            "reduce_padding": int(reduce_padding),
            "reduce_kernel": int(reduce_kernel),
            "stem_kernel": int(stem_kernel),
            "trunk_pool": bool(trunk_pool),
            "pool_downsample": bool(pool_downsample),
        }
        self.trunk = make_trunk(
            trunk_widths, trunk_blocks, trunk_strides, stem_stride, stem_pool, stem_kernel,
            trunk_pool, pool_downsample,
        )  # fmt: skip
        convs: list[tuple[str, nn.Module]] = []
        in_ch = trunk_widths[-1]
        for i, out_ch in enumerate(reduce_channels):
            conv = nn.Conv2d(
                in_ch, out_ch, reduce_kernel, padding=reduce_padding, bias=not reduce_norm
            )
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            convs.append((f"conv{i + 1}", conv))
            if reduce_norm:
                convs.append((f"bn{i + 1}", nn.BatchNorm2d(out_ch)))
            convs.append((f"relu{i + 1}", nn.ReLU()))
            in_ch = out_ch
        self.reduce = nn.Sequential(OrderedDict(convs))
        h, w = self.input_size[1:]
        for k, st, p in trunk_ops(self.config):
            h, w = conv_out(h, k, st, p), conv_out(w, k, st, p)
        if h < 1 or w < 1:
            raise ValueError(f"input_size {input_size} is too small for this trunk")
        self.grid = (self.input_size[0] // SLICES_PER_TRIPLET, h, w)
        self.to_volume = ToVolume()
        self.fc = nn.Conv3d(in_ch, len(self.class_names), kernel_size=(1, h, w), stride=(1, h, w))
        self.pool = TripletMean()

    def grid_geometry(self) -> tuple[tuple[float, float], ...]:
        """Where the explanation grid lies in the input: ``(first_centre, step)`` per axis.

        In input voxels along (S, H, W): grid cell ``i`` is centred on voxel
        ``first_centre + i * step``. Along S a cell is one triplet (step 3). In-plane the
        step is the trunk stride; with valid reduce convolutions (the original design)
        the first cell sits ``4 * stride`` voxels in, so the grid does not span the slice.
        """
        step, centre = 1.0, 0.0
        for k, st, p in trunk_ops(self.config):
            # Output j of (k, st, p) reads inputs j*st - p .. j*st - p + k - 1.
            centre += step * ((k - 1) / 2 - p)
            step *= st
        return ((1.0, 3.0), (centre, step), (centre, step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, H, W)`` -> logits ``(B, n_findings)``."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(
                f"AxialNet expects a (B, 1, S, H, W) CT volume; got shape {tuple(x.shape)}"
            )
        b, _, s, hh, ww = x.shape
        if s % SLICES_PER_TRIPLET or s == 0:
            raise InputError(f"AxialNet needs a slice count divisible by 3; got {s} slices")
        if (hh, ww) != self.input_size[1:]:
            raise InputError(
                f"AxialNet was built for {self.input_size[1]} x {self.input_size[2]} slices; "
                f"got {hh} x {ww} (resample/crop the scan to the model's input size)"
            )
        t = s // SLICES_PER_TRIPLET
        triplets = x.reshape(b * t, SLICES_PER_TRIPLET, hh, ww)
        feats = self.reduce(self.trunk(triplets))
        self.to_volume.n_triplets = t
        return self.pool(self.fc(self.to_volume(feats)))


def axialnet_tiny(class_names: Sequence[str]) -> AxialNet:
    """AxialNet scaled for CPU: 96 x 128 x 128 input, explanation grid (32, 8, 8).

    Trunk widths 16/32/64 (one basic block each, total stride 16; a 4 x 4 stride-2 stem
    and 2 x 2 max-pools do all downsampling, so grid cell ``i`` is centred on input pixels
    ``16 i .. 16 i + 15``), then four 1 x 1 reduce convolutions with batch norm
    (32 -> 16 -> 16 -> 16 channels).
    """
    return AxialNet(class_names, **TINY_KWARGS)
