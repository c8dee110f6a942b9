"""The scan pipeline: preprocessing, one explained forward pass, Invertd, files and report.

A tiny hand-built network whose HiResCAM map equals the brightness above a threshold
(a "blob detector") makes the geometry checkable without a trained model: the map must
peak at a bright blob planted in a phantom that is stored with an oblique, LPS-oriented,
anisotropic affine.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.errors import InputError, TargetError
from hirescam3d.io.outputs import write_labels
from hirescam3d.io.scans import OutputError
from hirescam3d.models.bundle import InputSpec, ModelInfo, preprocessing_transforms
from hirescam3d.pipeline import explain_image, explain_scan, preprocess_transforms

SPEC = InputSpec(3, 1, (56, 56, 56), "SPL", (5.0, 6.0, 6.0), (-1000.0, 3000.0))
CELL = 2  # model voxels per feature cell (the detector's stride)
BLOB_HU = 3000.0  # the top of the window: scaled to 1


class BlobNet(nn.Module):
    """logit("blob") = 50 * sum over 2x2x2 cells of ReLU(mean - threshold) - 1; "nothing" -5."""

    class_names = ("blob", "nothing")

    def __init__(self, size=SPEC.spatial_size, threshold: float = 0.55):
        super().__init__()
        conv = nn.Conv3d(1, 1, CELL, stride=CELL)
        fc = nn.Linear(math.prod(n // CELL for n in size), 2)
        with torch.no_grad():
            conv.weight.fill_(1.0 / CELL**3)
            conv.bias.fill_(-threshold)
            fc.weight.zero_()
            fc.weight[0] = 50.0
            fc.bias.copy_(torch.tensor([-1.0, -5.0]))
        self.features = nn.Sequential(conv, nn.ReLU())
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def blob_model() -> tuple[nn.Module, ModelInfo]:
    info = ModelInfo(
        name="blobnet", description="test blob detector", class_names=BlobNet.class_names,
        target_layer="features", input=SPEC, preprocessing=preprocessing_transforms(SPEC),
        task="multilabel", guaranteed=True, trained=False,
    )
    return BlobNet().eval(), info


def rotation(degrees) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_phantom(blob: bool = True, seed: int = 4):
    """Phantom CT (+ organs) as LPS arrays (i -> L, j -> P, k -> S) with an oblique affine.

    Returns ``(ct, organs, organ_names, affine, blob_world_mm or None)``.
    """
    ph = make_chest_ct(seed, findings=[], shape=(48, 64, 64), spacing=(6.0, 5.0, 5.0))
    ct = ph.ct.astype(np.float32)
    centre = np.array([30, 20, 18])  # superior, anterior, patient-right of the middle
    if blob:
        zz, yy, xx = np.indices(ct.shape)
        dist = np.sqrt(((zz - centre[0]) * 6.0) ** 2 + ((yy - centre[1]) * 5.0) ** 2
                       + ((xx - centre[2]) * 5.0) ** 2)
        ct[dist <= 12.0] = BLOB_HU
    # SPL array -> LPS array; spacing follows the axes (L, P: 5 mm, S: 6 mm).
    ct_lps = np.ascontiguousarray(ct.transpose(2, 1, 0))
    organs_lps = np.ascontiguousarray(ph.organs.transpose(2, 1, 0))
    affine = np.eye(4)
    affine[:3, :3] = rotation((5.0, -4.0, 7.0)) @ np.diag([-5.0, -5.0, 6.0])
    affine[:3, 3] = [140.0, 95.0, -120.0]
    blob_world = (affine @ np.array([centre[2], centre[1], centre[0], 1.0]))[:3] if blob else None
    return ct_lps, organs_lps, dict(ph.organ_names), affine, blob_world


@pytest.fixture(scope="module")
def scan_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    ct, organs, names, affine, blob_world = oblique_phantom()
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(root / "chest.nii.gz"))
    write_labels(root / "chest_organs.nii.gz", organs, affine)
    (root / "chest_organs.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    return root, blob_world


def model_grid_affine(image: np.ndarray, affine: np.ndarray, info: ModelInfo) -> np.ndarray:
    pre = preprocess_transforms(info, from_array=True)
    out = pre({"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine))})
    return out["image"].affine.numpy()


def test_preprocessing_follows_the_spec():
    _, info = blob_model()
    pre = preprocess_transforms(info, keys="image", label_keys="organs", from_array=True)
    names = [type(t).__name__ for t in pre.transforms]
    assert names == ["EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged",
                     "ResizeWithPadOrCropd"]
    ct, organs, _, affine, _ = oblique_phantom(blob=False)
    data = pre({"image": MetaTensor(torch.from_numpy(ct), affine=torch.as_tensor(affine)),
                "organs": MetaTensor(torch.from_numpy(organs.astype(np.float32)),
                                     affine=torch.as_tensor(affine))})
    image, labels = data["image"], data["organs"]
    assert tuple(image.shape) == (1, 56, 56, 56)
    assert "".join(nib.aff2axcodes(image.affine.numpy())) == "SPL"
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0),
                               SPEC.spacing, atol=1e-6)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # labels: nearest interpolation keeps them integers from the original set, no windowing
    values = set(np.unique(labels.numpy()).tolist())
    assert values <= set(np.unique(organs).tolist()) and len(values) > 3


def test_geometry_round_trip_oblique_lps(scan_files, tmp_path):
    """Outputs have the input's exact shape and affine; the map peaks at the planted blob."""
    root, blob_world = scan_files
    scan_path = root / "chest.nii.gz"
    network, info = blob_model()
    result, written = explain_scan(scan_path, tmp_path, model=(network, info),
                                   findings=["blob"], methods=["hirescam", "gradcam"],
                                   device="cpu")
    src = nib.load(str(scan_path))
    assert "".join(nib.aff2axcodes(src.affine)) == "LPS"
    grid = model_grid_affine(np.asarray(src.dataobj, np.float32), src.affine, info)
    for method in ("hirescam", "gradcam"):
        out = nib.load(str(written[f"blob/{method}"]))
        assert written[f"blob/{method}"].name == f"chest_blob_{method}.nii.gz"
        assert out.shape == src.shape
        np.testing.assert_array_equal(out.affine, src.affine)
        vol = np.asanyarray(out.dataobj)
        assert vol.dtype == np.float32 and vol.min() >= 0.0 and vol.max() <= 1.0
        peak = np.unravel_index(np.argmax(vol), vol.shape)
        peak_world = (src.affine @ np.array([*peak, 1.0]))[:3]
        offset_cells = np.linalg.solve(grid[:3, :3], peak_world - blob_world) / CELL
        assert np.all(np.abs(offset_cells) <= 1.0), (method, offset_cells)
        np.testing.assert_array_equal(vol, result.maps[("blob", method)])
    # the model-grid map (before Invertd) peaks at the blob too, in model voxels
    mg = result.model_grid_maps[("blob", "hirescam")]
    assert mg.shape == SPEC.spatial_size
    peak = np.unravel_index(np.argmax(mg), mg.shape)
    blob_vox = np.linalg.solve(grid, np.array([*blob_world, 1.0]))[:3]
    assert np.all(np.abs(np.array(peak) - blob_vox) <= CELL)


