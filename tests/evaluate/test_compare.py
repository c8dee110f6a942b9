"""``hirescam3d compare``: one pass, the figure, compare.json's metrics, refusals.

Runs the CLI in-process on the shipped sample (96 x 128 x 128 chest CT, its organ map
and atelectasis mask) with the default demo model; the metrics are recomputed here,
independently, from the maps an ``explain`` run writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from hirescam3d.evaluate import metrics
from tests.cli.test_cli import assert_one_line_error, invoke

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"
CT = SAMPLE / "sample_chest_ct.nii.gz"
ORGANS = SAMPLE / "sample_chest_organs.nii.gz"
MASK = SAMPLE / "sample_chest_atelectasis.nii.gz"
METHODS = ("hirescam", "gradcam")


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    args = ["compare", CT, "--finding", "atelectasis", "--organs", ORGANS, "--mask", MASK,
            "--out", out, "--device", "cpu", "--quiet"]
    for m in METHODS:
        args += ["--method", m]
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return out, json.loads((out / "compare.json").read_text())


@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> dict[str, np.ndarray]:
    """The maps ``explain`` writes for the same scan, finding and methods."""
    out = tmp_path_factory.mktemp("explain")
    args = ["explain", CT, "--finding", "atelectasis", "--out", out, "--device", "cpu", "-q"]
    for m in METHODS:
        args += ["--method", m]
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return {
        m: np.asarray(nib.load(str(out / f"sample_chest_ct_atelectasis_{m}.nii.gz")).dataobj)
        for m in METHODS
    }


def test_outputs_and_figure(compared) -> None:
    out, record = compared
    png = out / "sample_chest_ct_atelectasis_compare.png"
    assert png.is_file()
    figure = record["figure"]
    assert figure["rows"] == ["axial", "coronal", "sagittal"]
    assert figure["columns"] == list(METHODS)
    assert figure["panels"] == 3 * len(METHODS)
    assert figure["slices_chosen_from"] == "hirescam"
    # figsize (2.8 per column + 1.6, 3 x 2.8 + 0.8) inches at 100 dpi
    assert Image.open(png).size == (round(100 * (2.8 * len(METHODS) + 1.6)), 920)
    assert record["methods"] == list(METHODS)
    assert record["hirescam_guaranteed_faithful"] is True
    assert not list(out.glob(".*tmp*"))  # written atomically: no temporary left


def test_metrics_match_independent_computation(compared, explained) -> None:
    _, record = compared
    mask = np.asarray(nib.load(str(MASK)).dataobj) != 0
    organs = np.asarray(nib.load(str(ORGANS)).dataobj)
    names = {int(k): v for k, v in json.loads((SAMPLE / "sample_chest_organs.json")
                                                .read_text()).items()}
    for m in METHODS:
        got = record["metrics"][m]
        volume = explained[m].astype(np.float64)
        positive = np.clip(volume, 0, None)
        # relevance mass inside the finding mask, with numpy
        assert got["relevance_mass"] == pytest.approx(
            positive[mask].sum() / positive.sum(), abs=1e-4
        )
        # pointing game: the first maximum in C order lies in the mask
        assert got["pointing_game"] == float(mask.ravel()[np.argmax(volume.ravel())])
        for label, name in names.items():
            share = positive[organs == label].sum() / positive.sum()
            assert got["relevance_mass_per_organ"][name] == pytest.approx(share, abs=1e-4)
        # the other mask metrics, from hirescam3d.evaluate.metrics on the written maps
        loc = metrics.localisation_metrics(
            torch.from_numpy(explained[m])[None, None], torch.from_numpy(mask)[None, None]
        )
        assert got["iou_best"] == pytest.approx(float(loc.iou[0, 0]), abs=1e-4)
        assert got["iou_best_threshold"] == pytest.approx(float(loc.iou_threshold[0, 0]))
        assert got["gradcam_box_iou"] == pytest.approx(float(loc.gradcam_box[0, 0]), abs=1e-4)


def test_l2_to_exact(compared) -> None:
    _, record = compared
    assert record["l2_to_exact"]["computed"] is True
    assert record["metrics"]["hirescam"]["l2_to_exact"] <= 1e-6
    assert record["metrics"]["gradcam"]["l2_to_exact"] > 0


def test_mask_on_another_grid_is_refused(tmp_path) -> None:
    image = nib.load(str(MASK))
    shifted = image.affine.copy()
    shifted[:3, 3] += 5.0
    other = tmp_path / "shifted_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), str(other))
    out = tmp_path / "out"
    result = invoke("compare", CT, "--finding", "atelectasis", "--mask", other, "--out", out,
                    "--device", "cpu", "-q")
    line = assert_one_line_error(result, "mask grid", "scan", "grid", str(other), code=1)
    assert "origin" in line and "(158.8, 158.8, -142.5)" in line
    assert not list(out.glob("*")) if out.exists() else True


def test_existing_outputs_need_force(compared) -> None:
    out, _ = compared
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = invoke("compare", CT, "--finding", "atelectasis", "--out", out, "-q")
    assert_one_line_error(result, "already exist", "--force", code=1)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_one_finding_only(tmp_path) -> None:
    result = invoke("compare", CT, "--out", tmp_path)
    assert_one_line_error(result, "exactly one --finding", code=2)
