"""Grad-CAM++, XGrad-CAM, LayerCAM, Gradient x Input and Eigen-CAM (issue 15).

Each method is checked in 2D and 3D against an oracle written here from the published
formula with NumPy and explicit loops, on the known identities of a global-average-
pooling + linear network, and through the Explainer (batch == single calls, several
targets == separate calls, one forward pass, model restored, forward keyword arguments).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hirescam3d import Explainer
from hirescam3d.core.methods import (
    METHODS,
    cam,
    eigencam,
    get_method,
    gradcampp,
    gradxinput,
    hirescam,
    layercam,
    register_guided_methods,
    register_method,
    xgradcam,
)
from hirescam3d.errors import HiResCAMError
from tests.conftest import CONV, SPATIAL, ConvLinearNet, GapLinearNet, make_input

NEW_GRADIENT_METHODS = ("gradcampp", "xgradcam", "layercam", "gradxinput")
NEW_METHODS = (*NEW_GRADIENT_METHODS, "eigencam")
SHAPES = {2: (2, 3, 4, 5), 3: (2, 3, 3, 4, 2)}  # (B, F, *S)


# -- oracles: the published formulas, per item and feature, over flattened space --------
def _items(a: torch.Tensor, g: torch.Tensor | None = None):
    """Yield (b, A_b as (F, N) float64 array, G_b as (F, N) or None)."""
    a = a.double().numpy()
    for b in range(a.shape[0]):
        ab = a[b].reshape(a.shape[1], -1)
        gb = None if g is None else g[b].double().numpy().reshape(a.shape[1], -1)
        yield b, ab, gb


def oracle_gradcampp(a: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    """Chattopadhay et al. eq. 19 with exp(S) cancelled: alpha = g^2 / (2 g^2 + sum A g^3)."""
    out = np.zeros((a.shape[0], int(np.prod(a.shape[2:]))))
    for b, ab, gb in _items(a, g):
        for f in range(ab.shape[0]):
            s3 = sum(ab[f, j] * gb[f, j] ** 3 for j in range(ab.shape[1]))
            w = 0.0
            for j in range(ab.shape[1]):
                den = 2 * gb[f, j] ** 2 + s3
                alpha = gb[f, j] ** 2 / den if den != 0 else 0.0
                w += alpha * max(gb[f, j], 0.0)
            out[b] += w * ab[f]
    return out.reshape(a.shape[0], *a.shape[2:])


def oracle_xgradcam(a: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    """Fu et al.: w_f = sum_s (A_f(s) / sum_s' A_f(s')) * g_f(s)."""
    out = np.zeros((a.shape[0], int(np.prod(a.shape[2:]))))
    for b, ab, gb in _items(a, g):
        for f in range(ab.shape[0]):
            total = ab[f].sum()
            w = sum(ab[f, j] / total * gb[f, j] for j in range(ab.shape[1])) if total else 0.0
            out[b] += w * ab[f]
    return out.reshape(a.shape[0], *a.shape[2:])


def oracle_layercam(a: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    """Jiang et al.: M(s) = sum_f relu(g_f(s)) * A_f(s)."""
    out = np.zeros((a.shape[0], int(np.prod(a.shape[2:]))))
    for b, ab, gb in _items(a, g):
        for j in range(ab.shape[1]):
            out[b, j] = sum(max(gb[f, j], 0.0) * ab[f, j] for f in range(ab.shape[0]))
    return out.reshape(a.shape[0], *a.shape[2:])


def oracle_gradxinput(a: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    out = np.zeros((a.shape[0], int(np.prod(a.shape[2:]))))
    for b, ab, gb in _items(a, g):
        for j in range(ab.shape[1]):
            out[b, j] = sum(gb[f, j] * ab[f, j] for f in range(ab.shape[0]))
    return out.reshape(a.shape[0], *a.shape[2:])


def oracle_eigencam(a: torch.Tensor) -> np.ndarray:
    """Projection of the centred (N, F) activations on the covariance's top eigenvector
    (np.linalg.eigh, not an SVD), signed to correlate positively with mean_f A_f."""
    out = np.zeros((a.shape[0], int(np.prod(a.shape[2:]))))
    for b, ab, _ in _items(a):
        m = ab.T  # (N, F)
        c = m - m.mean(axis=0)
        _, vecs = np.linalg.eigh(c.T @ c)
        proj = c @ vecs[:, -1]
        if np.corrcoef(proj, m.mean(axis=1))[0, 1] < 0:
            proj = -proj
        out[b] = proj
    return out.reshape(a.shape[0], *a.shape[2:])


ORACLES = {
    "gradcampp": oracle_gradcampp,
    "xgradcam": oracle_xgradcam,
    "layercam": oracle_layercam,
    "gradxinput": oracle_gradxinput,
}


def _random(dims: int, seed: int, k: int | None = None, positive: bool = True):
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[dims]
    a = torch.rand(shape, generator=gen, dtype=torch.float64)
    if not positive:
        a = a - 0.3
    g = torch.randn((k, *shape) if k else shape, generator=gen, dtype=torch.float64)
    return a, g


# -- pure functions against the oracles --------------------------------------------------
@pytest.mark.parametrize("name", NEW_GRADIENT_METHODS)
def test_gradient_methods_match_the_published_formula(name, dims):
    a, g = _random(dims, seed=dims)
    got = get_method(name).fn(a, g)
    assert got.shape == (a.shape[0], *a.shape[2:])
    np.testing.assert_allclose(got.numpy(), ORACLES[name](a, g), rtol=1e-9, atol=1e-12)
    # K targets at once: (K, B, F, *S) -> (K, B, *S), each as its own call.
    a, g = _random(dims, seed=10 + dims, k=3, positive=False)
    got = get_method(name).fn(a, g)
    assert got.shape == (3, a.shape[0], *a.shape[2:])
    for k in range(3):
        np.testing.assert_allclose(got[k].numpy(), ORACLES[name](a, g[k]), rtol=1e-9, atol=1e-12)


def test_eigencam_matches_the_first_principal_component(dims):
    a, _ = _random(dims, seed=20 + dims, positive=False)
    got = eigencam(a)
    assert got.shape == (a.shape[0], *a.shape[2:])
    np.testing.assert_allclose(got.numpy(), oracle_eigencam(a), rtol=1e-7, atol=1e-10)
    assert torch.allclose(eigencam(a.float()).double(), got, atol=1e-4)  # float32 in, out


def test_hand_computed_examples():
    # One feature, two cells: A = [1, 3], g = [1, 2] -> sum A g^3 = 1 + 24 = 25.
    a = torch.tensor([[[1.0, 3.0]]])
    g = torch.tensor([[[1.0, 2.0]]])
    alpha = torch.tensor([1 / 27, 4 / 33])
    w = (alpha * g).sum()
    assert torch.allclose(gradcampp(a, g), w * a[:, 0])
    assert torch.allclose(xgradcam(a, g), (1 * 1 + 3 * 2) / 4 * a[:, 0])
    assert torch.equal(layercam(a, -g), torch.zeros(1, 2))
    assert torch.equal(gradxinput(a, g), torch.tensor([[1.0, 6.0]]))
    # One feature: its first principal component is the feature itself, centred.
    assert torch.allclose(eigencam(a), torch.tensor([[-1.0, 1.0]]))


def test_zero_denominators_give_zero_weights_not_nan():
    a = torch.zeros(1, 2, 3, 3)
    a[0, 1] = torch.rand(3, 3)
    g = torch.zeros(1, 2, 3, 3)  # Grad-CAM++: 0 / 0 everywhere
    for fn in (gradcampp, xgradcam, layercam, gradxinput):
        out = fn(a, g)
        assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(1, 3, 3))
    g = torch.randn(1, 2, 3, 3)  # XGrad-CAM: the dead feature 0 sums to 0
    assert torch.allclose(xgradcam(a, g), xgradcam(a[:, 1:], g[:, 1:]))
    assert torch.equal(eigencam(torch.ones(1, 3, 2, 2)), torch.zeros(1, 2, 2))  # no variance


def test_eigencam_sign_follows_the_mean_activation():
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(3, 4, 5, 6, generator=gen)
    for flip in (1.0, -1.0):  # negating the activations flips the map with them
        m = eigencam(flip * a)
        mean_act = (flip * a).mean(1)
        centred = mean_act - mean_act.mean((1, 2), keepdim=True)
        corr = ((m - m.mean((1, 2), keepdim=True)) * centred).sum((1, 2))
        assert (corr > 0).all()


def test_registry_has_the_new_methods():
    for name in NEW_GRADIENT_METHODS:
        assert METHODS[name].needs == "gradients"
    assert METHODS["eigencam"].needs == "activations"
    for name in ("scorecam", "ablationcam", "occlusion"):
        assert METHODS[name].needs == "model" and METHODS[name].resolution == "layer"
    assert all(m.description for m in METHODS.values())
    with pytest.raises(ValueError, match="activations"):
        register_method("bad", hirescam, needs="model-weights")


# -- identities on the CAM architecture (global average pooling + one linear layer) -----
def _gap_results(dims: int, n_classes: int = 4):
    torch.manual_seed(dims)
    net = GapLinearNet(dims, n_classes=n_classes).eval()
    x = make_input(dims, batch=2, seed=dims)
    names = ["cam", "hirescam", "gradcam", *NEW_METHODS]
    results = Explainer(net, "features").explain(x, list(range(n_classes)), names, maps=False)
    return net, x, {k: v.raw.double() for k, v in results.items()}


def test_identities_on_the_cam_architecture(dims):
    net, x, raw = _gap_results(dims)
    n = float(np.prod(SPATIAL[dims]))  # G = W_k / N, the same at every location
    # Gradient x Input at the layer is HiResCAM, exactly, on any network.
    assert torch.equal(raw["gradxinput"], raw["hirescam"])
    # XGrad-CAM's activation-weighted mean of a constant gradient is that constant: CAM / N.
    assert torch.allclose(raw["xgradcam"], raw["cam"] / n, atol=1e-6)
    assert torch.allclose(raw["xgradcam"], raw["gradcam"], atol=1e-6)
    # LayerCAM keeps the positive weights only: CAM with the fc rows clamped at 0, / N.
    with torch.no_grad():
        acts = net.features(x).double()
        w = net.fc.weight.double()
        pos = torch.einsum("kf,bf...->bk...", w.clamp_min(0), acts) / n
        # Grad-CAM++ with g_f = c_f constant over space (c = W_k / N):
        #   alpha_f = 1 / (2 + c_f sum_S A_f),  w_f = N relu(c_f) alpha_f.
        c = (w / n)[None, :, :, None]  # (1, K, F, 1)
        sums = acts.flatten(2).sum(-1)[:, None, :, None]  # (B, 1, F, 1)
        wpp = n * c.clamp_min(0) / (2 + c * sums)
        pp = torch.einsum("bkf,bf...->bk...", wpp[..., 0], acts)
    assert torch.allclose(raw["layercam"], pos, atol=1e-6)
    assert torch.allclose(raw["gradcampp"], pp, rtol=1e-4, atol=1e-6)
    # Eigen-CAM is class-agnostic: every target gets the item's one map.
    assert torch.equal(raw["eigencam"], raw["eigencam"][:, :1].expand_as(raw["eigencam"]))


def test_gradcampp_and_layercam_equal_cam_for_a_class_with_positive_weights(dims):
    # With one feature map and a positive weight, every gradient method is CAM up to a
    # positive factor: identical after normalising by the maximum.
    torch.manual_seed(0)
    net = GapLinearNet(dims, n_classes=2, feat=1).eval()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[0.7], [1.3]]))
    x = make_input(dims, batch=2)
    names = ["cam", "gradcampp", "xgradcam", "layercam", "hirescam"]
    res = Explainer(net, "features").explain(x, [0, 1], names)
    for name in names[1:]:
        assert torch.allclose(res[name].maps, res["cam"].maps, atol=1e-5), name


# -- through the Explainer -----------------------------------------------------------------
# Grad-CAM++'s alpha divides by 2 g^2 + sum_S(A g^3), which comes close to 0 where negative
# gradients cancel: float32 round-off of the network (a batch and a single item use
# different convolution kernels) is amplified there, by up to ~1e3 on these networks.
REL_TOL = {"gradcampp": 2e-3}


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> bool:
    """Equal within a tolerance relative to the largest magnitude of ``want``."""
    scale = float(want.abs().max()) or 1.0
    return float((got - want).abs().max()) <= REL_TOL.get(name, 1e-5) * scale


def test_batch_equals_single_calls_and_targets_equal_separate_calls(dims):
    torch.manual_seed(1)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims, batch=3, seed=7)
    explainer = Explainer(net, "features")
    together = explainer.explain(x, [2, 0, 3], list(NEW_METHODS))
    for name in NEW_METHODS:
        raw = together[name].raw
        assert raw.shape == (3, 3, *SPATIAL[dims])
        for b in range(3):
            single = explainer.explain(x[b : b + 1], [2, 0, 3], [name])[name]
            assert _close(single.raw[0], raw[b], name), name
            assert _close(single.maps[0], together[name].maps[b], name), name
        for k, t in enumerate([2, 0, 3]):
            alone = explainer.explain(x, t, [name])[name]
            assert _close(alone.raw[:, 0], raw[:, k], name), name


def test_all_methods_and_targets_cost_one_forward_pass(dims, monkeypatch):
    torch.manual_seed(2)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    explainer = Explainer(net, "features")
    explainer.explain(x, [0, 1, 2], ["hirescam", "gradcam", *NEW_METHODS])  # traces too
    explainer.explain(x, [0, 1, 2], ["hirescam", "gradcam", *NEW_METHODS])
    assert len(calls) == 2
    # Eigen-CAM alone needs no gradients at all.
    def no_gradients(*_a, **_k):
        raise AssertionError("gradients were computed")

    monkeypatch.setattr(Explainer, "_gradients", no_gradients)
    out = explainer.explain(x, [0, 1], ["eigencam"])["eigencam"]
    assert out.raw.shape == (2, 2, *SPATIAL[dims]) and len(calls) == 3


def test_model_is_restored():
    torch.manual_seed(3)
    net = ConvLinearNet(3).train()
    net.features[0].weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    Explainer(net, "features").explain(make_input(3), [0, 1], list(NEW_METHODS))
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


class KeywordNet(nn.Module):
    """A network whose forward needs a keyword argument (as MONAI's adjoint test)."""

    def __init__(self, dims: int):
        super().__init__()
        self.features = nn.Sequential(CONV[dims](1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, *, scale: float, offset: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x * scale).flatten(2).mean(-1)) + offset


def test_forward_keyword_arguments_reach_the_model(dims):
    torch.manual_seed(4)
    net = KeywordNet(dims).eval()
    x = make_input(dims)
    kw = {"scale": 2.0, "offset": torch.tensor([0.0, 5.0, 0.0])}
    explainer = Explainer(net, "features", method="gradcampp")
    res = explainer.explain(x, None, ["gradcampp", "eigencam"], forward_kwargs=kw)
    assert (res["gradcampp"].targets == 1).all()  # the offset made class 1 the top class
    assert res["gradcampp"].maps.shape == (2, 1, *SPATIAL[dims])
    called = explainer(x, 1, **kw)
    assert torch.equal(called.raw, res["gradcampp"].raw)
    # The same as explaining the doubled input with the offset folded in.
    plain = Explainer(KeywordNetFixed(net), "net.features", method="gradcampp")(2.0 * x, 1)
    assert torch.allclose(plain.raw, called.raw, atol=1e-6)
    assert explainer.geometry(x[:, :, :-1], forward_kwargs=kw).grid_shape[0] == x.shape[2] - 1
    with pytest.raises(TypeError, match="scale"):
        explainer(x, 1)


class KeywordNetFixed(nn.Module):
    def __init__(self, net: KeywordNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, scale=1.0, offset=torch.tensor([0.0, 5.0, 0.0]))


def test_methods_reject_maps_without_spatial_dims():
    for fn in (gradcampp, xgradcam, layercam, gradxinput, eigencam):
        with pytest.raises(HiResCAMError, match="at least one spatial dim"):
            fn(torch.rand(2, 3), torch.rand(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_new_methods_on_cuda_match_cpu():
    torch.manual_seed(5)
    net = ConvLinearNet(3).eval()
    x = make_input(3)
    cpu = Explainer(net, "features").explain(x, [0, 1], list(NEW_METHODS))
    gpu = Explainer(net.cuda(), "features").explain(x.cuda(), [0, 1], list(NEW_METHODS))
    for name in NEW_METHODS:
        assert gpu[name].raw.is_cuda
        assert torch.allclose(gpu[name].raw.cpu(), cpu[name].raw, rtol=1e-3, atol=1e-5), name


# -- perturbation methods (needs="model"): Ablation-CAM, Score-CAM, occlusion -------------
PERTURBATION = ("ablationcam", "scorecam", "occlusion")


def _logits(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(x).double().numpy()


def oracle_ablationcam(net: ConvLinearNet, x: torch.Tensor, target: int) -> np.ndarray:
    """Desai & Ramaswamy without the 1/y factor: w_f = y - y(A_f = 0), one f at a time."""
    with torch.no_grad():
        acts = net.features(x)
        y = net.fc(acts.flatten(1))[:, target]
        out = torch.zeros(x.shape[0], *acts.shape[2:], dtype=torch.float64)
        for f in range(acts.shape[1]):
            ablated = acts.clone()
            ablated[:, f] = 0
            w = (y - net.fc(ablated.flatten(1))[:, target]).double()
            out += w.view(-1, *[1] * (acts.ndim - 2)) * acts[:, f].double()
    return out.numpy()


def oracle_occlusion(net: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """One input voxel at a time set to 0 (a stride-1 layer's tile is one voxel)."""
    y = _logits(net, x)[:, target]
    out = np.zeros((x.shape[0], *x.shape[2:]))
    for index in np.ndindex(*x.shape[2:]):
        occluded = x.clone()
        occluded[(slice(None), slice(None), *index)] = 0
        out[(slice(None), *index)] = y - _logits(net, occluded)[:, target]
    return out


def oracle_scorecam(net: GapLinearNet, x: torch.Tensor, target: int) -> np.ndarray:
    """Wang et al. with logits: w_f = y(x * minmax(A_f)) - y(0); the layer's grid is the
    input's (stride 1, cell i centred on voxel i), so no upsampling."""
    with torch.no_grad():
        acts = net.features(x).double()
    base = _logits(net, torch.zeros_like(x[:1]))[0, target]
    out = np.zeros((x.shape[0], *x.shape[2:]))
    for b in range(x.shape[0]):
        for f in range(acts.shape[1]):
            a = acts[b, f].numpy()
            span = a.max() - a.min()
            mask = (a - a.min()) / span if span > 0 else np.zeros_like(a)
            masked = x[b : b + 1] * torch.from_numpy(mask).float()
            w = _logits(net, masked)[0, target] - base
            out[b] += w * a
    return out


@pytest.mark.parametrize("name", PERTURBATION)
def test_perturbation_methods_match_their_definition(name, dims):
    torch.manual_seed(7)
    net = (ConvLinearNet(dims) if name == "ablationcam" else GapLinearNet(dims, feat=3)).eval()
    x = make_input(dims, batch=2, seed=3)
    oracle = {"ablationcam": oracle_ablationcam, "scorecam": oracle_scorecam,
              "occlusion": oracle_occlusion}[name]
    res = Explainer(net, "features", method=name).explain(x, [1, 3], [name], maps=False)[name]
    assert res.raw.shape == (2, 2, *SPATIAL[dims])
    for k, t in enumerate([1, 3]):
        want = oracle(net, x, t)
        got = res.raw[:, k].double().numpy()
        # atol: float32 round-off of score differences near zero (the oracle is float64)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ablationcam_weights_are_hirescam_totals_on_a_linear_head(dims):
    # After the layer only one linear layer: zeroing A_f lowers the logit by exactly
    # sum_S(W_f * A_f), HiResCAM's total for feature f.
    torch.manual_seed(8)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    res = Explainer(net, "features").explain(x, [0, 2], ["ablationcam"], maps=False)
    with torch.no_grad():
        acts = net.features(x)
        w = net.fc.weight.view(net.fc.out_features, *acts.shape[1:])[[0, 2]]  # (K, F, *S)
        totals = (w.unsqueeze(1) * acts).flatten(3).sum(-1)  # (K, B, F)
    assert torch.allclose(res["ablationcam"].raw.movedim(1, 0), cam(acts, totals), atol=1e-5)


def test_perturbations_run_in_batches_with_progress_and_restore_the_model(dims):
    torch.manual_seed(9)
    net = ConvLinearNet(dims).train()
    x = make_input(dims, batch=2)
    calls, reports = [], []
    net.register_forward_pre_hook(lambda _m, inputs: calls.append(inputs[0].shape[0]))
    capped = Explainer(net, "features", batch_size=4, progress=lambda *a: reports.append(a))
    out = capped.explain(x, [0, 1], list(PERTURBATION), maps=False)
    n_feat, n_cells = 3, int(np.prod(SPATIAL[dims]))  # ConvLinearNet: F = 3
    # One forward pass (the geometry is traced within it, no pass of its own), then the
    # perturbed inputs of ablation, Score-CAM (+ its baseline) and occlusion, batch_size
    # at a time.
    assert calls[0] == 2
    assert max(calls[1:]) <= 4
    assert sum(calls[1:]) == 2 * n_feat + (2 * n_feat + 1) + 2 * n_cells
    assert reports[-1] == (2 * n_cells, 2 * n_cells)
    assert all(done <= of for done, of in reports)
    whole = Explainer(net, "features", batch_size=1000).explain(x, [0, 1], list(PERTURBATION),
                                                                 maps=False)
    for name in PERTURBATION:
        assert torch.allclose(out[name].raw, whole[name].raw, rtol=1e-4, atol=1e-6), name
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())
    assert [len(m._forward_pre_hooks) for m in net.modules()] == [1] + [0] * (
        len(list(net.modules())) - 1
    )


def test_perturbation_maps_are_placed_like_the_others():
    torch.manual_seed(10)
    net = ConvLinearNet(3).eval()
    x = make_input(3)
    res = Explainer(net, "features").explain(x, [0], ["occlusion", "hirescam"])
    assert res["occlusion"].maps.shape == res["hirescam"].maps.shape == (2, 1, *SPATIAL[3])
    assert res["occlusion"].maps.min() >= 0 and res["occlusion"].maps.max() <= 1


# -- guided backpropagation and Guided Grad-CAM / HiResCAM (input resolution) -------------
GUIDED = ("guidedbackprop", "guided-gradcam", "guided-hirescam")


@pytest.fixture
def guided():
    """The guided methods are registered at import, as input-resolution model methods
    (registering them again is harmless)."""
    register_guided_methods()
    assert all(METHODS[n].needs == "model" and METHODS[n].resolution == "input"
               for n in GUIDED)


def oracle_guided_backprop(net: ConvLinearNet, x: torch.Tensor, target: int) -> torch.Tensor:
    """Springenberg et al. by hand: back through each ReLU only where its input and the
    incoming gradient are both positive; convolutions' backward by autograd, one at a time."""
    conv1, _, conv2, _ = net.features
    xi = x.clone().requires_grad_(True)
    z1 = conv1(xi)
    h1 = z1.clamp_min(0).detach().requires_grad_(True)
    z2 = conv2(h1)
    g = net.fc.weight[target].view(1, *z2.shape[1:]).expand_as(z2)
    g = g.clamp_min(0) * (z2 > 0)
    (g,) = torch.autograd.grad(z2, h1, g)
    g = g.clamp_min(0) * (z1 > 0)
    (g,) = torch.autograd.grad(z1, xi, g)
    return g.sum(1).detach()  # summed over input channels


def test_guided_methods_match_their_definition(dims, guided):
    torch.manual_seed(11)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims, batch=2, seed=4)
    res = Explainer(net, "features").explain(x, [0, 3], list(GUIDED))
    with torch.no_grad():
        acts = net.features(x)
    for k, t in enumerate([0, 3]):
        gb = oracle_guided_backprop(net, x, t)
        # The layer's gradient is the fc row; the padded stride-1 layer lies on the input
        # grid, so placing its maps on the input is the identity.
        g = net.fc.weight[t].detach().view(1, *acts.shape[1:]).expand_as(acts)
        gc = (g.mean(dim=tuple(range(2, g.ndim)), keepdim=True) * acts).sum(1).clamp_min(0)
        hr = (g * acts).sum(1).clamp_min(0)
        for name, want in (("guidedbackprop", gb), ("guided-gradcam", gb * gc),
                           ("guided-hirescam", gb * hr)):
            got = res[name].raw[:, k]
            assert got.shape == x.shape[:1] + x.shape[2:]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), name
            assert res[name].maps.shape == (2, 2, *x.shape[2:])


def test_guided_methods_leave_the_model_as_it_was(guided):
    torch.manual_seed(12)
    net = ConvLinearNet(2).train()
    net.features[2].weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    res = Explainer(net, "features").explain(make_input(2), [1], list(GUIDED), maps=False)
    assert all(torch.isfinite(r.raw).all() for r in res.values())
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    assert all(r.inplace for r in relus)  # in-place ReLUs stay in-place
