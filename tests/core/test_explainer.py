"""Explainer behaviour: shapes, targets, one forward pass, model left untouched, errors."""

import pytest
import torch
from torch import nn

from hirescam3d import Explainer, InputError, LayerError, TargetError
from tests.conftest import SPATIAL, ConvLinearNet, GapLinearNet, make_input


def test_result_shapes_and_ranges(dims):
    net = ConvLinearNet(dims).eval()
    x = make_input(dims, batch=2)
    res = Explainer(net, "features", class_names=["a", "b", "c", "d"])(x, targets=["b", "d", 0])
    assert res.raw.shape == (2, 3, *SPATIAL[dims]) and res.raw.dtype == torch.float32
    assert res.maps.shape == (2, 3, *x.shape[2:])
    assert res.maps.min() >= 0 and res.maps.max() <= 1
    assert res.scores.shape == (2, 4)
    assert res.targets.tolist() == [[1, 3, 0], [1, 3, 0]]
    assert res.target_names() == [["b", "d", "a"], ["b", "d", "a"]]
    assert res.method == "hirescam" and res.layer == "features"


def test_default_target_is_each_items_top_class():
    net = ConvLinearNet(3).eval()
    x = make_input(3, batch=4, seed=5)
    res = Explainer(net, net.features)(x)
    assert res.targets.shape == (4, 1)
    assert torch.equal(res.targets[:, 0], res.scores.argmax(1))


def test_per_item_targets():
    net = ConvLinearNet(2).eval()
    x = make_input(2, batch=2)
    ex = Explainer(net, "features")
    res = ex(x, targets=[[1, 2], [3, 0]])
    assert res.targets.tolist() == [[1, 2], [3, 0]]
    single = ex(x[1:], targets=[3, 0])
    assert torch.allclose(res.raw[1], single.raw[0], atol=1e-6)


def test_upsampled_map_has_input_size_for_strided_layer():
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 3 * 4, 2),
    ).eval()
    x = torch.randn(1, 1, 4, 6, 8)
    res = Explainer(net, "1")(x, targets=[0, 1])
    assert res.raw.shape == (1, 2, 2, 3, 4)
    assert res.maps.shape == (1, 2, 4, 6, 8)


class CountingNet(ConvLinearNet):
    calls = 0

    def forward(self, x):
        CountingNet.calls += 1
        return super().forward(x)


def test_k_targets_and_methods_cost_one_forward_pass():
    net = CountingNet(3).eval()
    CountingNet.calls = 0
    Explainer(net, "features").explain(
        make_input(3), targets=[0, 1, 2, 3], methods=["hirescam", "gradcam"]
    )
    assert CountingNet.calls == 1


def test_parameters_never_receive_grad_and_no_graph_before_layer():
    net = ConvLinearNet(3).eval()
    seen = {}

    def record(_module, _inputs, output):
        seen["pre"] = output.requires_grad

    handle = net.features[0].register_forward_hook(record)
    Explainer(net, "features")(make_input(3), targets=[0, 1])
    handle.remove()
    assert seen["pre"] is False
    assert all(p.grad is None for p in net.parameters())


