"""nnU-Net v2 model folders, checked against nnU-Net itself.

The model folder is made by nnU-Net (``hirescam3d.data.nnunet_phantom``: phantoms as a raw
dataset, nnU-Net's fingerprint and plans, the network its trainer builds from the plans
with seeded weights, saved as its trainer saves checkpoints) once per session. The
oracle is nnU-Net's ``nnUNetPredictor`` reading the same NIfTI file from disk.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="needs hirescam3d[nnunet]")

from hirescam3d.data.nnunet_phantom import write_phantom_ct  # noqa: E402
from hirescam3d.errors import HiResCAMError, InputError, ModelError  # noqa: E402
from hirescam3d.models.nnunet import (  # noqa: E402
    open_model,
    predictor,
    preprocess,
    segmentation,
)
from hirescam3d.pipeline.nnunet_explain import explain_preprocessed  # noqa: E402
from tests.cli.test_cli import assert_one_line_error, invoke  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
LAYER = "decoder.stages.2"  # the last decoder stage of the planned 4-stage U-Net


@pytest.fixture(scope="session")
def nnunet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m hirescam3d.data.nnunet_phantom ROOT --folds 0 1`` in a temporary folder."""
    from hirescam3d.data.nnunet_phantom import build_phantom_model

    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        return build_phantom_model(tmp_path_factory.mktemp("nnunet"), folds=(0, 1))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``tiles``: on the plans' spacing, two tiles; ``resampled``: another spacing (the
    preprocessing resamples it, pads one axis and cuts 2 x 2 tiles)."""
    root = tmp_path_factory.mktemp("nnunet_scans")
    return {
        "tiles": write_phantom_ct(root / "tiles_0000.nii.gz", 12, (24, 40, 48), (6.0, 5.0, 5.0)),
        "resampled": write_phantom_ct(root / "resampled_0000.nii.gz", 13, (20, 36, 44),
                                      (7.0, 6.0, 6.0)),
    }  # fmt: skip


def nnunet_predicts(folder: Path, scan: Path, folds: tuple, mirror: bool, out: Path):
    """nnU-Net's own prediction from the file: (segmentation array, probabilities)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                        perform_everything_on_device=False, device=torch.device("cpu"),
                        verbose=False, allow_tqdm=False)  # fmt: skip
    p.initialize_from_trained_model_folder(str(folder), folds)
    p.predict_from_files_sequential([[str(scan)]], str(out), save_probabilities=True)
    name = scan.name.replace("_0000.nii.gz", "")
    seg = np.asanyarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
    probabilities = np.load(out / f"{name}.npz")["probabilities"]
    return seg, probabilities


@pytest.mark.parametrize(
    ("scan", "folds", "mirror"), [("tiles", (0,), True), ("resampled", (0, 1), False)]
)
def test_prediction_equals_nnunet_predictor(nnunet_folder, scans, tmp_path, scan, folds, mirror):
    seg, probs = nnunet_predicts(nnunet_folder, scans[scan], folds, mirror, tmp_path)
    model = open_model(nnunet_folder, folds)
    pre = preprocess(model, scans[scan])
    from hirescam3d.models.nnunet import predict_logits

    ours, our_probs = segmentation(model, predict_logits(model, pre.data, mirror),
                                   pre.properties)  # fmt: skip
    assert len(np.unique(seg)) == 3  # background, lungs and heart are all predicted
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 1, 0), seg)
    assert np.abs(np.asarray(our_probs) - probs).max() <= 1e-4


def _fp32_nnunet_logits(model, data: torch.Tensor, mirror: bool) -> torch.Tensor:
    """nnU-Net's own blend, accumulated in float32 instead of its float16."""
    half = torch.half
    torch.half = torch.float32  # nnU-Net allocates its accumulators as torch.half
    try:
        return predictor(model, mirror).predict_logits_from_preprocessed_data(data).float()
    finally:
        torch.half = half


