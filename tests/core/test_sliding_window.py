"""Sliding-window explanations (issue 16, section 2).

Oracles: MONAI's own ``sliding_window_inference`` on the same network and settings, the
whole-volume explanation computed directly, the window layout written out by hand, and
``R * (P - b)`` for a layer followed by one 1x1 convolution.
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from hirescam3d import Explainer, InputError, TargetError
from hirescam3d.core import postprocess
from tests.core.test_explainer import assert_same_state, snapshot


class FCN(nn.Module):
    """Fully convolutional: conv3-ReLU-conv3-ReLU ("features", receptive field 5) -> head.

    ``linear_head``: one 1x1 conv; else conv3 -> ReLU -> 1x1 conv (receptive field 7).
    """

    def __init__(self, dims: int = 3, linear_head: bool = False, n_classes: int = 2):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.features = nn.Sequential(
            conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1), nn.ReLU()
        )
        self.head = (
            conv(4, n_classes, 1)
            if linear_head
            else nn.Sequential(conv(4, 4, 3, padding=1), nn.ReLU(), conv(4, n_classes, 1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make(shape, seed=0, **kw):
    torch.manual_seed(seed)
    net = FCN(len(shape), **kw).eval()
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed + 1))
    return net, x


def box(shape, *ranges):
    r = torch.zeros(1, 1, *shape, dtype=torch.bool)
    r[(0, 0, *(slice(a, b) for a, b in ranges))] = True
    return r


@pytest.mark.parametrize(
    ("shape", "roi", "mode"),
    [((20, 12, 28), (16, 16, 16), "gaussian"), ((40, 30), (16, 16), "constant")],
    ids=["3d-gaussian-padded", "2d-constant"],
)
def test_blended_prediction_equals_monai_and_linear_head_map_is_region_times_logit(
    shape, roi, mode
):
    net, x = make(shape, linear_head=True)
    region = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(2)) < 0.3
    res = Explainer(net, "features").sliding_window(
        x, [1, 0], region=region, roi_size=roi, overlap=0.25, sw_batch_size=3, mode=mode
    )
    with torch.no_grad():
        monai = sliding_window_inference(x, roi, 3, net, overlap=0.25, mode=mode)
    assert torch.allclose(res.output, monai, atol=1e-6)
    # Only a 1x1 conv follows the layer: each window's map is R * (p_i - b); blended with
    # MONAI's weights that is R * (P - b) exactly, voxel by voxel.
    bias = net.head.bias.detach()
    for k, cls in enumerate([1, 0]):
        expected = region[:, 0] * (monai[:, cls] - bias[cls])
        assert torch.allclose(res.raw[:, k], expected, atol=1e-5)
        assert torch.allclose(
            res.region_scores[:, k], (monai[:, cls] * region[:, 0]).flatten(1).sum(1), rtol=1e-5
        )
    assert res.raw.shape == (1, 2, *shape)
    identity = postprocess.stretch_geometry(shape, shape)
    assert torch.allclose(res.maps, postprocess.unit_maps(res.raw, identity, shape), atol=1e-6)


def clean_axis(size: int, roi: int, starts: list[int], margin: int) -> torch.Tensor:
    """Voxels of one axis at least ``margin`` voxels from every inner face of every window
    (``[s, s + roi)``) that covers them; faces on the volume's border do not count (the
    whole-volume network pads there too)."""
    ok = torch.ones(size, dtype=torch.bool)
    for u in range(size):
        for s in starts:
            if s <= u < s + roi:
                if s > 0 and u - s < margin:
                    ok[u] = False
                if s + roi < size and s + roi - 1 - u < margin:
                    ok[u] = False
    return ok


def test_stitched_hirescam_equals_whole_volume_away_from_window_faces():
    """Receptive field 7 < overlap 12: wherever every window covering a voxel sees the
    voxel's whole neighbourhood, the stitched map equals the whole-volume map."""
    shape, roi = (48, 48, 48), 24
    net, x = make(shape)  # nonlinear head: the maps depend on the neighbourhood
    region = box(shape, (10, 40), (6, 30), (14, 44))
    ex = Explainer(net, "features")
    stitched = ex.sliding_window(
        x, [1], region=region, roi_size=roi, overlap=0.5, sw_batch_size=4, mode="constant"
    )
    whole = ex(x, [1], region=region)
    # Windows start at 0, 12, 24 on every axis (interval 24 * (1 - 0.5)). The layer's
    # value needs 2 voxels on either side (two 3-convs); the gradient of the logits at a
    # voxel's neighbours (3-conv + ReLU after the layer) needs 2 more: margin 4.
    ok = clean_axis(48, roi, [0, 12, 24], margin=4)
    assert ok[16:20].all() and ok[28:32].all() and not ok[12:16].any()  # inside overlaps
    clean = ok[:, None, None] & ok[None, :, None] & ok[None, None, :]
    a, b = stitched.raw[0, 0], whole.raw[0, 0]
    scale = b.abs().max()
    assert torch.allclose(a[clean], b[clean], atol=1e-5 * scale)
    # the comparison is not empty: it covers voxels blended from 2, 4 and 8 windows
    assert bool(clean[16:20, 16:20, 16:20].all()) and b[16:20, 16:20, 16:20].abs().sum() > 0


