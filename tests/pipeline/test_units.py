"""Contributions in logit units, from the raw cells to the written NIfTI and report.json.

Oracles: the networks' own final biases (the score with the explained layer at zero),
the logits of the forward pass, and sums of the written files read back with nibabel.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hirescam3d.errors import ModelError
from hirescam3d.pipeline import explain_image, explain_scan
from tests.pipeline.test_pipeline import blob_model, scan_files  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "sample_chest_ct.nii.gz"
ORGANS = REPO / "sample_data" / "sample_chest_organs.nii.gz"


def nifti_sum(path: Path) -> float:
    return float(np.asarray(nib.load(str(path)).dataobj, dtype=np.float64).sum())


def check_parts_add_up(c: dict) -> None:
    parts = sum(c["by_organ"].values()) + c["outside_organs"] + c["outside_scan"]
    assert parts == pytest.approx(c["total"], abs=1e-6)


@pytest.mark.slow
def test_demo_sample_logit_map_sums_to_the_contributions(tmp_path):
    """Through the CLI: ``explain --values logit`` on the shipped sample and demo model."""
    import json

    from hirescam3d.models import zoo
    from tests.cli.test_cli import invoke

    network, _ = zoo.load("demo")
    fc_bias = network.fc.bias.detach().double().numpy()
    result = invoke(
        "explain", SAMPLE, "-f", "atelectasis", "-f", "Nodule", "--values", "logit",
        "--organs", ORGANS, "--out", tmp_path, "--json", "--device", "cpu", "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["values"] == "logit" and report["hirescam_guaranteed_faithful"] is True
    for finding in ("atelectasis", "nodule"):
        c = report["contributions"][finding]["hirescam"]
        # AxialNet: logit = mean over triplets of (w . A_t + b), so s(0) = the fc bias
        assert c["bias"] == pytest.approx(fc_bias[zoo.CHEST_FINDINGS.index(finding)], abs=1e-5)
        assert c["total"] + c["bias"] == pytest.approx(report["findings"][finding]["logit"],
                                                       abs=1e-3)
        check_parts_add_up(c)
        path = tmp_path / report["outputs"][finding]["hirescam"]
        assert nifti_sum(path) == pytest.approx(c["total"] - c["outside_scan"], rel=0.01,
                                                abs=1e-4)
        img = nib.load(str(path))
        assert img.header.get_intent()[2] == "logit/voxel"
        assert b"logit per voxel" in bytes(img.header["descrip"])
        assert img.header["cal_min"] == -img.header["cal_max"] < 0
    lungs = report["contributions"]["atelectasis"]["hirescam"]["by_organ"]
    assert max(lungs, key=lungs.get) in ("left_lung", "right_lung")
    result = invoke("explain", SAMPLE, "-f", "atelectasis", "-m", "gradcam", "--values",
                    "logit", "--out", tmp_path / "g", "--device", "cpu")
    assert result.exit_code == 2 and "gradcam maps have no units" in result.stderr
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_single_fc_network_contributions_and_logit_map(scan_files, tmp_path):  # noqa: F811
    root, _ = scan_files
    network, info = blob_model()
    result, written = explain_scan(
        root / "chest.nii.gz", tmp_path, model=(network, info), findings=["blob"],
        methods=["hirescam"], organs_path=root / "chest_organs.nii.gz", device="cpu",
        values="logit",
    )
    c = result.report["contributions"]["blob"]["hirescam"]
    assert c["bias"] == pytest.approx(-1.0, abs=1e-6)  # BlobNet's fc bias for "blob"
    assert c["total"] + c["bias"] == pytest.approx(result.logits["blob"], abs=1e-3)
    check_parts_add_up(c)
    # the phantom does not fill the model's 56^3 grid at 5 x 6 x 6 mm: some cells are
    # padding, and their (zero-input) contributions are reported outside the scan
    assert nifti_sum(written["blob/hirescam"]) == pytest.approx(
        c["total"] - c["outside_scan"], rel=0.01, abs=1e-3
    )
    # resampling to the scan grid moved only a few percent of the mass before the fix-up
    positive, negative = c["resampling_correction"]
    assert 0.9 < positive < 1.1 and negative == pytest.approx(1.0, abs=0.1)
    data = np.asarray(nib.load(str(written["blob/hirescam"])).dataobj)
    assert data.max() > 0  # the blob's contribution is positive


def test_logit_values_refuse_methods_without_units(scan_files, tmp_path):  # noqa: F811
    root, _ = scan_files
    with pytest.raises(ModelError, match="gradcam have no units"):
        explain_scan(root / "chest.nii.gz", tmp_path, model=blob_model(), findings=["blob"],
                     methods=["hirescam", "gradcam"], device="cpu", values="logit")
    assert not any(tmp_path.iterdir())


def test_map_without_positive_evidence_is_reported_as_such():
    # BlobNet's "nothing" class has all-zero weights: no positive (nor negative) evidence
    from tests.pipeline.test_pipeline import oblique_phantom

    ct, organs, names, affine, _ = oblique_phantom()
    result = explain_image(ct, affine, model=blob_model(), findings=["nothing"],
                           methods=["hirescam", "gradcam"], organs=organs,
                           organ_names=names, device="cpu")
    for method in ("hirescam", "gradcam"):
        entry = result.report["organs"]["nothing"][method]
        assert entry["no_positive_evidence"] is True
        assert entry["by_label"] is None and entry["outside_labels"] is None
        assert not result.maps[("nothing", method)].any()
    assert "no explained map has positive evidence" in " ".join(result.warnings)


def test_input_resolution_methods_get_organ_shares_on_the_input_grid():
    """Guided HiResCAM maps live on the model's input grid, not the layer's: the pipeline
    shares them out there, and the shares still add up."""
    from tests.pipeline.test_pipeline import oblique_phantom

    ct, organs, names, affine, _ = oblique_phantom()
    result = explain_image(ct, affine, model=blob_model(), findings=["blob"],
                           methods=["hirescam", "guided-hirescam"], organs=organs,
                           organ_names=names, device="cpu")
    for method in ("hirescam", "guided-hirescam"):
        entry = result.report["organs"]["blob"][method]
        assert entry["no_positive_evidence"] is False
        assert sum(entry["by_label"].values()) + entry["outside_labels"] == pytest.approx(1.0)
        assert result.maps[("blob", method)].shape == ct.shape
    # no logit units for a method other than HiResCAM
    assert set(result.report["contributions"]["blob"]) == {"hirescam"}


def test_perturbation_methods_report_their_model_passes():
    from tests.pipeline.test_pipeline import oblique_phantom

    ct, _, _, affine, _ = oblique_phantom()
    stages: list[str] = []
    explain_image(ct, affine, model=blob_model(), findings=["blob"], methods=["ablationcam"],
                  device="cpu", progress=lambda stage, _fraction: stages.append(stage))
    # Ablation-CAM zeroes each of BlobNet's 1 feature maps once: 1 pass for 1 item
    assert "explain: 1/1 model passes" in stages
