"""napari plugin without a display: reader, writer, manifest, sample data, `view` layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install hirescam3d[napari])")

from hirescam3d.errors import InputError  # noqa: E402
from hirescam3d.io.outputs import write_explanation  # noqa: E402
from hirescam3d.napari import _layers, _reader, _writer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "hirescam3d" / "napari" / "napari.yaml"
SPL_FROM_RAS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])

# A small volume in display (S, P, L) order and its voxel -> RAS affine.
SHAPE_SPL = (5, 6, 7)
SPACING_SPL = (3.0, 2.0, 1.5)
AFFINE_SPL = np.array(
    [
        [0.0, 0.0, -1.5, 20.0],
        [0.0, -2.0, 0.0, 30.0],
        [3.0, 0.0, 0.0, -40.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _ct_spl(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=SHAPE_SPL).astype(np.int16)


def _expected_world(affine: np.ndarray, index) -> np.ndarray:
    """World (S, P, L) mm of a voxel index, straight from the file's affine."""
    ras = affine @ np.append(np.asarray(index, dtype=float), 1.0)
    return SPL_FROM_RAS @ ras[:3]


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def _to_ras_order(array: np.ndarray, affine: np.ndarray):
    """The same physical volume stored in RAS index order."""
    return _layers.reorient(array, affine, "RAS")


def _image_layer(data, kwargs):
    from napari.layers import Image

    return Image(data, **{k: v for k, v in kwargs.items() if k != "metadata"})


def test_package_import_does_not_pull_napari_or_qt():
    code = (
        "import sys, hirescam3d.napari, hirescam3d.napari._reader, hirescam3d.napari._writer; "
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'vispy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_manifest_validates_and_every_python_name_imports():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # raises if a python_name does not resolve
    contributions = manifest.contributions
    assert manifest.name == "hirescam3d"
    assert {w.display_name for w in contributions.widgets} == {"Explain"}
    assert contributions.readers[0].accepts_directories
    assert "*.nii.gz" in contributions.readers[0].filename_patterns
    assert contributions.writers[0].layer_types == ["image"]
    assert {s.key for s in contributions.sample_data} == {"chest_ct", "chest_ct_explained"}
    # The entry point in pyproject.toml names this file.
    text = (ROOT / "pyproject.toml").read_text()
    assert 'hirescam3d = "hirescam3d.napari:napari.yaml"' in text


def test_scan_in_spl_order_keeps_values_and_physical_positions(tmp_path):
    ct = _ct_spl()
    path = _save_nifti(ct, AFFINE_SPL, tmp_path / "scan.nii.gz")
    (data, kwargs, kind), = _reader.read_path(path)
    assert kind == "image" and kwargs["name"] == "scan"
    np.testing.assert_array_equal(data, ct.astype(np.float32))
    assert kwargs["scale"] == pytest.approx(SPACING_SPL)
    assert kwargs["translate"] == pytest.approx(_expected_world(AFFINE_SPL, (0, 0, 0)))
    assert "rotate" not in kwargs
    assert kwargs["contrast_limits"] == _layers.CT_WINDOW
    entry = kwargs["metadata"]["hirescam3d"]
    np.testing.assert_allclose(entry["affine"], AFFINE_SPL)
    assert entry["shape"] == SHAPE_SPL and entry["kind"] == "scan"
    assert isinstance(entry["header"], nib.Nifti1Header) and len(entry["sha256"]) == 64
    layer = _image_layer(data, kwargs)
    for index in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        np.testing.assert_allclose(layer.data_to_world(index), _expected_world(AFFINE_SPL, index))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_any_storage_order_and_format_displays_the_same(tmp_path, suffix):
    import SimpleITK as sitk

    ct = _ct_spl(1)
    ras, ras_affine = _to_ras_order(ct, AFFINE_SPL)
    path = tmp_path / f"ras{suffix}"
    if suffix == ".nii.gz":
        _save_nifti(ras, ras_affine, path)
    else:  # ITK stores LPS: flip the first two world axes
        image = sitk.GetImageFromArray(np.ascontiguousarray(ras.transpose(2, 1, 0)))
        lps = np.diag([-1.0, -1.0, 1.0]) @ ras_affine[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        image.SetSpacing(tuple(spacing))
        image.SetDirection(tuple((lps / spacing).ravel()))
        image.SetOrigin(tuple(np.diag([-1.0, -1.0, 1.0]) @ ras_affine[:3, 3]))
        sitk.WriteImage(image, str(path))
    (data, kwargs, _), = _reader.read_path(path)
    # Display order is SPL whatever the file order: identical to the SPL original.
    np.testing.assert_array_equal(data, ct.astype(np.float32))
    assert kwargs["scale"] == pytest.approx(SPACING_SPL)
    assert kwargs["translate"] == pytest.approx(_expected_world(AFFINE_SPL, (0, 0, 0)))
    np.testing.assert_allclose(kwargs["metadata"]["hirescam3d"]["affine"], ras_affine, atol=1e-6)


def test_oblique_scan_gets_a_rotation_that_keeps_physical_positions(tmp_path):
    angle = np.deg2rad(12.0)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]]
    )
    affine = AFFINE_SPL.copy()
    affine[:3, :3] = rot @ AFFINE_SPL[:3, :3]
    path = _save_nifti(_ct_spl(2), affine, tmp_path / "tilted.nii.gz")
    (data, kwargs, _), = _reader.read_path(path)
    assert kwargs["scale"] == pytest.approx(SPACING_SPL)
    assert np.asarray(kwargs["rotate"]).shape == (3, 3)
    layer = _image_layer(data, kwargs)
    for index in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        np.testing.assert_allclose(
            layer.data_to_world(index), _expected_world(affine, index), atol=1e-6
        )


