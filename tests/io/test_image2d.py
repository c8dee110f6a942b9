"""2D models get 2D inputs: PNG, JPEG, TIFF, a single-slice DICOM and 2D NIfTI, read,
explained, written as 2D NIfTI / PNG maps with PNG overlays; 2D networks over volumes
slice by slice on MONAI's SliceInferer schedule.

Oracles: the pixels Pillow and tifffile were given, SimpleITK's reading of the same
DICOM file (values and geometry), MONAI's own ``SliceInferer``, and hand computation
with the networks' final linear layers (HiResCAM's total = logit - bias).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from hirescam3d.errors import ScanError
from hirescam3d.io.image2d import read_image2d, spatial_dims_of_file
from hirescam3d.io.scans import read_image, read_scan
from hirescam3d.models.bundle import InputSpec, ModelInfo, preprocessing_transforms
from hirescam3d.pipeline.explain2d import explain_picture
from tests.cli.test_cli import assert_one_line_error, invoke

REPO = Path(__file__).resolve().parents[2]

CELL = 4
SIZE = (32, 32)


class Blob2D(nn.Module):
    """logit("blob") = 20 * sum over 4x4 cells of ReLU(mean - 0.5) - 1; "none" = -3."""

    class_names = ("blob", "none")

    def __init__(self, channels: int = 3):
        super().__init__()
        conv = nn.Conv2d(channels, 1, CELL, stride=CELL)
        fc = nn.Linear(math.prod(n // CELL for n in SIZE), 2)
        with torch.no_grad():
            conv.weight.fill_(1.0 / (channels * CELL * CELL))
            conv.bias.fill_(-0.5)
            fc.weight.zero_()
            fc.weight[0] = 20.0
            fc.bias.copy_(torch.tensor([-1.0, -3.0]))
        self.features = nn.Sequential(conv, nn.ReLU())
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def blob_model(channels: int = 3, window=(0.0, 255.0), modality: str = "photograph"):
    spec = InputSpec(2, channels, SIZE, None, None, window, modality, "resize")
    info = ModelInfo(
        name="blob2d", description="test 2D blob detector", class_names=Blob2D.class_names,
        target_layer="features", input=spec, preprocessing=preprocessing_transforms(spec),
        task="multilabel", guaranteed=True, trained=False,
    )  # fmt: skip
    return Blob2D(channels).eval(), info


def square_picture(mode: str = "RGB", size=(120, 80), box=(80, 10, 110, 40)) -> Image.Image:
    """A dark ``size`` (W, H) picture with one bright square ``box`` (x0, y0, x1, y1)."""
    im = Image.new(mode, size, 20 if mode == "L" else (20, 30, 40))
    ImageDraw.Draw(im).rectangle(box, fill=250 if mode == "L" else (250, 240, 230))
    return im


# -- readers --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_lossless_pictures_read_as_saved(tmp_path, suffix, mode):
    rng = np.random.default_rng(3)
    shape = (37, 53, 3) if mode == "RGB" else (37, 53)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"p{suffix}"
    Image.fromarray(pixels, mode).save(path)
    image = read_image2d(path)
    expected = pixels.transpose(2, 0, 1) if mode == "RGB" else pixels[None]
    assert image.mode == mode and image.shape == (37, 53)
    np.testing.assert_array_equal(image.array, expected.astype(np.float32))
    assert spatial_dims_of_file(path) == 2


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    stored = np.random.default_rng(2).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display = stored rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    shown = np.rot90(stored, k=-1)  # clockwise
    np.testing.assert_array_equal(read_image2d(tmp_path / "turned.png").array,
                                  shown.transpose(2, 0, 1).astype(np.float32))  # fmt: skip


def test_jpeg_and_16bit_tiff(tmp_path):
    import tifffile

    im = square_picture()
    im.save(tmp_path / "p.jpg", quality=95)
    image = read_image2d(tmp_path / "p.jpg")
    source = np.asarray(im, np.float32).transpose(2, 0, 1)
    assert image.array.shape == source.shape
    assert float(np.abs(image.array - source).mean()) < 3.0  # JPEG loss only
    values = np.random.default_rng(1).integers(0, 4096, (40, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "ct.tiff", values)
    np.testing.assert_array_equal(read_image2d(tmp_path / "ct.tiff").array[0], values)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([values, values, values, values]))
    with pytest.raises(ScanError, match="stack"):
        read_image2d(tmp_path / "stack.tif")


def test_single_slice_dicom_matches_simpleitk():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    image = read_image2d(path)
    itk, itk_affine, _, _ = read_image(path)  # SimpleITK: (I, J, 1) = columns, rows
    assert image.source == "dicom" and image.shape == (128, 128)
    np.testing.assert_allclose(image.array[0].T, itk[:, :, 0], atol=1e-3)
    np.testing.assert_allclose(image.affine[:3, [0, 1, 3]], itk_affine[:3, [0, 1, 3]], atol=1e-4)
    assert float(image.array.min()) < -800  # HU: the rescale intercept was applied


def test_2d_nifti_and_3d_refusal(tmp_path):
    data = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    affine = np.array([[0.0, -0.7, 0, 10], [0.9, 0, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    for name, stored in (("a.nii.gz", data), ("b.nii", data[:, :, None])):
        nib.save(nib.Nifti1Image(stored, affine), tmp_path / name)
        image = read_image2d(tmp_path / name)
        np.testing.assert_array_equal(image.array[0], data.T)  # rows J, columns I
        np.testing.assert_allclose(image.affine, affine)
    nib.save(nib.Nifti1Image(np.zeros((6, 4, 5), np.float32), affine), tmp_path / "v.nii.gz")
    with pytest.raises(ScanError, match="3D volume"):
        read_image2d(tmp_path / "v.nii.gz")


def test_read_scan_refuses_a_picture_as_a_volume(tmp_path):
    square_picture("L").save(tmp_path / "p.png")
    with pytest.raises(ScanError, match="2D"):
        read_scan(tmp_path / "p.png")


# -- explained and written ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_picture_map_finds_the_square_and_adds_up(tmp_path, mode):
    square_picture(mode).save(tmp_path / "sq.png")
    network, info = blob_model()
    result, paths = explain_picture(
        tmp_path / "sq.png", tmp_path / "out", (network, info), ["blob"], ["hirescam"],
        png=True, device="cpu", formats="nifti,png",
    )  # fmt: skip
    plane = result.maps[("blob", "hirescam")]
    assert plane.shape == (80, 120)  # (H, W) of the picture
    row, col = np.unravel_index(np.argmax(plane), plane.shape)
    assert 10 <= row <= 40 and 80 <= col <= 110, (row, col)
    assert float(plane[60:, :60].max()) == 0.0  # nothing far from the square
    nifti = nib.load(paths["blob/hirescam"])
    assert nifti.shape == (120, 80, 1)
    np.testing.assert_allclose(np.asarray(nifti.dataobj)[:, :, 0], plane.T, atol=1e-6)
    with Image.open(paths["blob/hirescam/map_png"]) as png_map:
        assert png_map.size == (120, 80)
        np.testing.assert_allclose(np.asarray(png_map) / 65535.0, plane, atol=1e-4)
    with Image.open(paths["blob/hirescam/png"]) as overlay:
        assert overlay.size == (120, 80) and overlay.mode == "RGB"
    report = json.loads(paths["report"].read_text())
    part = report["contributions"]["blob"]["hirescam"]
    bias = float(network.fc.bias.detach()[0])
    assert part["total"] == pytest.approx(report["findings"]["blob"]["logit"] - bias, abs=1e-4)


def test_logit_map_sums_to_logit_minus_bias(tmp_path):
    square_picture().save(tmp_path / "sq.png")
    network, info = blob_model()
    result, paths = explain_picture(tmp_path / "sq.png", tmp_path / "out", (network, info),
                                    ["blob"], values="logit", device="cpu")  # fmt: skip
    plane = result.maps[("blob", "hirescam")]
    expected = result.logits["blob"] - float(network.fc.bias.detach()[0])
    assert float(plane.sum(dtype=np.float64)) == pytest.approx(expected, rel=1e-5)
    stored = np.asarray(nib.load(paths["blob/hirescam"]).dataobj)
    assert float(stored.sum(dtype=np.float64)) == pytest.approx(expected, rel=1e-5)


def test_dicom_map_lies_on_the_dicom_grid(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    network, info = blob_model(channels=1, window=(-200.0, 300.0), modality="CT")
    result, paths = explain_picture(path, tmp_path, (network, info), ["blob"], device="cpu")
    _, itk_affine, _, _ = read_image(path)
    written = nib.load(paths["blob/hirescam"])
    assert written.shape == (128, 128, 1)
    np.testing.assert_allclose(written.affine[:3, [0, 1, 3]], itk_affine[:3, [0, 1, 3]],
                               atol=1e-4)  # fmt: skip
    assert result.axes == "columns"  # MONAI LoadImage's order for non-photo models
    report = json.loads(paths["report"].read_text())
    assert report["contributions"]["blob"]["hirescam"]["total"] == pytest.approx(
        report["findings"]["blob"]["logit"] + 1.0, abs=1e-4)  # fmt: skip


# -- the command line -------------------------------------------------------------------------
def test_cli_2d_and_3d_mismatches_are_one_line(tmp_path):
    square_picture().save(tmp_path / "photo.png")
    result = invoke("explain", tmp_path / "photo.png", "--out", tmp_path / "o1")
    assert_one_line_error(result, "photo.png", "2D image", "3D model", code=1)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    result = invoke("explain", tmp_path / "v.nii.gz", "--model", "resnet34v", "--out",
                    tmp_path / "o2")  # fmt: skip
    assert_one_line_error(result, "v.nii.gz", "3D volume", "2D model", code=1)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_cli_explains_a_jpeg_with_resnet34v(tmp_path):
    """``hirescam3d explain photo.jpg --model resnet34v``; the total is checked by hand
    with the network's own head and fc layer on an independently preprocessed input."""
    from monai.transforms import Resize, ScaleIntensityRange

    from hirescam3d.models import zoo

    square_picture(size=(150, 100)).save(tmp_path / "photo.jpg", quality=95)
    out = tmp_path / "out"
    result = invoke("explain", tmp_path / "photo.jpg", "--model", "resnet34v", "--finding",
                    "cat", "--png", "--format", "nifti,png", "--out", out, "--json",
                    "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert nib.load(out / "photo_cat_hirescam.nii.gz").shape == (150, 100, 1)
    with Image.open(out / "photo_cat_hirescam_overlay.png") as overlay:
        assert overlay.size == (150, 100)
    with Image.open(out / "photo_cat_hirescam_map.png") as png_map:
        assert png_map.size == (150, 100)
    network, _ = zoo.load("resnet34v")
    with Image.open(tmp_path / "photo.jpg") as im:
        pixels = torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1).copy())
    x = Resize((224, 224))(ScaleIntensityRange(0, 255, 0, 1, clip=True)(pixels))[None]
    cat = network.class_names.index("cat")
    with torch.no_grad():
        acts = network.head(network.features(torch.as_tensor(x)))
        by_hand = float((network.fc.weight[cat] * acts.flatten(1)[0]).sum())
        logit = float(network(torch.as_tensor(x))[0, cat])
    part = report["contributions"]["cat"]["hirescam"]
    assert part["total"] == pytest.approx(by_hand, rel=1e-3, abs=1e-3)
    assert report["findings"]["cat"]["logit"] == pytest.approx(logit, rel=1e-3, abs=1e-3)
    assert part["total"] + float(network.fc.bias.detach()[cat]) == pytest.approx(logit, abs=1e-3)