def test_report_contents(scan_files, tmp_path):
    root, _ = scan_files
    scan_path = root / "chest.nii.gz"
    network, info = blob_model()
    stages = []
    result, written = explain_scan(
        scan_path, tmp_path, model=(network, info), organs_path=root / "chest_organs.nii.gz",
        device="auto", progress=lambda stage, f: stages.append((stage, f)),
    )
    report = json.loads(written["report"].read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["model"]["name"] == "blobnet"
    assert "weights_sha256" in report["model"]
    assert report["input"]["path"] == str(scan_path.resolve())
    assert report["input"]["sha256"] == hashlib.sha256(scan_path.read_bytes()).hexdigest()
    assert report["input"]["axcodes"] == "LPS"
    assert report["layer"] == "features" and report["hirescam_guaranteed_faithful"] is True
    assert report["methods"] == ["hirescam"]
    # no --finding: the positive findings (p >= 0.5) are explained, and the report says so
    assert "probability >= 0.5" in report["finding_selection"]
    assert report["explained"] == ["blob"]
    assert set(written) == {"blob/hirescam", "report"}
    # the logits are the network's own for the preprocessed input
    pre = preprocess_transforms(info, from_array=True)
    src = nib.load(str(scan_path))
    x = pre({"image": MetaTensor(torch.from_numpy(np.asarray(src.dataobj, np.float32)),
                                 affine=torch.as_tensor(src.affine))})["image"]
    device = next(network.parameters()).device  # "auto" may have moved it to a GPU
    with torch.no_grad():
        logits = network(x.as_tensor()[None].to(device)).cpu().numpy()[0]
    for i, name in enumerate(info.class_names):
        f = report["findings"][name]
        assert f["logit"] == pytest.approx(float(logits[i]), rel=1e-5, abs=1e-5)
        assert f["probability"] == pytest.approx(1 / (1 + math.exp(-f["logit"])), rel=1e-6)
    assert report["findings"]["blob"]["probability"] > 0.5
    assert report["findings"]["nothing"]["explained"] is False
    assert set(report["versions"]) == {"hirescam3d", "torch", "monai", "numpy", "nibabel",
                                       "SimpleITK", "python"}
    assert {"read_s", "preprocess_s", "explain_s", "invert_s", "write_s", "total_s"} <= set(
        report["timings_s"])
    # organ attribution: the blob sits in the right lung
    fractions = report["organs"]["blob"]["hirescam"]
    by_label = fractions["by_label"]
    assert max(by_label, key=by_label.get) == "right_lung"
    assert sum(by_label.values()) + fractions["outside_labels"] == pytest.approx(1.0)
    assert report["organ_map"]["names"]["1"] == "right_lung"
    # progress: increasing fractions, ending at done
    assert stages[0] == ("read", 0.0) and stages[-1] == ("done", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)


def test_no_positive_finding_writes_only_the_report(tmp_path):
    ct, _, _, affine, _ = oblique_phantom(blob=False)
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(tmp_path / "clear.nii.gz"))
    result, written = explain_scan(tmp_path / "clear.nii.gz", tmp_path / "out",
                                   model=blob_model(), device="cpu")
    assert result.maps == {} and set(written) == {"report"}
    assert any("no finding has probability" in w for w in result.warnings)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]