@pytest.mark.parametrize(("scan", "folds", "mirror"),
                         [("tiles", (0,), True), ("resampled", (0, 1), False)])  # fmt: skip
def test_logit_maps_sum_to_region_score_minus_bias(nnunet_folder, scans, scan, folds, mirror):
    model = open_model(nnunet_folder, folds)
    pre = preprocess(model, scans[scan])
    e = explain_preprocessed(model, pre, LAYER, ["lungs", "heart"], mirror)
    reference = _fp32_nnunet_logits(model, pre.data, mirror)
    flips = 8 if mirror else 1
    assert [p["fold"] for p in e.passes] == [f for f in folds for _ in range(flips)]
    bias = sum(  # the passes' mean bias: each fold's, read from its checkpoint by hand
        torch.load(nnunet_folder / f"fold_{f}" / "checkpoint_final.pth", weights_only=False)
        ["network_weights"]["decoder.seg_layers.2.bias"] for f in folds
    ) / len(folds)
    for k, c in enumerate((1, 2)):  # lungs, heart
        region = (e.logits.argmax(0) == c).float()
        torch.testing.assert_close(e.region[k], region)
        score = float((region * reference[c]).sum())
        expected = score - float(bias[c]) * float(region.sum())
        assert abs(bias[c]) > 1e-3  # the bias term matters in this check
        assert float(e.raw[k].sum()) == pytest.approx(expected, rel=1e-4, abs=1e-2)
        inside = region > 0
        assert (e.blended[c][inside] - reference[c][inside]).abs().max() < 1e-4


def test_monai_gaussian_blend_is_not_nnunets():
    """Why the tiles are nnU-Net's: MONAI's gaussian mode (sigma_scale 0.125) peaks at
    (n - 1) / 2 and floors at 1e-3, and its schedule places windows elsewhere."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    patch = (24, 40, 40)
    monai_map = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device="cpu")
    nnunet_map = compute_gaussian(patch, 1 / 8, 1, dtype=torch.float64,
                                  device=torch.device("cpu"))  # fmt: skip
    diff = (monai_map / monai_map.max()).double() - nnunet_map / nnunet_map.max()
    assert diff.abs().max() > 0.1
    interval = _get_scan_interval((110,), (64,), 1, (0.5,))
    monai_starts = [int(s[0].start) for s in dense_patch_slices((110,), (64,), interval)]
    assert compute_steps_for_sliding_window((110,), (64,), 0.5) == [[0, 23, 46]]
    assert monai_starts != [0, 23, 46]


def test_cli_explain_layers_and_report(nnunet_folder, scans, tmp_path):
    out = tmp_path / "out"
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--folds", "0",
                    "--no-mirror", "--values", "logit", "--finding", "heart",
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["passes"] == [{"fold": 0, "flip": []}] and report["guaranteed"] is True
    entry = report["findings"]["heart"]
    assert entry["map_sum"] == pytest.approx(
        entry["region_score_explained"] - entry["bias"] * entry["region_voxels"], rel=1e-4
    )
    (tmp_path / "oracle").mkdir()
    seg, _ = nnunet_predicts(nnunet_folder, scans["tiles"], (0,), False, tmp_path / "oracle")
    written = np.asanyarray(nib.load(str(out / "tiles_0000_nnunet_segmentation.nii.gz")).dataobj)
    np.testing.assert_array_equal(written, seg)
    heart = nib.load(str(out / "tiles_0000_heart_hirescam.nii.gz"))
    assert heart.shape == seg.shape
    np.testing.assert_allclose(heart.affine, nib.load(str(scans["tiles"])).affine)
    layers = invoke("layers", "--model", nnunet_folder, "--json")
    assert layers.exit_code == 0 and LAYER in layers.stdout
    audit = invoke("audit", "--model", nnunet_folder)
    assert audit.exit_code == 0, audit.stderr


# -- safe loading -------------------------------------------------------------------------
class Planted:
    """Unpickling it writes ``marker``: a checkpoint that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoint_that_runs_code_is_refused(nnunet_folder, tmp_path):
    folder = tmp_path / "planted"
    shutil.copytree(nnunet_folder, folder)
    marker = tmp_path / "marker.txt"
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    payload = torch.load(checkpoint, weights_only=False)
    payload["logging"] = Planted(marker)
    torch.save(payload, checkpoint)
    with pytest.raises(ModelError) as err:
        open_model(folder, [0])
    assert "refused" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # what an unsafe load would have done
    assert marker.read_text() == "code ran"


