"""Region targets for segmentation models (issue 16, section 1).

Oracles: autograd of the region score summed explicitly here (``(out[:, c] * R).sum()``),
masks computed by hand from the logits (argmax, sigmoid >= 0.5), the head's own bias for
the guarantee, and the architecture written here for the audit verdicts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hirescam3d import Explainer, InputError, TargetError
from hirescam3d.core.audit import audit_layer
from tests.core.test_explainer import assert_same_state, snapshot

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
GRID = {2: (12, 10), 3: (8, 10, 6)}


class SegNet(nn.Module):
    """conv-ReLU-conv-ReLU ("features") -> head -> logits (B, 3, *spatial).

    ``linear_head``: the head is one 1x1 convolution (HiResCAM guaranteed at features);
    else conv 3x3 -> ReLU -> 1x1 conv (not guaranteed).
    """

    def __init__(self, dims: int = 3, linear_head: bool = True, n_classes: int = 3):
        super().__init__()
        conv = CONV[dims]
        self.features = nn.Sequential(
            conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1), nn.ReLU()
        )
        if linear_head:
            self.head = conv(4, n_classes, 1)
        else:
            self.head = nn.Sequential(conv(4, 5, 3, padding=1), nn.ReLU(), conv(5, n_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make(dims: int = 3, batch: int = 2, seed: int = 0, **kw) -> tuple[SegNet, torch.Tensor]:
    torch.manual_seed(seed)
    net = SegNet(dims, **kw).eval()
    x = torch.randn(batch, 1, *GRID[dims], generator=torch.Generator().manual_seed(seed + 1))
    return net, x


def oracle_hirescam(net: SegNet, x: torch.Tensor, cls: int, region: torch.Tensor):
    """``sum_f A_f * d(sum_v R[v] * out[c, v]) / dA_f`` by autograd of the explicit sum,
    per item; and the region scores ``(B,)``."""
    acts = net.features(x).detach().requires_grad_(True)
    out = net.head(acts)
    score = (out[:, cls] * region).flatten(1).sum(1)
    (grad,) = torch.autograd.grad(score.sum(), acts)
    return (grad * acts).sum(1).detach(), score.detach()


@pytest.mark.parametrize("dims", [2, 3])
def test_region_hirescam_is_autograd_of_the_summed_region_score(dims):
    net, x = make(dims, linear_head=False)
    g = torch.Generator().manual_seed(7)
    masks = torch.rand(2, 2, *GRID[dims], generator=g) < 0.3  # one mask per target
    weights = torch.rand(2, 1, *GRID[dims], generator=g)  # one weight map for all targets
    ex = Explainer(net, "features", class_names=["bg", "organ", "lesion"])

    res = ex(x, ["lesion", "organ"], region=masks)
    for k, cls in enumerate([2, 1]):
        raw, score = oracle_hirescam(net, x, cls, masks[:, k].float())
        assert torch.allclose(res.raw[:, k], raw, atol=1e-5)
        assert torch.allclose(res.target_scores()[:, k], score, rtol=1e-5, atol=1e-4)
    assert res.raw.shape == (2, 2, *GRID[dims]) and res.maps.shape == (2, 2, *GRID[dims])
    assert torch.equal(res.region, masks)

    res = ex(x, [0, 2], region=weights)
    for k, cls in enumerate([0, 2]):
        raw, score = oracle_hirescam(net, x, cls, weights[:, 0])
        assert torch.allclose(res.raw[:, k], raw, atol=1e-5)
        assert torch.allclose(res.region_scores[:, k], score, rtol=1e-5, atol=1e-4)


def test_per_item_targets_and_a_region_shared_by_the_batch():
    net, x = make(3)
    region = torch.zeros(1, 1, *GRID[3], dtype=torch.bool)
    region[..., 2:5, 3:8, 1:4] = True
    res = Explainer(net, "features")(x, [[1], [2]], region=region)
    for b, cls in enumerate([1, 2]):
        raw, _ = oracle_hirescam(net, x[b : b + 1], cls, region[:, 0].float())
        assert torch.allclose(res.raw[b, 0], raw[0], atol=1e-5)


def test_scores_are_region_scores_of_every_class():
    net, x = make(3)
    g = torch.Generator().manual_seed(3)
    one = torch.rand(2, 1, *GRID[3], generator=g) < 0.5
    out = net(x).detach()
    by_hand = (out * one).flatten(2).sum(2)  # (B, C): every class over the one region
    res = Explainer(net, "features")(x, [2, 0], region=one)
    assert torch.allclose(res.scores, by_hand, rtol=1e-5, atol=1e-4)
    assert torch.allclose(res.target_scores(), by_hand[:, [2, 0]], rtol=1e-5, atol=1e-4)

    per_target = torch.rand(2, 2, *GRID[3], generator=g) < 0.5
    res = Explainer(net, "features")(x, [2, 0], region=per_target)
    assert torch.allclose(res.scores[:, 2], (out[:, 2] * per_target[:, 0]).flatten(1).sum(1))
    assert torch.allclose(res.scores[:, 0], (out[:, 0] * per_target[:, 1]).flatten(1).sum(1))
    assert torch.isnan(res.scores[:, 1]).all()  # no region was given for class 1


@pytest.mark.parametrize("task", ["softmax", "sigmoid", "multilabel"])
def test_predicted_region_is_the_models_own_mask(task):
    net, x = make(3, seed=4)
    with torch.no_grad():  # centre each class's logits so that every class is predicted
        net.head.bias.sub_(net(x).mean((0, 2, 3, 4)))
    out = net(x).detach()
    if task == "softmax":
        masks = torch.stack([out.argmax(1) == c for c in range(3)], 1)
    else:
        masks = torch.sigmoid(out) >= 0.5
    assert masks.flatten(2).any(2).all(), "test setup: every class must be predicted"
    ex = Explainer(net, "features", task=task if task != "softmax" else None)
    res = ex(x, [1, 2], region="predicted", task="softmax" if task == "softmax" else None)
    assert res.region.dtype == torch.bool and torch.equal(res.region, masks[:, [1, 2]])
    assert res.task == ("softmax" if task == "softmax" else "sigmoid")
    for k, cls in enumerate([1, 2]):
        raw, score = oracle_hirescam(net, x, cls, masks[:, cls].float())
        assert torch.allclose(res.raw[:, k], raw, atol=1e-5)
        assert torch.allclose(res.region_scores[:, k], score, rtol=1e-5, atol=1e-4)
    by_hand = (out * masks).flatten(2).sum(2)  # each class over its own predicted mask
    assert torch.allclose(res.scores, by_hand, rtol=1e-5, atol=1e-4)


def test_task_from_the_model_attribute_and_single_channel_default():
    net, x = make(3, n_classes=1)
    out = net(x).detach()
    res = Explainer(net, "features")(x, 0, region="predicted")  # one channel: sigmoid
    assert torch.equal(res.region[:, 0], out[:, 0] >= 0)
    net3, x3 = make(3)
    net3.task = "softmax"
    res = Explainer(net3, "features")(x3, 2, region="predicted")
    assert torch.equal(res.region[:, 0], net3(x3).argmax(1) == 2)


def test_guarantee_cells_sum_to_region_score_minus_bias_times_size():
    net, x = make(3, linear_head=True)
    g = torch.Generator().manual_seed(11)
    region = torch.rand(2, 1, *GRID[3], generator=g) < 0.4
    weights = torch.rand(2, 1, *GRID[3], generator=g) * 2 - 0.5  # signed weights too
    out = net(x).detach()
    bias = net.head.bias.detach()
    for r in (region, weights):
        res = Explainer(net, "features")(x, [0, 1, 2], region=r)
        direct = (out * r).flatten(2).sum(2)  # (B, C) region scores, by hand
        size = r.float().flatten(1).sum(1, keepdim=True)  # (B, 1) region size (sum of weights)
        total = res.raw.double().flatten(2).sum(2) + bias.double() * size.double()
        assert torch.allclose(total.float(), direct, rtol=1e-5, atol=1e-3)

    verdict = audit_layer(net, "features", (1, *GRID[3]))
    assert verdict.guaranteed and verdict.segmentation and verdict.bias_uniform, verdict.reason
    assert verdict.bias == pytest.approx(bias.tolist(), abs=1e-6)
    assert "region score minus bias x region size" in verdict.reason
    assert verdict.to_dict()["segmentation"] is True


def test_nonlinearity_after_the_layer_is_not_certified():
    net, _ = make(3, linear_head=False)
    verdict = audit_layer(net, "features", (1, *GRID[3]))
    assert not verdict.guaranteed
    assert (verdict.first_nonlinear, verdict.nonlinear_module) == ("relu", "head.1")
    # the layer before the features' last ReLU is not guaranteed either, with a linear head
    net_lin, _ = make(3, linear_head=True)
    assert not audit_layer(net_lin, "features.2", (1, *GRID[3])).guaranteed
    assert audit_layer(net_lin, "features.3", (1, *GRID[3])).guaranteed


def test_padded_convolution_after_the_layer_reports_a_non_uniform_bias():
    """A 3x3 zero-padded conv after the layer: the output at zero activations is not the
    same at the border, so 'bias x region size' does not hold; the region's sum of the
    zero-activation output does (computed here with a hook)."""
    torch.manual_seed(5)
    net = SegNet(3)
    net.head = nn.Sequential(nn.Conv3d(4, 4, 1), nn.Conv3d(4, 3, 3, padding=1)).eval()
    net.eval()
    x = torch.randn(1, 1, *GRID[3])
    verdict = audit_layer(net, "features", (1, *GRID[3]))
    assert verdict.guaranteed and verdict.bias_uniform is False
    zero = net.head(torch.zeros(1, 4, *GRID[3])).detach()  # output at zero activations
    region = torch.zeros(1, 1, *GRID[3])
    region[..., 0:3, :, 2:5] = 1  # touches the border
    res = Explainer(net, "features")(x, [0, 2], region=region)
    direct = (net(x).detach() * region).flatten(2).sum(2)[:, [0, 2]]
    bias_sum = (zero * region).flatten(2).sum(2)[:, [0, 2]]
    assert torch.allclose(res.raw.flatten(2).sum(2) + bias_sum, direct, rtol=1e-5, atol=1e-3)


class CountingSeg(SegNet):
    calls = 0

    def forward(self, x):
        CountingSeg.calls += 1
        return super().forward(x)


def test_k_targets_cost_one_forward_and_one_batched_vjp(monkeypatch):
    torch.manual_seed(0)
    net = CountingSeg(3).eval()
    x = torch.randn(1, 1, *GRID[3])
    grads = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        grads.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    region = torch.rand(1, 3, *GRID[3]) < 0.5
    CountingSeg.calls = 0
    res = Explainer(net, "features").explain(
        x, [0, 1, 2], methods=["hirescam", "gradcam"], region=region
    )
    assert CountingSeg.calls == 1
    assert grads == [True]
    assert res["hirescam"].raw.shape == (1, 3, *GRID[3])


def test_ablationcam_uses_the_region_score():
    net, x = make(3, batch=1, linear_head=False)
    region = torch.zeros(1, 1, *GRID[3])
    region[..., 1:6, 2:8, 1:5] = 1
    res = Explainer(net, "features").explain(x, [2], ["ablationcam"], region=region)
    acts = net.features(x).detach()
    base = (net.head(acts)[:, 2] * region[:, 0]).sum()
    expected = torch.zeros(GRID[3])
    for f in range(acts.shape[1]):
        cut = acts.clone()
        cut[:, f] = 0
        drop = base - (net.head(cut)[:, 2] * region[:, 0]).sum()
        expected += drop.detach() * acts[0, f]
    assert torch.allclose(res["ablationcam"].raw[0, 0], expected, rtol=1e-4, atol=1e-4)


def test_region_errors():
    net, x = make(3)
    ex = Explainer(net, "features", class_names=["bg", "organ", "lesion"])
    good = torch.ones(2, 1, *GRID[3], dtype=torch.bool)
    with pytest.raises(InputError, match=r"pass region=|region=\.\.\."):
        ex(x, "lesion")
    empty = good.clone()
    empty[1] = False
    with pytest.raises(InputError, match="empty .*for item 1"):
        ex(x, "lesion", region=empty)
    with pytest.raises(InputError, match=r"grid of \(8, 10, 5\).*output grid is \(8, 10, 6\)"):
        ex(x, "lesion", region=good[..., :5])
    with pytest.raises(TargetError, match="out of range for 3 classes"):
        ex(x, 3, region=good)
    with pytest.raises(TargetError, match="unknown class 'lesoin'"):
        ex(x, "lesoin", region=good)
    with pytest.raises(TargetError, match="needs targets"):
        ex(x, region=good)
    with pytest.raises(InputError, match="3 channels for 2 targets"):
        ex(x, [1, 2], region=good.expand(2, 3, *GRID[3]))
    with pytest.raises(InputError, match="values 0, 1, 2"):
        ex(x, 1, region=torch.arange(3).repeat_interleave(160).reshape(1, 1, *GRID[3]))
    with pytest.raises(InputError, match="task="):
        ex(x, 1, region="predicted")
    with pytest.raises(InputError, match="unknown task 'argmax'"):
        ex(x, 1, region="predicted", task="argmax")
    with pytest.raises(InputError, match="'predicted'; got the string 'predict'"):
        ex(x, 1, region="predict")
    with torch.no_grad():
        net.head.bias[2] = -1e3  # the lesion is never predicted
    with pytest.raises(InputError, match="predicts no voxel of class 'lesion' for item 0"):
        ex(x, "lesion", region="predicted", task="sigmoid")


def test_region_on_a_classifier_is_refused():
    from tests.conftest import ConvLinearNet, make_input

    with pytest.raises(InputError, match="applies to segmentation models"):
        Explainer(ConvLinearNet(3).eval(), "features")(make_input(3), 0, region=torch.ones(4))


def test_model_state_restored_also_when_the_region_is_refused():
    torch.manual_seed(0)
    net = SegNet(3)
    net.features.insert(1, nn.BatchNorm3d(4))
    net.train()
    net.features[0].weight.requires_grad_(False)
    x = torch.randn(2, 1, *GRID[3])
    before = snapshot(net)
    ex = Explainer(net, "features")
    with pytest.raises(InputError, match="empty"):
        ex(x, 1, region=torch.zeros(1, 1, *GRID[3]))
    assert_same_state(before, snapshot(net))
    ex.explain(x, [0, 1], methods=["hirescam", "occlusion"], region=torch.ones(*GRID[3]))
    assert_same_state(before, snapshot(net))
    assert torch.is_grad_enabled()
