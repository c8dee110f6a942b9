"""Bad and unusual scan inputs (issue 14): one clear line each, never a silent guess.

Every case builds its own input in ``tmp_path`` and runs the installed ``hirescam3d``
console script, checking the exit code, that stderr holds exactly the intended lines (no
ITK or nibabel noise), that a refused run leaves no output file and that a run that
proceeds writes maps with the input's exact shape and affine. Variants and a property
test over randomly corrupted NIfTI headers run through :func:`hirescam3d.io.scans.read_scan`.
Volumes are 20^3 voxels of 16 x 16 x 14 mm, so they fill the small model's field of view.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import from_matvec
from nibabel.eulerangles import euler2mat

from hirescam3d.errors import HiResCAMError, ScanError
from hirescam3d.io import nifti
from hirescam3d.io import scans as io
from hirescam3d.io.outputs import QFORM_TOLERANCE_MM, write_explanation, write_labels
from hirescam3d.io.scans import ScanWarning, read_scan
from tests.conftest import installed_console_script

MODEL, FINDING = "axialnet_tiny", "atelectasis"
SHAPE = (20, 20, 20)
AFFINE = np.array(
    [[16.0, 0.0, 0.0, -150.0], [0.0, 16.0, 0.0, -160.0], [0.0, 0.0, 14.0, -140.0], [0, 0, 0, 1]]
)
OUTPUT = f"{FINDING}_hirescam.nii.gz"


# -- helpers ------------------------------------------------------------------------------
def ct_volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """int16 CT-like intensities: air around soft tissue, one bone voxel."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-800.0, 60.0, shape)
    vol[tuple(slice(n // 4, n - n // 4) for n in shape)] = 40.0
    vol[tuple(n // 2 for n in shape)] = 900.0
    return vol.astype(np.int16)


def save_nifti(path: Path, sform=AFFINE, qform=AFFINE, data=None) -> Path:
    """A NIfTI with the given sform / qform (None: code 0)."""
    img = nib.Nifti1Image(ct_volume() if data is None else data, None)
    img.header.set_zooms(tuple(np.linalg.norm(AFFINE[:3, :3], axis=0)))
    img.set_sform(sform, code=0 if sform is None else 1)
    img.set_qform(qform, code=0 if qform is None else 1)
    nib.save(img, str(path))
    return path


def patch_header(path: Path, **fields) -> Path:
    """Overwrite stored header fields of a .nii/.nii.gz without nibabel's checks or fixes."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    hdr = nib.Nifti1Header.from_fileobj(open_bytes(raw), check=False)
    for name, value in fields.items():
        if isinstance(value, dict):
            for index, item in value.items():
                hdr[name][index] = item
        else:
            hdr[name] = value
    block = hdr.binaryblock
    with opener(path, "wb") as f:
        f.write(block + raw[len(block) :])
    return path


def open_bytes(raw: bytes):
    import io as _io

    return _io.BytesIO(raw)


def ct5n() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N"


def copy_series(dst: Path) -> Path:
    shutil.copytree(ct5n(), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def write_rtstruct(path: Path) -> Path:
    """pydicom's RT structure set as a standard DICOM file (preamble and file meta)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    ds = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def explain(scan: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed (pip install -e .)")
    args = [str(script), "explain", str(scan), "--model", MODEL, "-f", FINDING]
    return subprocess.run(
        [*args, "--out", str(out), "-q", *extra], capture_output=True, text=True, timeout=300
    )


def assert_refused(done: subprocess.CompletedProcess, out: Path, expected: str) -> None:
    """Exit 1, stderr exactly ``error: expected``, no output file."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.splitlines() == [f"error: {expected}"]
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def assert_written(
    done: subprocess.CompletedProcess, out: Path, stem: str, warned: list[str]
) -> nib.Nifti1Image:
    """Exit 0, stderr exactly the ``warned`` lines; returns the written map."""
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"warning: {w}" for w in warned]
    img = nib.load(str(out / f"{stem}_{OUTPUT}"))
    assert img.shape == SHAPE
    return img


def read(path: Path) -> tuple[io.Scan, list[str]]:
    """read_scan with the texts of its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = read_scan(path)
    return scan, [str(w.message) for w in caught if issubclass(w.category, ScanWarning)]


# -- 1. DICOM series with an unreadable or missing slice ----------------------------------
def test_truncated_dicom_slice_is_refused_with_the_file_and_the_gap(tmp_path):
    folder = copy_series(tmp_path / "CT5N")
    with open(folder / "2693", "r+b") as f:
        f.truncate(3000)
    out = tmp_path / "out"
    done = explain(folder, out)
    assert_refused(
        done, out,
        f"{folder}: 2693 looks like a DICOM slice of this series but cannot be read "
        "(truncated or corrupt); without it, slices 3023 and 2392 are 5 mm apart (at 1.2625 "
        "and 6.2625 mm along the slice normal), the others 2.5 mm; copy the series again or "
        "replace that file (slices are never skipped silently)",
    )


def test_truncated_end_slice_is_refused_without_a_gap(tmp_path):
    folder = copy_series(tmp_path / "CT5N")
    with open(folder / "2062", "r+b") as f:  # the top slice: no gap, still a lost slice
        f.truncate(1000)
    with pytest.raises(ScanError, match=r"2062 looks like a DICOM slice .* cannot be read \("):
        read_scan(folder)


def test_missing_dicom_slice_is_resampled_with_a_warning(tmp_path):
    folder = copy_series(tmp_path / "CT5N")
    (folder / "2693").unlink()
    scan, texts = read(folder)
    assert texts == [
        f"{folder}: the slices are not evenly spaced: slices 3023 and 2392 are 5 mm apart (at "
        "1.2625 and 6.2625 mm along the slice normal), the others 2.5 mm, so a slice is "
        "probably missing; resampled the 4 slices onto a regular grid of 5 at 2.5 mm along "
        "the slice normal (linear interpolation between neighbouring slices); check the "
        "series is complete"
    ]
    assert scan.array.shape == (16, 16, 5) and not scan.dicom.on_source_grid
    np.testing.assert_allclose(scan.spacing, (0.488281, 0.488281, 2.5), atol=1e-5)


def test_intact_series_with_an_rtstruct_beside_it_reads_without_warnings(tmp_path):
    folder = copy_series(tmp_path / "CT5N")
    write_rtstruct(folder / "rtstruct.dcm")
    scan, texts = read(folder)
    assert scan.array.shape == (16, 16, 5) and texts == []
    np.testing.assert_allclose(scan.spacing, (0.488281, 0.488281, 2.5), atol=1e-5)


# -- 2. a header declaring far more data than the file holds --------------------------------
def test_header_declaring_more_data_than_the_file_is_refused(tmp_path):
    path = patch_header(save_nifti(tmp_path / "big.nii"), dim={1: 10000, 2: 10000, 3: 10000})
    out = tmp_path / "out"
    assert_refused(
        explain(path, out), out,
        f"{path}: the header declares a 10000 x 10000 x 10000 int16 volume (2 TB) starting at "
        "byte 352, but the file holds only 16 kB of image data; the file is truncated or its "
        "header (dim, datatype) is corrupt: copy or export it again",
    )


def test_gzipped_header_declaring_more_data_than_the_file_can_hold(tmp_path):
    path = patch_header(save_nifti(tmp_path / "big.nii.gz"), dim={1: 10000, 2: 10000, 3: 10000})
    with pytest.raises(ScanError, match=r"big.nii.gz: the header declares a 10000 x 10000 x "
                       r"10000 int16 volume \(2 TB\), but the compressed file has only"):
        read_scan(path)


def test_volume_larger_than_free_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = save_nifti(tmp_path / "ct.nii.gz")
    monkeypatch.setattr(nifti, "_available_memory", lambda: 1000)
    with pytest.raises(ScanError, match=r"needs about 48 kB of memory, but only 1 kB is"):
        read_scan(path)


# -- 3. no orientation in the header --------------------------------------------------------
@pytest.mark.slow
def test_header_without_sform_and_qform_warns_what_was_assumed(tmp_path):
    path = save_nifti(tmp_path / "analyze.nii.gz", sform=None, qform=None)
    out = tmp_path / "out"
    img = assert_written(
        explain(path, out), out, "analyze",
        [
            f"{path}: the orientation is unknown (sform_code and qform_code are both 0, as in "
            "an Analyze header); assumed LAS (nibabel's default: axis i runs from right to "
            "left), voxel size 16 x 16 x 14 mm from pixdim and the volume centred at the "
            "origin; if that is wrong, the maps are misplaced: set the sform (nibabel: "
            "img.set_sform(affine, code=1), then save)"
        ],
    )
    np.testing.assert_array_equal(img.affine, nib.load(str(path)).affine)


# -- 4. zero / negative / NaN voxel size ---------------------------------------------------
def test_zero_pixdim_is_refused_with_the_axis_and_no_nibabel_line(tmp_path):
    path = patch_header(save_nifti(tmp_path / "flat.nii", sform=None), pixdim={3: 0.0})
    out = tmp_path / "out"
    assert_refused(
        explain(path, out), out,
        f"{path}: the qform (the header's only orientation) is unusable: pixdim[3] (the voxel "
        "size along axis k) is 0; write the true voxel size in mm into pixdim (nibabel: "
        "img.header.set_zooms(sizes), then save) or export the scan again",
    )


@pytest.mark.parametrize("value", [-2.0, float("nan")])
def test_negative_or_nan_pixdim_without_any_transform_is_refused(tmp_path, value, capfd):
    path = patch_header(save_nifti(tmp_path / "a.nii", sform=None, qform=None), pixdim={1: value})
    with pytest.raises(ScanError, match=rf"pixdim\[1\] \(the voxel size along axis i\) is {value:g}"
                       r" and the header has no sform or qform"):
        read_scan(path)
    assert capfd.readouterr().err == ""


def test_zero_pixdim_beside_a_valid_sform_uses_the_sform_with_a_warning(tmp_path, capfd):
    path = patch_header(save_nifti(tmp_path / "s.nii", qform=None), pixdim={2: 0.0})
    scan, texts = read(path)
    np.testing.assert_array_equal(scan.affine, AFFINE)
    assert texts == [
        f"{path}: pixdim[2] (the voxel size along axis j) is 0; used the voxel size the sform "
        "gives (16 x 16 x 14 mm); fix pixdim so that other tools agree"
    ]
    assert capfd.readouterr().err == ""


# -- 5. sheared sform; sform and qform disagreeing -----------------------------------------
def sheared() -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, :2] = [15.0, 0.5]  # axis j leans towards x: not perpendicular to axis i
    return affine


def test_sheared_sform_is_kept_exactly_with_qform_code_0_and_a_warning(tmp_path):
    path = save_nifti(tmp_path / "shear.nii.gz", sform=sheared(), qform=sheared())
    out = tmp_path / "out"
    img = assert_written(
        explain(path, out), out, "shear",
        [
            f"{path}: the sform is sheared (its voxel axes are not perpendicular; the nearest "
            "qform is off by up to 6.46 mm); the header's qform (code 1) differs by up to "
            "6.46 mm; used the sform: the outputs keep it exactly and have qform_code 0, so "
            "view them in a tool that reads the sform"
        ],
    )
    assert np.array_equal(img.header.get_sform(), sheared())
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 0


@pytest.mark.slow
def test_sform_and_qform_disagreeing_warns_and_uses_the_sform(tmp_path):
    qform = AFFINE.copy()
    qform[:3, 3] += [0.0, 0.0, 5.0]
    path = save_nifti(tmp_path / "two.nii.gz", qform=qform)
    out = tmp_path / "out"
    img = assert_written(
        explain(path, out), out, "two",
        [
            f"{path}: the sform (code 1) and the qform (code 1) disagree by up to 5 mm; used "
            "the sform, as nibabel and most tools do (the outputs hold it as both); fix the "
            "header if the qform is the right one"
        ],
    )
    assert np.array_equal(img.header.get_sform(), AFFINE)
    assert int(img.header["qform_code"]) == 1
    assert nifti.affine_distance_mm(img.header.get_qform(), AFFINE, SHAPE) <= QFORM_TOLERANCE_MM


def test_written_qform_is_code_1_only_where_it_matches_the_sform(tmp_path):
    oblique = from_matvec(euler2mat(0.1, -0.05, 0.07) @ np.diag([0.9, 1.3, 2.7]), [12, -40, 7])
    for name, affine, code in [("oblique", oblique, 1), ("sheared", sheared(), 0)]:
        written = [
            write_explanation(tmp_path / f"{name}_map.nii.gz", np.zeros(SHAPE), affine, "cam"),
            write_labels(tmp_path / f"{name}_labels.nii.gz", np.zeros(SHAPE, np.uint8), affine),
        ]
        for path in written:
            hdr = nib.load(str(path)).header
            assert np.allclose(hdr.get_sform(), affine, atol=1e-5) and hdr["sform_code"] == 1
            assert int(hdr["qform_code"]) == code, path.name
            if code:
                gap = nifti.affine_distance_mm(hdr.get_qform(), hdr.get_sform(), SHAPE)
                assert gap <= QFORM_TOLERANCE_MM


# -- 7. unusable sform: NaN or singular ----------------------------------------------------
@pytest.mark.slow
def test_nan_sform_falls_back_to_the_qform_with_a_warning(tmp_path):
    path = patch_header(save_nifti(tmp_path / "nan.nii"), srow_y=[0.0, np.nan, 0.0, -160.0])
    out = tmp_path / "out"
    img = assert_written(
        explain(path, out), out, "nan",
        [
            f"{path}: the sform (sform_code 1) is unusable: srow_y holds NaN or infinite "
            "values; used the qform (qform_code 1) instead; fix the header (or export the scan "
            "again) so that it holds the true geometry"
        ],
    )
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)


@pytest.mark.slow
def test_singular_sform_without_a_qform_names_the_file_and_field(tmp_path):
    path = patch_header(save_nifti(tmp_path / "flat.nii", qform=None), srow_z=[16.0, 0, 0, 0])
    out = tmp_path / "out"
    assert_refused(
        explain(path, out), out,
        f"{path}: the sform is unusable: it is singular: voxel axis k has zero length in "
        "srow_x/srow_y/srow_z and there is no qform to fall back on (qform_code 0); fix the "
        "header (or export the scan again) so that it holds the true geometry",
    )


def test_singular_sform_falls_back_to_the_qform(tmp_path):
    path = patch_header(save_nifti(tmp_path / "s.nii"), srow_x=[0.0, 0.0, 0.0, 0.0])
    scan, texts = read(path)
    np.testing.assert_allclose(scan.affine, AFFINE, atol=1e-5)
    assert texts == [
        f"{path}: the sform (sform_code 1) is unusable: srow_x has 0 in its first three "
        "values, so it is singular; used the qform (qform_code 1) instead; fix the header (or "
        "export the scan again) so that it holds the true geometry"
    ]


# -- 8. folders without a series: one line, no ITK noise -----------------------------------
def test_series_one_level_down_is_named(tmp_path):
    top = tmp_path / "study"
    copy_series(top / "series_1")
    out = tmp_path / "out"
    assert_refused(
        explain(top, out), out,
        f"{top}: the folder holds no DICOM series (subfolders are not searched), but its "
        f"subfolder {top / 'series_1'} does; pass that folder",
    )


@pytest.mark.slow
def test_rtstruct_only_folder_says_what_it_holds(tmp_path):
    folder = tmp_path / "rt"
    write_rtstruct(folder / "rtstruct.dcm")
    out = tmp_path / "out"
    assert_refused(
        explain(folder, out), out,
        f"{folder}: the folder holds 1 DICOM file (RT structure set) but no readable image "
        "series; pass the folder holding the scan's image slices",
    )


@pytest.mark.slow
def test_folder_without_dicom_gives_one_line(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here\n")
    out = tmp_path / "out"
    assert_refused(
        explain(folder, out), out,
        f"{folder}: the folder holds no DICOM series (subfolders are not searched); pass the "
        "folder with the DICOM files of one series, or an image file (.nii, .nii.gz, .nrrd, "
        ".mha, .mhd or a folder holding one DICOM series)",
    )


def test_library_folder_errors_print_nothing(tmp_path, capfd):
    rt_and_series = tmp_path / "rt_top"
    write_rtstruct(rt_and_series / "rtstruct.dcm")
    copy_series(rt_and_series / "a" / "ct")
    with pytest.raises(ScanError) as err:
        read_scan(rt_and_series)
    assert str(err.value) == (
        f"{rt_and_series}: the folder holds no image series, only 1 other DICOM file "
        f"(subfolders are not searched), but its subfolder {rt_and_series / 'a' / 'ct'} does; "
        "pass that folder"
    )
    assert capfd.readouterr().err == ""


# -- 9. organ map on another grid ----------------------------------------------------------
@pytest.mark.slow
def test_organ_map_on_a_shifted_grid_names_the_origin(tmp_path):
    scan = save_nifti(tmp_path / "ct.nii.gz")
    shifted = AFFINE.copy()
    shifted[2, 3] += 28.0  # two slices up
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:16, 4:16, 2:14] = 1
    organs = tmp_path / "organs.nii.gz"
    nib.save(nib.Nifti1Image(labels, shifted), str(organs))
    out = tmp_path / "out"
    assert_written(
        explain(scan, out, "--organs", str(organs)), out, "ct",
        [
            f"organ map {organs} is on a different grid than the scan (origin (-150, -160, "
            "-112) mm vs the scan's (-150, -160, -140) mm); resampled to the scan's grid with "
            "nearest-neighbour interpolation"
        ],
    )


def test_grid_differences_name_every_part_with_values():
    other = AFFINE.copy()
    other[:3, :3] = np.diag([-8.0, 16.0, 14.0])
    assert nifti.grid_differences((10, 20, 20), other, SHAPE, AFFINE) == [
        "shape (10, 20, 20) vs the scan's (20, 20, 20)",
        "spacing 8 x 16 x 14 mm vs the scan's 16 x 16 x 14 mm",
        "direction LAS vs the scan's RAS",
    ]


# -- property test: randomly corrupted NIfTI headers ---------------------------------------
def corrupt(rng: np.random.Generator, hdr: nib.Nifti1Header) -> list[str]:
    """Damage 1-3 random header fields in place; returns what was done."""
    bad = [0.0, -1.0, np.nan, np.inf, 1e-30, 1e30]
    actions = {
        "pixdim": lambda: hdr["pixdim"].__setitem__(rng.integers(0, 4), rng.choice(bad)),
        "dim": lambda: hdr["dim"].__setitem__(
            rng.integers(0, 5), rng.choice([0, -1, 1, 2, 5, 19, 40, 4, 8, 10000, 32767])
        ),
        "sform_code": lambda: hdr.__setitem__("sform_code", rng.choice([0, 1, 2, 5, 6, -1])),
        "qform_code": lambda: hdr.__setitem__("qform_code", rng.choice([0, 1, 3, 7, -2])),
        "srow": lambda: hdr[f"srow_{'xyz'[rng.integers(3)]}"].__setitem__(
            rng.integers(4), rng.choice([0.0, np.nan, np.inf, 1e30, rng.normal(0, 20)])
        ),
        "srow_row": lambda: hdr.__setitem__(
            f"srow_{'xyz'[rng.integers(3)]}", rng.choice([0.0, 16.0], size=4)
        ),
        "quatern": lambda: hdr.__setitem__(
            f"quatern_{'bcd'[rng.integers(3)]}", rng.choice([np.nan, 2.0, rng.uniform(-1, 1)])
        ),
        "qoffset": lambda: hdr.__setitem__(f"qoffset_{'xyz'[rng.integers(3)]}", np.nan),
        "scl": lambda: hdr.__setitem__(
            rng.choice(["scl_slope", "scl_inter"]), rng.choice([0.0, np.nan, np.inf, -1.0, 1e38])
        ),
        "datatype": lambda: hdr.__setitem__(
            "datatype", rng.choice([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 2304, 9999])
        ),
        "vox_offset": lambda: hdr.__setitem__("vox_offset", rng.choice([0, 351, 1e9, np.nan])),
    }
    names = list(rng.choice(sorted(actions), size=rng.integers(1, 4), replace=False))
    for name in names:
        actions[name]()
    return names


def corrupted_cases(base: bytes, n: int, seed: int = 14):
    """``n`` (name, file bytes, what was damaged) from a valid .nii in ``base``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        hdr = nib.Nifti1Header.from_fileobj(open_bytes(base), check=False)
        with np.errstate(all="ignore"):
            what = corrupt(rng, hdr)
        suffix = ".nii.gz" if i % 4 == 3 else ".nii"
        data = hdr.binaryblock + base[348:]
        yield f"case{i:03d}{suffix}", gzip.compress(data) if suffix.endswith("gz") else data, what


def declared_shape(path: Path) -> tuple[int, ...]:
    """The shape the stored header declares, trailing singleton axes dropped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        hdr = nib.Nifti1Header.from_fileobj(f, check=False)
    shape = [int(d) for d in hdr["dim"][1 : int(hdr["dim"][0]) + 1]]
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def check_outcome(path: Path, what: list[str]) -> str:
    """Read ``path``; assert success with sound geometry or one single-line library error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scan = read_scan(path)
    except HiResCAMError as err:
        text = str(err)
        assert text and "\n" not in text and str(path) in text, (what, text)
        return "refused"
    except Exception as err:  # noqa: BLE001 - exactly what this test forbids
        pytest.fail(f"{path.name} ({what}): {type(err).__name__}: {err}")
    assert np.isfinite(scan.affine).all(), what
    assert abs(np.linalg.det(scan.affine[:3, :3])) > 0, what
    assert scan.array.shape == declared_shape(path), what
    assert np.isfinite(scan.array).all(), what
    return "read"


@pytest.fixture(scope="module")
def base_nifti(tmp_path_factory) -> bytes:
    oblique = AFFINE.copy()
    oblique[:3, :3] = euler2mat(0.2, 0.1, -0.1) @ AFFINE[:3, :3]
    path = save_nifti(tmp_path_factory.mktemp("base") / "base.nii", oblique, oblique)
    return path.read_bytes()


def test_randomly_corrupted_headers_read_soundly_or_fail_in_one_line(
    base_nifti, tmp_path, capfd
):
    outcomes = []
    for name, data, what in corrupted_cases(base_nifti, 240):
        path = tmp_path / name
        path.write_bytes(data)
        outcomes.append(check_outcome(path, what))
    assert capfd.readouterr().err == ""  # no nibabel or ITK lines
    assert 40 < outcomes.count("read") < 200, outcomes.count("read")  # both kinds covered


@pytest.mark.slow
def test_randomly_corrupted_headers_through_the_cli(base_nifti, tmp_path):
    """24 of the same cases through ``hirescam3d batch`` (one process, one model load)."""
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed (pip install -e .)")
    paths = {}
    for name, data, what in list(corrupted_cases(base_nifti, 240))[::10]:
        paths[name] = (tmp_path / "in" / name, what)
        paths[name][0].parent.mkdir(exist_ok=True)
        paths[name][0].write_bytes(data)
    out = tmp_path / "out"
    done = subprocess.run(
        [str(script), "batch", *(str(p) for p, _ in paths.values()), "--model", MODEL,
         "-f", FINDING, "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    assert all(line.startswith(("error: ", "warning: ")) for line in done.stderr.splitlines())
    library_errors = {cls.__name__ for cls in all_subclasses(HiResCAMError)}
    records = [json.loads(line) for line in (out / "batch_log.jsonl").read_text().splitlines()]
    assert len(records) == len(paths)
    for record in records:
        path, what = paths[Path(record["input"]).name]
        if record["status"] == "failed":
            assert record["error_type"] in library_errors, (what, record)
            assert "\n" not in record["error"] and f"error: {record['error']}" in done.stderr
            assert not Path(record["out_dir"]).exists() or not any(
                Path(record["out_dir"]).glob("*.nii.gz")
            ), what
        else:
            assert record["status"] == "ok", record
            scan = read(path)[0]
            img = nib.load(str(Path(record["out_dir"]) / f"{io.scan_stem(path)}_{OUTPUT}"))
            assert img.shape == scan.array.shape, what
            np.testing.assert_allclose(img.affine, scan.affine, atol=1e-4)


def all_subclasses(cls: type) -> set[type]:
    return {cls} | {s for sub in cls.__subclasses__() for s in all_subclasses(sub)}


# -- 6: a scan much smaller than the model's field of view --------------------------------
def test_tiny_scan_warns_how_little_of_the_field_of_view_it_covers(tmp_path):
    data = ct_volume((5, 5, 5))
    scan = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), str(scan))
    out = tmp_path / "out"
    done = explain(scan, out)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "field of view" in line]
    assert len(lines) == 1, done.stderr
    prefix, rest = lines[0].split("covers only ")
    assert prefix == "warning: the scan "
    assert rest.endswith(
        " % of the model's field of view (the rest is padding the model sees as air); "
        "explanations of such a scan say little"
    )
    share = float(rest.split(" %")[0])
    # The model sees the 5 mm cube on its 3 x 2.5 x 2.5 mm grid of 96 x 128 x 128 voxels:
    # at least its physical volume, at most one model voxel more along each axis.
    fov = 96 * 3.0 * 128 * 2.5 * 128 * 2.5
    assert 125 / fov * 100 <= share <= (5 + 3.0) * (5 + 2.5) ** 2 / fov * 100
    img = nib.load(str(out / f"tiny_{OUTPUT}"))
    assert img.shape == (5, 5, 5) and np.allclose(img.affine, np.eye(4))
