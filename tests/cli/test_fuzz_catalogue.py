"""The second fuzz catalogue (issue 28): every row through the installed ``hirescam3d``.

Each case builds its input in ``tmp_path``, runs the console script and checks the exit
code, that stderr is exactly one line naming the file or option, and that the output
folder (which holds a file of ours beforehand) is left exactly as it was: the same
listing and the same SHA-256 of every file. Also: two ``batch`` runs on one folder (one
writer at a time, every scan done once) and ``kill -9`` while a DICOM series is written
(nothing partial; a rerun without ``--force`` succeeds).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import installed_console_script

MODEL, FINDING = "axialnet_tiny", "atelectasis"
SHAPE = (20, 20, 20)
AFFINE = np.array(
    [[16.0, 0.0, 0.0, -150.0], [0.0, 16.0, 0.0, -160.0], [0.0, 0.0, 14.0, -140.0], [0, 0, 0, 1]]
)
SCRIPT = installed_console_script()
# importing a user's model module must not add __pycache__ to the folders compared
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
assert SCRIPT is not None, "install the package (pip install -e .) for the hirescam3d script"


# -- helpers ------------------------------------------------------------------------------
def ct_volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """CT-like HU: air around a soft-tissue block, one bone voxel."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-800.0, 60.0, shape)
    vol[tuple(slice(n // 4, n - n // 4) for n in shape)] = 40.0
    vol[tuple(n // 2 for n in shape)] = 900.0
    return vol


def save_nifti(path: Path, data: np.ndarray | None = None, dtype=np.int16) -> Path:
    data = ct_volume() if data is None else data
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), AFFINE, dtype=dtype), str(path))
    return path


def run(*args: object, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:  # noqa: E501
    return subprocess.run(
        [str(SCRIPT), *(str(a) for a in args)], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env=ENV,
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, str] | None:
    """Every entry under ``folder`` (hidden ones too): relative path -> SHA-256 or 'dir'."""
    if not folder.exists():
        return None
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output folder that already holds a file of the user's."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file\n")
    return folder


def assert_one_line(done: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Exit ``code``; stderr exactly one ``error:`` line containing every one of ``names``."""
    lines = done.stderr.splitlines()
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def refused(args: list[object], out: Path, code: int, *names: str, cwd: Path | None = None) -> str:
    """Run ``args`` (with ``--out out`` for explain/batch/compare); check the one line and
    that ``out`` is left exactly as it was."""
    before = snapshot(out)
    done = run(*args, cwd=cwd)
    line = assert_one_line(done, code, *names)
    assert snapshot(out) == before
    return line


def explain(scan: Path, out: Path, *extra: object) -> list[object]:
    return ["explain", scan, "--model", MODEL, "-f", FINDING, "--out", out, *extra]


def write_series(folder: Path, shape=SHAPE) -> Path:
    """A CT series (one file per slice) of ``ct_volume``; patient P1."""
    from hirescam3d.io.dicom_write import write_ct_series

    write_ct_series(folder, ct_volume(shape), AFFINE, patient_id="P1")
    return folder


# -- row 1 and 6: --seg-threshold ---------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_row1_a_non_finite_seg_threshold_is_refused_before_writing(tmp_path, out, value):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    refused(explain(scan, out, "--format", "dicom-seg", "--seg-threshold", value), out, 2,
            "--seg-threshold", value)  # fmt: skip


def test_row1_a_non_finite_seg_threshold_is_refused_by_batch(tmp_path, out):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    refused(["batch", scan, "--model", MODEL, "-f", FINDING, "--out", out, "--format",
             "dicom-seg", "--seg-threshold", "nan"], out, 2, "--seg-threshold", "nan")  # fmt: skip


@pytest.mark.parametrize("value", ["1.5", "-0.5", "0"])
def test_row6_a_seg_threshold_outside_unit_maps_is_refused(tmp_path, out, value):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    refused(explain(scan, out, "--format", "dicom-seg", "--seg-threshold", value), out, 2,
            f"--seg-threshold {float(value):g}", "(0, 1]")  # fmt: skip


@pytest.mark.slow
def test_row6_a_threshold_leaving_the_seg_empty_gets_our_warning(tmp_path):
    """At threshold 1.0 no voxel of the scan-grid map reaches it (read back with nibabel);
    the SEG (read back with pydicom) then segments nothing and we say so in one line."""
    scan = save_nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "o"
    done = run(*explain(scan, out, "--format", "nifti,dicom-seg", "--seg-threshold", "1", "-q"))
    assert done.returncode == 0, done.stderr
    nifti_map = np.asarray(nib.load(out / f"scan_{FINDING}_hirescam.nii.gz").dataobj)
    seg = pydicom.dcmread(out / f"scan_{FINDING}_hirescam_seg.dcm")
    lines = done.stderr.splitlines()
    if nifti_map.max() >= 1.0:  # the map reaches its maximum 1 on the scan grid
        assert seg.pixel_array.any()
        pytest.fail("the oracle's premise failed: the map reaches 1.0 on the scan grid")
    assert not seg.pixel_array.any()
    assert len(lines) == 1 and lines[0].startswith("warning: "), done.stderr
    assert "--seg-threshold 1" in lines[0] and "empty" in lines[0]


# -- row 2: one writer per output folder --------------------------------------------------
def _wait_for(predicate, timeout: float = 240.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


def _two_runs_then_a_waiting_one(scans: Path, out: Path) -> tuple[list, list[int]]:
    """Start two batch runs on ``scans`` into ``out`` at once, then a third with ``--wait``
    once one holds the lock (or has ended); their ``(stdout, stderr)`` and exit codes."""
    args = [str(SCRIPT), "batch", str(scans), "--model", MODEL, "-f", FINDING, "--out",
            str(out), "-q"]  # fmt: skip
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    assert _wait_for(lambda: (out / ".hirescam3d.lock").exists()
                     or any(p.poll() is not None for p in runs))  # fmt: skip
    waiting = subprocess.Popen([*args, "--wait"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    results = [p.communicate(timeout=600) for p in (*runs, waiting)]
    return results, [p.returncode for p in (*runs, waiting)]


def _explained_once_each(out: Path) -> bool:
    """Whether every scan in the batch log of ``out`` was explained at most once."""
    records = [json.loads(line) for line in (out / "batch_log.jsonl").read_text().splitlines()]
    ok = [r["id"] for r in records if r["status"] == "ok"]
    return len(ok) == len(set(ok))


@pytest.mark.slow
def test_row2_two_batch_runs_on_one_folder_one_writer_each_scan_once(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(6):
        save_nifti(scans / f"s{i}.nii.gz", ct_volume(seed=i))
    # Two runs started together: whichever takes the lock explains, the other is refused.
    # On a loaded machine the second can start after the first has ended, when both
    # rightly succeed (the second skips every scan): that try tests nothing, so it is made
    # again, up to three times. Two runs that both explain a scan fail at once.
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        results, codes = _two_runs_then_a_waiting_one(scans, out)
        assert _explained_once_each(out), results
        if sorted(codes[:2]) != [0, 0]:
            break
    assert sorted(codes[:2]) == [0, 1], results
    # the refused one says so in one line naming the folder and --wait
    lines = results[codes.index(1)][1].splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "--wait" in lines[0], lines
    # the waiting run went after the first: it found every scan done
    assert codes[2] == 0, results[2][1]
    records = [json.loads(line) for line in (out / "batch_log.jsonl").read_text().splitlines()]
    ok = sorted(r["id"] for r in records if r["status"] == "ok")
    skipped = sorted(r["id"] for r in records if r["status"] == "skipped")
    assert ok == [f"s{i}" for i in range(6)]  # each scan explained exactly once
    assert skipped == ok  # the waiting run skipped each once
    for i in range(6):
        marker = json.loads((out / f"s{i}" / "batch_done.json").read_text())
        assert all((out / f"s{i}" / name).is_file() for name in marker["outputs"])
    assert not (out / ".hirescam3d.lock").exists()


# -- row 3: one patient, one study, one frame of reference ---------------------------------
@pytest.mark.slow
def test_row3_a_series_of_two_patients_is_refused_even_with_series(tmp_path, out):
    folder = write_series(tmp_path / "ct")
    files = sorted(folder.iterdir())
    for path in files[10:]:
        ds = pydicom.dcmread(path)
        ds.PatientID = "P2"
        ds.save_as(path)
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    # naming the series does not make it one scan (without --series: the same line)
    line = refused(explain(folder, out, "--series", uid), out, 1, str(folder), uid,
                   "2 patients (PatientID)", "'P1' in CT00001.dcm", "'P2' in CT00011.dcm")
    assert "--series cannot" in line


# -- row 4: readers name what is missing ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("header", ["scan.mhd", "scan.nhdr"])
def test_row4_a_missing_data_file_is_named(tmp_path, out, header):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(ct_volume().astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing((16.0, 16.0, 14.0))
    sitk.WriteImage(image, str(tmp_path / header))
    data = [p for p in tmp_path.iterdir() if p.suffix in (".raw", ".zraw")]
    assert len(data) == 1
    data[0].unlink()
    refused(explain(tmp_path / header, out), out, 1, header, str(data[0].name), "does not exist")


# -- row 5 and 12: audit of user models ----------------------------------------------------
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Gap(nn.Module):
        # conv -> ReLU (a module) -> global average pool -> linear: CAM's architecture, where
        # HiResCAM is exact at the ReLU (the scores are linear in its output)
        def __init__(self, kind="tensor"):
            super().__init__()
            self.kind = kind
            self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            f = self.features(x)
            y = self.fc(f.mean((2, 3, 4)))
            if self.kind == "tuple":
                return y, f
            if self.kind == "dict":
                return {"logits": y, "features": f}
            return y


    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 2)

        def forward(self, x):
            return self.fc(x.flatten(1))


    def tup():
        return Gap("tuple")


    def dct():
        return Gap("dict")


    def dense():
        return Dense()


    def boom():
        raise RuntimeError("boom")
    """
)


@pytest.fixture
def user_models(tmp_path: Path) -> Path:
    (tmp_path / "usermodels.py").write_text(MODELS)
    return tmp_path


@pytest.mark.parametrize(("spec", "kind", "hint"), [("tup", "tuple of 2", "--output INDEX"),
                                                    ("dct", "dict", "--output KEY")])
def test_row5_a_model_returning_several_outputs_is_named(user_models, spec, kind, hint):
    line = refused(["audit", "--model", f"usermodels:{spec}", "--input-shape", "1x4x4x4"],
                   user_models, 2, f"usermodels:{spec}", kind, hint, cwd=user_models)
    assert "(1, 3)" in line and "(1, 4, 4, 4, 4)" in line  # what each output holds


@pytest.mark.parametrize(("spec", "pick"), [("tup", "0"), ("dct", "logits")])
def test_row5_output_picks_the_logits(user_models, spec, pick):
    """With --output the audit runs on the picked logits: HiResCAM is guaranteed at the
    ReLU before global average pooling and a linear layer (CAM's architecture)."""
    done = run("audit", "--model", f"usermodels:{spec}", "--input-shape", "1x4x4x4",
               "--output", pick, "--json", cwd=user_models)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    verdicts = {v["layer"]: v["guaranteed"] for v in report["layers"]}
    assert verdicts.get("features.1") is True or any(
        v["guaranteed"] and "features.1" in v.get("aliases", []) for v in report["layers"]
    ), report["layers"]
    assert done.stderr == ""


def test_row5_a_wrong_output_key_lists_the_keys(user_models):
    refused(["audit", "--model", "usermodels:dct", "--input-shape", "1x4x4x4", "--output",
             "nope"], user_models, 2, "--output nope", "'logits'", "'features'",
            cwd=user_models)  # fmt: skip


def test_row5_a_model_without_explainable_layer_gets_a_reason(user_models):
    done = run("audit", "--model", "usermodels:dense", "--input-shape", "1x4x4x4",
               cwd=user_models)  # fmt: skip
    assert_one_line(done, 3, "usermodels:dense", "no layer")
    assert done.stdout == ""  # no empty table


def test_row12_a_raising_callable_is_named(user_models):
    refused(["audit", "--model", "usermodels:boom", "--input-shape", "1x4x4x4"], user_models,
            1, "--model usermodels:boom", "boom()", "RuntimeError: boom", cwd=user_models)


# -- row 7: duplicate manifest rows --------------------------------------------------------
def test_row7_a_manifest_listing_one_scan_twice_is_refused(tmp_path, out):
    save_nifti(tmp_path / "a.nii.gz")
    save_nifti(tmp_path / "b.nii.gz", ct_volume(seed=1))
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,id\na.nii.gz,first\nb.nii.gz,other\na.nii.gz,second\n")
    refused(["batch", manifest, "--model", MODEL, "-f", FINDING, "--out", out], out, 2,
            str(manifest), "a.nii.gz on lines 2, 4")  # fmt: skip


# -- row 8: compare --mask -----------------------------------------------------------------
def test_row8_an_all_zero_compare_mask_is_refused(tmp_path, out):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    mask = save_nifti(tmp_path / "mask.nii.gz", np.zeros(SHAPE), np.uint8)
    refused(["compare", scan, "--model", MODEL, "-f", FINDING, "--mask", mask, "--out", out],
            out, 1, f"--mask {mask}", "empty")  # fmt: skip


# -- row 9: sizes before allocating --------------------------------------------------------
def test_row9_a_huge_input_shape_is_refused_with_the_bytes(tmp_path):
    refused(["audit", "--model", MODEL, "--input-shape", "1x100000x100000x100000"], tmp_path,
            2, "--input-shape 1x100000x100000x100000", "PB", "available")  # fmt: skip


def test_row9_a_scan_larger_than_memory_is_refused_before_reading(tmp_path, out):
    """A MetaImage header declaring 10^5 x 10^5 x 10^5 int16 voxels (2 PB) beside a small
    data file: refused from the header, before ITK allocates, naming the size."""
    (tmp_path / "huge.raw").write_bytes(b"\0" * 1024)
    header = tmp_path / "huge.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "ElementSpacing = 1 1 1\nDimSize = 100000 100000 100000\nElementType = MET_SHORT\n"
        "ElementDataFile = huge.raw\n"
    )
    refused(explain(header, out), out, 1, str(header), "100000 x 100000 x 100000", "PB",
            "available")  # fmt: skip


# -- row 11: intensities no CT holds -------------------------------------------------------
@pytest.mark.slow
def test_row11_int64_voxels_beyond_any_ct_are_refused(tmp_path, out):
    data = np.full(SHAPE, -1000, np.int64)
    data[5:15, 5:15, 5:15] = 4_600_000_000_000_000_000
    data[0, 0, 0] = -4_600_000_000_000_000_000
    scan = save_nifti(tmp_path / "int64.nii.gz", data, np.int64)
    refused(explain(scan, out), out, 1, str(scan), "4.6e+18", "HU")


# -- pure option problems exit 2 -----------------------------------------------------------
def test_values_logit_with_gradcam_is_a_usage_error(tmp_path, out):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    refused(explain(scan, out, "--values", "logit", "-m", "gradcam"), out, 2, "--values logit",
            "gradcam")  # fmt: skip


def test_series_on_a_nifti_is_a_usage_error(tmp_path, out):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    refused(explain(scan, out, "--series", "1.2.3"), out, 2, "--series", str(scan))


@pytest.mark.slow
def test_an_unknown_series_uid_is_a_usage_error(tmp_path, out):
    folder = write_series(tmp_path / "ct")
    refused(explain(folder, out, "--series", "1.2.3"), out, 2, "'1.2.3'", "--series")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_naming_a_file_is_a_usage_error(tmp_path, force):
    scan = save_nifti(tmp_path / "scan.nii.gz")
    target = tmp_path / "afile"
    target.write_text("mine\n")
    line = refused(explain(scan, target, *force), tmp_path, 2, f"--out {target}", "not a folder")
    assert "already exists" not in line


# -- kill -9 while a DICOM series is being written -----------------------------------------
@pytest.mark.slow
def test_kill_9_while_writing_a_dicom_series_leaves_nothing_partial(tmp_path, out):
    scan = save_nifti(tmp_path / "scan.nii.gz", ct_volume((24, 24, 240)))
    before = snapshot(out)
    args = [str(SCRIPT), *map(str, explain(scan, out, "--format", "dicom", "-q"))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def writing() -> bool:  # CT slices in the run's temporary folder
        return any(any(p.glob("*/CT*.dcm")) or any(p.glob("*/*/CT*.dcm"))
                   for p in out.glob(".tmp-*"))  # fmt: skip

    assert _wait_for(lambda: writing() or proc.poll() is not None, step=0.002)
    assert proc.poll() is None, "the run ended before the series was written: no kill test"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # nothing in place but what was there; only hidden leftovers that block nothing
    visible = {k: v for k, v in snapshot(out).items() if not k.split(os.sep)[0].startswith(".")}
    assert visible == before
    done = run(*explain(scan, out, "--format", "dicom", "-q"))  # no --force
    assert done.returncode == 0, done.stderr
    after = snapshot(out)
    assert not [k for k in after if k.startswith(".")]  # stale temporary folder cleaned
    series = sorted((out / "scan_ct_dicom").glob("*.dcm"))
    assert len(series) == 240  # the whole series, once
    pm = pydicom.dcmread(out / f"scan_{FINDING}_hirescam_pm.dcm", stop_before_pixels=True)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in series}
    referenced = pm.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert uids == {str(referenced)}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def _gap_bundle(folder: Path, kind: str, state: dict) -> Path:
    """A bundle of ``usermodels.Gap(kind)`` (user code: needs --trust-bundle)."""
    import torch

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference = {
        "network_def": {"_target_": "usermodels.Gap", "kind": kind},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "ScaleIntensityd", "keys": "image"},
        ]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    }  # fmt: skip
    metadata = {"name": f"gap_{kind}", "version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": list(SHAPE)}},
        "outputs": {"pred": {"type": "probabilities", "class_names": ["a", "b", "c"]}}}}
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save(state, folder / "models" / "model.pt")
    return folder


