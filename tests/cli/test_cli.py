"""The ``hirescam3d`` command line: options, outputs, exit codes and one-line errors.

Most tests drive the Typer app in-process (CliRunner); a few run the installed console
script as a subprocess. Models are the untrained ``axialnet_tiny`` (same architecture as
the demo model) so nothing here depends on trained weights or their accuracy.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import hirescam3d
from hirescam3d.data.phantom import make_chest_ct
from tests.conftest import installed_console_script

REPO = Path(__file__).resolve().parents[2]
MODEL = "axialnet_tiny"
SHAPE, SPACING = (48, 64, 64), (6.0, 5.0, 5.0)


def load_cli_main():
    """``hirescam3d.cli.main``; in a source checkout without ``pip install -e .`` the
    subpackage (folder ``cli/``, mapped by pyproject) is made importable by hand."""
    try:
        return importlib.import_module("hirescam3d.cli.main")
    except ModuleNotFoundError:
        hirescam3d.__path__.append(str(REPO))
        return importlib.import_module("hirescam3d.cli.main")


cli_main = load_cli_main()
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli_main.app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str, code: int) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr holding ``fragments``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine),
        str(path),
    )
    return path


def tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: modification time (ns) and content."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom (48 x 64 x 64 voxels of 6 x 5 x 5 mm) with atelectasis + organs."""
    folder = tmp_path_factory.mktemp("phantom")
    make_chest_ct(3, findings=("atelectasis",), shape=SHAPE, spacing=SPACING).save(folder, "small")
    return folder


@pytest.fixture(scope="module")
def scan(phantom_dir) -> Path:
    return phantom_dir / "small_ct.nii.gz"


@pytest.fixture(scope="module")
def explained(phantom_dir, scan, tmp_path_factory):
    """One real run: --json, two methods, organ map; returns (result, out folder)."""
    out = tmp_path_factory.mktemp("explained") / "out"
    result = invoke(
        "explain",
        scan,
        "--model",
        MODEL,
        "--finding",
        "atelectasis",
        "-m",
        "hirescam",
        "-m",
        "gradcam",
        "--organs",
        phantom_dir / "small_organs.nii.gz",
        "--organ-names",
        phantom_dir / "small_organs.json",
        "--out",
        out,
        "--json",
    )
    return result, out


# -- general ------------------------------------------------------------------------------
def test_help_lists_every_command_and_version_prints():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("explain", "batch", "models", "findings", "layers", "sample"):
        assert command in result.stdout
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"hirescam3d {hirescam3d.__version__}"


def test_method_choices_come_from_the_registry():
    from hirescam3d.core.method_names import BUILTIN_METHODS

    # the CLI names methods without importing torch; the registry holds exactly those
    assert set(BUILTIN_METHODS) == set(hirescam3d.METHODS)
    result = invoke("explain", "--help")
    for name in hirescam3d.METHODS:
        assert name in result.stdout
    result = invoke("explain", "x.nii.gz", "--method", "lime")
    assert_one_line_error(result, "--method", "hirescam", code=2)


def test_typer_usage_errors_are_one_line_with_exit_code_2(tmp_path):
    assert_one_line_error(invoke("explain", "a.nii.gz", "--bogus"), "--bogus", code=2)
    assert_one_line_error(invoke("explain"), "Missing argument", code=2)
    assert_one_line_error(invoke("explian"), "No such command", "explain", code=2)
    assert_one_line_error(invoke("explain", "a.nii.gz", "--device", "tpu"), "--device", code=2)


def test_error_messages_and_exit_codes():
    errors = importlib.import_module("hirescam3d.cli.errors")
    from hirescam3d.errors import LayerError, ModelError, ScanError, TargetError

    assert errors.exit_code_for(TargetError("x")) == 2
    assert errors.exit_code_for(LayerError("x")) == 2
    assert errors.exit_code_for(errors.CLIUsageError("x")) == 2
    assert errors.exit_code_for(ModelError("x")) == 1
    assert errors.exit_code_for(ScanError("x")) == 1
    assert errors.exit_code_for(OSError("x")) == 1
    assert errors.exit_code_for(KeyboardInterrupt()) == 130
    text = errors.describe(PermissionError(13, "Permission denied", "/data/out/a/report.json"))
    assert "/data/out/a/report.json" in text and "folder /data/out/a is not writable" in text
    assert errors.describe(ScanError("line one\nline two")) == "line one; line two"
    assert "--debug" in errors.describe(ValueError("bug"))


