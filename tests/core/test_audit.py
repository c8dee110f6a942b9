"""The HiResCAM guarantee, computed: verdicts on networks where a declared flag would lie.

Oracles: the architecture of each network (which operations follow the layer, written
by hand here) and, for guaranteed layers, the network's own final bias (the score with
the layer's output at zero must equal it).
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from hirescam3d.core.audit import audit_layer, audit_model
from hirescam3d.errors import LayerError
from hirescam3d.models.nets.axialnet import axialnet_tiny
from hirescam3d.models.zoo import CHEST_FINDINGS
from tests.cli.test_cli import invoke

NETS = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn


    def features(dims=3):
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        return nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU())


    class MLPHead(nn.Module):
        """features -> flatten -> linear -> ReLU -> linear: two layers, not guaranteed."""

        def __init__(self):
            super().__init__()
            self.features = features()
            self.head = nn.Sequential(nn.Flatten(1), nn.Linear(4 * 64, 8), nn.ReLU(),
                                      nn.Linear(8, 3))

        def forward(self, x):
            return self.head(self.features(x))


    class GapLinear(nn.Module):
        """The CAM architecture: global average pooling + one linear layer."""

        default_layer = "features"

        def __init__(self):
            super().__init__()
            self.features = features()
            self.pool = nn.AdaptiveAvgPool3d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1))


    class DropoutHead(GapLinear):
        """Dropout before the linear layer: the identity in eval mode."""

        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


    class HiddenSigmoid(GapLinear):
        """A nonlinearity called inside forward, invisible to module hooks."""

        def forward(self, x):
            f = self.features(x)
            return self.fc(torch.sigmoid(f).mean(dim=(2, 3, 4)))


    class HiddenThroughPython(GapLinear):
        """A nonlinearity through a Python float: no torch operation shows it."""

        def forward(self, x):
            f = self.pool(self.features(x)).flatten(1)
            return self.fc(f) * float(f.abs().max() + 1)


    def mlp_head():
        return MLPHead()


    def gap_linear():
        return GapLinear()


    def dropout_head():
        return DropoutHead()


    def hidden_sigmoid():
        return HiddenSigmoid()


    def hidden_python():
        return HiddenThroughPython()
    '''
)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """The networks above as an importable module (for module:callable on the CLI)."""
    root = tmp_path_factory.mktemp("usernets")
    (root / "audit_user_nets.py").write_text(NETS)
    sys.path.insert(0, str(root))
    import audit_user_nets

    yield audit_user_nets
    sys.path.remove(str(root))
    sys.modules.pop("audit_user_nets", None)


SHAPE = (1, 4, 4, 4)
# HiddenThroughPython turns a tensor into a Python float on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def only(verdicts, layer):
    found = [v for v in verdicts if v.layer == layer or layer in v.aliases]
    assert len(found) == 1, [v.layer for v in verdicts]
    return found[0]


def test_two_layer_mlp_head_is_not_guaranteed(nets):
    net = nets.mlp_head().eval()
    v = audit_layer(net, "features", SHAPE)
    assert not v.guaranteed
    assert (v.first_nonlinear, v.nonlinear_module) == ("relu", "head.2")
    assert v.text() == (
        "HiResCAM is not guaranteed at features: the first nonlinear operation after it "
        "is relu (head.2)"
    )


def test_gap_linear_is_guaranteed_and_its_bias_is_the_fc_bias(nets):
    net = nets.gap_linear().eval()
    v = audit_layer(net, "features", SHAPE)
    assert v.guaranteed, v.reason
    # float32 round-off only (the audit's own tolerance is 1e-3; a ReLU gives O(1) errors)
    assert v.completeness_error < 1e-4 and v.linearity_error < 1e-4
    assert v.bias == pytest.approx(net.fc.bias.tolist(), abs=1e-6)
    # the layer inside the features (conv, before its ReLU) is not guaranteed
    assert not audit_layer(net, "features.0", SHAPE).guaranteed


def test_dropout_in_eval_mode_keeps_the_guarantee_and_the_mode(nets):
    net = nets.dropout_head().train()
    v = audit_layer(net, "features", SHAPE)
    assert v.guaranteed, v.reason
    assert net.training and net.drop.training  # the network is left as it was


def test_functional_nonlinearity_inside_forward_is_found_by_tracing(nets):
    v = audit_layer(nets.hidden_sigmoid().eval(), "features", SHAPE)
    assert not v.guaranteed
    assert v.first_nonlinear == "sigmoid" and v.nonlinear_module == "HiddenSigmoid.forward"


def test_nonlinearity_outside_torch_is_caught_by_the_numerical_check(nets):
    v = audit_layer(nets.hidden_python().eval(), "features", SHAPE)
    assert not v.guaranteed
    assert v.first_nonlinear is None  # the trace saw only linear operations...
    assert v.linearity_error > 1e-3 or v.completeness_error > 1e-3  # ...the numbers did not
    assert "numerical check fails" in v.reason


def test_axialnet_per_slice_head_is_guaranteed_and_per_triplet_layers_are_not_offered():
    net = axialnet_tiny(CHEST_FINDINGS).eval()
    verdicts = audit_model(net, (1, 6, 128, 128), default_layer="to_volume")
    v = only(verdicts, "to_volume")
    assert v.guaranteed and v.default
    # logit = mean over triplets of (w . A_t + b): the bias is the fc bias
    assert v.bias == pytest.approx(net.fc.bias.tolist(), abs=1e-6)
    assert not any(x.layer.startswith(("trunk.", "reduce.")) for x in verdicts)
    with pytest.raises(LayerError, match="not one .* map per input"):
        audit_layer(net, "reduce.relu4", (1, 6, 128, 128))


def test_verdict_geometry_is_the_traced_grid():
    net = axialnet_tiny(CHEST_FINDINGS).eval()
    v = audit_layer(net, "to_volume", (1, 6, 128, 128))
    assert v.geometry.grid_shape == (2, 8, 8)
    assert tuple(zip(v.geometry.firsts, v.geometry.steps, strict=True)) == net.grid_geometry()


@pytest.mark.parametrize(
    ("factory", "code", "fragment"),
    [
        ("mlp_head", 3, "the first nonlinear operation after it is relu (head.2)"),
        ("gap_linear", 0, "HiResCAM is guaranteed faithful at features"),
        ("dropout_head", 0, "HiResCAM is guaranteed faithful at features"),
        ("hidden_sigmoid", 3, "after it is sigmoid (HiddenSigmoid.forward)"),
    ],
)
def test_audit_command_verdicts(nets, factory, code, fragment):
    result = invoke(
        "audit", "--model", f"audit_user_nets:{factory}", "--layer", "features",
        "--input-shape", "1x4x4x4", "--json",
    )
    assert result.exit_code == code, result.stderr
    payload = json.loads(result.stdout)
    assert fragment in payload["verdict"]
    assert payload["guaranteed"] is (code == 0)


def test_audit_command_on_zoo_models():
    result = invoke("audit", "--model", "axialnet_tiny", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["verdict"] == "HiResCAM is guaranteed faithful at to_volume"
    result = invoke("audit", "--model", "resnet18_cam_2d", "--layer", "features.layer3")
    assert result.exit_code == 3
    assert "first nonlinear operation after it is relu (features.layer4.0.act)" in " ".join(
        result.stdout.split()
    )


def test_audit_command_usage_errors(nets):
    result = invoke("audit", "--model", "audit_user_nets:gap_linear")
    assert result.exit_code == 2
    assert "give --input-shape" in result.stderr
    result = invoke("audit", "--model", "no_such_module_xyz:build", "--input-shape", "1x4x4x4")
    assert result.exit_code == 2
    assert "cannot import 'no_such_module_xyz'" in result.stderr
    result = invoke("audit", "--model", "audit_user_nets:gap_linear", "--input-shape", "1xAx4")
    assert result.exit_code == 2
    assert "expected positive integers" in result.stderr


def test_audit_leaves_the_network_unchanged(nets):
    net = nets.gap_linear().train()
    net.fc.weight.requires_grad_(False)
    hooks_before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    audit_model(net, SHAPE)
    assert net.training and not net.fc.weight.requires_grad and net.fc.bias.requires_grad
    assert hooks_before == [len(m._forward_hooks) + len(m._forward_pre_hooks)
                            for m in net.modules()]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_an_in_place_activation_gets_its_own_verdict():
    """``ReLU(inplace=True)`` returns the tensor it was given with new values. By hand:
    the batch norm's output is followed by that ReLU (not guaranteed); the ReLU's output
    only by average pooling and a linear layer (guaranteed, cells sum to logit - bias)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    net.add_module("features", features)
    net.add_module(
        "head",
        torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(4, 2)),
    )  # fmt: skip
    verdicts = {v.layer: v for v in audit_model(net.eval(), (1, 12, 12))}
    assert verdicts["features.1"].aliases == ("features",)
    assert not verdicts["features.1"].guaranteed
    assert "relu" in verdicts["features.1"].reason
    assert verdicts["head.0"].aliases == () and verdicts["head.0"].guaranteed
    # the guarantee holds numerically: sum_f,s w_kf A_fs / |S| = logit - bias
    x = torch.randn(1, 1, 12, 12)
    with torch.no_grad():
        acts = net.head[0](net.features(x).clone())
        logits = net(x)
    w, b = net.head[3].weight, net.head[3].bias
    cells = torch.einsum("kf,fhw->khw", w, acts[0]) / acts[0, 0].numel()
    assert torch.allclose(cells.sum((1, 2)), logits[0] - b, atol=1e-5)
