"""HiResCAMd / GradCAMd / CAMd in user-style MONAI pipelines, under no_grad and inference mode."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, SaveImaged
from torch import nn

from hirescam3d.core.explainer import Explainer
from hirescam3d.errors import HiResCAMError
from hirescam3d.models import zoo
from hirescam3d.monai.transforms import CAMd, Explaind, GradCAMd, HiResCAMd
from hirescam3d.pipeline import preprocess_transforms
from tests.pipeline.test_pipeline import CELL, blob_model, oblique_phantom

DOC = Path(__file__).resolve().parents[2] / "docs" / "monai_pipeline.md"


@pytest.fixture(scope="module")
def blob_scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("blob")
    ct, _, _, affine, blob_world = oblique_phantom()
    path = root / "chest.nii.gz"
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(path))
    return path, blob_world


def preprocessed(path: Path):
    _, info = blob_model()
    pre = preprocess_transforms(info)
    return pre, pre({"image": str(path)})


@pytest.mark.parametrize("grad_context", [torch.no_grad, torch.inference_mode])
def test_user_pipeline_saves_on_the_scan_grid(blob_scan, tmp_path, grad_context):
    """LoadImaged ... -> HiResCAMd -> Invertd -> SaveImaged, with gradients switched off."""
    path, blob_world = blob_scan
    network, info = blob_model()
    pre = preprocess_transforms(info)  # starts with LoadImaged
    assert type(pre.transforms[0]) is LoadImaged
    pipeline = Compose([
        pre,
        HiResCAMd("image", model=network, info=info, findings=["blob"]),
        Invertd("blob_hirescam", transform=pre, orig_keys="image", nearest_interp=False),
        SaveImaged("blob_hirescam", output_dir=tmp_path, output_postfix="blob",
                   separate_folder=False, resample=False, print_log=False),
    ])
    with grad_context():
        assert not torch.is_grad_enabled()
        data = pipeline({"image": str(path)})
        assert not torch.is_grad_enabled()  # the transform restored the caller's mode
    src = nib.load(str(path))
    out = nib.load(str(tmp_path / "chest_blob.nii.gz"))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    np.testing.assert_allclose(data["blob_hirescam"].affine.numpy(), src.affine, atol=1e-4)
    vol = out.get_fdata()
    assert vol.min() >= 0.0 and vol.max() <= 1.0 + 1e-6
    peak = np.unravel_index(np.argmax(vol), vol.shape)
    peak_world = (src.affine @ np.array([*peak, 1.0]))[:3]
    grid = data["image"].affine.numpy()  # the model grid
    offset_cells = np.linalg.solve(grid[:3, :3], peak_world - blob_world) / CELL
    assert np.all(np.abs(offset_cells) <= 1.0), offset_cells


def test_maps_equal_the_explainer_and_carry_the_image_meta(blob_scan):
    path, _ = blob_scan
    network, info = blob_model()
    _, data = preprocessed(path)
    image = data["image"]
    t = Explaind("image", model=network, info=info, findings=["blob", "nothing"],
                 methods=["hirescam", "gradcam"], scores_key="{key}_logits")
    assert t.output_keys() == ["blob_hirescam", "blob_gradcam", "nothing_hirescam",
                               "nothing_gradcam"]
    out = t(data)
    direct = Explainer(network, "features").explain(
        image.as_tensor()[None], ["blob", "nothing"], ["hirescam", "gradcam"])
    for k, finding in enumerate(("blob", "nothing")):
        for method in ("hirescam", "gradcam"):
            m = out[f"{finding}_{method}"]
            assert isinstance(m, MetaTensor) and tuple(m.shape) == tuple(image.shape)
            torch.testing.assert_close(m.as_tensor(), direct[method].maps[0, k : k + 1])
            torch.testing.assert_close(m.affine, image.affine)
            assert len(m.applied_operations) == len(image.applied_operations)
            assert m.applied_operations is not image.applied_operations
    torch.testing.assert_close(out["image_logits"], direct["hirescam"].scores[0])
    assert out["image"] is image  # the input is left as it was


def test_method_classes_and_defaults(blob_scan):
    path, _ = blob_scan
    network, info = blob_model()
    _, data = preprocessed(path)
    out = GradCAMd("image", model=network, info=info)(dict(data))
    assert {"blob_gradcam", "nothing_gradcam"} <= set(out)  # findings=None: every class
    assert HiResCAMd("image", model=network, info=info).methods == ["hirescam"]
    # CAM needs a global-average-pooling + linear head: the blob detector has none
    with pytest.raises(HiResCAMError, match="CAM needs"):
        CAMd("image", model=network, info=info, findings=["blob"])(dict(data))


class GapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))


def test_camd_on_a_gap_network_without_names():
    torch.manual_seed(0)
    net = GapNet().eval()
    image = MetaTensor(torch.rand(1, 6, 7, 8), affine=torch.diag(torch.tensor([2.0, 2, 3, 1])))
    out = CAMd("image", model=net, target_layer="features", findings=[2, 0])(
        {"image": image})
    assert set(out) == {"image", "2_cam", "0_cam"}
    expected = Explainer(net, "features", "cam").explain(image.as_tensor()[None], [2, 0])
    torch.testing.assert_close(out["0_cam"].as_tensor(), expected["cam"].maps[0, 1:2])


def test_configuration_errors():
    net = GapNet()
    with pytest.raises(HiResCAMError, match="no class names"):
        HiResCAMd("image", model=net, target_layer="features")
    with pytest.raises(HiResCAMError, match=r"must contain '\{key\}'"):
        HiResCAMd(["a", "b"], model=net, target_layer="features", findings=[0])
    with pytest.raises(HiResCAMError, match="target_layer"):
        HiResCAMd("image", model=net, findings=[0])
    with pytest.raises(HiResCAMError, match="unknown method"):
        Explaind("image", model=net, target_layer="features", findings=[0], methods=["nope"])
    with pytest.raises(HiResCAMError, match="model="):
        HiResCAMd("image", model=None)


def test_docs_example_runs(monkeypatch, capsys):
    """Run every code block of docs/monai_pipeline.md in order, as a user would."""
    if not zoo.DEMO_BUNDLE.is_dir():  # until the trained demo weights ship
        original = zoo.load
        monkeypatch.setattr(
            zoo, "load", lambda name=None, **kw: original(name or "axialnet_tiny", **kw)
        )
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "['sample_ct_atelectasis_hirescam.nii.gz', 'sample_ct_nodule_hirescam.nii.gz']" in (
        printed
    )
    assert "float32 0.0 1.0" in printed
    # save_bundle inferred the kind and classes, and nobody claims the weights are trained
    assert "my_classifier classification ('normal', 'lesion')" in printed
    assert "my_unet segmentation ('background', 'organ') model.2.0 True None" in printed


def test_density_values_sum_to_the_hirescam_total():
    """values="density": the map keeps the raw units; its sum is the sum of the cells."""
    from hirescam3d import Explainer
    from hirescam3d.monai.transforms import HiResCAMd
    from tests.conftest import GapLinearNet

    net = GapLinearNet(3).eval()
    image = torch.randn(1, 4, 6, 6)
    out = HiResCAMd("image", model=net, target_layer="features", findings=[1],
                    values="density")({"image": image})
    raw = Explainer(net, "features")(image[None], targets=1).raw
    assert out["1_hirescam"].shape == (1, 4, 6, 6)
    assert torch.isclose(out["1_hirescam"].sum(), raw.sum(), atol=1e-5)
