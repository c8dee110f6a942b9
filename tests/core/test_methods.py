"""The pure method functions and post-processing, on hand-computed examples."""

import pytest
import torch

from hirescam3d.core import postprocess
from hirescam3d.core.methods import METHODS, cam, get_method, gradcam, hirescam, register_method
from hirescam3d.errors import HiResCAMError

# Two 2x2 feature maps (F=2) and the gradient of one class score (paper Fig. 2 style).
A = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]]])  # (1, 2, 2, 2)
G = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]], [[-1.0, 0.0], [1.0, 1.0]]]])


def test_hirescam_hand_computed():
    # G1*A1 + G2*A2 = [[1,-2],[0,0]] + [[0,0],[3,0]]
    expected = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])
    assert torch.equal(hirescam(A, G), expected)


def test_gradcam_hand_computed():
    # alpha = mean(G1) = 0.5, mean(G2) = 0.25 -> 0.5*A1 + 0.25*A2
    expected = torch.tensor([[[0.5, 1.25], [0.75, 0.5]]])
    assert torch.equal(gradcam(A, G), expected)


def test_cam_hand_computed():
    w = torch.tensor([[2.0, -1.0]])  # (B, F)
    assert torch.equal(cam(A, w), torch.tensor([[[2.0, 3.0], [-3.0, 2.0]]]))


def test_methods_broadcast_over_k_targets():
    g2 = torch.stack([G, -G])  # (K=2, B=1, F, 2, 2)
    assert torch.equal(hirescam(A, g2)[1], -hirescam(A, G))
    assert torch.equal(gradcam(A, g2)[0], gradcam(A, G))
    w = torch.tensor([[[2.0, -1.0]], [[1.0, 1.0]]])  # (K, B, F)
    assert torch.equal(cam(A, w)[1], A.sum(1))


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 4, 5)])
def test_methods_are_nd(shape):
    a, g = torch.rand(shape), torch.randn(shape)
    assert hirescam(a, g).shape == (shape[0], *shape[2:])
    assert gradcam(a, g).shape == (shape[0], *shape[2:])


def test_methods_reject_maps_without_spatial_dims():
    with pytest.raises(HiResCAMError, match="at least one spatial dim"):
        hirescam(torch.rand(2, 3), torch.rand(2, 3))


def test_registry_and_unknown_method():
    assert {"cam", "gradcam", "hirescam"} <= set(METHODS)
    with pytest.raises(HiResCAMError, match="choose one of: ablationcam, cam, eigencam, gradcam,"):
        get_method("gradcam++")
    register_method("abs_hirescam", lambda a, g: hirescam(a, g).abs())
    try:
        assert torch.equal(get_method("abs_hirescam").fn(A, G), hirescam(A, G).abs())
    finally:
        METHODS.pop("abs_hirescam")


def test_normalize_is_not_inverted_and_handles_constant_maps():
    maps = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]]])  # (1, 2, 2, 2)
    out = postprocess.normalize(maps, spatial_dims=2)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[0, 1], torch.zeros(2, 2))
    assert not torch.isnan(postprocess.normalize(torch.zeros(1, 1, 3), 1)).any()


def test_relu_then_unit_maps_keep_zero_at_zero():
    # Divided by the maximum, not min-max: 0.5 stays half of the maximum 2.0.
    raw = torch.tensor([[[[-1.0, 2.0], [0.5, 1.0]]]])
    geometry = postprocess.stretch_geometry((2, 2), (2, 2))
    out = postprocess.unit_maps(raw, geometry)
    assert torch.allclose(out, torch.tensor([[[[0.0, 1.0], [0.25, 0.5]]]]))
    positive = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(postprocess.unit_maps(positive, geometry), positive / 4)


def test_unit_maps_of_negative_or_constant_maps_are_zero_not_nan():
    geometry = postprocess.stretch_geometry((3,), (6,))
    for raw in (-torch.rand(1, 1, 3) - 0.1, torch.zeros(1, 1, 3)):
        out = postprocess.unit_maps(raw, geometry)
        assert torch.equal(out, torch.zeros(1, 1, 6))
