"""The monai.visualize-compatible classes, checked against MONAI itself."""

import functools

import monai.visualize.class_activation_maps as monai_cam_module
import pytest
import torch
from monai.networks.nets import DenseNet, DenseNet121, SEResNet50, resnet18
from monai.visualize import CAM as MonaiCAM
from monai.visualize import GradCAM as MonaiGradCAM
from monai.visualize import GradCAMpp as MonaiGradCAMpp
from monai.visualize.class_activation_maps import default_upsampler as monai_upsampler
from torch import nn

from hirescam3d.monai.visualize import CAM, GradCAM, GradCAMpp, HiResCAM, ModelView
from tests.conftest import GapLinearNet, make_input

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


# -- MONAI's own scenarios (tests/visualize/test_vis_gradcam.py, test_vis_cam.py), re-run
# with our classes in place of monai.visualize's. Each entry: model, input shape, raw map
# shape (feature_map_size), target layer, fc layer (CAM).
class DenseNetAdjoint(DenseNet121):
    """MONAI's adjoint scenario: ``__call__`` itself takes a required extra argument."""

    def __call__(self, x, adjoint_info):
        if adjoint_info != 42:
            raise ValueError("adjoint_info must be 42")
        return super().__call__(x)


def _small_densenet3d(out_channels):
    return DenseNet(
        spatial_dims=3, in_channels=1, out_channels=out_channels, init_features=2,
        growth_rate=2, block_config=(6,),
    )


MONAI_MODELS = {
    "densenet2d": lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3),
    "densenet2d_bin": lambda: DenseNet(spatial_dims=2, in_channels=1, out_channels=1),
    "densenet3d": lambda: _small_densenet3d(3),
    "densenet3d_bin": lambda: _small_densenet3d(1),
    "senet2d": lambda: SEResNet50(spatial_dims=2, in_channels=3, num_classes=4),
    "senet2d_bin": lambda: SEResNet50(spatial_dims=2, in_channels=3, num_classes=1),
    "senet3d": lambda: SEResNet50(spatial_dims=3, in_channels=3, num_classes=4),
    "senet3d_bin": lambda: SEResNet50(spatial_dims=3, in_channels=3, num_classes=1),
    "adjoint": lambda: DenseNetAdjoint(spatial_dims=2, in_channels=1, out_channels=3),
}
DENSE = ("class_layers.relu", "class_layers.out")
SENET = ("layer4", "last_linear")
MONAI_SCENARIOS = {  # name: (input shape, feature_map_size, (target layer, fc layer))
    "densenet2d": ((2, 1, 48, 64), (2, 1, 1, 2), DENSE),
    "densenet2d_bin": ((2, 1, 48, 64), (2, 1, 1, 2), DENSE),
    "densenet3d": ((2, 1, 6, 6, 6), (2, 1, 2, 2, 2), DENSE),
    "densenet3d_bin": ((2, 1, 6, 6, 6), (2, 1, 2, 2, 2), DENSE),
    "senet2d": ((2, 3, 64, 64), (2, 1, 2, 2), SENET),
    "senet2d_bin": ((2, 3, 64, 64), (2, 1, 2, 2), SENET),
    "senet3d": ((2, 3, 8, 8, 48), (2, 1, 1, 1, 2), SENET),
    "senet3d_bin": ((2, 3, 8, 8, 48), (2, 1, 1, 1, 2), SENET),
    "adjoint": ((2, 1, 48, 64), (2, 1, 1, 2), DENSE),
}
CAM_SCENARIOS = ("densenet2d", "densenet3d", "senet2d", "senet3d")  # test_vis_cam.py


@functools.cache
def monai_model(name):
    torch.manual_seed(0)
    return MONAI_MODELS[name]().eval()


@pytest.mark.slow  # DenseNet-121 and SE-ResNet-50: ~1-2 s a case on a quiet 2-core machine
@pytest.mark.parametrize("cam_class", [GradCAM, GradCAMpp])
@pytest.mark.parametrize("name", list(MONAI_SCENARIOS))
def test_monai_gradcam_scenarios(name, cam_class):
    # test_vis_gradcam.py::test_shape, for GradCAM and GradCAMpp.
    shape, feature_shape, (layer, _) = MONAI_SCENARIOS[name]
    model = monai_model(name)
    kwargs = {"adjoint_info": 42} if name == "adjoint" else {}
    cam = cam_class(nn_module=model, target_layers=layer)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        inferred = model(image, **kwargs).max(1)[-1]
    result = cam(x=image, layer_idx=-1, **kwargs)
    assert torch.equal(cam.nn_module.class_idx.cpu(), inferred)
    assert tuple(cam.feature_map_size(shape, device="cpu", **kwargs)) == feature_shape
    assert tuple(result.shape) == (shape[0], 1, *shape[2:])
    # The same result whether class_idx is None or the inferred classes.
    result2 = cam(x=image, layer_idx=-1, class_idx=inferred, **kwargs)
    assert torch.allclose(result, result2)
    assert torch.equal(cam.nn_module.class_idx, inferred)