# -- models, findings, layers -------------------------------------------------------------
def test_models_lists_the_zoo_with_training_state():
    from hirescam3d.models import zoo

    result = invoke("models")
    assert result.exit_code == 0
    for name in zoo.names():
        assert name in result.stdout
    rows = json.loads(invoke("models", "--json").stdout)
    assert [r["name"] for r in rows] == zoo.names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["demo"]["default"] is True
    assert sum(r["default"] for r in rows) == 1
    assert by_name[MODEL]["trained"] == "no"
    assert by_name["demo"]["trained"] in ("yes", "no", "not installed")
    assert by_name[MODEL]["input"] == "3D CT 96 x 128 x 128"


def test_findings_of_default_and_named_models():
    from hirescam3d.models.nets import VOC_CLASSES
    from hirescam3d.models.zoo import CHEST_FINDINGS

    result = invoke("findings")
    assert result.exit_code == 0
    assert result.stdout.split() == list(CHEST_FINDINGS)
    result = invoke("findings", "--model", "resnet34v", "--json")
    assert json.loads(result.stdout) == list(VOC_CLASSES)


def test_layers_marks_the_default_and_the_guarantee():
    result = invoke("layers", "--model", MODEL, "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    # Only layers explain accepts: AxialNet's per-triplet layers ((B*T, F, h, w)) are not.
    assert list(rows) == ["to_volume", "fc"]
    assert [n for n, r in rows.items() if r["default"]] == ["to_volume"]
    assert rows["to_volume"]["guaranteed"] is True and rows["to_volume"]["module"] == "ToVolume"
    assert rows["to_volume"]["reason"].startswith("only linear operations follow it")
    table = invoke("layers", "--model", MODEL).stdout
    assert "to_volume (default)" in table
    assert "faithful" in table


def test_layers_give_the_first_nonlinear_operation():
    rows = json.loads(invoke("layers", "--model", "resnet18_cam_2d", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows if r["default"]] == ["features.layer4"]
    assert by_name["features.layer4"]["guaranteed"] is True
    conv1 = by_name["features.conv1"]
    assert conv1["guaranteed"] is False
    assert (conv1["first_nonlinear"], conv1["nonlinear_module"]) == ("relu", "features.act")
    assert "relu (features.act)" in conv1["reason"]


def _run_listing(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``hirescam3d ARGS`` in a fresh interpreter; also return the modules it imported."""
    import sys

    code = (
        "import sys\n"
        "from hirescam3d.cli.main import main\n"
        f"sys.argv = ['hirescam3d', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES ")][-1]
    return proc, line.split()[1:]


@pytest.mark.parametrize(
    "args",
    [("models",), ("models", "--json"), ("findings",), ("findings", "--model", "resnet34v"),
     ("--help",), ("explain", "--help")],
)
def test_listings_read_metadata_only(args):
    """`models`, `findings` and help import no architecture (so no MONAI), read no weights
    and do not even load torch: they answer in well under a second."""
    proc, modules = _run_listing(*args)
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in modules
    assert "hirescam3d.models.nets.axialnet" not in modules
    heavy = ("hirescam3d.models.nets.voc", "hirescam3d.core.audit")
    assert not any(m.startswith(heavy) for m in modules)
    assert "monai" not in modules
    assert proc.stdout.strip()


def test_findings_of_a_bundle_read_metadata_only(corrupt_bundle):
    proc, modules = _run_listing("findings", "--model", str(corrupt_bundle), "--json")
    assert proc.returncode == 0, proc.stderr
    from hirescam3d.models.zoo import CHEST_FINDINGS

    assert json.loads(proc.stdout) == list(CHEST_FINDINGS)
    assert "hirescam3d.models.nets.axialnet" not in modules and "monai" not in modules


def test_unknown_model_is_a_usage_error_listing_valid_names(scan, tmp_path):
    line = assert_one_line_error(invoke("findings", "--model", "axialnet_tiyn"), code=2)
    assert "unknown model 'axialnet_tiyn'" in line and "axialnet_tiny" in line and "demo" in line
    assert_one_line_error(
        invoke("explain", scan, "--model", "resnet99", "--out", tmp_path / "o"),
        "unknown model",
        "demo",
        code=2,
    )
    assert_one_line_error(
        invoke("layers", "--model", str(tmp_path / "no_bundle")), "no such bundle folder", code=2
    )
    assert not (tmp_path / "o").exists()
    (tmp_path / "weights.pt").write_bytes(b"x")
    line = assert_one_line_error(
        invoke("findings", "--model", tmp_path / "weights.pt"), "is a file", code=2
    )
    assert "pass a bundle folder" in line and "axialnet_tiny" in line
    assert_one_line_error(
        invoke("findings", "--model", tmp_path),
        "not a model bundle",
        "configs/metadata.json",
        code=2,
    )


@pytest.fixture(scope="module")
def corrupt_bundle(tmp_path_factory) -> Path:
    """A valid axialnet_tiny bundle whose models/model.pt is then cut to half its size."""
    from hirescam3d.models import zoo
    from hirescam3d.models.bundle import save_bundle

    folder = tmp_path_factory.mktemp("bundle") / "tiny_bundle"
    network, info = zoo.load(MODEL)
    save_bundle(network, info, folder)
    weights = folder / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_corrupt_checkpoint_is_a_runtime_error(corrupt_bundle, scan, tmp_path):
    out = tmp_path / "o"
    result = invoke("explain", scan, "--model", corrupt_bundle, "-f", "atelectasis", "--out", out)
    assert_one_line_error(result, "model.pt", "cannot read the checkpoint", code=1)
    assert not out.exists() or not any(out.iterdir())
    assert_one_line_error(
        invoke("layers", "--model", corrupt_bundle), "cannot read the checkpoint", code=1
    )
    # The bundle's class names are read without loading weights: unknown findings are
    # still usage errors.
    assert_one_line_error(
        invoke("explain", scan, "--model", corrupt_bundle, "-f", "pneumonia"),
        "pneumonia",
        "atelectasis",
        code=2,
    )


def test_debug_shows_the_traceback(corrupt_bundle, scan, tmp_path):
    result = invoke(
        "explain",
        scan,
        "--model",
        corrupt_bundle,
        "-f",
        "atelectasis",
        "--out",
        tmp_path / "o",
        "--debug",
    )
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error:")


# -- explain: outputs ---------------------------------------------------------------------
def test_explain_json_report_and_outputs_on_the_scan_grid(explained, scan):
    result, out = explained
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds nothing but the report
    assert report["explained"] == ["atelectasis"]
    assert set(report["findings"]) == {
        "atelectasis",
        "pleural_effusion",
        "cardiomegaly",
        "nodule",
        "pericardial_effusion",
    }
    for entry in report["findings"].values():
        assert 0.0 <= entry["probability"] <= 1.0
    assert report["layer"] == "to_volume"
    assert report["hirescam_guaranteed_faithful"] is True
    assert set(report["organs"]["atelectasis"]) == {"hirescam", "gradcam"}
    assert report == json.loads((out / "report.json").read_text())
    source = nib.load(str(scan))
    for method in ("hirescam", "gradcam"):
        img = nib.load(str(out / f"small_ct_atelectasis_{method}.nii.gz"))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
        data = img.get_fdata()
        assert data.min() >= 0.0 and data.max() <= 1.0
    assert sorted(p.name for p in out.iterdir()) == [
        "report.json",
        "small_ct_atelectasis_gradcam.nii.gz",
        "small_ct_atelectasis_hirescam.nii.gz",
    ]


def test_existing_outputs_are_kept_without_force(explained, scan):
    _, out = explained
    before = tree(out)
    result = invoke(
        "explain", scan, "--model", MODEL, "-f", "atelectasis", "-m", "hirescam", "--out", out
    )
    assert_one_line_error(result, "already exist", "--force", code=1)
    assert tree(out) == before


def test_force_overwrites_and_quiet_prints_only_paths(scan, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    target = out / "small_ct_atelectasis_hirescam.nii.gz"
    target.write_bytes(b"old")
    result = invoke(
        "explain",
        scan,
        "--model",
        MODEL,
        "-f",
        "atelectasis",
        "--out",
        out,
        "--force",
        "--quiet",
        "--png",
    )
    assert result.exit_code == 0, result.stderr
    png = out / "small_ct_atelectasis_hirescam.png"
    assert result.stdout.splitlines() == [str(out / "report.json"), str(target), str(png)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stderr == ""
    assert nib.load(str(target)).shape == SHAPE


def test_storage_options_dtype_and_grid(scan, tmp_path):
    """--dtype uint8 --grid model: small [0, 1] files on the model's grid with its affine;
    uint8 cannot hold signed logit maps (a usage error before any work)."""
    out = tmp_path / "u8"
    result = invoke("explain", scan, "--model", MODEL, "-f", "atelectasis", "--dtype", "uint8",
                    "--grid", "model", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["storage"]["dtype"] == "uint8" and report["storage"]["grid"] == "model"
    img = nib.load(str(out / "small_ct_atelectasis_hirescam.nii.gz"))
    assert img.get_data_dtype() == np.uint8
    assert list(img.shape) == report["input"]["model_grid_shape"]
    np.testing.assert_allclose(img.affine, report["input"]["model_grid_affine"], atol=1e-4)
    assert img.dataobj.slope == pytest.approx(1 / 255)
    assert 0.0 <= img.get_fdata().min() and img.get_fdata().max() == pytest.approx(1.0)
    result = invoke("explain", scan, "--model", MODEL, "-f", "atelectasis", "--dtype", "uint8",
                    "--values", "logit", "--out", tmp_path / "bad")
    assert_one_line_error(result, "--dtype uint8", "float32", code=2)
    assert not (tmp_path / "bad").exists()


def test_default_explains_findings_above_threshold_and_says_so(scan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("explain", scan, "--model", MODEL)
    assert result.exit_code == 0, result.stderr
    assert "no --finding given" in result.stderr and "0.5" in result.stderr
    out = tmp_path / "small_ct_explanations"  # the default output folder
    report = json.loads((out / "report.json").read_text())
    above = [n for n, f in report["findings"].items() if f["probability"] >= 0.5]
    assert report["explained"] == above
    for name, entry in report["findings"].items():
        assert name in result.stdout
        assert f"{entry['probability']:.3f}" in result.stdout  # the table
    assert {p.name for p in out.glob("*.nii.gz")} == {
        f"small_ct_{n}_hirescam.nii.gz" for n in above
    }


# -- explain: input errors ----------------------------------------------------------------
def test_missing_scan_is_a_usage_error(tmp_path):
    assert_one_line_error(
        invoke("explain", tmp_path / "nope.nii.gz", "--model", MODEL),
        "nope.nii.gz",
        "no such file",
        code=2,
    )


def test_missing_organ_map_is_a_usage_error(scan, tmp_path):
    assert_one_line_error(
        invoke("explain", scan, "--model", MODEL, "--organs", tmp_path / "organs.nii.gz"),
        "--organs",
        "no such file",
        code=2,
    )


def test_conflicting_finding_options(scan):
    assert_one_line_error(
        invoke("explain", scan, "--model", MODEL, "-f", "nodule", "--all-findings"),
        "--all-findings",
        code=2,
    )


def test_unknown_finding_lists_the_valid_ones(scan, tmp_path):
    result = invoke("explain", scan, "--model", MODEL, "-f", "atelectsis", "--out", tmp_path)
    line = assert_one_line_error(result, "unknown finding 'atelectsis'", code=2)
    for name in ("atelectasis", "pleural_effusion", "cardiomegaly", "nodule"):
        assert name in line
    assert "Did you mean 'atelectasis'?" in line
    assert list(tmp_path.iterdir()) == []


def test_layer_option(scan, tmp_path):
    line = assert_one_line_error(
        invoke(
            "explain",
            scan,
            "--model",
            MODEL,
            "-f",
            "nodule",
            "--layer",
            "fc7",
            "--out",
            tmp_path / "o",
        ),
        "unknown layer 'fc7'",
        code=2,
    )
    assert "Candidate layers of axialnet_tiny: to_volume, fc" in line
    # A layer of the network that explain cannot use (per-triplet layout) is refused too.
    assert_one_line_error(
        invoke("explain", scan, "--model", MODEL, "-f", "nodule", "--layer", "reduce.relu4"),
        "reduce.relu4",
        "hirescam3d layers",
        code=2,
    )
    assert not (tmp_path / "o").exists()
    # Findings match case-insensitively with spaces as underscores, duplicates dropped.
    result = invoke(
        "explain",
        scan,
        "--model",
        MODEL,
        "-f",
        "Pleural Effusion",
        "-f",
        "NODULE",
        "-f",
        "nodule",
        "--layer",
        "to_volume",
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["explained"] == ["pleural_effusion", "nodule"]
    assert report["layer"] == "to_volume" and report["hirescam_guaranteed_faithful"] is True


def test_not_an_image(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(
        invoke("explain", text, "--model", MODEL, "--out", tmp_path / "o"),
        "notes.txt",
        "not a supported image",
        code=1,
    )
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"\x1f\x8b garbage, not gzip")
    assert_one_line_error(
        invoke("explain", fake, "--model", MODEL, "--out", tmp_path / "o"),
        "fake.nii.gz",
        "NIfTI",
        code=1,
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_truncated_nifti(scan, tmp_path):
    data = scan.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(
        invoke("explain", cut, "--model", MODEL, "--out", tmp_path / "o"),
        "cut.nii.gz",
        "truncated",
        code=1,
    )


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("flat.nii.gz", np.full((32, 32), -500.0, np.float32), "2D"),
        ("time.nii.gz", np.full((8, 8, 8, 3), -500.0, np.float32), "4D"),
        ("const.nii.gz", np.full((16, 16, 16), -1000.0, np.float32), "constant"),
    ],
)
def test_unusable_volumes(tmp_path, name, data, fragment):
    path = save_volume(tmp_path / name, data)
    assert_one_line_error(
        invoke("explain", path, "--model", MODEL, "--out", tmp_path / "o"),
        name,
        fragment,
        code=1,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad):
    data = np.random.default_rng(0).uniform(-1000, 400, (16, 16, 16)).astype(np.float32)
    data[3, 4, 5] = bad
    path = save_volume(tmp_path / "bad.nii.gz", data)
    line = assert_one_line_error(
        invoke("explain", path, "--model", MODEL, "--out", tmp_path / "o"), "bad.nii.gz", code=1
    )
    assert ("1 NaN" if np.isnan(bad) else "1 infinite") in line


def test_intensities_not_in_hu_warn_but_run(phantom_dir, tmp_path):
    img = nib.load(str(phantom_dir / "small_ct.nii.gz"))
    ct = img.get_fdata().astype(np.float32)
    scaled = (ct - ct.min()) / (ct.max() - ct.min())  # normalised to 0..1
    path = save_volume(tmp_path / "norm.nii.gz", scaled, img.affine)
    result = invoke("explain", path, "--model", MODEL, "-f", "nodule", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "Hounsfield" in warnings[0] and "0..1" in warnings[0]
    assert (tmp_path / "o" / "norm_nodule_hirescam.nii.gz").is_file()


def test_organ_map_on_another_grid_is_resampled_with_a_warning(scan, tmp_path):
    coarse = make_chest_ct(
        3, findings=("atelectasis",), shape=(24, 32, 32), spacing=(12.0, 10.0, 10.0)
    )
    organs = save_volume(tmp_path / "organs.nii.gz", coarse.organs, coarse.affine)
    result = invoke(
        "explain",
        scan,
        "--model",
        MODEL,
        "-f",
        "atelectasis",
        "--organs",
        organs,
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "different grid" in warnings[0], result.stderr
    report = json.loads(result.stdout)
    assert any("different grid" in w for w in report["warnings"])
    assert "atelectasis" in report["organs"]


def test_organ_map_that_does_not_overlap_is_an_error(scan, tmp_path):
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[4:12, 4:12, 4:12] = 1
    far = np.diag([5.0, 5.0, 5.0, 1.0])
    far[:3, 3] = 5000.0  # 5 m away from the scan
    organs = save_volume(tmp_path / "far.nii.gz", labels, far)
    out = tmp_path / "o"
    assert_one_line_error(
        invoke(
            "explain", scan, "--model", MODEL, "-f", "atelectasis", "--organs", organs, "--out", out
        ),
        "does not overlap",
        code=1,
    )
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_folder(scan, tmp_path):
    if os.geteuid() != 0:
        out = tmp_path / "locked"
        out.mkdir()
        out.chmod(0o555)
        try:
            result = invoke("explain", scan, "--model", MODEL, "-f", "atelectasis", "--out", out)
        finally:
            out.chmod(0o755)
        assert_one_line_error(result, str(out), "not writable", code=1)
        assert list(out.iterdir()) == []
    # As root, permission bits do not stop writes: a folder below a regular file cannot
    # be created by anyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"
    result = invoke("explain", scan, "--model", MODEL, "-f", "atelectasis", "--out", out)
    assert_one_line_error(result, str(out), "choose another output folder", code=1)


def test_cuda_request_without_cuda(scan, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    assert_one_line_error(
        invoke("explain", scan, "--model", MODEL, "--device", "cuda", "--out", tmp_path),
        "--device cuda",
        "no CUDA",
        code=1,
    )


# -- sample -------------------------------------------------------------------------------
def test_sample_refuses_to_overwrite(tmp_path):
    from hirescam3d.data.sample import sample_paths

    paths = sample_paths(tmp_path)
    paths["scan"].write_bytes(b"mine")
    result = invoke("sample", tmp_path)
    assert_one_line_error(result, "already exist", "--force", code=1)
    assert paths["scan"].read_bytes() == b"mine"
    assert [p.name for p in tmp_path.iterdir()] == [paths["scan"].name]


def test_sample_writes_the_files_and_suggests_the_next_command(tmp_path, monkeypatch):
    from hirescam3d.data import phantom
    from hirescam3d.data.sample import SAMPLE_FINDINGS, SAMPLE_SEED

    seeds = []

    def small(seed, findings=None, **kwargs):  # the real sample is 96 x 128 x 128 (slower)
        seeds.append((seed, findings))
        return make_chest_ct(seed, findings=findings, shape=SHAPE, spacing=SPACING)

    monkeypatch.setattr(phantom, "make_chest_ct", small)
    result = invoke("sample", tmp_path / "demo")
    assert result.exit_code == 0, result.stderr
    assert seeds == [(SAMPLE_SEED, SAMPLE_FINDINGS)]
    listed = dict(line.split() for line in result.stdout.splitlines())
    assert set(listed) == {"scan", "organs", "organ_names", "findings_json", *SAMPLE_FINDINGS}
    for path in listed.values():
        assert Path(path).is_file()
    assert nib.load(listed["scan"]).shape == SHAPE
    assert f"hirescam3d explain {listed['scan']} --finding atelectasis" in result.stderr


# -- the installed console script ---------------------------------------------------------
def _run_script(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed (pip install -e .)")
    return subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_console_script_errors(tmp_path):
    done = _run_script("explain", tmp_path / "missing.nii.gz")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: scan {tmp_path / 'missing.nii.gz'}: no such file or folder; check the path"
    ]
    assert done.stdout == ""


@pytest.mark.slow
def test_console_script_explains_a_scan(scan, tmp_path):
    out = tmp_path / "out"
    done = _run_script(
        "explain", scan, "--model", MODEL, "-f", "atelectasis", "--out", out, "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    name = "small_ct_atelectasis_hirescam.nii.gz"
    assert report["outputs"] == {"atelectasis": {"hirescam": name}}
    img = nib.load(str(out / "small_ct_atelectasis_hirescam.nii.gz"))
    assert img.shape == SHAPE
    assert "Traceback" not in done.stderr
