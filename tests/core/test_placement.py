"""Placement of raw maps on the input by the network's own geometry (2D and 3D).

Oracles: hand-computed receptive-field centres, F.interpolate where the grid tiles the
input exactly, and impulse inputs through averaging networks, whose true answer is the
impulse position.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18
from torch import nn

from hirescam3d import Explainer
from hirescam3d.core import postprocess
from hirescam3d.models.nets.axialnet import AxialNet, axialnet_tiny
from hirescam3d.models.zoo import CHEST_FINDINGS

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def averaging(conv: nn.Module) -> nn.Module:
    """All weights 1 / (kernel volume): the layer averages its receptive field."""
    with torch.no_grad():
        conv.weight.fill_(1.0 / conv.weight[0].numel())
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


class AveragingNet(nn.Module):
    """Averaging convolutions ("features"), flatten, one linear layer of ones."""

    def __init__(self, dims: int, size: tuple[int, ...], kind: str):
        super().__init__()
        conv = CONV[dims]
        if kind == "valid":  # valid convolutions shrink the grid from both sides
            layers = [conv(1, 1, 5), conv(1, 1, 3, stride=2), conv(1, 1, 3)]
        elif kind == "strided":  # ResNet-style: 3x3 stride-2 padding-1
            layers = [conv(1, 1, 3, stride=2, padding=1) for _ in range(3)]
        else:  # dilated
            layers = [conv(1, 1, 3, dilation=2), conv(1, 1, 3, stride=2, dilation=3)]
        self.features = nn.Sequential(*[averaging(m) for m in layers])
        with torch.no_grad():
            n = self.features(torch.zeros(1, 1, *size)).numel()
        self.fc = nn.Linear(n, 1)
        with torch.no_grad():
            self.fc.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def centroid(volume: torch.Tensor) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in volume.shape],
                           indexing="ij")
    w = volume.double().clamp_min(0)
    return torch.stack([(g * w).sum() / w.sum() for g in grids])


CASES = [
    (2, (37, 41), "valid"),
    (2, (50, 45), "strided"),
    (2, (47, 39), "dilated"),
    (3, (21, 26, 23), "valid"),
    (3, (26, 19, 30), "strided"),
]


@pytest.mark.parametrize(("dims", "size", "kind"), CASES)
def test_impulse_lands_where_it_was(dims, size, kind):
    net = AveragingNet(dims, size, kind).eval()
    explainer = Explainer(net, "features")
    g = torch.Generator().manual_seed(dims + len(kind))
    geometry = explainer.geometry(torch.zeros(1, 1, *size))
    for _ in range(4):
        # impulses well inside the region that the grid covers
        centres = geometry.centres()
        p = [int(torch.randint(int(c[1]), int(c[-2]) + 1, (1,), generator=g)) for c in centres]
        x = torch.zeros(1, 1, *size)
        x[(0, 0, *p)] = 1.0
        result = explainer(x, targets=0)
        half_cell = torch.tensor(geometry.steps, dtype=torch.float64) / 2
        error = (centroid(result.maps[0, 0]) - torch.tensor(p, dtype=torch.float64)).abs()
        assert (error <= half_cell).all(), (kind, p, error.tolist(), geometry.steps)


def test_stretching_misplaces_valid_convolution_maps():
    """The old upsampling (stretch over the whole input) fails the same check."""
    size = (37, 41)
    net = AveragingNet(2, size, "valid").eval()
    explainer = Explainer(net, "features")
    x = torch.zeros(1, 1, *size)
    x[0, 0, 8, 9] = 1.0
    result = explainer(x, targets=0)
    stretched = postprocess.unit_maps(result.raw, postprocess.stretch_geometry(
        result.raw.shape[2:], size))
    error = (centroid(stretched[0, 0]) - torch.tensor([8.0, 9.0], dtype=torch.float64)).abs()
    assert (error > torch.tensor(result.geometry.steps) / 2).any()


def test_hand_computed_geometry_of_strided_valid_and_dilated_layers():
    # conv 5 valid: centre +2; conv 3 stride 2: +1, step 2; conv 3 valid at step 2: +2.
    geo = Explainer(AveragingNet(2, (37, 41), "valid"), "features").geometry(
        torch.zeros(1, 1, 37, 41)
    )
    assert geo.firsts == (5.0, 5.0) and geo.steps == (2.0, 2.0)
    assert geo.grid_shape == (14, 16)  # 37 -> 33 -> 16 -> 14, 41 -> 37 -> 18 -> 16
    # dilation 2 kernel 3: +2; then dilation 3 kernel 3 stride 2: +3, step 2.
    geo = Explainer(AveragingNet(2, (47, 39), "dilated"), "features").geometry(
        torch.zeros(1, 1, 47, 39)
    )
    assert geo.firsts == (5.0, 5.0) and geo.steps == (2.0, 2.0)
    # 3x3 stride-2 padding-1, three times: cell i centred on input 8 i (not 8 i + 3.5)
    geo = Explainer(AveragingNet(2, (50, 45), "strided"), "features").geometry(
        torch.zeros(1, 1, 50, 45)
    )
    assert geo.firsts == (0.0, 0.0) and geo.steps == (8.0, 8.0)
    assert geo.grid_shape == (7, 6)


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_resnet18_cells_are_centred_on_multiples_of_32(dims):
    net = resnet18(spatial_dims=dims, n_input_channels=1, num_classes=3, conv1_t_stride=2).eval()
    size = (96, 64, 80)[:dims] if dims == 3 else (100, 70)
    geo = Explainer(net, "layer4").geometry(torch.zeros(1, 1, *size))
    assert geo.firsts == (0.0,) * dims and geo.steps == (32.0,) * dims
    assert geo.grid_shape == tuple((n + 31) // 32 for n in size)


def test_axialnet_grid_geometry_agrees_with_the_trace():
    for net, size in (
        (AxialNet(CHEST_FINDINGS), (6, 420, 420)),
        (axialnet_tiny(CHEST_FINDINGS), (96, 128, 128)),
    ):
        geo = Explainer(net.eval(), "to_volume").geometry(torch.zeros(1, 1, *size))
        assert tuple(zip(geo.firsts, geo.steps, strict=True)) == net.grid_geometry()
    # full AxialNet: the 6 x 6 cells sit at pixels 128 .. 288 of the 420-pixel slice
    assert geo is not None


def test_full_axialnet_centres_cover_only_the_middle_of_the_slice():
    net = AxialNet(CHEST_FINDINGS).eval()
    geo = Explainer(net, "to_volume").geometry(torch.zeros(1, 1, 6, 420, 420))
    assert geo.centres()[1] == [128.0, 160.0, 192.0, 224.0, 256.0, 288.0]
    assert geo.centres()[0] == [1.0, 4.0]


def test_resnet34v_head_cells_are_centred_at_16_plus_32i():
    from hirescam3d.models import zoo

    net, info = zoo.load("resnet34v")
    geo = Explainer(net, info.target_layer).geometry(torch.zeros(1, 3, 224, 224))
    assert geo.centres() == [[16.0 + 32 * i for i in range(6)]] * 2


@pytest.mark.parametrize("size", [(16,), (16, 12), (8, 16, 12)])
def test_exact_tiling_placement_equals_interpolate(size):
    grid = tuple(n // 4 for n in size)
    maps = torch.rand(2, 3, *grid)
    geometry = postprocess.stretch_geometry(grid, size)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    expected = F.interpolate(maps, size=size, mode=mode, align_corners=False)
    assert torch.allclose(postprocess.place(maps, geometry), expected, atol=1e-6)


def test_place_holds_to_tile_edge_and_is_zero_beyond():
    # 3 cells centred at 10, 14, 18 (step 4) on a 30-voxel axis: tiles 8 .. 20
    from hirescam3d.core.trace import AxisGeometry, LayerGeometry

    geo = LayerGeometry((3,), (30,), (AxisGeometry(0, 10.0, 4.0, 4.0),))
    out = postprocess.place(torch.tensor([[[1.0, 3.0, 2.0]]]), geo)[0, 0]
    assert torch.equal(out[:8], torch.zeros(8)) and torch.equal(out[20:], torch.zeros(10))
    assert out[8] == 1.0 and out[10] == 1.0 and out[12] == 2.0 and out[14] == 3.0
    assert out[16] == 2.5 and out[19] == 2.0


def test_density_preserves_the_sum_and_reports_what_falls_outside():
    from hirescam3d.core.trace import AxisGeometry, LayerGeometry

    # cells at 0, 8, 16, 24 with step 8 on a 30-voxel axis (voxel edges -0.5 .. 29.5):
    # tile 0 spans -4 .. 4, of which 4.5 voxels are inside; tiles 1-3 lie inside.
    geo = LayerGeometry((4,), (30,), (AxisGeometry(0, 0.0, 8.0, 8.0),))
    raw = torch.tensor([[[2.0, -1.0, 3.0, 4.0]]], dtype=torch.float64)
    fractions = postprocess.cell_fractions(geo)
    assert torch.allclose(fractions, torch.tensor([4.5 / 8, 1.0, 1.0, 1.0], dtype=torch.float64))
    dens = postprocess.density(raw, geo)
    assert torch.isclose(dens.sum(), (raw * fractions).sum())
    assert torch.allclose(dens[0, 0, :4], torch.full((4,), 2.0 / 8, dtype=torch.float64))
    assert dens[0, 0, 29] == 0 and torch.isclose(dens[0, 0, 28], torch.tensor(4.0 / 16).double())
    # 2D/3D: the sum of the density is the sum of raw * fractions
    g3 = postprocess.stretch_geometry((4, 3, 5), (16, 12, 20))
    raw3 = torch.randn(1, 2, 4, 3, 5, dtype=torch.float64)
    assert torch.allclose(postprocess.density(raw3, g3).sum((2, 3, 4)), raw3.sum((2, 3, 4)))


class Im2ColNet(nn.Module):
    """A 2D 4x4 stride-4 averaging convolution written as unfold + matmul (im2col): the
    trace cannot follow unfold, so the geometry is measured by the gradient probe."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(8 * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, kernel_size=4, stride=4)  # (B, 16, 64)
        maps = (cols.mean(1, keepdim=True) ** 2).reshape(x.shape[0], 1, 8, 8)
        return self.fc(self.features(maps).flatten(1))


def test_probe_measures_what_the_trace_cannot_follow():
    explainer = Explainer(Im2ColNet().eval(), "features")
    geo = explainer.geometry(torch.zeros(1, 1, 32, 32))
    assert geo.source == "probe"
    # block i covers pixels 4i .. 4i + 3: centre 4i + 1.5
    assert geo.firsts == (1.5, 1.5) and geo.steps == (4.0, 4.0)