# -- bad input: one line, no file ---------------------------------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "Dataset501_Phantom" / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_folder_without_plans(nnunet_folder, scans, tmp_path):
    folder = _copy(nnunet_folder, tmp_path)
    (folder / "plans.json").unlink()
    result = invoke("explain", scans["tiles"], "--model", folder, "--out", tmp_path / "o")
    assert_one_line_error(result, "no plans.json", code=1)
    assert not (tmp_path / "o").exists()


def test_missing_fold(nnunet_folder, scans, tmp_path):
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--folds", "3",
                    "--out", tmp_path / "o")  # fmt: skip
    assert_one_line_error(result, "fold 3", "folds present: 0, 1", code=1)
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_architecture(nnunet_folder, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = _copy(nnunet_folder, tmp_path)
    checkpoint = folder / "fold_1" / "checkpoint_final.pth"
    payload = torch.load(checkpoint, weights_only=False)
    plans = payload["init_args"]["plans"]
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [8, 16, 32, 64]  # twice as wide
    manager = PlansManager(plans)
    net = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 1, 3, enable_deep_supervision=False
    )
    payload["network_weights"] = net.state_dict()
    torch.save(payload, checkpoint)
    with pytest.raises(ModelError) as err:
        open_model(folder)
    assert "fold_1" in str(err.value) and "another architecture" in str(err.value)
    assert "\n" not in str(err.value)