@pytest.mark.slow
@pytest.mark.parametrize("name", CAM_SCENARIOS)
def test_monai_cam_scenarios(name):
    # test_vis_cam.py::test_shape.
    shape, feature_shape, (layer, fc) = MONAI_SCENARIOS[name]
    cam = CAM(nn_module=monai_model(name), target_layers=layer, fc_layers=fc)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    result = cam(x=image, layer_idx=-1)
    assert tuple(cam.feature_map_size(shape, device="cpu")) == feature_shape
    assert tuple(result.shape) == (shape[0], 1, *shape[2:])


@pytest.mark.parametrize("cam_class", [GradCAM, GradCAMpp])
def test_frozen_features_work_where_monai_raises(cam_class):
    # test_vis_gradcam.py::test_ill: MONAI raises IndexError when the parameters before
    # the layer do not require grad (its backward hook never fires). Ours differentiates
    # with respect to the layer's output, so it explains, and the flags stay as they were.
    model = monai_model("densenet2d")
    frozen = [p for n, p in model.named_parameters() if "features" in n]
    try:
        for p in frozen:
            p.requires_grad = False
        cam = cam_class(nn_module=model, target_layers="class_layers.relu")
        result = cam(x=torch.rand(2, 1, 48, 64))
        assert result.shape == (2, 1, 48, 64) and torch.isfinite(result).all()
        assert not any(p.requires_grad for p in frozen)
    finally:
        for p in frozen:
            p.requires_grad = True


def test_gradcampp_agrees_with_monai_up_to_the_exp_score_factor(dims):
    # MONAI's raw Grad-CAM++ map carries the positive factor exp(score), which ours leaves
    # out, and adds 1e-7 to alpha's denominator 2 g^2 + sum_S(A g^3), which ours does not:
    # with gradients of order 1e-3 (a ResNet's layer3) that shifts MONAI's map by up to
    # 20 %. Here the gradients are of order 0.1-1 so the 1e-7 is negligible. One item:
    # for a batch, MONAI broadcasts the (B,) scores along the last spatial axis.
    torch.manual_seed(5)
    net = GapLinearNet(dims, n_classes=3).eval()
    with torch.no_grad():
        net.fc.weight.mul_(100)
    x = make_input(dims, batch=1)
    cam = GradCAMpp(net, "features", upsampler=monai_upsampler, postprocessing=identity)
    normalise = monai_cam_module.default_normalizer
    positive = 0
    for c in range(3):
        theirs = MonaiGradCAMpp(net, "features", postprocessing=identity)(x, class_idx=c)
        theirs = theirs.detach()
        ours = cam(x, class_idx=c)
        scaled = ours * cam.nn_module.score.exp()
        top = float(theirs.max())
        positive += top > 0
        assert torch.allclose(scaled, theirs, rtol=1e-3, atol=1e-5 * top), c
        # After MONAI's default normaliser the factor is gone.
        assert torch.allclose(normalise(ours), normalise(theirs), atol=1e-3), c
    assert positive >= 2


def test_extra_keyword_arguments_go_to_the_model_and_nn_module_is_a_view():
    model = monai_model("adjoint")
    cam = GradCAM(nn_module=model, target_layers="class_layers.relu")
    assert cam.nn_module.model is model and cam.nn_module.get_wrapped_net() is model
    assert cam.nn_module.class_idx is None
    assert cam.nn_module.class_layers is model.class_layers  # attributes of the module
    assert cam.nn_module.get_layer("class_layers.out") is model.class_layers.out
    image = torch.rand(1, 1, 48, 64)
    with pytest.raises(ValueError, match="42"):
        cam(x=image, adjoint_info=7)
    out = cam(x=image, class_idx=2, adjoint_info=42)
    assert out.shape == (1, 1, 48, 64)
    assert cam.nn_module.class_idx.tolist() == [2]
    with torch.no_grad():
        logits = cam.nn_module(image, adjoint_info=42)  # calling the view calls the model
    assert torch.allclose(cam.nn_module.score, logits[:, 2])
    # The user's module is left as it was: no hooks, no flags changed (MONAI's own
    # ModelWithHooks registers hooks for good and switches in-place ReLUs off).
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert isinstance(cam.nn_module, ModelView) and not isinstance(cam.nn_module, nn.Module)
    # A view passed back in is unwrapped, as MONAI accepts its ModelWithHooks.
    assert GradCAMpp(cam.nn_module, "class_layers.relu").nn_module.model is model


def test_cam_accepts_a_callable_fc_layer():
    torch.manual_seed(6)
    net = GapLinearNet(2).eval()
    x = make_input(2)
    by_name = CAM(net, "features", fc_layers="fc")(x, class_idx=1)
    by_callable = CAM(net, "features", fc_layers=lambda m: m.fc)(x, class_idx=1)
    assert torch.equal(by_name, by_callable)
