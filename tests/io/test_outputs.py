"""The output path at scan scale: fast inversion, organ pooling, storage types, grids, names.

Oracles: MONAI ``Invertd`` (the reference inversion), a brute-force sampling of each
cell's tile in world coordinates (organ shares), nibabel and SimpleITK reading the files
back (headers, scaling, geometry), SimpleITK's linear resampling by affine (what a viewer
does with a model-grid map), and hand-computed ``scl_slope`` values.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hirescam3d.core import postprocess
from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.errors import HiResCAMError, InputError
from hirescam3d.io import outputs
from hirescam3d.io.scans import OutputError
from hirescam3d.models.bundle import InputSpec, ModelInfo, preprocessing_transforms
from hirescam3d.pipeline import explain_arrays, explain_scan, invert_maps
from tests.pipeline.test_pipeline import SPEC, BlobNet, blob_model, oblique_phantom


def phantom(shape, spacing, seed=5):
    """A small phantom CT with its organs (SPL arrays, RAS affine)."""
    ph = make_chest_ct(seed, findings=[], shape=shape, spacing=spacing)
    ct = ph.ct.astype(np.float32)
    ct[shape[0] // 2 - 3 : shape[0] // 2 + 3, 20:30, 20:30] = 3000.0  # a blob to explain
    return ct, ph.organs, dict(ph.organ_names), ph.affine


CASES = {
    # oblique, LPS-stored, smaller than the model's field of view (padded on every axis)
    "oblique_lps_padded": lambda: oblique_phantom()[:2] + oblique_phantom()[2:4],
    # larger than the field of view on every axis (cropped), anisotropic
    "cropped": lambda: phantom((50, 64, 64), (6.5, 6.5, 6.0)),
    # cropped on one axis, padded on the others, odd sizes
    "mixed": lambda: phantom((61, 45, 47), (5.1, 7.9, 4.3)),
}


@pytest.fixture(scope="module", params=list(CASES))
def explained(request):
    ct, organs, names, affine = CASES[request.param]()
    result = explain_arrays(ct, affine, model=blob_model(), findings=["blob"],
                            methods=["hirescam", "gradcam", "guided-hirescam"],
                            organs=organs, organ_names=names, device="cpu")
    return result, ct, organs, names, affine


def test_fast_inversion_agrees_with_monai_invertd(explained):
    result, ct, _, _, affine = explained
    grid = result.grid
    assert grid.fast
    for pair in result.pairs:
        model_map = torch.from_numpy(result.model_map(pair))[None]
        reference = invert_maps(grid.pre, grid.image, {pair: model_map}, ct.shape, affine)[pair]
        fast = result.scan_map(pair)
        assert fast.shape == ct.shape and fast.dtype == np.float32
        np.testing.assert_allclose(fast, reference, atol=2e-5)
        assert reference.max() > 0.5  # a real map, not two empty ones
    # densities (logit units) too, before the mass fix-up
    pair = ("blob", "hirescam")
    raw = result.raw[pair][None, None].float()
    density = postprocess.density(raw, result.geometry["hirescam"], grid.shape)[0]
    reference = invert_maps(grid.pre, grid.image, {pair: density}, ct.shape, affine,
                            clip=False)[pair]
    fast = grid.to_scan(result.raw[pair], result.geometry["hirescam"], "density")
    np.testing.assert_allclose(fast, reference, atol=2e-5 * float(np.abs(reference).max()))


def test_only_maps_of_finite_cells_skip_the_writers_check(explained, tmp_path):
    """A display map of finite cells is marked clean, and written unchecked it gives the
    checked file's bytes; a NaN cell makes it unclean, and the checked write stores no
    NaN (nibabel reads the files back)."""
    from hirescam3d.pipeline import to_scan_grid

    result, _, _, _, affine = explained
    pair = ("blob", "hirescam")
    cells, geometry = result.raw[pair].clone(), result.geometry["hirescam"]
    placed = to_scan_grid.scan_map(cells, geometry, result.grid, "unit")
    assert placed.clean
    files = [outputs.write_map(tmp_path / f"{name}.nii.gz", placed.volume, affine, "hirescam",
                               checked=checked)
             for name, checked in (("checked", False), ("trusted", True))]  # fmt: skip
    assert gzip.decompress(files[0].read_bytes()) == gzip.decompress(files[1].read_bytes())
    cells.view(-1)[cells.argmax()] = float("nan")
    placed = to_scan_grid.scan_map(cells, geometry, result.grid, "unit")
    assert not placed.clean and np.isnan(placed.volume).all()
    path = outputs.write_map(tmp_path / "nan.nii.gz", placed.volume, affine, "hirescam")
    assert not np.isnan(np.asarray(nib.load(str(path)).dataobj)).any()


def test_maps_land_on_the_planted_blob(explained):
    """Independent of MONAI's bookkeeping: the map's mass centre is the blob's, also where
    MONAI 1.6.1 loses a pad or crop translation in the affine (the cropped/mixed cases)."""
    result, ct, *_ = explained
    blob = np.argwhere(ct >= 2999.0).mean(axis=0)
    for pair in result.pairs:
        hot = np.argwhere(result.scan_map(pair) > 0.5).mean(axis=0)
        assert np.all(np.abs(hot - blob) <= 1.5), (pair, hot, blob)


def _brute_force_shares(grid, geometry, labels, cells, samples=24):
    """Per cell: the share of its tile (inside the model's input) in each label, from
    ``samples ** 3`` points per tile mapped to the nearest scan voxel by the affines."""
    to_scan = np.linalg.solve(grid.scan_affine, grid.affine)
    out = []
    for cell in cells:
        axes = []
        for a, geo in enumerate(geometry.axes):
            lo = max(geo.first + (cell[a] - 0.5) * geo.step, -0.5)
            hi = min(geo.first + (cell[a] + 0.5) * geo.step, grid.shape[a] - 0.5)
            width = max(hi - lo, 0.0) / geo.step  # share of the tile's length in the input
            axes.append((lo + (np.arange(samples) + 0.5) * (hi - lo) / samples, width))
        u = np.stack(np.meshgrid(*[p for p, _ in axes], indexing="ij"), -1).reshape(-1, 3)
        v = np.rint(u @ to_scan[:3, :3].T + to_scan[:3, 3]).astype(int)
        ok = np.all((v >= 0) & (v < np.array(grid.scan_shape)), axis=1)
        found = np.zeros(len(v), int)
        found[ok] = labels[tuple(v[ok].T)] + 1  # 0: outside the scan
        volume = np.prod([w for _, w in axes])
        out.append({k: volume * float(np.mean(found == k)) for k in np.unique(found)})
    return out


def test_organ_shares_are_pooled_from_the_scan_grid(explained):
    result, _, organs, names, _ = explained
    geometry = result.geometry["hirescam"]
    regions = result.grid.cell_regions(geometry, organs, names)
    # the parts add up: every organ lies inside the scan
    in_organs = sum(regions.organs.values())
    assert torch.all(in_organs <= regions.inside + 1e-5)  # float32 pooling
    # against brute-force sampling, on cells spread over the grid (borders included)
    rng = np.random.default_rng(0)
    cells = [tuple(int(rng.integers(n)) for n in geometry.grid_shape) for _ in range(40)]
    cells += [(0, 0, 0), tuple(n - 1 for n in geometry.grid_shape)]
    expected = _brute_force_shares(result.grid, geometry, organs, cells)
    for cell, want in zip(cells, expected, strict=True):
        inside = sum(v for k, v in want.items() if k > 0)
        assert float(regions.inside[cell]) == pytest.approx(inside, abs=0.03)
        for label, name in names.items():
            got = float(regions.organs[name][cell]) if name in regions.organs else 0.0
            assert got == pytest.approx(want.get(label + 1, 0.0), abs=0.03), (cell, name)
    # the labels' memory order (nibabel reads F-ordered arrays) changes nothing
    again = result.grid.cell_regions(geometry, np.asfortranarray(organs), names)
    for name, share in regions.organs.items():
        torch.testing.assert_close(again.organs[name], share)


def test_report_shares_add_up(explained):
    result, *_ = explained
    for method, entry in result.organ_shares["blob"].items():
        assert entry["no_positive_evidence"] is False, method
        total = sum(entry["by_label"].values()) + entry["outside_labels"]
        assert total == pytest.approx(1.0)


def test_preprocessing_the_fast_path_does_not_cover_falls_back_to_invertd():
    spec = InputSpec(3, 1, SPEC.spatial_size, "SPL", None, (-1000.0, 3000.0),
                     size_mode="resize")
    info = ModelInfo(
        name="blob-resize", description="", class_names=BlobNet.class_names,
        target_layer="features", input=spec, preprocessing=preprocessing_transforms(spec),
        task="multilabel", guaranteed=True, trained=False,
    )
    ct, organs, names, affine, _ = oblique_phantom()
    result = explain_arrays(ct, affine, model=(BlobNet().eval(), info), findings=["blob"],
                            organs=organs, organ_names=names)
    assert not result.grid.fast
    grid, pair = result.grid, ("blob", "hirescam")
    reference = invert_maps(grid.pre, grid.image,
                            {pair: torch.from_numpy(result.model_map(pair))[None]},
                            ct.shape, affine)[pair]
    np.testing.assert_array_equal(result.scan_map(pair), reference)
    entry = result.organ_shares["blob"]["hirescam"]
    assert sum(entry["by_label"].values()) + entry["outside_labels"] == pytest.approx(1.0)


# -- storage types ------------------------------------------------------------------------
AFFINE = np.array([[0.0, 0.0, -0.8, 120.0], [0.0, -0.75, 0.0, 90.5],
                   [2.5, 0.0, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]])


def smooth_map(shape=(20, 33, 27), order="F"):
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    volume = np.sin(3 * grids[0]) * np.cos(2 * grids[1]) * grids[2]
    volume = np.clip(volume, 0, None) / volume.max()
    return np.asarray(volume, dtype=np.float32, order=order)


def stored_header(path: Path) -> nib.Nifti1Header:
    """The header as stored (nibabel's loaded image moves the scaling to its data proxy)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(f)


def read_sitk(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), image


@pytest.mark.parametrize(("dtype", "slope", "step"), [
    ("float32", None, 0.0),
    ("int16", np.float32(1 / 32767), 1 / 32767),
    ("uint8", np.float32(1 / 255), 1 / 255),
])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_unit_maps_read_back_in_nibabel_and_simpleitk(tmp_path, dtype, slope, step, suffix):
    volume = smooth_map()
    path = outputs.write_map(tmp_path / f"m{suffix}", volume, AFFINE, "hirescam", dtype=dtype)
    img = nib.load(str(path))
    hdr = stored_header(path)
    assert img.shape == volume.shape and hdr.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)  # stored as float32
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    stored_slope, inter = hdr.get_slope_inter()
    if slope is None:
        assert stored_slope is None and inter is None  # no scaling: values as stored
    else:
        assert np.float32(hdr["scl_slope"]) == slope and float(hdr["scl_inter"]) == 0.0
        assert img.dataobj.slope == pytest.approx(float(slope), rel=1e-7)
    assert hdr.get_intent()[0] == "estimate" and hdr.get_intent()[2] == "hirescam"
    assert (float(hdr["cal_min"]), float(hdr["cal_max"])) == (0.0, 1.0)
    values = img.get_fdata()
    assert np.abs(values - volume).max() <= step / 2 + 1e-6
    assert values.max() == pytest.approx(1.0, abs=1e-6)
    # SimpleITK (ITK's NIfTI reader, as in 3D Slicer and ITK-SNAP): scaled to float
    array, image = read_sitk(path)
    assert np.abs(array - volume).max() <= step / 2 + 1e-6
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(direction * np.array(image.GetSpacing()),
                               lps @ AFFINE[:3, :3], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), lps @ AFFINE[:3, 3], atol=1e-4)