def test_2d_configuration_given_a_3d_scan(nnunet_folder, scans, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = tmp_path / "Dataset501_Phantom" / "nnUNetTrainer__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(nnunet_folder / name, folder / name)
    payload = torch.load(nnunet_folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    manager = PlansManager(payload["init_args"]["plans"])
    net = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("2d"), 1, 3, enable_deep_supervision=False
    )
    payload["network_weights"] = net.state_dict()
    payload["init_args"]["configuration"] = "2d"
    payload["inference_allowed_mirroring_axes"] = (0, 1)
    torch.save(payload, folder / "fold_0" / "checkpoint_final.pth")
    model = open_model(folder)
    with pytest.raises(InputError) as err:
        preprocess(model, scans["tiles"])
    assert "2D configuration '2d'" in str(err.value) and "\n" not in str(err.value)
    result = invoke("explain", scans["tiles"], "--model", folder, "--out", tmp_path / "o")
    assert_one_line_error(result, "a 3D volume", "2D model", code=result.exit_code or 1)
    assert not (tmp_path / "o").exists()


def test_nnunetv2_not_installed(nnunet_folder, scans, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ImportError
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--out", tmp_path / "o")
    assert_one_line_error(result, 'pip install "hirescam3d[nnunet]"', code=1)
    assert not (tmp_path / "o").exists()
    with pytest.raises(HiResCAMError, match="nnunetv2, which is not installed"):
        open_model(nnunet_folder)


def test_generic_pipeline_refuses_nnunet_folders(nnunet_folder):
    """The generic pipeline (explain_scan, explain_image, compare_scan) would explain
    another prediction than nnU-Net's: it refuses the folder with one line."""
    from hirescam3d.pipeline import resolve_model

    with pytest.raises(ModelError, match="hirescam3d explain") as err:
        resolve_model(str(nnunet_folder))
    assert "\n" not in str(err.value)


def test_region_based_training_is_explained_per_region(nnunet_folder, scans, tmp_path):
    """A region-based training (sigmoid outputs, regions_class_order): one map per region,
    named from dataset.json, over nnU-Net's own region masks."""
    import json

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = _copy(nnunet_folder, tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "chest_organs": [1, 2], "heart": 2}
    dataset["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(dataset))
    shutil.rmtree(folder / "fold_1")
    payload = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    manager = PlansManager(payload["init_args"]["plans"])
    with torch.random.fork_rng():
        torch.manual_seed(5)
        net = nnUNetTrainer.build_network_architecture(
            manager, manager.get_configuration("3d_fullres"), 1, 2, enable_deep_supervision=False
        )
    payload["network_weights"] = net.state_dict()
    torch.save(payload, folder / "fold_0" / "checkpoint_final.pth")
    model = open_model(folder)
    assert model.class_names == ("chest_organs", "heart") and model.task == "sigmoid"
    pre = preprocess(model, scans["tiles"])
    e = explain_preprocessed(model, pre, LAYER, None, mirror=False)
    assert e.names == ["chest_organs", "heart"]
    for k in range(2):  # nnU-Net's region k: sigmoid(logit) > 0.5
        torch.testing.assert_close(e.region[k], (torch.sigmoid(e.logits[k].float()) > 0.5).float())
        assert float(e.raw[k].sum()) == pytest.approx(
            float(e.region_scores[k] - e.bias[k] * e.region[k].sum()), rel=1e-4, abs=1e-2)
    seg, _ = nnunet_predicts(folder, scans["tiles"], (0,), False, tmp_path)
    ours, _ = segmentation(model, e.logits, pre.properties)
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 1, 0), seg)


def test_checkpoint_option_and_mirror_default(nnunet_folder, tmp_path):
    """--checkpoint names each fold's file; mirroring defaults to what the checkpoint's
    inference_allowed_mirroring_axes allows, as in nnU-Net."""
    from hirescam3d.models.handle import ModelHandle

    result = invoke("findings", "--model", nnunet_folder, "--checkpoint", "checkpoint_best.pth")
    assert_one_line_error(result, "no fold_N/checkpoint_best.pth", code=1)
    folder = _copy(nnunet_folder, tmp_path)
    shutil.rmtree(folder / "fold_1")
    payload = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert ModelHandle.resolve(str(folder)).mirror is True  # (0, 1, 2) in the fixture
    payload["inference_allowed_mirroring_axes"] = None
    torch.save(payload, folder / "fold_0" / "checkpoint_best.pth")
    handle = ModelHandle.resolve(str(folder)).with_options(checkpoint="checkpoint_best.pth")
    assert handle.folds == [0] and handle.mirror is False
    assert handle.with_options(mirror=True).mirror is True
    listed = invoke("findings", "--model", folder, "--checkpoint", "checkpoint_best.pth")
    assert listed.exit_code == 0 and "heart" in listed.stdout


# -- batch, compare and napari take the same nnU-Net path as explain ----------------------
def test_batch_writes_what_explain_writes(nnunet_folder, scans, tmp_path):
    """batch over two scans: per scan the same files, with the same arrays, as explain on
    that scan; nnU-Net's segmentation equals nnUNetPredictor's; a rerun skips the scans,
    other folds make them stale."""
    import json

    options = ("--model", nnunet_folder, "--folds", "0", "--no-mirror", "--values", "logit")
    batch = invoke("batch", scans["tiles"], scans["resampled"], "--out", tmp_path / "b",
                   *options, "--json")  # fmt: skip
    assert batch.exit_code == 0, batch.stderr
    records = json.loads(batch.stdout)
    assert [r["status"] for r in records] == ["ok", "ok"]
    for name, scan in scans.items():
        single = tmp_path / f"explain_{name}"
        result = invoke("explain", scan, *options, "--out", single)
        assert result.exit_code == 0, result.stderr
        written = sorted(p.name for p in single.glob("*.nii.gz"))
        item = tmp_path / "b" / f"{name}_0000"
        assert written == sorted(p.name for p in item.glob("*.nii.gz"))
        assert any(n.endswith("_lungs_hirescam.nii.gz") for n in written)
        for file in written:
            a, b = nib.load(str(single / file)), nib.load(str(item / file))
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
        report = json.loads((item / "report.json").read_text())
        assert report["passes"] == [{"fold": 0, "flip": []}]
    (tmp_path / "oracle").mkdir()
    seg, _ = nnunet_predicts(nnunet_folder, scans["resampled"], (0,), False, tmp_path / "oracle")
    batch_seg = tmp_path / "b" / "resampled_0000" / "resampled_0000_nnunet_segmentation.nii.gz"
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(batch_seg)).dataobj), seg)
    again = invoke("batch", scans["tiles"], "--out", tmp_path / "b", *options, "--json")
    assert [r.get("note") for r in json.loads(again.stdout)] == ["already done"]
    other = invoke("batch", scans["tiles"], "--out", tmp_path / "b", "--model", nnunet_folder,
                   "--folds", "1", "--no-mirror", "--values", "logit", "--json")  # fmt: skip
    assert "other options" in json.loads(other.stdout)[0]["note"]