def test_unknown_finding_lists_valid_ones_and_writes_nothing(scan_files, tmp_path):
    root, _ = scan_files
    with pytest.raises(TargetError, match=r"unknown finding 'blobb'.*'blob'.*Valid findings: "
                                          r"blob, nothing"):
        explain_scan(root / "chest.nii.gz", tmp_path, model=blob_model(), findings=["blobb"])
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_stop_before_anything_is_written(scan_files, tmp_path):
    root, _ = scan_files
    existing = tmp_path / "chest_blob_gradcam.nii.gz"
    existing.write_bytes(b"old")
    kwargs = dict(model=blob_model(), findings=["blob"], methods=["hirescam", "gradcam"],
                  device="cpu")
    with pytest.raises(OutputError, match="chest_blob_gradcam.nii.gz already exist.*--force"):
        explain_scan(root / "chest.nii.gz", tmp_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest_blob_gradcam.nii.gz"]
    assert existing.read_bytes() == b"old"
    # the same when the findings are only known after the forward pass
    with pytest.raises(OutputError):
        explain_scan(root / "chest.nii.gz", tmp_path, model=blob_model(),
                     methods=["hirescam", "gradcam"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest_blob_gradcam.nii.gz"]
    _, written = explain_scan(root / "chest.nii.gz", tmp_path, force=True, png=True, **kwargs)
    assert nib.load(str(existing)).shape == nib.load(str(root / "chest.nii.gz")).shape
    png = written["blob/gradcam/png"]
    assert png.name == "chest_blob_gradcam.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


def test_explain_image_checks_inputs():
    ct, organs, names, affine, _ = oblique_phantom(blob=False)
    with pytest.raises(InputError, match="3D"):
        explain_image(ct[0], affine, model=blob_model())
    with pytest.raises(InputError, match="not on the scan's grid"):
        explain_image(ct, affine, model=blob_model(), organs=organs[:-1])
    with pytest.raises(InputError, match="singular"):
        explain_image(ct, np.diag([1.0, 0.0, 1.0, 1.0]), model=blob_model())


def test_demo_architecture_plumbing():
    """The demo architecture (untrained here) runs through the whole pipeline."""
    from hirescam3d.models import zoo

    network, info = zoo.load("axialnet_tiny")
    ph = make_chest_ct(2, findings=["nodule"], shape=(48, 64, 64), spacing=(6.0, 5.0, 5.0))
    result = explain_image(ph.ct, ph.affine, model=(network, info),
                           findings=["nodule", "atelectasis"], methods=["hirescam", "gradcam"],
                           organs=ph.organs, organ_names=ph.organ_names)
    assert set(result.maps) == {(f, m) for f in ("nodule", "atelectasis")
                                for m in ("hirescam", "gradcam")}
    for vol in result.maps.values():
        assert vol.shape == ph.ct.shape and vol.dtype == np.float32
    assert result.model_grid_maps[("nodule", "hirescam")].shape == info.input.spatial_size
    assert set(result.probabilities) == set(info.class_names)
    assert result.report["hirescam_guaranteed_faithful"] is True
    assert result.report["layer"] == "to_volume"
    assert set(result.report["organs"]["nodule"]["gradcam"]["by_group"]) >= {"left_lung", "heart"}


def test_montage_slices_and_errors(tmp_path):
    from hirescam3d.evaluate.figures import most_attended_slices, save_montage

    heat = np.zeros((10, 8, 6), np.float32)
    heat[7] = 1.0
    heat[2, :4] = 1.0
    heat[5, 0, 0] = 1.0
    assert most_attended_slices(heat, 2) == [2, 7]
    assert most_attended_slices(heat, 50) == list(range(10))
    ct = np.full(heat.shape, -800.0, np.float32)
    out = save_montage(ct, heat, tmp_path / "m.png", n_slices=3, title="test")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OutputError, match="already exists"):
        save_montage(ct, heat, out)
    with pytest.raises(InputError, match="same shape"):
        save_montage(ct[:-1], heat, tmp_path / "n.png")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    ct, _, _, affine, _ = oblique_phantom()
    on_cpu = explain_image(ct, affine, model=blob_model(), findings=["blob"], device="cpu")
    on_gpu = explain_image(ct, affine, model=blob_model(), findings=["blob"], device="cuda")
    assert on_gpu.report["device"].startswith("cuda")
    np.testing.assert_allclose(on_gpu.maps[("blob", "hirescam")],
                               on_cpu.maps[("blob", "hirescam")], atol=1e-4)
    assert on_gpu.logits["blob"] == pytest.approx(on_cpu.logits["blob"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "hirescam3d" / "bundles" / "demo").is_dir(),
    reason="the trained demo bundle is not installed",
)
def test_trained_demo_atelectasis_peaks_in_the_planted_atelectasis(tmp_path):
    from scipy import ndimage

    from hirescam3d.models import zoo

    network, info = zoo.load()
    ph = make_chest_ct(11, findings=["atelectasis"])
    paths = ph.save(tmp_path, "sample")
    result, written = explain_scan(paths["ct"], tmp_path / "out", model=(network, info),
                                   findings=["atelectasis"], device="cpu")
    assert result.probabilities["atelectasis"] >= 0.5
    heat = nib.load(str(written["atelectasis/hirescam"])).get_fdata()
    mask = ph.findings["atelectasis"]
    lungs = (ph.organs == 1) | (ph.organs == 3)
    assert heat[mask].mean() > 2.0 * heat[lungs & ~mask].mean()
    # the hottest voxel lies in the atelectasis, or within one explanation-grid cell of it
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    dist_mm = ndimage.distance_transform_edt(~mask, sampling=ph.spacing)[peak]
    cell_mm = np.array(info.input.spacing) * np.array(info.input.spatial_size) / network.grid
    assert mask[peak] or dist_mm <= cell_mm.max(), (dist_mm, cell_mm)
