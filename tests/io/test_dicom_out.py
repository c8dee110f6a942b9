"""DICOM outputs (hirescam3d.io.dicom_write): Parametric Maps, Segmentations and CT series.

Oracles: positions and orientations are read back with pydicom from the source slices
(or computed from the affine given to the writer), SEG frames are compared with numpy
thresholding, map values with the input array; decoded values use the standard DICOM
real-world value formula and the precision stated in the module docstring.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.errors import HiResCAMError
from hirescam3d.io import dicom_write as dicom_out
from hirescam3d.io.dicom import DicomSource
from hirescam3d.io.scans import OutputError, read_scan, reorient

CT5N = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/98892001/CT5N"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
TOL_MM = 1e-3
UNIT_PRECISION = 0.5 / 65535


# -- helpers (independent of the code under test) ----------------------------------------
def source_slices(folder: Path) -> dict[str, pydicom.Dataset]:
    """The slices of a series folder, by SOPInstanceUID (read with pydicom)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def frame_group(ds: pydicom.Dataset, index: int, keyword: str) -> pydicom.Dataset:
    frame = ds.PerFrameFunctionalGroupsSequence[index]
    group = frame if keyword in frame else ds.SharedFunctionalGroupsSequence[0]
    return group[keyword][0]


def frame_position(ds: pydicom.Dataset, index: int) -> np.ndarray:
    return np.array(frame_group(ds, index, "PlanePositionSequence").ImagePositionPatient, float)


def frame_orientation(ds: pydicom.Dataset, index: int) -> np.ndarray:
    item = frame_group(ds, index, "PlaneOrientationSequence")
    return np.array(item.ImageOrientationPatient, float)


def frame_refs(ds: pydicom.Dataset, index: int) -> list[pydicom.Dataset]:
    frame = ds.PerFrameFunctionalGroupsSequence[index]
    return [
        src for der in frame.get("DerivationImageSequence", [])
        for src in der.get("SourceImageSequence", [])
    ]


def k_of_position(affine: np.ndarray, position: np.ndarray, n_k: int) -> int:
    """The K index whose plane origin (voxel (0, 0, k), LPS) is ``position``."""
    origins = np.array([(LPS @ affine @ [0, 0, k, 1])[:3] for k in range(n_k)])
    distance = np.linalg.norm(origins - position, axis=1)
    k = int(np.argmin(distance))
    assert distance[k] < TOL_MM, f"frame at {position} is on no K plane of the map"
    return k


def decoded_frames(ds: pydicom.Dataset) -> np.ndarray:
    """Real-world values of every frame: stored * slope + intercept (DICOM RWV mapping)."""
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    stored = ds.pixel_array.astype(np.float64).reshape(-1, ds.Rows, ds.Columns)
    return stored * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept


def rwv_unit(ds: pydicom.Dataset) -> tuple[str, str]:
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    return str(unit.CodingSchemeDesignator), str(unit.CodeValue)


@pytest.fixture(scope="module")
def ct5n():
    return read_scan(CT5N)


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    phantom = make_chest_ct(3, shape=(16, 48, 48), spacing=(2.5, 2.0, 2.0))
    folder = tmp_path_factory.mktemp("phantom") / "ct"
    source = dicom_out.write_ct_series(folder, phantom.ct, phantom.affine)
    return phantom, folder, source


def check_on_source_grid(ds, values, affine, slices, precision):
    """Each frame references its source slice, sits where that slice sits, and holds the
    map's plane of that slice's K (K found from the scan's affine)."""
    n_k = values.shape[2]
    assert int(ds.NumberOfFrames) == n_k
    decoded = decoded_frames(ds)
    referenced = []
    for f in range(n_k):
        refs = frame_refs(ds, f)
        assert len(refs) == 1
        assert refs[0].SpatialLocationsPreserved == "YES"
        src = slices[str(refs[0].ReferencedSOPInstanceUID)]
        referenced.append(str(refs[0].ReferencedSOPInstanceUID))
        position = frame_position(ds, f)
        assert np.abs(position - np.array(src.ImagePositionPatient, float)).max() < TOL_MM
        assert np.allclose(frame_orientation(ds, f), np.array(src.ImageOrientationPatient, float),
                           atol=1e-6)
        k = k_of_position(affine, position, n_k)
        if precision is not None:
            assert np.abs(decoded[f] - values[:, :, k].T).max() <= precision
    assert sorted(referenced) == sorted(slices)


