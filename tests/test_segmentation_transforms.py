"""HiResCAMd / GradCAMd with ``region_key=`` on a segmentation UNet, inside a MONAI
``Compose`` under ``torch.no_grad()``: maps checked against the network's own output and
gradients computed here by hand with autograd."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import Compose
from test_user_bundles import UNET_ARGS, seeded

from hirescam3d.errors import HiResCAMError, InputError
from hirescam3d.transforms import GradCAMd, HiResCAMd

CLASSES = ("background", "liver", "tumour")
LAYER = "model.2.0"  # the last map before the output convolution (test_user_bundles)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return seeded(UNet, 0, **UNET_ARGS)


def item(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    label = torch.zeros(1, 16, 16, 16)
    label[0, 3:9, 5:14, 2:7] = 1
    return {
        "image": MetaTensor(torch.rand(1, 16, 16, 16, generator=g), affine=affine),
        "label": MetaTensor(label, affine=affine),
    }


def by_hand(net: torch.nn.Module, x: torch.Tensor, c: int, region: torch.Tensor):
    """``(region score, activations A, gradient G)`` of class c's logits summed over
    ``region``, with respect to the layer's output."""
    held = {}

    def hook(_m, _i, out):
        held["a"] = out
        out.retain_grad()

    handle = dict(net.named_modules())[LAYER].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            score = (net(x[None])[0, c] * region).sum()
            score.backward()
    finally:
        handle.remove()
    net.zero_grad(set_to_none=True)
    return float(score.detach()), held["a"][0].detach(), held["a"].grad[0].detach()


def test_hirescamd_region_key_density_sums_to_the_region_score(unet):
    data = item()
    pipeline = Compose([
        HiResCAMd("image", model=unet, target_layer=LAYER, findings=["tumour"],
                  class_names=CLASSES, region_key="label", values="density"),
    ])  # fmt: skip
    with torch.no_grad():
        out = pipeline(data)
    region = data["label"].as_tensor()[0]
    score, acts, grads = by_hand(unet, data["image"].as_tensor(), 2, region)
    bias = float(unet.model[2][1].conv.unit0.conv.bias[2].detach())
    cam = out["tumour_hirescam"]
    assert isinstance(cam, MetaTensor) and tuple(cam.shape) == (1, 16, 16, 16)
    assert torch.equal(cam.affine, data["image"].affine)
    # HiResCAM = sum_f G * A at full resolution (the layer is on the input grid)
    torch.testing.assert_close(cam.as_tensor()[0], (grads * acts).sum(0), rtol=1e-4, atol=1e-5)
    total = float(cam.as_tensor().double().sum())
    assert total == pytest.approx(score - bias * float(region.sum()), rel=1e-4)
    assert not unet.training and all(p.grad is None for p in unet.parameters())


def test_gradcamd_predicted_region(unet):
    data = item(1)
    data["region"] = "predicted"
    transform = GradCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                         class_names=CLASSES, region_key="region", task="softmax",
                         scores_key="scores")  # fmt: skip
    with torch.inference_mode():
        out = transform(data)
    x = data["image"].as_tensor()
    with torch.no_grad():
        logits = unet(x[None])[0]
    mask = (logits.argmax(0) == 1).float()
    assert 0 < mask.sum() < mask.numel()
    score, acts, grads = by_hand(unet, x, 1, mask)
    weights = grads.mean(dim=(1, 2, 3))
    cam = torch.relu((weights[:, None, None, None] * acts).sum(0))
    torch.testing.assert_close(out["liver_gradcam"].as_tensor()[0], cam / cam.max(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    # the scores: each class over its own predicted mask
    assert float(out["scores"][1]) == pytest.approx(score, rel=1e-5)


def test_region_key_errors(unet):
    data = item()
    with pytest.raises(HiResCAMError, match="region_key 'mask' is not in the data"):
        HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                  class_names=CLASSES, region_key="mask")(data)  # fmt: skip
    with pytest.raises(InputError, match="say which voxels"):
        HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                  class_names=CLASSES)(data)  # fmt: skip
    data["label"] = data["label"][:, :8]
    with pytest.raises(InputError, match="region is on a grid of"):
        HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                  class_names=CLASSES, region_key="label")(data)  # fmt: skip