def test_batch_and_compare_refuse_what_the_nnunet_path_cannot_do(nnunet_folder, scans, tmp_path):
    result = invoke("batch", scans["tiles"], "--out", tmp_path / "b", "--model", nnunet_folder,
                    "--method", "gradcam")  # fmt: skip
    assert_one_line_error(result, "--method hirescam", code=2)
    result = invoke("compare", scans["tiles"], "--finding", "lungs", "--model", nnunet_folder,
                    "--region", scans["tiles"], "--out", tmp_path / "c")  # fmt: skip
    assert_one_line_error(result, "predicted region", "drop --region", code=2)
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--roi-size", "16",
                    "16", "16", "--out", tmp_path / "r")  # fmt: skip
    assert_one_line_error(result, "--roi-size", "nnU-Net's own tiles", code=2)
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--format", "dicom",
                    "--out", tmp_path / "d")  # fmt: skip
    assert_one_line_error(result, "--format", "not supported for nnU-Net model folders", code=2)
    assert not any((tmp_path / n).exists() for n in "bcrd")


def test_napari_job_returns_nnunets_predicted_region(nnunet_folder, scans, tmp_path):
    """The widget's worker job on the CT layer's array: nnU-Net's segmentation of the same
    scan (nnUNetPredictor) as its masks, and the maps explain writes for the file."""
    pytest.importorskip("napari", reason="needs hirescam3d[napari]")
    from hirescam3d.models.nnunet_handle import NnunetHandle
    from hirescam3d.napari._widget import _explain
    from hirescam3d.pipeline.nnunet_scan import explain_nnunet_scan

    img = nib.load(str(scans["resampled"]))
    ct, affine = img.get_fdata(dtype=np.float32), img.affine
    result = _explain(ct, affine, str(nnunet_folder), ["lungs", "heart"], ["hirescam"], None,
                      None, None, lambda *_: None, {}, "unit",
                      nnunet={"folds": ["0"], "mirror": False})  # fmt: skip
    (tmp_path / "oracle").mkdir()
    seg, _ = nnunet_predicts(nnunet_folder, scans["resampled"], (0,), False, tmp_path / "oracle")
    for label, name in ((1, "lungs"), (2, "heart")):
        assert 0 < (seg == label).sum() < seg.size
        np.testing.assert_array_equal(result.masks[name], (seg == label).astype(np.uint8))
    handle = NnunetHandle.open(nnunet_folder, ["0"], None, False)
    _, paths = explain_nnunet_scan(scans["resampled"], tmp_path / "e", handle, ["heart"])
    expected = nib.load(str(paths["heart/hirescam"])).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(result.maps[("heart", "hirescam")], expected, atol=1e-6)
    with pytest.raises(InputError, match="a painted region is not supported"):
        _explain(ct, affine, str(nnunet_folder), ["lungs"], ["hirescam"], None, None, None,
                 lambda *_: None, {}, "unit", np.ones(ct.shape, bool))  # fmt: skip


