"""A MONAI bundle whose inferer is ``SliceInferer`` (a 2D UNet over a 3D volume, slice by
slice), explained end to end; MONAI's own ``ConfigParser`` pipeline is the oracle.

The bundle is written here as a user would write one (``@`` references, a ``$``
expression, ``Invertd`` back to the scan's grid in its postprocessing), with seeded random
weights MONAI builds from its ``network_def``; the scan is a phantom NIfTI with an
LPS-style affine (as from DICOM), so preprocessing reorients and resamples it.

- the predicted masks equal the bundle's own prediction, on the model's grid (argmax of
  its ``SliceInferer`` output) and on the scan's grid (its ``Invertd`` of the
  probabilities, then ``AsDiscreted(argmax)``), voxel for voxel;
- HiResCAM's logit map sums to the region score minus the bias per voxel x the region
  size, the bias being the network's output with the explained layer's activations set to
  zero (a forward hook on MONAI's own network);
- the report records the SliceInferer schedule MONAI parses from the config.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from hirescam3d.errors import InputError
from hirescam3d.io import scans as io
from hirescam3d.models.bundle import read_info
from hirescam3d.models.bundle_config import trusted_parser
from hirescam3d.models.handle import ModelHandle
from hirescam3d.pipeline import explain_arrays
from tests.conftest import installed_console_script
from tests.models.test_bundle_configs import lps_phantom, monai_prediction, one_line

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("background", "organ", "lesion")
INFERER = {"_target_": "SliceInferer", "roi_size": [32, 32], "spatial_dim": 2,
           "sw_batch_size": 4, "overlap": 0.25}  # fmt: skip
# whole slices (MONAI fills roi_size -1 with the slice's size): each voxel lies in one
# window, so the windows' own totals add up to the volume's
WHOLE_SLICES = {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": 0,
                "sw_batch_size": 4}  # fmt: skip


def write_bundle(root: Path, inferer: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A 2D UNet bundle run over volumes by ``inferer``; returns MONAI's network."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {
        "image_key": "image",
        "bundle_root": str(root),
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1,
                        "out_channels": len(CLASSES), "channels": [4, 8], "strides": [2],
                        "num_res_units": 1},  # fmt: skip
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [2.0, 2.0, 3.0],
             "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -200,
             "a_max": 300, "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ]},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "@image_key", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred",
             "output_dir": "$@bundle_root + '/eval'"},
        ]},
    }  # fmt: skip
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    pred = {"type": "image", "format": "segmentation", "num_channels": len(CLASSES),
            "channel_def": {str(i): n for i, n in enumerate(CLASSES)}}  # fmt: skip
    image = {"type": "image", "modality": "CT", "num_channels": 1, "spatial_shape": [32, 32],
             "is_patch_data": False}  # fmt: skip
    meta = {"name": "slice_seg", "version": "0.1.0",
            "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    parser = trusted_parser(root / "configs" / "inference.json", root)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    torch.save({"model": network.state_dict()}, root / "models" / "model.pt")
    return network.eval()


def make_case(tmp: Path, inferer: dict[str, Any]) -> dict[str, Any]:
    network = write_bundle(tmp / "slice_seg", inferer)
    scan = lps_phantom(tmp / "scan.nii.gz", (20, 40, 36))
    return {"root": tmp / "slice_seg", "network": network, "scan": scan,
            "whole_slices": inferer is WHOLE_SLICES}  # fmt: skip


@pytest.fixture(scope="module", params=["windows", "whole_slices"])
def bundle(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # fmt: skip
    inferer = INFERER if request.param == "windows" else WHOLE_SLICES
    return make_case(tmp_path_factory.mktemp("slice_bundle"), inferer)


def monai_logits(root: Path, network: torch.nn.Module, scan: Path) -> torch.Tensor:
    """The bundle's preprocessing and SliceInferer, by MONAI: logits ``(C, *model grid)``."""
    parser = trusted_parser(root / "configs" / "inference.json", root)
    image = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    with torch.no_grad():
        return parser.get_parsed_content("inferer")(image[None], network)[0].as_tensor()