def snapshot(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [
            (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
            for m in model.modules()
        ],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_same_state(before, after):
    assert before[:3] == after[:3]
    assert before[3].keys() == after[3].keys()
    for k in before[3]:
        assert torch.equal(before[3][k], after[3][k]), k


class BNNet(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.fail = fail

    def forward(self, x):
        f = self.features(x)
        if self.fail:
            raise ValueError("boom after the target layer")
        return self.fc(self.drop(f.mean((2, 3, 4))))


def test_model_state_unchanged_in_train_mode_with_frozen_params():
    net = BNNet().train()
    net.features[0].weight.requires_grad_(False)
    before = snapshot(net)
    grad_mode = torch.is_grad_enabled()
    Explainer(net, "features").explain(
        make_input(3, batch=2), targets=[0, 2], methods=["hirescam", "gradcam", "cam"]
    )
    assert_same_state(before, snapshot(net))
    assert torch.is_grad_enabled() == grad_mode


def test_model_state_unchanged_after_forward_raises():
    net = BNNet(fail=True).train()
    before = snapshot(net)
    with pytest.raises(ValueError, match="boom"):
        Explainer(net, "features")(make_input(3))
    assert_same_state(before, snapshot(net))
    assert torch.is_grad_enabled()


def test_works_under_no_grad():
    net = ConvLinearNet(2).eval()
    with torch.no_grad():
        res = Explainer(net, "features")(make_input(2), targets=1)
        assert not torch.is_grad_enabled()
    assert res.raw.abs().sum() > 0


def test_output_selector_for_dict_outputs():
    class DictNet(ConvLinearNet):
        def forward(self, x):
            return {"logits": super().forward(x), "aux": x}

    net = DictNet(2).eval()
    with pytest.raises(InputError, match="output_selector"):
        Explainer(net, "features")(make_input(2))
    res = Explainer(net, "features", output_selector=lambda o: o["logits"])(make_input(2))
    assert res.scores.shape == (2, 4)


def test_unknown_layer_suggests_close_names():
    with pytest.raises(LayerError, match=r"no layer named 'featurs'.*did you mean 'features'"):
        Explainer(ConvLinearNet(2), "featurs")


def test_layer_without_spatial_dims():
    with pytest.raises(LayerError, match="no spatial dimension"):
        Explainer(ConvLinearNet(2).eval(), "fc")(make_input(2))


def test_layer_output_not_a_tensor():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return x, x

    class Net(ConvLinearNet):
        def __init__(self):
            super().__init__(2)
            self.split = TupleLayer()

        def forward(self, x):
            return self.fc(self.features(self.split(x)[0]).flatten(1))

    with pytest.raises(LayerError, match="returns a tuple"):
        Explainer(Net().eval(), "split")(make_input(2))


def test_score_that_does_not_depend_on_layer():
    class Net(ConvLinearNet):
        def __init__(self):
            super().__init__(2)
            self.side = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            self.side(x)  # computed, never used for the output
            return super().forward(x)

    with pytest.raises(LayerError, match="do not depend on layer 'side'"):
        Explainer(Net().eval(), "side")(make_input(2))


def test_layer_never_called():
    net = GapLinearNet(2).eval()
    net.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(LayerError, match="not called"):
        Explainer(net, "unused")(make_input(2))


def test_target_errors():
    net = ConvLinearNet(2).eval()
    ex = Explainer(net, "features", class_names=["atelectasis", "nodule", "effusion", "mass"])
    with pytest.raises(TargetError, match="out of range for 4 classes"):
        ex(make_input(2), targets=7)
    with pytest.raises(TargetError, match="unknown class 'nodul'.*Did you mean 'nodule'"):
        ex(make_input(2), targets="nodul")
    with pytest.raises(TargetError, match="has no class names"):
        Explainer(net, "features")(make_input(2), targets="nodule")


def test_input_errors():
    net = ConvLinearNet(3).eval()
    ex = Explainer(net, "features")
    x = make_input(3)
    x[0, 0, 1, 1, 1] = float("nan")
    with pytest.raises(InputError, match="1 non-finite values"):
        ex(x)
    with pytest.raises(InputError, match="expects a 5-D input"):
        ex(torch.randn(1, 1, 6, 6))
    with pytest.raises(InputError, match=r"\(B, C, \*spatial\)"):
        ex(torch.randn(6, 6))


def test_layer_that_runs_per_slice_is_refused():
    class SliceNet(nn.Module):
        """Runs a 2D conv on every slice of a (B, 1, S, H, W) volume."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            b, _, s, h, w = x.shape
            f = self.conv(x.reshape(b * s, 1, h, w))
            return self.fc(f.reshape(b, s, 2, h * w).mean((1, 3)))

    with pytest.raises(LayerError, match="outputs 8 maps for a batch of 2 inputs"):
        Explainer(SliceNet().eval(), "conv")(torch.randn(2, 1, 4, 5, 5))


def test_cam_requires_gap_linear_head():
    with pytest.raises(LayerError, match="CAM needs a global-average-pooling"):
        Explainer(ConvLinearNet(2).eval(), "features", method="cam")(make_input(2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = ConvLinearNet(3).eval()
    x = make_input(3)
    cpu = Explainer(net, "features").explain(x, targets=[0, 1], methods=["hirescam", "gradcam"])
    gpu = Explainer(net.cuda(), "features").explain(
        x.cuda(), targets=[0, 1], methods=["hirescam", "gradcam"]
    )
    for m in cpu:
        assert gpu[m].raw.is_cuda
        assert torch.allclose(cpu[m].raw, gpu[m].raw.cpu(), atol=1e-4)
