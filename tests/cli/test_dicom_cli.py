"""DICOM in and out through the CLI: ``hirescam3d explain SERIES --format dicom`` on pydicom's
real 5-slice CT series, on a phantom CT given as NIfTI (written as a CT series too), and a
folder holding two series (``--series``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.io.scans import read_scan
from tests.cli.test_cli import assert_one_line_error, invoke
from tests.io.test_dicom_out import (
    CT5N,
    LPS,
    UNIT_PRECISION,
    check_on_source_grid,
    decoded_frames,
    frame_position,
    source_slices,
)

pytestmark = pytest.mark.slow


def world_index(affine: np.ndarray, ijk: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Voxel indices ``(N, 3)`` of grid ``other`` at the world points of ``ijk`` in ``affine``."""
    world = affine @ np.c_[ijk, np.ones(len(ijk))].T
    return np.rint((np.linalg.inv(other) @ world)[:3].T).astype(int)


def test_dicom_in_dicom_out_on_a_real_series(tmp_path):
    out = tmp_path / "out"
    result = invoke("explain", CT5N, "--finding", "nodule", "--format", "nifti,dicom,dicom-seg",
                    "--seg-threshold", "0.2", "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    img = nib.load(next(out.glob("*_nodule_hirescam.nii.gz")))
    values = np.asarray(img.dataobj, dtype=np.float64)
    pm = pydicom.dcmread(next(out.glob("*_nodule_hirescam_pm.dcm")))
    slices = source_slices(Path(CT5N))
    # every frame references its source slice, sits on it and holds the NIfTI map's plane
    check_on_source_grid(pm, values, img.affine, slices, precision=UNIT_PRECISION + 1e-7)
    series_uid = {str(s.SeriesInstanceUID) for s in slices.values()}
    assert {str(r.SeriesInstanceUID) for r in pm.ReferencedSeriesSequence} == series_uid
    assert pm.SeriesDescription == "hirescam3d: nodule (hirescam)"
    assert pm.FrameOfReferenceUID == next(iter(slices.values())).FrameOfReferenceUID

    seg = pydicom.dcmread(next(out.glob("*_nodule_hirescam_seg.dcm")))
    assert int(seg.pixel_array.astype(bool).sum()) == int((values >= 0.2).sum()) > 0
    report = json.loads((out / "report.json").read_text())
    assert report["dicom"]["source_series_uid"] in series_uid
    assert report["dicom"]["seg_threshold"] == 0.2
    assert "ct_series" not in report["dicom"]  # the scan is DICOM: nothing rewritten


def test_nifti_scan_is_written_as_a_ct_series_the_maps_reference(tmp_path):
    phantom = make_chest_ct(5, shape=(32, 64, 64), spacing=(6.0, 5.0, 5.0))
    scan = phantom.save(tmp_path / "in")["ct"]
    out = tmp_path / "out"
    result = invoke("explain", scan, "--finding", "atelectasis", "--format", "nifti,dicom",
                    "--values", "logit", "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    folder = next(out.glob("*_ct_dicom"))
    ct = read_scan(folder)
    # the CT series holds the phantom's HU at the same places in the patient frame
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, phantom.ct.shape, size=(200, 3))
    there = world_index(phantom.affine, ijk, ct.affine)
    assert np.array_equal(ct.array[tuple(there.T)], phantom.ct[tuple(ijk.T)])
    # axial slices for PACS: the slice normal is the patient's S axis
    normal = ct.affine[:3, 2] / np.linalg.norm(ct.affine[:3, 2])
    assert abs(abs(normal[2]) - 1) < 1e-6

    pm = pydicom.dcmread(next(out.glob("*_atelectasis_hirescam_pm.dcm")))
    check_on_source_grid(pm, np.zeros(ct.array.shape), ct.affine, source_slices(folder), None)
    # each frame holds the NIfTI map's logits at the same world points
    img = nib.load(next(out.glob("*_atelectasis_hirescam.nii.gz")))
    logits = np.asarray(img.dataobj, dtype=np.float64)
    decoded = decoded_frames(pm)
    precision = np.abs(logits).max() / 65534 * 1.01
    rows, cols = np.mgrid[0 : pm.Rows, 0 : pm.Columns]
    for f in (0, len(decoded) // 2, len(decoded) - 1):
        k = int(np.argmin([np.linalg.norm((LPS @ ct.affine @ [0, 0, k, 1])[:3]
                                          - frame_position(pm, f))
                           for k in range(ct.array.shape[2])]))  # fmt: skip
        ijk = np.c_[cols.ravel(), rows.ravel(), np.full(rows.size, k)]
        there = world_index(ct.affine, ijk, img.affine)
        expected = logits[tuple(there.T)].reshape(rows.shape)
        assert np.abs(decoded[f] - expected).max() <= precision
    assert np.abs(decoded).max() > 0


def test_a_folder_with_two_series_needs_series(tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(CT5N, folder / "a")
    other = generate_uid()
    for i, path in enumerate(sorted(Path(CT5N).iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = other
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"b{i}.dcm")
    for path in (folder / "a").iterdir():
        path.rename(folder / f"a_{path.name}")
    (folder / "a").rmdir()

    result = invoke("explain", folder, "--finding", "atelectasis", "--out", tmp_path / "o")
    assert_one_line_error(result, "2 DICOM series", other, "--series", code=1)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    result = invoke("explain", folder, "--finding", "atelectasis", "--series", other,
                    "--out", tmp_path / "o", "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert len(report["outputs"]["atelectasis"]) == 1