def zero_activation_output(network: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The network's output with ``layer``'s activations set to zero (2D input)."""
    module = dict(network.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            return network(x)
    finally:
        handle.remove()


def test_the_logit_map_sums_to_the_region_score_of_monais_prediction(bundle):
    root, network, scan_path = bundle["root"], bundle["network"], bundle["scan"]
    handle = ModelHandle.resolve(str(root))
    assert handle.input.spatial_dims == 2 and handle.info.inferer["kind"] == "slice"
    scan = io.read_scan(scan_path)
    explanation = explain_arrays(scan.array, scan.affine, model=handle, values="logit")
    logits = monai_logits(root, network, scan_path)
    predicted = logits.argmax(0)
    assert explanation.grid.shape == tuple(predicted.shape)
    assert set(explanation.masks) == {n for k, n in enumerate(CLASSES)
                                      if bool((predicted == k).any())}  # fmt: skip
    assert len(explanation.masks) >= 2  # the seeded weights segment several classes
    bias = zero_activation_output(network, explanation.layer, torch.zeros(1, 1, 32, 32))[0]
    for k, name in enumerate(CLASSES):
        if name not in explanation.masks:
            continue
        mask = predicted == k
        assert torch.equal(explanation.masks[name], mask)
        # the explained layer's zero-activation output is one number per class
        assert float(bias[k].max() - bias[k].min()) < 1e-6
        score = float(logits[k][mask].double().sum())
        expected = score - float(bias[k, 0, 0]) * int(mask.sum())
        cells = explanation.raw[(name, "hirescam")]
        assert cells.shape == mask.shape  # maps on the model's input grid
        if bundle["whole_slices"]:  # overlapping windows blend maps and logits apart
            assert float(cells.double().sum()) == pytest.approx(expected, rel=1e-4, abs=1e-2)
        assert explanation.scores[name].logit == pytest.approx(score, rel=1e-5)
    assert all(p.requires_grad for p in network.parameters())
    text = one_line(lambda: explain_arrays(scan.array, scan.affine, model=handle,
                                           roi_size=(8, 8, 8)), InputError)  # fmt: skip
    assert "SliceInferer" in text and "drop roi_size" in text


@pytest.mark.slow
def test_the_cli_explains_a_slice_inferer_bundle_as_monai_predicts_it(tmp_path):
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed")
    bundle = make_case(tmp_path, INFERER)  # overlapping 32 x 32 windows in each slice
    root, scan_path = bundle["root"], bundle["scan"]
    out = tmp_path / "out"
    result = subprocess.run(
        [str(script), "explain", str(scan_path), "--model", str(root), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    oracle = monai_prediction(root, bundle["network"], scan_path)
    report = json.loads((out / "report.json").read_text())
    parsed = trusted_parser(root / "configs" / "inference.json", root)
    inferer = parsed.get_parsed_content("inferer")  # MONAI's own SliceInferer
    recorded = report["region"]["slice_inferer"]
    assert recorded["spatial_dim"] == inferer.spatial_dim
    assert tuple(recorded["roi_size"]) == tuple(inferer.orig_roi_size)
    assert recorded["overlap"] == inferer.overlap
    assert recorded["sw_batch_size"] == inferer.sw_batch_size
    explained = report["explained"]
    assert explained == [n for k, n in enumerate(CLASSES)
                         if bool((oracle["probabilities"].argmax(0) == k).any())]  # fmt: skip
    scan = nib.load(scan_path)
    for name in explained:
        k = CLASSES.index(name)
        written = nib.load(out / f"scan_{name}_predicted_mask.nii.gz")
        np.testing.assert_allclose(written.affine, scan.affine, atol=1e-4)
        # the bundle's own Invertd of the probabilities, then argmax: voxel for voxel
        np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, oracle["labels"] == k)
        heat = nib.load(out / f"scan_{name}_hirescam.nii.gz")
        assert heat.shape == scan.shape and np.isfinite(heat.get_fdata()).all()


def test_slice_inferer_entries_are_checked_by_monai_when_read(tmp_path):
    root = tmp_path / "bad"
    write_bundle(root, {"_target_": "SliceInferer", "roi_size": [8, 8, 8], "spatial_dim": 0})
    text = one_line(lambda: read_info(root))
    assert text.startswith(f"{root / 'configs' / 'inference.json'}: inferer SliceInferer")
    assert "roi_size" in text