def test_header_and_bytes_match_nibabels_own_writer(tmp_path):
    """The streamed, block-parallel gzip is one valid gzip member; header and voxels are
    what nibabel itself writes for the same image."""
    volume = smooth_map((40, 50, 60))
    ours = outputs.write_map(tmp_path / "ours.nii.gz", volume, AFFINE, "gradcam")
    img = outputs._nifti_image(np.ascontiguousarray(volume), AFFINE)
    hdr = outputs.nifti_header(volume.shape, AFFINE, "float32", "gradcam")
    for key in ("intent_name", "descrip", "cal_min", "cal_max", "intent_code"):
        img.header[key] = hdr[key]
    nib.save(img, str(tmp_path / "nibabel.nii"))
    with gzip.open(ours, "rb") as f:
        data = f.read()
    theirs = (tmp_path / "nibabel.nii").read_bytes()
    assert data[348:] == theirs[348:]  # extension flag + voxels
    a, b = stored_header(ours), stored_header(tmp_path / "nibabel.nii")
    for key in ("dim", "pixdim", "datatype", "bitpix", "vox_offset", "srow_x", "srow_y",
                "srow_z", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "sform_code",
                "qform_code", "xyzt_units", "magic"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_logit_maps_int16_and_refusals(tmp_path):
    signed = (smooth_map() - 0.3) * 0.02
    path = outputs.write_map(tmp_path / "l.nii.gz", signed, AFFINE, "hirescam",
                             values="logit", dtype="int16")
    hdr = stored_header(path)
    top = float(np.abs(signed).max())
    assert np.float32(hdr["scl_slope"]) == np.float32(top / 32767)
    assert float(hdr["cal_min"]) == pytest.approx(-top)
    assert float(hdr["cal_max"]) == pytest.approx(top)
    assert hdr.get_intent()[2] == "logit/voxel"
    assert np.abs(nib.load(str(path)).get_fdata() - signed).max() <= top / 32767
    # uint8 cannot hold signed logits: refused before a file exists
    with pytest.raises(HiResCAMError, match="uint8 stores \\[0, 1\\] display maps"):
        outputs.write_map(tmp_path / "u.nii.gz", signed, AFFINE, "hirescam", values="logit",
                          dtype="uint8")
    with pytest.raises(HiResCAMError, match="3D"):
        outputs.write_map(tmp_path / "bad.nii.gz", signed[0], AFFINE, "hirescam")
    with pytest.raises(HiResCAMError, match="dtype must be one of"):
        outputs.write_map(tmp_path / "f16.nii.gz", signed, AFFINE, "hirescam", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.nii.gz"]  # no temp files


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.nii.gz"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        outputs.atomic_write(target, broken)
    assert list(tmp_path.iterdir()) == []
    outputs.atomic_write_text(target, "one")
    with pytest.raises(OutputError, match="already exists"):
        outputs.atomic_write(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "one"


# -- names --------------------------------------------------------------------------------
def test_file_names_round_trip(tmp_path):
    paths = outputs.output_paths(tmp_path, "ct_scan_2", ["pleural_effusion"], ["gradcam"], png=True)
    name = paths["pleural_effusion/gradcam"].name
    assert name == "ct_scan_2_pleural_effusion_gradcam.nii.gz"
    assert paths["pleural_effusion/gradcam/png"].name == "ct_scan_2_pleural_effusion_gradcam.png"
    # by the known vocabularies (no report beside the file)
    assert outputs.parse_map_name(tmp_path / name) == ("ct_scan_2", "pleural_effusion", "gradcam")
    assert outputs.parse_map_name(tmp_path / "ct_nodule_guided-hirescam.nii") == (
        "ct", "nodule", "guided-hirescam")
    assert outputs.parse_map_name(tmp_path / "ct_blob_hirescam.nii.gz") == (None, None, "hirescam")
    # a custom model's findings: the report beside the maps names them exactly
    (tmp_path / "report.json").write_text(json.dumps(
        {"outputs": {"blob": {"hirescam": "ct_blob_hirescam.nii.gz"}}}))
    parsed = outputs.parse_map_name(tmp_path / "ct_blob_hirescam.nii.gz")
    assert parsed == ("ct", "blob", "hirescam")


# -- files from explain_scan --------------------------------------------------------------
@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    ct, organs, names, affine = phantom((61, 45, 47), (5.1, 7.9, 4.3))
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(root / "ct.nii.gz"))
    outputs.write_labels(root / "ct_organs.nii.gz", organs, affine)
    (root / "ct_organs.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    return root


def test_model_grid_maps_land_where_the_scan_grid_maps_are(scan_file, tmp_path):
    """A viewer resamples a model-grid map by its affine: SimpleITK's linear resampling
    onto the scan grid gives the scan-grid map (away from the border clamp)."""
    kwargs = dict(model=blob_model(), findings=["blob"], methods=["hirescam"], device="cpu")
    on_scan, scan_paths = explain_scan(scan_file / "ct.nii.gz", tmp_path / "s", **kwargs)
    on_model, model_paths = explain_scan(scan_file / "ct.nii.gz", tmp_path / "m", grid="model",
                                         **kwargs)
    report = json.loads(model_paths["report"].read_text())
    assert report["storage"]["grid"] == "model"
    model_img = nib.load(str(model_paths["blob/hirescam"]))
    assert model_img.shape == SPEC.spatial_size
    np.testing.assert_allclose(model_img.affine, report["input"]["model_grid_affine"], atol=1e-5)
    assert model_paths["blob/hirescam"].stat().st_size < scan_paths["blob/hirescam"].stat().st_size
    scan_map, scan_image = read_sitk(scan_paths["blob/hirescam"])
    moving = sitk.ReadImage(str(model_paths["blob/hirescam"]))
    resampled = sitk.Resample(moving, scan_image, sitk.Transform(), sitk.sitkLinear, 0.0)
    viewer = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    # compare where the model-grid position lies inside the grid by half a voxel or more
    grid = np.linalg.solve(model_img.affine, nib.load(str(scan_paths["blob/hirescam"])).affine)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in scan_map.shape], indexing="ij"), -1)
    u = ijk @ grid[:3, :3].T + grid[:3, 3]
    interior = np.all((u >= 0.5) & (u <= np.array(SPEC.spatial_size) - 1.5), axis=-1)
    assert interior.mean() > 0.3 and scan_map[interior].max() > 0.5
    np.testing.assert_allclose(viewer[interior], scan_map[interior], atol=1e-4)


