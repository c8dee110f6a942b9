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

from hirescam3d.errors import HiResCAMError, InputError
from hirescam3d.monai.transforms import GradCAMd, HiResCAMd
from tests.models.test_user_bundles import UNET_ARGS, seeded

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


def test_region_errors_name_arguments_that_exist(unet):
    """Every message names an argument of the transform, and that argument works."""
    import inspect
    import re

    accepted = set(inspect.signature(HiResCAMd.__init__).parameters) | set(
        inspect.signature(HiResCAMd.__mro__[1].__init__).parameters
    )
    data = item()
    messages = []
    for kwargs in ({"region_key": "mask"}, {"region": "mask"}, {}):
        with pytest.raises(HiResCAMError) as err:
            HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                      class_names=CLASSES, **kwargs)(data)  # fmt: skip
        messages.append(str(err.value))
    assert "region_key='mask' is not a key of the data (keys: image, label)" in messages[0]
    assert "region='mask' is not a key of the data" in messages[1]
    assert "segmentation output" in messages[2] and "region='predicted'" in messages[2]
    for text in messages:
        for name in re.findall(r"\b(\w+)=", text):
            assert name in accepted, f"{name}= in {text!r} is not an argument of HiResCAMd"
    # what the messages propose works: region="predicted" and region=<key of a mask>
    for region in ("predicted", "label"):
        out = HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                        class_names=CLASSES, region=region, task="softmax")(item())  # fmt: skip
        assert out["liver_hirescam"].shape == (1, 16, 16, 16)
    with pytest.raises(HiResCAMError, match="give region= or region_key=, not both"):
        HiResCAMd("image", model=unet, target_layer=LAYER, region="label", region_key="label")
    data["label"] = data["label"][:, :8]
    with pytest.raises(InputError, match="region is on a grid of"):
        HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                  class_names=CLASSES, region="label")(data)  # fmt: skip


def test_region_predicted_as_argument_or_key_matches_the_data_entry(unet):
    """``region="predicted"``, ``region_key="predicted"`` (no such key) and a data entry
    holding ``"predicted"`` explain the same thing: the model's own argmax mask."""
    maps = []
    for kwargs, extra in (({"region": "predicted"}, {}), ({"region_key": "predicted"}, {}),
                          ({"region": "which"}, {"which": "predicted"})):  # fmt: skip
        data = {**item(2), **extra}
        out = HiResCAMd("image", model=unet, target_layer=LAYER, findings=["liver"],
                        class_names=CLASSES, task="softmax", values="density",
                        **kwargs)(data)  # fmt: skip
        maps.append(out["liver_hirescam"].as_tensor())
    x = item(2)["image"].as_tensor()
    with torch.no_grad():
        logits = unet(x[None])[0]
    mask = (logits.argmax(0) == 1).float()
    score, acts, grads = by_hand(unet, x, 1, mask)
    torch.testing.assert_close(maps[0][0], (grads * acts).sum(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[0], maps[2])


def test_inferer_sliding_window_matches_monai_prediction(unet):
    """``inferer=SlidingWindowInferer(...)``: the explained prediction is MONAI's own
    windowed prediction; the density map sums to its region score minus bias x size."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    data = item(3)
    # no overlap: every voxel's logits come from one window, so the region score splits
    # exactly (the layer is followed by a 3x3 convolution, which blending with overlap
    # would smear across window weights; docs/segmentation.md)
    inferer = SlidingWindowInferer(roi_size=(8, 16, 8), sw_batch_size=2, overlap=0.0)
    out = HiResCAMd("image", model=unet, target_layer=LAYER, findings=["tumour"],
                    class_names=CLASSES, region="label", values="density",
                    inferer=inferer, scores_key="scores")(data)  # fmt: skip
    x = data["image"].as_tensor()[None]
    with torch.no_grad():
        windowed = inferer(x, unet)[0]
        whole = unet(x)[0]
    assert not torch.allclose(windowed, whole, atol=1e-3)  # the windows matter here
    region = data["label"].as_tensor()[0].bool()
    bias = float(unet.model[2][1].conv.unit0.conv.bias[2].detach())
    total = float(out["tumour_hirescam"].as_tensor().double().sum())
    expected = float(windowed[2][region].double().sum()) - bias * int(region.sum())
    assert total == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # with overlap and gaussian blending: the inferer's whole schedule is used
    from hirescam3d import Explainer
    from hirescam3d.core import postprocess

    inferer = SlidingWindowInferer((8, 16, 8), 2, overlap=0.5, mode="gaussian", sigma_scale=0.2)
    out = HiResCAMd("image", model=unet, target_layer=LAYER, findings=["tumour"],
                    class_names=CLASSES, region="label", values="density",
                    inferer=inferer)(item(3))  # fmt: skip
    explainer = Explainer(unet, LAYER, class_names=CLASSES, postprocessing=postprocess.density)
    sw = explainer.sliding_window(x, ["tumour"], region=region[None, None], roi_size=(8, 16, 8),
                                  overlap=0.5, sw_batch_size=2, mode="gaussian",
                                  sigma_scale=0.2)  # fmt: skip
    torch.testing.assert_close(out["tumour_hirescam"].as_tensor()[0], sw.maps[0, 0])
    with torch.no_grad():
        torch.testing.assert_close(sw.output[0], inferer(x, unet)[0], rtol=1e-5, atol=1e-5)
    # SimpleInferer is the whole item at once; anything else is refused by name
    simple = HiResCAMd("image", model=unet, target_layer=LAYER, findings=["tumour"],
                       class_names=CLASSES, region="label", inferer=SimpleInferer())
    plain = HiResCAMd("image", model=unet, target_layer=LAYER, findings=["tumour"],
                      class_names=CLASSES, region="label")
    assert torch.equal(simple(item(3))["tumour_hirescam"], plain(item(3))["tumour_hirescam"])
    with pytest.raises(HiResCAMError, match="inferer= takes MONAI's SimpleInferer or "
                       "SlidingWindowInferer, not SliceInferer"):  # fmt: skip
        from monai.inferers import SliceInferer

        HiResCAMd("image", model=unet, target_layer=LAYER, inferer=SliceInferer(roi_size=(8, 8)))