@pytest.mark.gui
@pytest.mark.skipif(
    not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen",
    reason="napari canvases need an X display with OpenGL: run under xvfb-run",
)
def test_napari_widget_shows_nnunets_region(nnunet_folder, scans, tmp_path, make_napari_viewer,
                                            qtbot):  # fmt: skip
    """The widget with the folder, fold 0 and mirroring off: HiResCAM only, and the
    'lungs region' layer is nnUNetPredictor's lungs, on the layer's (SPL) axes."""
    pytest.importorskip("napari", reason="needs hirescam3d[napari]")
    from hirescam3d.napari._layers import display_geometry, to_display
    from hirescam3d.napari._widget import ExplainWidget

    img = nib.load(str(scans["tiles"]))
    ct, affine = img.get_fdata(dtype=np.float32), img.affine
    viewer = make_napari_viewer(show=True)
    shown, shown_affine = to_display(ct, affine)
    viewer.add_image(shown, name="ct", **display_geometry(shown_affine))
    widget = ExplainWidget(viewer)
    widget.model_combo.setCurrentText(str(nnunet_folder))
    assert widget.methods() == ["hirescam"]
    widget.set_findings(["lungs"])
    widget.nnunet_folds.setText("0")
    widget.nnunet_mirror.setCurrentText("mirror off")
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.status.text().startswith("done"), widget.status.text()
    (tmp_path / "oracle").mkdir()
    seg, _ = nnunet_predicts(nnunet_folder, scans["tiles"], (0,), False, tmp_path / "oracle")
    to_spl = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("SPL")
    )
    expected = nib.orientations.apply_orientation((seg == 1).astype(np.uint8), to_spl)
    np.testing.assert_array_equal(np.asarray(viewer.layers["lungs region"].data), expected)