# -- parametric maps on a real CT series -------------------------------------------------
def test_pm_unit_on_real_series_references_slices_and_round_trips(ct5n, tmp_path):
    n_i, n_j, n_k = ct5n.array.shape
    i, j, k = np.meshgrid(np.arange(n_i), np.arange(n_j), np.arange(n_k), indexing="ij")
    values = ((i + n_i * j + n_i * n_j * k) / (n_i * n_j * n_k)).astype(np.float32)
    path = dicom_out.write_parametric_map(
        tmp_path / "pm.dcm", values, ct5n.affine, ct5n.dicom,
        finding="nodule", method="hirescam", version="0.1.0",
    )
    ds = pydicom.dcmread(path)
    slices = source_slices(CT5N)
    first = next(iter(slices.values()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    assert ds.SeriesDescription == "hirescam3d: nodule (hirescam)"
    check_on_source_grid(ds, values, ct5n.affine, slices, UNIT_PRECISION + 1e-12)
    assert rwv_unit(ds) == ("UCUM", "1")
    quantity = (ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
                .QuantityDefinitionSequence[0].ConceptCodeSequence[0])
    assert (quantity.CodingSchemeDesignator, quantity.CodeValue) == ("DCM", "130402")
    assert ds.ManufacturerModelName == "hirescam3d hirescam"
    assert ds.SoftwareVersions == "0.1.0"


def test_pm_logit_round_trips_negative_values(ct5n, tmp_path):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(ct5n.array.shape) * 1e-3).astype(np.float32)
    values[0, 0, :] = 0.0
    path = dicom_out.write_parametric_map(
        tmp_path / "logit.dcm", values, ct5n.affine, ct5n.dicom, finding="effusion",
        method="hirescam", values_kind="logit", version="0.1.0",
    )
    ds = pydicom.dcmread(path)
    precision = float(np.abs(values).max()) / 65534 * (1 + 1e-9)
    check_on_source_grid(ds, values, ct5n.affine, source_slices(CT5N), precision)
    decoded = decoded_frames(ds)
    assert decoded.min() < 0 < decoded.max()
    assert (decoded[:, 0, 0] == 0.0).all()  # zero is stored exactly
    assert rwv_unit(ds) == ("UCUM", "{logit}/{voxel}")


def test_pm_off_source_grid_references_frame_of_reference_only(ct5n, tmp_path):
    source = dataclasses.replace(ct5n.dicom, on_source_grid=False)  # e.g. a resampled read
    values = np.full(ct5n.array.shape, 0.25, np.float32)
    path = dicom_out.write_parametric_map(
        tmp_path / "pm.dcm", values, ct5n.affine, source, finding="f", method="gradcam",
        version="1",
    )
    ds = pydicom.dcmread(path)
    first = next(iter(source_slices(CT5N).values()))
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    origins = {tuple(np.round((LPS @ ct5n.affine @ [0, 0, k, 1])[:3], 3)) for k in range(5)}
    for f in range(int(ds.NumberOfFrames)):
        assert frame_refs(ds, f) == []
        assert tuple(np.round(frame_position(ds, f), 3)) in origins
    assert np.abs(decoded_frames(ds) - 0.25).max() <= UNIT_PRECISION


def test_pm_on_multiframe_source_references_frames(tmp_path):
    path = Path(pydicom.data.get_testdata_file("eCT_Supplemental.dcm"))
    src = pydicom.dcmread(path, stop_before_pixels=True)
    # The map's affine, from the source frames (pydicom): I along the row cosine.
    iop = np.array(frame_orientation(src, 0))
    dr, dc = (float(x) for x in frame_group(src, 0, "PixelMeasuresSequence").PixelSpacing)
    p0, p1 = frame_position(src, 0), frame_position(src, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * dc, iop[3:] * dr, p1 - p0, p0
    affine = LPS @ lps
    source = DicomSource.from_files([path], multiframe=True)
    values = np.zeros((int(src.Columns), int(src.Rows), 2), np.float32)
    values[:, :, 1] = 1.0
    out = dicom_out.write_parametric_map(
        tmp_path / "pm.dcm", values, affine, source, finding="f", method="cam", version="1"
    )
    ds = pydicom.dcmread(out)
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    decoded = decoded_frames(ds)
    for f in range(2):
        (ref,) = frame_refs(ds, f)
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        number = int(ref.ReferencedFrameNumber)
        assert np.abs(frame_position(ds, f) - frame_position(src, number - 1)).max() < TOL_MM
        assert np.allclose(decoded[f], number - 1)  # frame 2 (k = 1) holds the ones


# -- CT series from a NIfTI-like volume --------------------------------------------------
def test_ct_series_round_trips_phantom(phantom_series):
    phantom, folder, source = phantom_series
    scan = read_scan(folder)
    # Same voxels in the same places: compare in a common orientation.
    got, got_affine = reorient(scan.array, scan.affine, "RAS")
    want, want_affine = reorient(phantom.ct.astype(np.float32), phantom.affine, "RAS")
    assert np.abs(got_affine - want_affine).max() < 1e-3
    assert np.array_equal(got, want)
    assert scan.dicom.study_uid == source.study_uid
    assert scan.dicom.frame_of_reference_uid == source.frame_of_reference_uid
    # Files are in K order of the written array.
    for k, path in enumerate(source.files):
        ds = pydicom.dcmread(path)
        origin = (LPS @ phantom.affine @ [0, 0, k, 1])[:3]
        assert np.abs(np.array(ds.ImagePositionPatient, float) - origin).max() < TOL_MM
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, phantom.ct[:, :, k].T)
        assert ds.Modality == "CT" and ds.SeriesInstanceUID == source.series_uid


def test_pm_on_phantom_series_and_on_coarse_model_grid(phantom_series, tmp_path):
    phantom, folder, source = phantom_series
    rng = np.random.default_rng(2)
    values = rng.random(phantom.ct.shape).astype(np.float32)
    path = dicom_out.write_parametric_map(
        tmp_path / "fine.dcm", values, phantom.affine, source, finding="nodule",
        method="hirescam", version="0.1.0",
    )
    check_on_source_grid(pydicom.dcmread(path), values, phantom.affine, source_slices(folder),
                         UNIT_PRECISION + 1e-12)

    coarse = phantom.affine @ np.diag([4.0, 8.0, 8.0, 1.0])
    coarse[:3, 3] = (phantom.affine @ [1.5, 3.5, 3.5, 1])[:3]
    small = rng.random((4, 6, 6)).astype(np.float32)
    path = dicom_out.write_parametric_map(
        tmp_path / "coarse.dcm", small, coarse, source, finding="nodule",
        method="hirescam", version="0.1.0",
    )
    ds = pydicom.dcmread(path)
    assert ds.FrameOfReferenceUID == source.frame_of_reference_uid
    assert ds.StudyInstanceUID == source.study_uid
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (6, 4, 6)
    lps = LPS @ coarse
    row = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    decoded = decoded_frames(ds)
    seen = set()
    for f in range(6):
        assert frame_refs(ds, f) == []
        assert np.allclose(frame_orientation(ds, f), np.concatenate([row, col]), atol=1e-6)
        k = k_of_position(coarse, frame_position(ds, f), 6)
        seen.add(k)
        assert np.abs(decoded[f] - small[:, :, k].T).max() <= UNIT_PRECISION + 1e-12
    assert seen == set(range(6))
    spacing = np.array(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing,
                       float)
    assert np.allclose(spacing, [np.linalg.norm(lps[:3, 1]), np.linalg.norm(lps[:3, 0])])


# -- segmentation ------------------------------------------------------------------------
def test_seg_frames_match_numpy_threshold(ct5n, tmp_path):
    values = np.random.default_rng(3).random(ct5n.array.shape).astype(np.float32)
    values[:, :, 2] = 0.0  # one slice without any voxel above the threshold
    path = dicom_out.write_segmentation(
        tmp_path / "seg.dcm", values, ct5n.affine, ct5n.dicom, threshold=0.8,
        finding="nodule", method="hirescam", version="0.1.0",
    )
    ds = pydicom.dcmread(path)
    slices = source_slices(CT5N)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == next(iter(slices.values())).FrameOfReferenceUID
    segment = ds.SegmentSequence[0]
    assert "nodule" in segment.SegmentLabel and "hirescam" in segment.SegmentLabel
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == (
        "hirescam3d hirescam"
    )
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    written = set()
    for f in range(int(ds.NumberOfFrames)):
        (ref,) = frame_refs(ds, f)
        src = slices[str(ref.ReferencedSOPInstanceUID)]
        position = frame_position(ds, f)
        assert np.abs(position - np.array(src.ImagePositionPatient, float)).max() < TOL_MM
        k = k_of_position(ct5n.affine, position, values.shape[2])
        written.add(k)
        assert np.array_equal(frames[f].astype(bool), (values[:, :, k] >= 0.8).T)
    for k in set(range(values.shape[2])) - written:  # omitted frames are empty
        assert not (values[:, :, k] >= 0.8).any()
    assert 2 not in written


def test_seg_all_below_threshold_is_an_empty_segment(ct5n, tmp_path):
    values = np.full(ct5n.array.shape, 0.1, np.float32)
    path = dicom_out.write_segmentation(
        tmp_path / "seg.dcm", values, ct5n.affine, ct5n.dicom, threshold=0.5,
        finding="nodule", method="hirescam", version="0.1.0",
    )
    ds = pydicom.dcmread(path)
    assert len(ds.SegmentSequence) == 1
    assert int(ds.NumberOfFrames) == values.shape[2]
    assert not ds.pixel_array.any()


# -- errors and atomic writes ------------------------------------------------------------
def test_sheared_in_plane_grid_is_refused(ct5n, tmp_path):
    sheared = ct5n.affine.copy()
    sheared[0, 1] = 0.1  # J axis tilts towards I: non-rectangular pixels
    with pytest.raises(dicom_out.DicomOutputError, match="perpendicular"):
        dicom_out.write_parametric_map(
            tmp_path / "pm.dcm", np.zeros(ct5n.array.shape, np.float32), sheared, ct5n.dicom,
            finding="f", method="m", version="1",
        )
    assert list(tmp_path.iterdir()) == []
    assert issubclass(dicom_out.DicomOutputError, HiResCAMError)


def test_existing_output_needs_force(ct5n, tmp_path):
    values = np.zeros(ct5n.array.shape, np.float32)
    kwargs = {"finding": "f", "method": "m", "version": "1"}
    path = tmp_path / "pm.dcm"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists"):
        dicom_out.write_parametric_map(path, values, ct5n.affine, ct5n.dicom, **kwargs)
    assert path.read_bytes() == b"old"
    dicom_out.write_parametric_map(path, values, ct5n.affine, ct5n.dicom, force=True, **kwargs)
    assert pydicom.dcmread(path).Modality == "OT"


def test_failed_writes_leave_no_partial_files(ct5n, tmp_path, monkeypatch):
    calls = []

    def failing_save(self, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) >= 3:
            Path(filename).write_bytes(b"partial")
            raise RuntimeError("disk gone")
        return original(self, filename, *args, **kwargs)

    original = pydicom.Dataset.save_as
    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk gone"):
        dicom_out.write_ct_series(out / "ct", np.zeros((8, 8, 5), np.float32), np.eye(4))
    assert len(calls) == 3
    assert list(out.iterdir()) == []  # no series folder, no temporary folder
    with pytest.raises(RuntimeError, match="disk gone"):
        dicom_out.write_parametric_map(
            out / "pm.dcm", np.zeros(ct5n.array.shape, np.float32), ct5n.affine, ct5n.dicom,
            finding="f", method="m", version="1",
        )
    assert list(out.iterdir()) == []


def test_ct_series_fractional_hu_and_replacing_a_folder(tmp_path):
    rng = np.random.default_rng(4)
    hu = (rng.random((6, 5, 3)) * 3000 - 1000).astype(np.float32)  # not whole HU
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    folder = tmp_path / "ct"
    source = dicom_out.write_ct_series(folder, hu, affine)
    precision = (float(hu.max()) - float(hu.min())) / 65534 / 2 * (1 + 1e-6)
    for k, path in enumerate(source.files):
        ds = pydicom.dcmread(path)
        got = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(got - hu[:, :, k].T).max() <= precision
        assert np.allclose(np.array(ds.PixelSpacing, float), [0.9, 0.8])
        assert float(ds.SliceThickness) == pytest.approx(3.0)
    with pytest.raises(OutputError, match="force"):
        dicom_out.write_ct_series(folder, hu, affine)
    again = dicom_out.write_ct_series(folder, hu[:, :, :2], affine, force=True)
    assert sorted(folder.iterdir()) == sorted(again.files)  # the old series is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not DICOM"):
        dicom_out.write_ct_series(folder, hu, affine, force=True)