@pytest.mark.slow
def test_cli_2d_monai_bundle_predicts_as_monai(tmp_path):
    """The Model Zoo's classification_template (2D), unchanged configs and seeded weights
    from its own network_def: the CLI's probabilities on a PNG equal those of the bundle's
    own preprocessing (MONAI's LoadImaged reads PNGs columns first) and network, run by
    MONAI's ConfigParser (trusted here, in the test only)."""
    import shutil

    from monai.bundle import ConfigParser

    bundle = tmp_path / "classification_template"
    zoo = REPO / "tests" / "fixtures" / "model_zoo"
    shutil.copytree(zoo / "classification_template" / "configs",
                    bundle / "configs")  # fmt: skip
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    square_picture("L", size=(72, 56), box=(40, 6, 60, 20)).save(tmp_path / "shape.png")
    out = tmp_path / "out"
    result = invoke("explain", tmp_path / "shape.png", "--model", bundle, "--all-findings",
                    "--json", "--out", out, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    x = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "shape.png")})
    with torch.no_grad():
        probs = torch.softmax(network(torch.as_tensor(x["image"])[None]), dim=1)[0]
    got = [entry["probability"] for entry in report["findings"].values()]
    np.testing.assert_allclose(got, probs.numpy(), rtol=1e-4, atol=1e-6)
    assert nib.load(out / f"shape_{next(iter(report['findings']))}_hirescam.nii.gz").shape == (
        72, 56, 1)  # fmt: skip