def test_label_map_with_names_sidecar_opens_as_labels_with_names_and_fixed_colours(tmp_path):
    labels = np.zeros(SHAPE_SPL, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[3:5, 3:5, 4:6] = 2
    ras, ras_affine = _to_ras_order(labels, AFFINE_SPL)
    path = _save_nifti(ras, ras_affine, tmp_path / "chest_organs.nii.gz")
    (tmp_path / "chest_organs.json").write_text(json.dumps({"1": "right_lung", "2": "heart"}))
    assert _reader.guess_kind(path, _reader.names_sidecar(path)) == "labels"
    (data, kwargs, kind), = _reader.read_path(path)
    assert kind == "labels" and kwargs["name"] == "chest_organs"
    np.testing.assert_array_equal(data, labels)
    assert dict(zip(kwargs["features"]["index"], kwargs["features"]["name"], strict=True)) == {
        0: "background", 1: "right_lung", 2: "heart"
    }
    colors = kwargs["colormap"].color_dict
    np.testing.assert_allclose(colors[1][:3], _layers.ORGAN_COLORS["right_lung"])
    np.testing.assert_allclose(colors[2][:3], _layers.ORGAN_COLORS["heart"])
    assert colors[0][3] == 0.0  # background transparent
    assert kwargs["scale"] == pytest.approx(SPACING_SPL)

    from napari.layers import Labels

    layer = Labels(data, **{k: v for k, v in kwargs.items() if k != "metadata"})
    assert layer.features.set_index("index").loc[2, "name"] == "heart"
    np.testing.assert_allclose(layer.get_color(1)[:3], _layers.ORGAN_COLORS["right_lung"])


def test_integer_volume_kind_depends_on_its_values(tmp_path):
    mask = np.zeros(SHAPE_SPL, np.uint8)
    mask[2, 2:4, 2:4] = 1
    mask_path = _save_nifti(mask, AFFINE_SPL, tmp_path / "mask.nii.gz")
    ct_path = _save_nifti(_ct_spl(), AFFINE_SPL, tmp_path / "ct.nii.gz")
    float_path = _save_nifti(np.full(SHAPE_SPL, 2.0, np.float32), AFFINE_SPL, tmp_path / "f.nii")
    assert _reader.guess_kind(mask_path) == "labels"
    assert _reader.guess_kind(ct_path) == "scan"  # int16 with thousands of values
    assert _reader.guess_kind(float_path) == "scan"
    (_, kwargs, kind), = _reader.read_path(mask_path)
    assert kind == "labels" and "label_1" in kwargs["features"]["name"]


def test_explanation_file_round_trip_keeps_geometry_and_values(tmp_path):
    rng = np.random.default_rng(3)
    volume = rng.random(SHAPE_SPL).astype(np.float32)
    ras, ras_affine = _to_ras_order(volume, AFFINE_SPL)
    source = tmp_path / "ct_pleural_effusion_hirescam.nii.gz"
    write_explanation(source, ras, ras_affine, "hirescam")

    (data, kwargs, kind), = _reader.read_path(source)
    assert kind == "image"
    assert kwargs["name"] == "pleural_effusion · hirescam"
    assert kwargs["colormap"] == _layers.HEAT_COLORMAP and kwargs["blending"] == "additive"
    assert kwargs["contrast_limits"] == (0.0, 1.0) and kwargs["opacity"] == 0.5
    np.testing.assert_array_equal(data, volume)  # displayed in SPL order
    entry = kwargs["metadata"]["hirescam3d"]
    assert (entry["kind"], entry["finding"], entry["method"]) == (
        "explanation", "pleural_effusion", "hirescam"
    )

    out = _writer.write_explanation(str(tmp_path / "saved.nii.gz"), data, kwargs)
    img = nib.load(out[0])
    assert img.shape == ras.shape
    np.testing.assert_allclose(img.affine, ras_affine, atol=1e-6)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_intent()[0] == "estimate" and img.header.get_intent()[2] == "hirescam"
    np.testing.assert_array_equal(np.asarray(img.dataobj), ras)


def test_uint8_map_of_a_custom_model_is_named_from_the_report(tmp_path):
    """A --dtype uint8 map reads back as [0, 1] values; a finding the chest zoo does not
    know is named from the report.json written beside the maps."""
    from hirescam3d.io.outputs import write_json, write_map

    volume = np.random.default_rng(4).random(SHAPE_SPL).astype(np.float32)
    ras, ras_affine = _to_ras_order(volume, AFFINE_SPL)
    source = tmp_path / "ct_blob_gradcam.nii.gz"
    write_map(source, ras, ras_affine, "gradcam", dtype="uint8")
    write_json(tmp_path / "report.json", {"outputs": {"blob": {"gradcam": source.name}}})
    (data, kwargs, _), = _reader.read_path(source)
    assert kwargs["name"] == "blob · gradcam"
    np.testing.assert_allclose(data, volume, atol=0.5 / 255 + 1e-6)


def test_writer_puts_a_map_made_on_the_display_grid_back_on_the_scan_grid(tmp_path):
    # What the widget does: a map on the CT's display array, metadata from the CT layer.
    ct = _ct_spl()
    ras, ras_affine = _to_ras_order(ct, AFFINE_SPL)
    (_, ct_kwargs, _), = _reader.read_path(_save_nifti(ras, ras_affine, tmp_path / "ct.nii.gz"))
    entry = dict(ct_kwargs["metadata"]["hirescam3d"], kind="explanation", method="gradcam")
    display_map = np.linspace(0, 1, ct.size, dtype=np.float32).reshape(SHAPE_SPL)
    meta = {"name": "x · gradcam", "metadata": {"hirescam3d": entry}}
    out = _writer.write_explanation(str(tmp_path / "map"), display_map, meta)
    assert out[0].endswith("map.nii.gz")
    img = nib.load(out[0])
    np.testing.assert_allclose(img.affine, ras_affine, atol=1e-6)
    expected, _ = _to_ras_order(display_map, AFFINE_SPL)
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
    # the CT header's int16 type and scaling were not carried over
    assert img.get_data_dtype() == np.float32

    with pytest.raises(InputError, match="resized or cropped"):
        _writer.write_explanation(str(tmp_path / "crop.nii.gz"), display_map[1:], meta)


def test_writer_refuses_non_maps_and_uses_layer_geometry_without_metadata(tmp_path):
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        _writer.write_explanation(
            str(tmp_path / "ct.nii.gz"), _ct_spl().astype(np.float32), {"name": "ct"}
        )
    geometry = _layers.display_geometry(AFFINE_SPL)
    volume = np.full(SHAPE_SPL, 0.25, np.float32)
    out = _writer.write_explanation(str(tmp_path / "plain.nii"), volume, {"name": "p", **geometry})
    img = nib.load(out[0])
    np.testing.assert_allclose(img.affine, AFFINE_SPL, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(img.dataobj), volume)


def test_get_reader_claims_only_images_and_dicom_folders(tmp_path):
    assert _reader.get_reader(str(tmp_path / "a.nii.gz")) is _reader.read_layers
    assert _reader.get_reader(str(tmp_path / "a.NRRD")) is _reader.read_layers
    assert _reader.get_reader(str(tmp_path / "notes.txt")) is None
    assert _reader.get_reader(str(tmp_path)) is None  # empty folder: not a DICOM series
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert _reader.get_reader(str(tmp_path)) is _reader.read_layers
    with pytest.raises(ValueError, match="kind must be one of"):
        _reader.read_path(tmp_path, kind="mesh")


def _view_module():
    try:
        from hirescam3d.cli import view
    except ImportError:  # source tree without an install: cli/ is a top-level package
        sys.path.insert(0, str(ROOT))
        from cli import view
    return view


def test_view_loads_scan_organs_and_explanations_in_order(tmp_path):
    view = _view_module()
    ct = _save_nifti(_ct_spl(), AFFINE_SPL, tmp_path / "ct.nii.gz")
    labels = np.zeros(SHAPE_SPL, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    organs = _save_nifti(labels, AFFINE_SPL, tmp_path / "ct_organs.nii.gz")
    (tmp_path / "ct_organs.json").write_text('{"1": "left_lung"}')
    maps = []
    for method in ("gradcam", "hirescam"):
        maps.append(tmp_path / f"ct_nodule_{method}.nii.gz")
        write_explanation(maps[-1], np.full(SHAPE_SPL, 0.5, np.float32), AFFINE_SPL, method)
    layers = view.load_layers(ct, maps, organs)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("ct", "image"), ("ct_organs", "labels"),
        ("nodule · gradcam", "image"), ("nodule · hirescam", "image"),
    ]
    assert "left_lung" in layers[1][1]["features"]["name"]
    for _, kwargs, _ in layers:  # all aligned
        assert kwargs["scale"] == pytest.approx(SPACING_SPL)
        assert kwargs["translate"] == pytest.approx(layers[0][1]["translate"])
    with pytest.raises(view.CLIUsageError, match="--explanation .*missing.nii.gz"):
        view.load_layers(ct, [tmp_path / "missing.nii.gz"])


def test_view_command_help_and_usage_errors(tmp_path):
    import typer
    from typer.testing import CliRunner

    view = _view_module()
    app = typer.Typer()
    app.command()(view.view)
    app.command("other")(lambda: None)  # force sub-command mode, as in the real CLI
    runner = CliRunner()
    shown = runner.invoke(app, ["view", "--help"])
    assert shown.exit_code == 0
    assert "--explanation" in shown.output and "--organs" in shown.output
    missing = runner.invoke(app, ["view", str(tmp_path / "nope.nii.gz")])
    assert missing.exit_code == 2


@pytest.mark.slow
def test_sample_data_is_written_once_and_maps_are_cached_per_model(tmp_path, monkeypatch):
    from hirescam3d.napari import _sample_data

    monkeypatch.setenv("HIRESCAM3D_CACHE", str(tmp_path))
    layers = _sample_data.chest_ct()
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("sample_chest_ct", "image"), ("sample_chest_organs", "labels")
    ]
    assert layers[0][0].shape == (96, 128, 128)
    assert {"right_lung", "left_lung", "heart"} <= set(layers[1][1]["features"]["name"])

    # The untrained twin of the demo model: same pipeline, keyed by its name.
    paths = _sample_data.explanation_files("axialnet_tiny")
    assert list(paths) == ["gradcam", "hirescam"]
    assert all(p.parent.name.endswith("axialnet_tiny-untrained") for p in paths.values())
    stamps = {m: p.stat().st_mtime_ns for m, p in paths.items()}
    assert _sample_data.explanation_files("axialnet_tiny") == paths  # cached: not recomputed
    assert {m: p.stat().st_mtime_ns for m, p in paths.items()} == stamps
    (data, kwargs, _), = _reader.read_path(paths["hirescam"])
    assert kwargs["name"] == "atelectasis · hirescam" and data.shape == (96, 128, 128)
    assert 0.0 <= data.min() and data.max() <= 1.0
    assert (paths["hirescam"].parent / "report.json").is_file()
