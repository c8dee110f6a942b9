"""Zoo architectures: shapes, AxialNet's triplet layout and fc, computed guarantees."""

import pytest
import torch
from torch import nn

from hirescam3d import Explainer
from hirescam3d.errors import InputError
from hirescam3d.models.handle import ModelHandle
from hirescam3d.models.nets import AxialNet, CAMNet, VOCNet, axialnet_tiny
from hirescam3d.models.zoo import CHEST_FINDINGS

NAMES = list(CHEST_FINDINGS)


def capture(net: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, output of layer)`` for one eval forward pass."""
    seen = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: seen.setdefault("out", out.detach().clone())
    )
    try:
        with torch.no_grad():
            logits = net.eval()(x)
    finally:
        handle.remove()
    return logits, seen["out"]


def seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory()


def test_axialnet_tiny_shapes():
    net = seeded(lambda: axialnet_tiny(NAMES))
    x = torch.randn(2, 1, 96, 128, 128)
    logits, vol = capture(net, "to_volume", x)
    assert logits.shape == (2, 5)
    assert net.grid == (32, 8, 8)
    assert vol.shape == (2, 16, 32, 8, 8)


def test_axialnet_full_config_grid():
    net = seeded(lambda: AxialNet(NAMES))
    assert net.grid == (135, 6, 6)
    assert net.fc.kernel_size == (1, 6, 6) and net.fc.stride == (1, 6, 6)
    # One triplet of full-size slices is enough to check the trunk arithmetic: 512 x 14 x 14.
    x = torch.randn(1, 1, 3, 420, 420)
    _, trunk = capture(net, "trunk", x)
    logits, vol = capture(net, "to_volume", x)
    assert trunk.shape == (1, 512, 14, 14)
    assert vol.shape == (1, 16, 1, 6, 6) and logits.shape == (1, 5)


def test_axialnet_triplets_are_consecutive_slices():
    net = seeded(lambda: axialnet_tiny(NAMES))
    x = torch.randn(2, 1, 12, 128, 128)
    seen = {}
    handle = net.trunk.stem.conv.register_forward_pre_hook(
        lambda _m, inp: seen.setdefault("x", inp[0].clone())
    )
    with torch.no_grad():
        net.eval()(x)
    handle.remove()
    triplets = seen["x"]
    assert triplets.shape == (2 * 4, 3, 128, 128)
    for b in range(2):
        for t in range(4):
            assert torch.equal(triplets[b * 4 + t], x[b, 0, 3 * t : 3 * t + 3])


def test_to_volume_is_last_relu_in_volume_layout():
    net = seeded(lambda: axialnet_tiny(NAMES))
    x = torch.randn(2, 1, 15, 128, 128)
    _, per_triplet = capture(net, "reduce.relu4", x)
    _, vol = capture(net, "to_volume", x)
    assert per_triplet.shape == (10, 16, 8, 8) and vol.shape == (2, 16, 5, 8, 8)
    for b in range(2):
        for t in range(5):
            assert torch.equal(vol[b, :, t], per_triplet[b * 5 + t])


def test_conv3d_fc_equals_per_triplet_conv2d_and_linear():
    net = seeded(lambda: axialnet_tiny(NAMES))
    x = torch.randn(2, 1, 9, 128, 128)
    logits, per_triplet = capture(net, "reduce.relu4", x)
    f, n = per_triplet.shape[1], len(NAMES)
    # The authors' form: Conv2d(F, n, kernel=(h, w), stride=(h, w)) on each triplet.
    conv2d = nn.Conv2d(f, n, kernel_size=(8, 8), stride=(8, 8))
    conv2d.weight.data = net.fc.weight.data[:, :, 0].clone()
    conv2d.bias.data = net.fc.bias.data.clone()
    # ... which is one fully connected layer on the flattened triplet features.
    linear = nn.Linear(f * 64, n)
    linear.weight.data = net.fc.weight.data.reshape(n, -1).clone()
    linear.bias.data = net.fc.bias.data.clone()
    with torch.no_grad():
        by_conv = conv2d(per_triplet).reshape(2, 3, n).mean(1)
        by_linear = linear(per_triplet.flatten(1)).reshape(2, 3, n).mean(1)
    torch.testing.assert_close(logits, by_conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, by_linear, rtol=1e-5, atol=1e-5)


def test_hirescam_at_to_volume_sums_to_logit_minus_bias():
    net = seeded(lambda: axialnet_tiny(NAMES)).eval()
    x = torch.rand(2, 1, 96, 128, 128)
    res = Explainer(net, "to_volume", method="hirescam")(x, targets=list(range(5)))
    assert res.raw.shape == (2, 5, 32, 8, 8)
    total = res.raw.flatten(2).sum(-1)
    torch.testing.assert_close(total + net.fc.bias, res.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone,params", [("resnet34", 21_284_672), ("densenet121", 6_953_856)])
def test_voc_nets_shapes(backbone, params):
    net = seeded(lambda: VOCNet(backbone))
    n_features = sum(p.numel() for p in net.features.parameters())
    assert n_features == params  # the standard ResNet-34 / DenseNet-121 conv layers
    logits, head = capture(net, "head", torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 20)
    assert head.shape == (2, 512, 6, 6) and net.grid == (6, 6)
    assert net.fc.in_features == 512 * 6 * 6
    assert not any(isinstance(m, nn.modules.pooling._AdaptiveAvgPoolNd) for m in net.modules())


@pytest.mark.parametrize(
    "backbone,dims,shape,layer,feat",
    [
        ("resnet18", 3, (1, 1, 64, 64, 64), "features.layer4", (512, 2, 2, 2)),
        ("resnet18", 2, (2, 3, 96, 96), "features.layer4", (512, 3, 3)),
        ("densenet121", 3, (1, 1, 64, 64, 64), "features.relu5", (1024, 2, 2, 2)),
        ("densenet121", 2, (2, 3, 64, 64), "features.relu5", (1024, 2, 2)),
    ],
)
def test_cam_baselines_shapes(backbone, dims, shape, layer, feat):
    net = seeded(lambda: CAMNet(["a", "b", "c"], backbone, dims, shape[1]))
    assert net.default_layer == layer
    logits, out = capture(net, layer, torch.randn(*shape))
    assert logits.shape == (shape[0], 3)
    assert out.shape == (shape[0], *feat)
    # CAM architecture: the logits are the linear layer applied to the pooled features.
    pooled = out.flatten(2).mean(-1)
    torch.testing.assert_close(net.fc(pooled), logits, rtol=1e-5, atol=1e-5)


def guaranteed_names(verdicts) -> set[str]:
    """Names (and aliases) of the layers the audit finds HiResCAM guaranteed at."""
    return {n for v in verdicts if v.guaranteed for n in (v.layer, *v.aliases)}


def test_computed_guarantees():
    axial = ModelHandle.resolve("axialnet_tiny").layers()
    # Per-triplet layers ((B*T, F, h, w) outputs) are not listed: explain refuses them.
    assert [v.layer for v in axial] == ["to_volume", "fc"]
    assert [v.layer for v in axial if v.default] == ["to_volume"]
    assert all(v.guaranteed for v in axial)

    voc = ModelHandle.resolve("resnet34v").layers()
    assert {"features.layer4", "head"} <= guaranteed_names(voc)
    assert [v.layer for v in voc if v.default] == ["head"]
    conv1 = next(v for v in voc if v.layer == "features.conv1")
    assert not conv1.guaranteed and conv1.first_nonlinear == "relu"
    assert conv1.nonlinear_module == "features.act" and "features.act" in conv1.reason

    cam = ModelHandle.resolve("resnet18_cam_2d").layers()
    assert "features.layer4" in guaranteed_names(cam)
    assert not {"features.layer3", "features.layer1"} & guaranteed_names(cam)
    assert not any(v.layer in ("flatten", "fc") for v in cam)


def test_guarantee_of_a_network_that_is_not_in_the_zoo():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    handle = ModelHandle.from_network(plain, ["a", "b"], input_shape=(1, 4, 4))
    verdicts = {v.layer: v for v in handle.layers()}
    assert verdicts["0"].guaranteed is False and verdicts["0"].first_nonlinear == "relu"
    assert verdicts["1"].guaranteed is True


def test_no_inplace_activations():
    for net in (axialnet_tiny(NAMES), VOCNet("densenet121"), CAMNet(["a"], "resnet18", 2, 3)):
        assert not any(getattr(m, "inplace", False) for m in net.modules())


def test_input_errors():
    net = seeded(lambda: axialnet_tiny(NAMES)).eval()
    with pytest.raises(InputError, match="divisible by 3"):
        net(torch.zeros(1, 1, 10, 128, 128))
    with pytest.raises(InputError, match="128 x 128"):
        net(torch.zeros(1, 1, 9, 64, 64))
    with pytest.raises(InputError, match=r"\(B, 1, S, H, W\)"):
        net(torch.zeros(1, 9, 128, 128))
    with pytest.raises(InputError, match="224"):
        VOCNet("resnet34").eval()(torch.zeros(1, 3, 200, 200))
    with pytest.raises(ValueError, match="divisible by 3"):
        AxialNet(NAMES, input_size=(10, 128, 128))


def test_grid_geometry_matches_receptive_field_centres():
    # Valid reduce convolutions (the original design) push the grid inwards by 4 cells.
    assert AxialNet(NAMES).grid_geometry() == ((1.0, 3.0), (128.0, 32.0), (128.0, 32.0))
    torch.manual_seed(0)
    net = AxialNet(
        ["a"], input_size=(3, 160, 160), trunk_widths=(8, 8), trunk_blocks=(1, 1),
        trunk_strides=(1, 2), reduce_channels=(4, 4, 4, 4),
    ).eval()  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 0.01)
    (_, (first, step), _) = net.grid_geometry()
    assert net.grid == (1, 12, 12) and (first, step) == (32.0, 8.0)
    x = torch.rand(1, 1, 3, 160, 160, requires_grad=True)
    seen = {}
    net.to_volume.register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    net(x)
    for i in (0, 5, 11):
        (grad,) = torch.autograd.grad(seen["out"][0, :, 0, i, i].sum(), x, retain_graph=True)
        rows = grad.abs()[0, 0].sum(dim=(0, 2))
        centroid = float((rows * torch.arange(160)).sum() / rows.sum())
        assert abs(centroid - (first + i * step)) < step / 2, (i, centroid)


def test_tiny_grid_tiles_the_slice():
    net = axialnet_tiny(NAMES)
    (t0, t_step), (first, step), _ = net.grid_geometry()
    assert (t0, t_step) == (1.0, 3.0)
    assert step * net.grid[1] == 128 and 0 <= first < step


def test_triplet_labels_mark_triplets_the_mask_touches():
    import numpy as np

    from hirescam3d.models.training.train_demo import triplet_labels

    mask = np.zeros((12, 4, 4), dtype=bool)
    mask[5:7, 1, 2] = True  # slices 5 and 6: triplets 1 (3-5) and 2 (6-8)
    out = triplet_labels({"nodule": mask}, ("atelectasis", "nodule"), 12)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [0, 1, 1, 0]])


def test_balanced_triplets_draw_half_positives():
    import numpy as np

    from hirescam3d.models.training.train_demo import balanced_triplets

    present = np.zeros((5, 4), dtype=np.float32)
    present[2, 1] = present[4, 3] = 1
    pairs, y = balanced_triplets(present, 10, np.random.default_rng(0))
    assert pairs.shape == (10, 2) and y.dtype == np.float32
    np.testing.assert_array_equal(y, [1] * 5 + [0] * 5)
    np.testing.assert_array_equal(present[pairs[:, 0], pairs[:, 1]], y)
    # No positive triplet at all: every draw is negative instead of failing.
    pairs, y = balanced_triplets(np.zeros((3, 4)), 6, np.random.default_rng(0))
    assert len(pairs) == 6 and not y.any()


def test_triplet_logits_are_each_triplets_own_fc_output():
    import numpy as np

    from hirescam3d.models.bundle import apply_window
    from hirescam3d.models.nets import axialnet_tiny
    from hirescam3d.models.training.train_demo import triplet_logits

    torch.manual_seed(0)
    net = axialnet_tiny(NAMES).eval()
    cts = np.random.default_rng(0).integers(-1000, 200, size=(2, 9, 128, 128)).astype(np.int16)
    seen = {}
    net.fc.register_forward_hook(lambda _m, _i, out: seen.update(fc=out))
    with torch.no_grad():
        net(apply_window(cts, (-400, 200)).unsqueeze(1))
        full = seen["fc"].flatten(2)  # (B, n, T)
        pairs = np.array([[1, 2], [0, 0], [1, 1]])
        own = triplet_logits(net, cts, pairs, (-400, 200))
    assert own.shape == (3, len(NAMES))
    for row, (v, t) in zip(own, pairs, strict=True):
        torch.testing.assert_close(row, full[v, :, t], atol=1e-5, rtol=1e-5)


def test_both_training_stages_keep_the_chosen_fc_rows_nonnegative():
    import numpy as np

    from hirescam3d.models.nets import axialnet_tiny
    from hirescam3d.models.training.train_demo import pretrain_triplets, train

    torch.manual_seed(0)
    net = axialnet_tiny(["a", "b"])
    cts = np.random.default_rng(0).integers(-1000, 200, size=(4, 6, 128, 128)).astype(np.int16)
    trip = np.zeros((4, 2, 2), dtype=np.float32)
    trip[1, 1, 0] = 1
    with torch.no_grad():
        net.fc.weight.fill_(-0.5)
    history = pretrain_triplets(net, cts, trip, [1], (-400, 200), 2, 4, 1e-3, 0.0, 0)
    assert history == [] and not net.training  # fewer than 100 steps: no block mean yet
    assert (net.fc.weight[1] >= 0).all()
    assert (net.fc.weight[0] < 0).all()  # other findings are left free

    labels = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    with torch.no_grad():
        net.fc.weight.fill_(-0.5)
    (loss,) = train(net, cts, labels, (-400, 200), 1, 2, 1e-3, 0.0, 0, nonnegative=[0])
    assert loss > 0 and not net.training
    assert (net.fc.weight[0] >= 0).all()
    assert (net.fc.weight[1] < 0).all()