# -- 2D networks over volumes: SliceInferer ---------------------------------------------------
class SliceSeg(nn.Module):
    """3x3 conv -> ReLU -> 1x1 conv to 3 classes (the layer ``act`` is HiResCAM-exact)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.conv(x)))


@pytest.mark.parametrize("spatial_dim, roi", [(0, (24, 16)), (2, (12, 10))])
def test_slice_explanations_follow_monai_slice_inferer(spatial_dim, roi):
    from monai.inferers import SliceInferer

    from hirescam3d import Explainer
    from hirescam3d.core.slices import slice_inferer_explain

    torch.manual_seed(0)
    net = SliceSeg().eval()
    x = torch.randn(1, 1, 10, 24, 16)
    with torch.no_grad():
        reference = SliceInferer(roi_size=roi, spatial_dim=spatial_dim, sw_batch_size=3,
                                 overlap=0.25)(x, net)  # fmt: skip
    explainer = Explainer(net, "act", "hirescam", class_names=["a", "b", "c"], task="softmax")
    result = slice_inferer_explain(explainer, x, targets=["b"], spatial_dim=spatial_dim,
                                   roi_size=roi, sw_batch_size=3)["hirescam"]  # fmt: skip
    torch.testing.assert_close(result.output, reference, rtol=0, atol=1e-6)
    assert result.raw.shape == (1, 1, 10, 24, 16)
    mask = reference.argmax(1) == 1  # class b's predicted voxels, by MONAI's prediction
    region_score = float(reference[:, 1][mask].sum())
    bias = float(net.out.bias.detach()[1])
    assert float(result.raw.sum()) == pytest.approx(region_score - bias * int(mask.sum()),
                                                    rel=1e-4, abs=1e-3)  # fmt: skip
    assert float(result.raw[0, 0][~mask[0]].abs().max()) == 0.0
    assert all(p.requires_grad for p in net.parameters()) and not net.training


def test_a_bundle_slice_inferer_entry_explains_as_monai_parses_it():
    from monai.bundle import ConfigParser

    from hirescam3d import Explainer
    from hirescam3d.core.slices import (
        check_slice_inferer,
        slice_inferer_explain,
        slice_options,
        slice_predict,
    )
    from hirescam3d.errors import ModelError

    entry = {"_target_": "SliceInferer", "roi_size": [12, 10], "spatial_dim": 1,
             "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"}  # fmt: skip
    torch.manual_seed(1)
    net = SliceSeg().eval()
    x = torch.randn(1, 1, 14, 6, 18)
    with torch.no_grad():
        reference = ConfigParser({"inferer": entry}).get_parsed_content("inferer")(x, net)
    torch.testing.assert_close(slice_predict(net, x, entry), reference, rtol=0, atol=1e-6)
    explainer = Explainer(net, "act", "gradcam", class_names=["a", "b", "c"], task="softmax")
    result = slice_inferer_explain(explainer, x, ["c"], **slice_options(entry))["gradcam"]
    torch.testing.assert_close(result.output, reference, rtol=0, atol=1e-6)
    assert result.raw.shape == (1, 1, 14, 6, 18) and bool(result.raw.abs().sum() > 0)
    check_slice_inferer({"kind": "slice", "roi_size": [12, 10]})
    with pytest.raises(ModelError, match="roi_size"):
        check_slice_inferer({"kind": "slice", "roi_size": [4, 4, 4]})