def test_organs_png_and_dtype_for_an_nnunet_folder(nnunet_folder, scans, tmp_path):
    """--organs: each map's logits per organ and positive shares, against sums over the
    written logit map computed here; --png: a montage per class; --dtype int16: the same
    unit map as float32, within one storage step."""
    import json

    from PIL import Image

    scan = nib.load(str(scans["tiles"]))
    labels = np.zeros(scan.shape, np.uint8)
    labels[: scan.shape[0] // 2] = 1  # patient halves and a slab of the other half
    labels[scan.shape[0] // 2 :, : scan.shape[1] // 3] = 2
    organs = tmp_path / "organs.nii.gz"
    nib.save(nib.Nifti1Image(labels, scan.affine), str(organs))
    organs.with_name("organs.json").write_text(json.dumps({"1": "left_half", "2": "slab"}))
    out = tmp_path / "out"
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--folds", "0",
                    "--no-mirror", "--values", "logit", "--finding", "heart", "--organs",
                    organs, "--png", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    density = np.asarray(nib.load(str(out / "tiles_0000_heart_hirescam.nii.gz")).dataobj,
                         dtype=np.float64)  # fmt: skip
    parts = report["contributions"]["heart"]["hirescam"]
    for value, name in ((1, "left_half"), (2, "slab")):
        assert parts["by_organ"][name] == pytest.approx(density[labels == value].sum(), rel=1e-5)
        positive = np.maximum(density, 0)
        assert report["organs"]["heart"]["hirescam"]["by_label"][name] == pytest.approx(
            positive[labels == value].sum() / positive.sum(), rel=1e-5)
    assert parts["outside_organs"] == pytest.approx(density[labels == 0].sum(), rel=1e-5)
    total = report["findings"]["heart"]["map_sum_scan_grid"]
    assert sum(parts["by_organ"].values()) + parts["outside_organs"] == pytest.approx(total,
                                                                                      rel=1e-5)
    with Image.open(out / "tiles_0000_heart_hirescam.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100
    for dtype in ("float32", "int16"):  # unit maps, stored both ways
        result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--folds", "0",
                        "--no-mirror", "--finding", "heart", "--dtype", dtype,
                        "--out", tmp_path / dtype)  # fmt: skip
        assert result.exit_code == 0, result.stderr
    stored = nib.load(str(tmp_path / "int16" / "tiles_0000_heart_hirescam.nii.gz"))
    assert stored.get_data_dtype() == np.int16
    unit = np.asarray(nib.load(str(tmp_path / "float32" / "tiles_0000_heart_hirescam.nii.gz"))
                      .dataobj)  # fmt: skip
    np.testing.assert_allclose(np.asarray(stored.dataobj), unit, atol=1 / 32767)


def test_a_failed_write_leaves_no_nnunet_output(nnunet_folder, scans, tmp_path, monkeypatch):
    from hirescam3d.io import outputs
    from hirescam3d.io.scans import OutputError

    def full(*args, **kwargs):
        raise OutputError("cannot write the segmentation: No space left on device")

    monkeypatch.setattr(outputs, "write_labels", full)
    out = tmp_path / "out"
    result = invoke("explain", scans["tiles"], "--model", nnunet_folder, "--folds", "0",
                    "--no-mirror", "--finding", "heart", "--out", out)  # fmt: skip
    assert_one_line_error(result, "No space left", code=1)
    assert not out.exists() or list(out.iterdir()) == []


def test_compare_scores_methods_on_nnunets_tiles(nnunet_folder, scans, tmp_path):
    """compare on nnU-Net's predicted heart: the HiResCAM column is the map `explain`
    writes, its mask metrics are those computed here from that map and nnU-Net's own
    segmentation (nnUNetPredictor) as the mask, and Grad-CAM is scored beside it."""
    import json

    (tmp_path / "oracle").mkdir()
    seg, _ = nnunet_predicts(nnunet_folder, scans["tiles"], (0,), False, tmp_path / "oracle")
    heart = 2  # dataset.json's label of the heart in the fixture
    mask = tmp_path / "heart_mask.nii.gz"
    nib.save(nib.Nifti1Image((seg == heart).astype(np.uint8),
                             nib.load(str(scans["tiles"])).affine), str(mask))  # fmt: skip
    common = ("--model", nnunet_folder, "--folds", "0", "--no-mirror", "--finding", "heart")
    result = invoke("compare", scans["tiles"], *common, "--mask", mask, "--json",
                    "--out", tmp_path / "c")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["methods"] == ["hirescam", "gradcam"] and record["region"] == "predicted"
    assert invoke("explain", scans["tiles"], *common, "--out", tmp_path / "e").exit_code == 0
    unit = np.asarray(nib.load(str(tmp_path / "e" / "tiles_0000_heart_hirescam.nii.gz")).dataobj,
                      dtype=np.float64)  # fmt: skip
    inside = seg == heart
    scores = record["metrics"]["hirescam"]
    assert scores["relevance_mass"] == pytest.approx(unit[inside].sum() / unit.sum(), rel=1e-5)
    assert scores["pointing_game"] == float(inside.ravel()[int(np.argmax(unit.ravel()))])
    assert scores["l2_to_exact"] == pytest.approx(0.0, abs=1e-6)
    grad = record["metrics"]["gradcam"]
    assert 0.0 <= grad["relevance_mass"] <= 1.0 and grad["l2_to_exact"] is not None
    assert (tmp_path / "c" / "tiles_0000_heart_compare.png").stat().st_size > 10_000
