"""Segmentation models through the pipeline and the CLI: ``--region mask.nii.gz``,
``--region predicted`` and ``--roi-size``/``--overlap`` (sliding windows).

The models are tiny MONAI UNet bundles written in MONAI's own format (the helpers of
``test_user_bundles``). Every value is checked against an oracle computed here from the
network itself: the preprocessed input built by hand (or by MONAI's own reader of the
bundle), the network's output (``sliding_window_inference`` for patch models), region
scores summed by hand and masks mapped onto the scan's grid by the affines alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from hirescam3d.errors import InputError
from hirescam3d.models.bundle import INFERENCE
from hirescam3d.pipeline import explain_arrays
from tests.cli.test_cli import assert_one_line_error, invoke
from tests.models.test_user_bundles import (
    CT_PREPROCESSING,
    UNET_ARGS,
    seeded,
    unet_metadata,
    write_bundle,
)

WINDOW = (-57.0, 164.0)  # CT_PREPROCESSING's ScaleIntensityRanged
MODEL_SPACING = (1.5, 1.5, 2.0)  # CT_PREPROCESSING's Spacingd (RAS)
CLASSES = ("background", "liver", "tumour")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return seeded(UNet, 0, **UNET_ARGS).state_dict()


def network(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = UNet(**UNET_ARGS)
    net.load_state_dict(state)
    return net.eval()


def bundle(root: Path, state: dict, activation: str, patch: bool) -> Path:
    meta = unet_metadata()
    for part in ("inputs", "outputs"):
        for spec in meta["network_data_format"][part].values():
            spec["is_patch_data"] = patch
    post = [{"_target_": "Activationsd", "keys": "pred", activation: True}]
    name = f"unet_{activation}_{'patch' if patch else 'whole'}"
    # the bundle's inferer is what hirescam3d follows: whole volumes or gaussian-blended
    # 32^3 windows (MONAI's sliding_window_inference is the oracle below)
    inferer = (
        {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "overlap": 0.25,
         "mode": "gaussian"} if patch else {"_target_": "SimpleInferer"}
    )  # fmt: skip
    return write_bundle(root / name, {"_target_": "UNet", **UNET_ARGS}, meta, state,
                        CT_PREPROCESSING, post, extra={"inferer": inferer})  # fmt: skip


def ct_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Soft-tissue-like HU values (inside the window) with a bright ball."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(50.0, 50.0, shape).astype(np.float32)
    centre = np.array(shape) / 2
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    ct[np.linalg.norm(grid - centre, axis=-1) < min(shape) / 4] = 150.0
    return ct


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def window(ct: np.ndarray) -> np.ndarray:
    return np.clip((ct - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0.0, 1.0).astype(np.float32)


def report_of(result) -> dict[str, Any]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


# -- a region file, the whole volume in one pass -------------------------------------------
@pytest.fixture(scope="module")
def lps_scan(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A scan stored LPS at the model's spacing: preprocessing only flips axes 0 and 1."""
    root = tmp_path_factory.mktemp("lps")
    ct = ct_volume((24, 20, 16), seed=1)
    affine = np.diag([-MODEL_SPACING[0], -MODEL_SPACING[1], MODEL_SPACING[2], 1.0])
    affine[:3, 3] = [30.0, -12.0, 40.0]
    return save(root / "scan.nii.gz", ct, affine), ct, affine