def test_explain_scan_dtypes_and_report(scan_file, tmp_path):
    kwargs = dict(model=blob_model(), findings=["blob"], methods=["hirescam", "gradcam"],
                  organs_path=scan_file / "ct_organs.nii.gz", device="cpu")
    exact, paths32 = explain_scan(scan_file / "ct.nii.gz", tmp_path / "f", **kwargs)
    _, paths8 = explain_scan(scan_file / "ct.nii.gz", tmp_path / "u", dtype="uint8", **kwargs)
    for method in ("hirescam", "gradcam"):
        key = f"blob/{method}"
        small = nib.load(str(paths8[key]))
        assert small.get_data_dtype() == np.uint8
        np.testing.assert_allclose(small.get_fdata(), exact.maps[("blob", method)],
                                   atol=0.5 / 255 + 1e-6)
        assert paths8[key].stat().st_size < paths32[key].stat().st_size
    report = json.loads(paths8["report"].read_text())
    assert report["storage"] == {**report["storage"], "dtype": "uint8", "grid": "scan"}
    assert {"read_s", "read_organs_s", "invert_s", "write_s"} <= set(report["timings_s"])
    with pytest.raises(InputError, match="uint8 stores"):
        explain_scan(scan_file / "ct.nii.gz", tmp_path / "x", model=blob_model(),
                     findings=["blob"], dtype="uint8", values="logit")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
