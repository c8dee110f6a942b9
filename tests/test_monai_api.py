"""The monai.visualize-compatible classes, checked against MONAI itself."""

import pytest
import torch
from conftest import GapLinearNet, make_input
from monai.networks.nets import DenseNet121, resnet18
from monai.visualize import CAM as MonaiCAM
from monai.visualize import GradCAM as MonaiGradCAM
from monai.visualize.class_activation_maps import default_upsampler as monai_upsampler

from hirescam3d.monai_api import CAM, GradCAM, HiResCAM

# MONAI's GradCAM leaves its backward hooks on the network; they fire (and warn) when we
# differentiate the same network afterwards.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def identity(x):
    return x


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_agrees_with_monai(dims):
    torch.manual_seed(0)
    net = resnet18(spatial_dims=dims, n_input_channels=1, num_classes=5).eval()
    x = torch.randn(2, 1, *([32] * dims))
    theirs = MonaiGradCAM(net, "layer4", postprocessing=identity)(x, class_idx=3)
    # With MONAI's own upsampler injected, the output is MONAI's.
    same = dict(upsampler=monai_upsampler, postprocessing=identity)
    ours = GradCAM(net, "layer4", **same)(x, class_idx=3)
    assert ours.shape == theirs.shape == (2, 1, *x.shape[2:])
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    # class_idx=None: MONAI indexes logits[:, argmax_of_every_item] and sums, which mixes
    # the items' classes when B > 1; with one item both mean "the top class".
    theirs = MonaiGradCAM(net, "layer4", postprocessing=identity)(x[1:], class_idx=None)
    ours = GradCAM(net, "layer4", **same)(x[1:], class_idx=None)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_default_upsampling_puts_each_cell_on_its_receptive_field_centre():
    # MONAI's resnet18 (stem stride 1) has total stride 16 and padded convolutions: cell i
    # is centred on input voxel 16 i. MONAI stretches the grid instead (centre 16 i + 7.5).
    torch.manual_seed(0)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=5).eval()
    x = torch.randn(1, 1, 64, 48)
    cam = GradCAM(net, "layer4", postprocessing=identity)
    raw = cam.compute_map(x, class_idx=2)
    placed = cam(x, class_idx=2)
    assert raw.shape[2:] == (4, 3)
    for i in range(4):
        for j in range(3):
            assert torch.isclose(placed[0, 0, 16 * i, 16 * j], raw[0, 0, i, j], atol=1e-6)
    theirs = MonaiGradCAM(net, "layer4", postprocessing=identity)(x, class_idx=2)
    assert not torch.allclose(placed, theirs, atol=1e-3)


def test_gradcam_agrees_with_monai_on_densenet():
    torch.manual_seed(1)
    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    layer = "class_layers.relu"
    theirs = MonaiGradCAM(net, layer, postprocessing=identity)(x, class_idx=1)
    ours = GradCAM(net, layer, upsampler=monai_upsampler, postprocessing=identity)(
        x, class_idx=1
    )
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_cam_agrees_with_monai_after_normalisation():
    # MONAI's CAM adds the fc bias at every location; a shift that min-max removes.
    torch.manual_seed(2)
    net = GapLinearNet(3).eval()
    x = make_input(3)
    theirs = MonaiCAM(net, "features", fc_layers="fc")(x, class_idx=torch.tensor([2, 2]))
    ours = CAM(net, "features", fc_layers="fc")(x, class_idx=2)
    assert torch.allclose(ours, 1 - theirs, atol=1e-5)  # MONAI's default normaliser inverts


def test_default_normaliser_is_not_inverted_and_maps_in_unit_range():
    torch.manual_seed(3)
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=4).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    raw = HiResCAM(net, "layer4").compute_map(x, class_idx=[1, 2])
    maps = HiResCAM(net, "layer4")(x, class_idx=[1, 2])
    assert raw.shape == (2, 1, 1, 1, 1) or raw.shape[:2] == (2, 1)
    assert maps.shape == (2, 1, 32, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    for b in range(2):
        if raw[b].max() > raw[b].min():
            assert maps[b].max() == pytest.approx(1.0)


def test_feature_map_size_and_layer_idx():
    torch.manual_seed(4)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=4).eval()
    cam = HiResCAM(net, ["layer3", "layer4"])
    shapes = {}
    for name in ("layer3", "layer4"):
        getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape))
        )
    with torch.no_grad():
        net(torch.zeros(1, 1, 64, 64))
    assert tuple(cam.feature_map_size((1, 1, 64, 64), layer_idx=0)) == (1, 1, *shapes["layer3"][2:])
    assert tuple(cam.feature_map_size((1, 1, 64, 64))) == (1, 1, *shapes["layer4"][2:])
    assert shapes["layer3"][2:] != shapes["layer4"][2:]