def test_region_file_scores_are_the_logits_summed_over_it(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    model = bundle(tmp_path, state, "softmax", patch=False)
    mask = np.zeros(ct.shape, np.uint8)
    mask[3:11, 12:19, 5:13] = 1  # off-centre: a wrong flip would move it
    mask[20, 2, 1] = 1
    region = save(tmp_path / "mask.nii.gz", mask, affine)
    net = network(state)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = tmp_path / "out"
    report = report_of(invoke(
        "explain", scan, "--model", model, "--region", region, "-f", "liver", "-f", "tumour",
        "--values", "logit", "--out", out, "--json",
    ))  # fmt: skip
    # Oracle: the model's input built by hand (LPS -> RAS flips axes 0 and 1; the spacing
    # is the model's), the network's own output, the region flipped the same way.
    x = torch.from_numpy(window(ct)[::-1, ::-1].copy())[None, None]
    region_model = torch.from_numpy(mask[::-1, ::-1].copy()).bool()
    assert report["input"]["model_grid_shape"] == list(ct.shape)
    with torch.no_grad():
        logits = net(x)[0].double()
    bias = net.model[2][1].conv.unit0.conv.bias.detach().double()  # the output convolution
    size = int(mask.sum())
    assert report["region"]["source"] == "given" and report["region"]["sliding_window"] is None
    assert report["region"]["path"] == str(region.resolve())
    for c, name in enumerate(CLASSES):
        expected = float(logits[c][region_model].sum())
        entry = report["findings"][name]
        assert entry["region_score"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert entry["region_voxels"] == size
        probs = torch.softmax(logits, 0)[c][region_model]
        assert entry["mean_probability"] == pytest.approx(float(probs.mean()), rel=1e-5)
    for c, name in ((1, "liver"), (2, "tumour")):
        part = report["contributions"][name]["hirescam"]
        # HiResCAM at the default layer: the cells sum to the score minus bias x |R|
        score = float(logits[c][region_model].sum())
        assert part["total"] == pytest.approx(score - float(bias[c]) * size, rel=1e-4, abs=1e-3)
        # ... and the logit map on the scan's grid holds that total (all of it inside)
        volume = nib.load(str(out / f"scan_{name}_hirescam.nii.gz"))
        np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
        assert volume.shape == ct.shape
        assert float(np.asarray(volume.dataobj, np.float64).sum()) == pytest.approx(
            part["total"], rel=1e-4, abs=1e-3
        )
    assert not list(out.glob("*_predicted_mask.nii.gz"))  # a given region is not written
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_region_on_another_grid_is_refused_naming_both_grids(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    model = bundle(tmp_path, state, "softmax", patch=False)
    mask = np.zeros(ct.shape, np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    shifted = affine.copy()
    shifted[2, 3] += 0.01  # 10 um: more than the 1e-3 mm tolerance
    cases = {
        "shifted": (mask, shifted, ["origin (30, -12, 40.01) mm vs the scan's (30, -12, 40) mm"]),
        "shape": (mask[:, :, :-2], affine, ["24x20x14 voxels", "shape (24, 20, 14)"]),
    }
    for name, (data, aff, fragments) in cases.items():
        region = save(tmp_path / f"{name}.nii.gz", data, aff)
        out = tmp_path / f"out_{name}"
        result = invoke("explain", scan, "--model", model, "--region", region, "-f", "liver",
                        "--out", out)  # fmt: skip
        line = assert_one_line_error(
            result, str(region), "region grid 24x20x", "scan grid 24x20x16 voxels of 1.5 x "
            "1.5 x 2 mm, LPS, origin (30, -12, 40) mm", *fragments, code=1,
        )  # fmt: skip
        assert "nearest-neighbour" in line
        assert not out.exists() or not any(out.iterdir())  # nothing written
    # within the tolerance (1e-4 mm) the region is accepted as on the scan's grid
    close = affine.copy()
    close[0, 3] += 1e-4
    region = save(tmp_path / "close.nii.gz", mask, close)
    result = invoke("explain", scan, "--model", model, "--region", region, "-f", "liver",
                    "--out", tmp_path / "close_out", "--json")  # fmt: skip
    assert report_of(result)["findings"]["liver"]["region_voxels"] == int(mask.sum())


def test_usage_and_input_errors_are_one_line(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    model = bundle(tmp_path, state, "softmax", patch=False)
    empty = save(tmp_path / "empty.nii.gz", np.zeros(ct.shape, np.uint8), affine)
    out = tmp_path / "out"
    cases = [
        (("--model", "axialnet_tiny", "--region", "predicted"),
         ("--region applies to segmentation models", "axialnet_tiny"), 2),
        (("--model", "axialnet_tiny", "--roi-size", "8", "8", "8"), ("--roi-size applies",), 2),
        (("--model", model, "--region", tmp_path / "missing.nii.gz"),
         ("--region", "missing.nii.gz: no such file"), 2),
        (("--model", model, "--overlap", "1.0"), ("--overlap must lie in [0, 1)",), 2),
        (("--model", model, "--roi-size", "0", "8", "8"), ("--roi-size 0 8 8",), 2),
        (("--model", model, "--region", empty, "-f", "liver"), ("is empty",), 1),
    ]  # fmt: skip
    for args, fragments, code in cases:
        result = invoke("explain", scan, *args, "--out", out)
        assert_one_line_error(result, *fragments, code=code)
    assert not out.exists() or not any(out.iterdir())


def test_library_region_checks(tmp_path, state, lps_scan):
    _, ct, affine = lps_scan
    model = str(bundle(tmp_path, state, "softmax", patch=False))
    with pytest.raises(InputError, match=r"region \(24, 20, 15\) is not on the scan's grid"):
        explain_arrays(ct, affine, model, ["liver"], region=np.ones((24, 20, 15), bool))
    with pytest.raises(InputError, match="integer array with values 0, 1, 2"):
        explain_arrays(ct, affine, model, ["liver"], region=np.arange(3).repeat(
            ct.size // 3 + 1)[: ct.size].reshape(ct.shape))  # fmt: skip
    with pytest.raises(InputError, match="applies to segmentation models"):
        explain_arrays(ct, affine, "axialnet_tiny", ["atelectasis"], region="predicted")


# -- predicted masks and sliding windows ----------------------------------------------------
@pytest.fixture(scope="module")
def resampled_scan(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """LPS, anisotropic spacing unlike the model's (the model resamples it), larger than
    the 32^3 window along two axes."""
    root = tmp_path_factory.mktemp("resampled")
    ct = ct_volume((48, 52, 22), seed=2)
    affine = np.diag([-1.21, -1.09, 1.73, 1.0])  # no voxel halfway between two of the other grid
    affine[:3, 3] = [25.0, 31.0, -60.0]
    return save(root / "scan.nii.gz", ct, affine), ct, affine


def monai_input(model: Path, scan: Path) -> Any:
    """The model's input as MONAI's own bundle reader preprocesses the scan."""
    parser = ConfigParser()
    parser.read_config(str(model / INFERENCE))
    return parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]


def nearest_on_scan(mask: np.ndarray, model_affine: np.ndarray, scan_shape, scan_affine):
    """Each scan voxel takes the model-grid voxel nearest to its centre (0 outside)."""
    idx = np.indices(scan_shape).reshape(3, -1)
    u = np.linalg.inv(model_affine) @ scan_affine @ np.vstack([idx, np.ones(idx.shape[1])])
    u = np.rint(u[:3]).astype(int)
    ok = ((u >= 0) & (u < np.array(mask.shape)[:, None])).all(0)
    out = np.zeros(idx.shape[1], np.uint8)
    out[ok] = mask[u[0, ok], u[1, ok], u[2, ok]]
    return out.reshape(scan_shape)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_predicted_mask_is_the_thresholded_output_on_the_scan_grid(
    tmp_path, state, resampled_scan, activation
):
    scan, ct, affine = resampled_scan
    model = bundle(tmp_path, state, activation, patch=True)
    finding = "liver"
    out = tmp_path / "out"
    report = report_of(invoke(
        "explain", scan, "--model", model, "--region", "predicted", "-f", finding,
        "--out", out, "--json",
    ))  # fmt: skip
    # Oracle: MONAI's reader of the bundle, MONAI's sliding_window_inference with the
    # bundle's window, the activation's threshold, the affines.
    image = monai_input(model, scan)
    x = image.as_tensor()[None].float()
    model_affine = image.affine.numpy().astype(np.float64)
    assert report["input"]["model_grid_shape"] == list(x.shape[2:])
    assert max(x.shape[2:]) > 32  # several windows
    with torch.no_grad():
        logits = sliding_window_inference(x, (32, 32, 32), 1, network(state), overlap=0.25,
                                          mode="gaussian")[0].double()  # fmt: skip
    c = CLASSES.index(finding)
    if activation == "softmax":
        mask = (logits.argmax(0) == c).numpy()
    else:
        mask = (logits[c] >= 0).numpy()
    assert 0 < mask.sum() < mask.size
    written = nib.load(str(out / f"scan_{finding}_predicted_mask.nii.gz"))
    assert written.shape == ct.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert written.header.get_intent()[0] == "label"
    expected = nearest_on_scan(mask.astype(np.uint8), model_affine, ct.shape, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    entry = report["findings"][finding]
    assert entry["region_voxels"] == int(mask.sum())
    assert entry["region_score"] == pytest.approx(float(logits[c][torch.from_numpy(mask)].sum()),
                                                  rel=1e-4)  # fmt: skip
    region = report["region"]
    assert region["source"] == "predicted" and region["task"] == activation
    assert region["sliding_window"]["roi_size"] == [32, 32, 32]  # the bundle's patch
    assert region["masks"] == {finding: f"scan_{finding}_predicted_mask.nii.gz"}


def test_sliding_window_maps_hold_the_region_score(tmp_path, state, resampled_scan):
    scan, ct, affine = resampled_scan
    model = bundle(tmp_path, state, "softmax", patch=True)
    mask = np.zeros(ct.shape, np.uint8)
    mask[10:40, 5:30, 4:18] = 1
    region = save(tmp_path / "mask.nii.gz", mask, affine)
    out = tmp_path / "out"
    report = report_of(invoke(
        "explain", scan, "--model", model, "--region", region, "-f", "tumour",
        "--roi-size", "16", "16", "16", "--overlap", "0.5", "--values", "logit",
        "--out", out, "--json",
    ))  # fmt: skip
    image = monai_input(model, scan)
    x = image.as_tensor()[None].float()
    # the region on the model's grid: MONAI's own nearest resampling of the mask
    label = ConfigParser()
    label.read_config(str(model / INFERENCE))
    specs = [{**t, "keys": "label"} for t in CT_PREPROCESSING if "Scale" not in t["_target_"]]
    for spec in specs:
        if "Spacingd" in spec["_target_"]:
            spec["mode"] = "nearest"
    label.update({"label_pre": {"_target_": "Compose", "transforms": specs}})
    on_model = label.get_parsed_content("label_pre")({"label": str(region)})["label"]
    region_model = on_model.as_tensor()[0] > 0.5
    assert region_model.shape == x.shape[2:]
    with torch.no_grad():
        logits = sliding_window_inference(x, (16, 16, 16), 1, network(state), overlap=0.5,
                                          mode="gaussian")[0].double()  # fmt: skip
    score = float(logits[2][region_model].sum())
    entry = report["findings"]["tumour"]
    assert entry["region_voxels"] == int(region_model.sum())
    assert entry["region_score"] == pytest.approx(score, rel=1e-4)
    bias = float(network(state).model[2][1].conv.unit0.conv.bias[2].detach())
    part = report["contributions"]["tumour"]["hirescam"]
    assert part["total"] == pytest.approx(score - bias * int(region_model.sum()), rel=1e-3)
    assert report["region"]["sliding_window"] == {
        "roi_size": [16, 16, 16], "overlap": 0.5, "sw_batch_size": 1, "mode": "gaussian"
    }  # fmt: skip
    volume = nib.load(str(out / "scan_tumour_hirescam.nii.gz"))
    assert volume.shape == ct.shape
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)


def test_without_findings_every_segmented_finding_is_explained(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    model = bundle(tmp_path, state, "softmax", patch=False)
    out = tmp_path / "out"
    result = invoke("explain", scan, "--model", model, "--out", out, "--json")
    report = report_of(result)
    assert "every finding with a non-empty predicted mask" in result.stderr
    x = torch.from_numpy(window(ct)[::-1, ::-1].copy())[None, None]
    with torch.no_grad():
        top = network(state)(x)[0].argmax(0)
    segmented = [n for c, n in enumerate(CLASSES) if bool((top == c).any())]
    assert segmented and report["explained"] == segmented
    assert report["region"]["source"] == "predicted" and report["region"]["task"] == "softmax"
    for c, name in enumerate(CLASSES):
        assert report["findings"][name]["region_voxels"] == int((top == c).sum())
    written = sorted(p.name for p in out.glob("*_predicted_mask.nii.gz"))
    assert written == sorted(f"scan_{n}_predicted_mask.nii.gz" for n in segmented)


# -- batch: a region mask per scan from the manifest ---------------------------------------
def test_batch_takes_each_scans_region_from_the_manifest(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    model = bundle(tmp_path, state, "softmax", patch=False)
    masks = {}
    for name, box in (("a", np.s_[3:11, 12:19, 5:13]), ("b", np.s_[10:20, 2:9, 1:6])):
        mask = np.zeros(ct.shape, np.uint8)
        mask[box] = 1
        masks[name] = mask
        save(tmp_path / f"mask_{name}.nii.gz", mask, affine)
    copies = [shutil.copy(scan, tmp_path / f"scan_{n}.nii.gz") for n in "abc"]  # one scan each
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"id,path,region\na,{copies[0]},mask_a.nii.gz\n"
                        f"b,{copies[1]},mask_b.nii.gz\nc,{copies[2]},\n")  # fmt: skip
    out = tmp_path / "out"
    result = invoke("batch", manifest, "--model", model, "-f", "liver", "--out", out,
                    "--quiet")  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr)
    x = torch.from_numpy(window(ct)[::-1, ::-1].copy())[None, None]
    with torch.no_grad():
        logits = network(state)(x)[0, 1].double()
    for name, mask in masks.items():
        report = json.loads((out / name / "report.json").read_text())
        expected = float(logits[torch.from_numpy(mask[::-1, ::-1].copy()).bool()].sum())
        assert report["region"]["source"] == "given"
        assert report["findings"]["liver"]["region_score"] == pytest.approx(expected, rel=1e-5)
        marker = json.loads((out / name / "batch_done.json").read_text())
        assert marker["options"]["region"] == str((tmp_path / f"mask_{name}.nii.gz").resolve())
    report = json.loads((out / "c" / "report.json").read_text())  # no mask: predicted
    assert report["region"]["source"] == "predicted"
    with torch.no_grad():  # the oracle: where the argmax is liver
        predicted = network(state)(x)[0].argmax(0) == 1
    assert report["findings"]["liver"]["region_voxels"] == int(predicted.sum())


def test_batch_region_errors_are_one_line(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,region\n{scan},missing.nii.gz\n")
    model = bundle(tmp_path, state, "softmax", patch=False)
    result = invoke("batch", manifest, "--model", model, "--out", tmp_path / "o1")
    assert_one_line_error(result, "missing.nii.gz", "no such file", "'region' column", code=2)
    mask = save(tmp_path / "m.nii.gz", np.ones(ct.shape, np.uint8), affine)
    manifest.write_text(f"path,region\n{scan},{mask}\n")
    result = invoke("batch", manifest, "--model", "demo", "--out", tmp_path / "o2")
    assert_one_line_error(result, "classifier", "drop the 'region' column", code=2)
    result = invoke("batch", scan, "--model", model, "--region", "given", "--out", tmp_path)
    assert result.exit_code == 2 and "predicted" in result.stderr


def test_compare_explains_a_segmentation_finding_over_its_region(tmp_path, state, lps_scan):
    scan, ct, affine = lps_scan
    model = bundle(tmp_path, state, "softmax", patch=False)
    mask = np.zeros(ct.shape, np.uint8)
    mask[3:11, 12:19, 5:13] = 1
    region = save(tmp_path / "mask.nii.gz", mask, affine)
    out = tmp_path / "out"
    result = invoke("compare", scan, "--model", model, "-f", "liver", "--region", region,
                    "--mask", region, "--out", out, "--json")  # fmt: skip
    record = report_of(result)
    x = torch.from_numpy(window(ct)[::-1, ::-1].copy())[None, None]
    with torch.no_grad():
        logits = network(state)(x)[0].double()
    inside = torch.from_numpy(mask[::-1, ::-1].copy()).bool()
    assert record["region"]["source"] == "given"
    assert record["logit"] == pytest.approx(float(logits[1][inside].sum()), rel=1e-5)
    probability = torch.softmax(logits, 0)[1][inside].mean()
    assert record["probability"] == pytest.approx(float(probability), rel=1e-5)
    assert set(record["metrics"]) == {"hirescam", "gradcam"}
    assert (out / "scan_liver_compare.png").stat().st_size > 1000