@pytest.mark.slow
def test_row5_explain_takes_output_for_a_tuple_output_bundle(user_models):
    """explain names a tuple output in one line; with --output 0 it explains exactly what
    the same weights explain in a network that returns the logits alone."""
    import torch

    sys.path.insert(0, str(user_models))
    try:
        import usermodels

        torch.manual_seed(0)
        state = usermodels.Gap().state_dict()
    finally:
        sys.path.remove(str(user_models))
        sys.modules.pop("usermodels", None)
    scan = save_nifti(user_models / "scan.nii.gz")
    env = {**ENV, "PYTHONPATH": str(user_models)}

    def explain_with(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), "explain", str(scan), "--model", str(bundle), "--trust-bundle",
             "-f", "b", "--values", "logit", "--grid", "model", "--out", str(out), *extra],
            capture_output=True, text=True, timeout=300, env=env, cwd=user_models,
        )  # fmt: skip

    two = _gap_bundle(user_models / "two_heads", "tuple", state)
    one = _gap_bundle(user_models / "one_head", "tensor", state)
    done = explain_with(two, user_models / "refused")
    line = done.stderr.splitlines()[-1]
    assert done.returncode == 2 and "tuple" in line and "--output" in line, done.stderr
    assert not (user_models / "refused").exists()
    picked = explain_with(two, user_models / "picked", "--output", "0")
    plain = explain_with(one, user_models / "plain")
    assert picked.returncode == 0 and plain.returncode == 0, (picked.stderr, plain.stderr)
    maps = [sorted((user_models / n).glob("*_b_hirescam.nii.gz")) for n in ("picked", "plain")]
    assert len(maps[0]) == len(maps[1]) == 1
    a, b = (np.asarray(nib.load(str(m[0])).dataobj) for m in maps)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).sum() > 0
