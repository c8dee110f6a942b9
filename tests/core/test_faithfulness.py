"""The HiResCAM paper's claims, checked on this code in 2D and 3D."""

import torch

from hirescam3d import Explainer
from hirescam3d.core import postprocess
from tests.conftest import ConvLinearNet, GapLinearNet, make_input


def exact_contribution(net: ConvLinearNet, x: torch.Tensor, k: int) -> torch.Tensor:
    """Contribution of each location to score k: W_k reshaped to (F, *S), times A, summed over F."""
    with torch.no_grad():
        a = net.features(x)
        w = net.fc.weight[k].reshape(a.shape[1:])
        return (w * a).sum(1)


def test_hirescam_equals_exact_contribution(dims):
    """Table 1, "L2 = 0": one linear layer after the target layer."""
    torch.manual_seed(dims)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    res = Explainer(net, "features", method="hirescam")(x, targets=[0, 1, 2, 3])
    for k in range(4):
        exact = exact_contribution(net, x, k)
        assert torch.allclose(res.raw[:, k], exact, atol=1e-5)
        total = res.raw[:, k].flatten(1).sum(1)
        assert torch.allclose(total, res.scores[:, k] - net.fc.bias[k], atol=1e-5)


def test_gradcam_differs_from_exact_contribution(dims):
    torch.manual_seed(10 + dims)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    res = Explainer(net, "features", method="gradcam")(x, targets=[0, 1])
    for k in range(2):
        l2 = torch.linalg.vector_norm(res.raw[:, k] - exact_contribution(net, x, k))
        assert l2 > 1e-2


def test_cam_hirescam_gradcam_agree_on_gap_linear(dims):
    """Section 3.6.3: identical explanations for the CAM architecture."""
    torch.manual_seed(20 + dims)
    net = GapLinearNet(dims).eval()
    x = make_input(dims)
    out = Explainer(net, "features").explain(
        x, targets=[0, 2], methods=["cam", "hirescam", "gradcam"]
    )
    n_cells = out["hirescam"].raw[0, 0].numel()
    assert torch.allclose(out["hirescam"].raw, out["gradcam"].raw, atol=1e-6)
    assert torch.allclose(out["cam"].raw / n_cells, out["hirescam"].raw, atol=1e-6)
    spatial = len(x.shape) - 2
    normed = {m: postprocess.normalize(r.raw, spatial) for m, r in out.items()}
    assert torch.allclose(normed["cam"], normed["hirescam"], atol=1e-5)
    assert torch.allclose(normed["gradcam"], normed["hirescam"], atol=1e-5)
    assert torch.allclose(out["cam"].maps, out["hirescam"].maps, atol=1e-5)


def test_final_bias_changes_neither_cam_nor_hirescam(dims):
    """Appendix 7.3."""
    torch.manual_seed(30 + dims)
    x = make_input(dims)
    for net, methods, layer in (
        (GapLinearNet(dims), ["cam", "hirescam"], "features"),
        (ConvLinearNet(dims), ["hirescam"], "features"),
    ):
        net.eval()
        before = Explainer(net, layer).explain(x, targets=[1], methods=methods)
        with torch.no_grad():
            net.fc.bias.add_(torch.randn_like(net.fc.bias) * 5)
        after = Explainer(net, layer).explain(x, targets=[1], methods=methods)
        for m in methods:
            assert torch.allclose(before[m].raw, after[m].raw, atol=1e-6)
            assert not torch.allclose(before[m].scores, after[m].scores)


def test_batch_equals_single_calls_and_k_targets_equal_separate_calls(dims):
    torch.manual_seed(40 + dims)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims, batch=3)
    ex = Explainer(net, "features.2")
    for method in ("hirescam", "gradcam"):
        joint = ex.explain(x, targets=[3, 0, 2], methods=[method])[method]
        for b in range(3):
            for j, k in enumerate([3, 0, 2]):
                single = ex.explain(x[b : b + 1], targets=k, methods=[method])[method]
                assert torch.allclose(joint.raw[b, j], single.raw[0, 0], atol=1e-6)
                assert torch.allclose(joint.maps[b, j], single.maps[0, 0], atol=1e-5)