def test_predicted_region_is_the_mask_of_the_blended_prediction():
    shape, roi = (24, 20, 28), (16, 16, 16)
    net, x = make(shape, linear_head=True)
    with torch.no_grad():
        monai = sliding_window_inference(x, roi, 2, net, overlap=0.25, mode="gaussian")
    mask = torch.sigmoid(monai[:, 1:2]) >= 0.5
    assert 0 < mask.sum() < mask.numel()
    ex = Explainer(net, "features", task="sigmoid")
    res = ex.sliding_window(x, 1, region="predicted", roi_size=roi, sw_batch_size=2)
    assert torch.equal(res.region, mask) and torch.allclose(res.output, monai, atol=1e-6)
    expected = mask[:, 0] * (monai[:, 1] - net.head.bias[1].detach())
    assert torch.allclose(res.raw[:, 0], expected, atol=1e-5)


def test_sliding_window_errors_and_model_state():
    net, x = make((20, 20, 20))
    net.features.insert(1, nn.BatchNorm3d(4))
    net.train()
    net.features[0].weight.requires_grad_(False)
    before = snapshot(net)
    ex = Explainer(net, "features")
    region = box((20, 20, 20), (2, 8), (2, 8), (2, 8))
    with pytest.raises(InputError, match="region="):
        ex.sliding_window(x, 0, roi_size=16)
    with pytest.raises(TargetError, match="needs targets"):
        ex.sliding_window(x, region=region, roi_size=16)
    with pytest.raises(InputError, match="empty"):
        ex.sliding_window(x, 0, region=torch.zeros_like(region), roi_size=16)
    with pytest.raises(InputError, match=r"output grid is \(20, 20, 20\)"):
        ex.sliding_window(x, 0, region=region[..., :10], roi_size=16)
    with pytest.raises(InputError, match="roi_size"):
        ex.sliding_window(x, 0, region=region, roi_size=(16, 16))
    with pytest.raises(InputError, match="eigencam"):
        from hirescam3d.core.sliding import sliding_window_explain

        sliding_window_explain(ex, x, 0, region, roi_size=16, methods=["eigencam"])
    with pytest.raises(TargetError, match="out of range for 2 classes"):
        ex.sliding_window(x, 5, region=region, roi_size=16)
    assert_same_state(before, snapshot(net))
    res = ex.sliding_window(x, 0, region=region, roi_size=16, mode="constant")
    assert res.raw.abs().sum() > 0
    assert_same_state(before, snapshot(net))
