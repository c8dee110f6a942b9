"""DICOM input: series selection, enhanced multi-frame, problem series, rescale to HU.

Oracles: pydicom's own reading of the same files (positions, orientations, pixel values with
``apply_modality_lut``) and the phantom arrays and affines the series were written from.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.errors import ScanError
from hirescam3d.io.scans import ScanWarning, read_image, read_scan

SHAPE = (16, 48, 48)  # phantom (slice, row, column)
SPACING = (2.5, 2.0, 2.0)


@pytest.fixture(scope="module")
def phantom():
    return make_chest_ct(3, shape=SHAPE, spacing=SPACING)


def ct_small() -> Path:
    return Path(pydicom.data.get_testdata_file("CT_small.dcm"))


def ct5n() -> Path:
    return Path(os.path.dirname(ct_small())) / "dicomdirtests/98892001/CT5N"


def enhanced_ct() -> Path:
    return Path(pydicom.data.get_testdata_file("eCT_Supplemental.dcm"))


def read(path, **kwargs):
    """read_scan, with the texts of the ScanWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = read_scan(path, **kwargs)
    return scan, [str(w.message) for w in caught if issubclass(w.category, ScanWarning)]


def lps(ras: np.ndarray) -> np.ndarray:
    return np.array([-ras[0], -ras[1], ras[2]])


def write_series(
    folder: Path,
    ct: np.ndarray,
    affine: np.ndarray,
    slices=None,
    names=None,
    series_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    description: str = "phantom chest",
    tilt_deg: float = 0.0,
    rescale=None,
    crop=None,
) -> dict[int, Path]:
    """Write phantom ``ct`` (slice, row, column; int16 HU) as one CT file per slice.

    ``affine`` maps phantom voxel (slice, row, column) to RAS mm. ``slices``: which slices
    to write (in that order); ``names``: file name per slice; ``tilt_deg``: tilt the image
    planes about the left-right axis while the positions stay on the slice axis (gantry
    tilt); ``rescale``: {slice: (slope, intercept)} (default 1, -1024); ``crop``: {slice:
    rows} to write fewer rows. Returns {slice: file}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    frame_uid = "1.2.826.0.1.3680043.8.498.2"
    row_dir = lps(affine[:3, 2]) / np.linalg.norm(affine[:3, 2])  # column index -> +x
    col_dir = lps(affine[:3, 1]) / np.linalg.norm(affine[:3, 1])  # row index -> +y
    if tilt_deg:
        a = np.radians(tilt_deg)
        col_dir = np.array([0.0, np.cos(a), -np.sin(a)])
    written = {}
    for s in range(ct.shape[0]) if slices is None else slices:
        slope, intercept = (rescale or {}).get(s, (1.0, -1024.0))
        image = ct[s][: (crop or {}).get(s, ct.shape[1])]
        stored = np.rint((image.astype(np.float64) - intercept) / slope).astype("<i2")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.SeriesNumber = 2
        ds.InstanceNumber = s + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps(affine @ [s, 0, 0, 1])]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{np.linalg.norm(affine[:3, i]):g}" for i in (1, 2)]
        ds.SliceThickness = f"{np.linalg.norm(affine[:3, 0]):g}"
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored.tobytes()
        path = folder / (names[s] if names else f"IM{s:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        written[s] = path
    return written


def ijk_affine(phantom_affine: np.ndarray) -> np.ndarray:
    """The phantom affine for a (column, row, slice) = (I, J, K) array."""
    return phantom_affine[:, [2, 1, 0, 3]]


# -- real files from pydicom ------------------------------------------------------------------
def test_single_ct_file_values_are_the_modality_lut():
    ds = pydicom.dcmread(ct_small())
    arr, affine, _, files = read_image(ct_small())
    assert arr.shape == (128, 128, 1) and files == [ct_small()]
    expected = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(arr[:, :, 0].T, expected)
    assert expected.min() < -800 and expected.max() > 1000  # HU: air and bone
    np.testing.assert_allclose(lps(affine[:3, 3]), np.array(ds.ImagePositionPatient, float))


def test_ct5n_series_geometry_values_and_source():
    scan, texts = read(ct5n())
    assert texts == [] and scan.array.shape == (16, 16, 5)
    files = sorted(ct5n().iterdir())
    sets = [pydicom.dcmread(f) for f in files]
    iop = np.array(sets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    by_position = [f for _, f in sorted((np.dot(ds.ImagePositionPatient, normal), f)
                                        for ds, f in zip(sets, files, strict=True))]
    assert scan.dicom.files == tuple(by_position) and scan.dicom.on_source_grid
    assert scan.dicom.series_uid == sets[0].SeriesInstanceUID
    assert scan.dicom.study_uid == sets[0].StudyInstanceUID
    assert not scan.dicom.multiframe
    for k, f in enumerate(by_position):
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(scan.array[:, :, k].T, apply_modality_lut(ds.pixel_array, ds))
        np.testing.assert_allclose(
            lps(scan.affine @ [0, 0, k, 1]), np.array(ds.ImagePositionPatient, float), atol=1e-3
        )
    assert -1100 < scan.array.min() < -500 and 0 < scan.array.max() < 3000  # HU-like


def test_enhanced_multiframe_geometry_and_hu(tmp_path):
    path = enhanced_ct()
    scan, texts = read(path)
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert scan.array.shape == (int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames))
    assert texts == []
    assert scan.dicom.files == (path,) and scan.dicom.multiframe and scan.dicom.on_source_grid
    assert scan.dicom.series_uid == ds.SeriesInstanceUID
    assert scan.dicom.frame_of_reference_uid == ds.FrameOfReferenceUID
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    inv = np.linalg.inv(scan.affine)
    pixels = ds.pixel_array
    found = set()
    for f, item in enumerate(frames):
        ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        hu = apply_modality_lut(pixels[f], shared.PixelValueTransformationSequence[0])
        for r, c in [(0, 0), (100, 311), (511, 511), (256, 40), (300, 300)]:
            world = ipp + iop[:3] * dc * c + iop[3:] * dr * r
            ijk = inv @ [-world[0], -world[1], world[2], 1.0]
            np.testing.assert_allclose(ijk[:3], np.rint(ijk[:3]), atol=1e-3)
            i, j, k = np.rint(ijk[:3]).astype(int)
            assert (i, j) == (c, r)
            found.add(int(k))
            assert scan.array[i, j, k] == hu[r, c]
    assert found == {0, 1}
    # HU: air at -1024 and soft tissue present
    assert scan.array.min() == -1024 and np.mean(scan.array > -100) > 0.05
    # the same from a folder holding only that file
    shutil.copy(path, tmp_path / "ect.dcm")
    again, _ = read(tmp_path)
    np.testing.assert_array_equal(again.array, scan.array)
    np.testing.assert_allclose(again.affine, scan.affine)
    assert again.dicom.files == (tmp_path / "ect.dcm",) and again.dicom.multiframe


def test_multiframe_with_two_stacks_or_orientations_is_refused(tmp_path):
    ds = pydicom.dcmread(enhanced_ct())
    ds.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0].StackID = "2"
    ds.save_as(tmp_path / "stacks.dcm")
    with pytest.raises(ScanError, match=r"stacks.dcm: the multi-frame image holds 2 stacks"):
        read_scan(tmp_path / "stacks.dcm")
    ds = pydicom.dcmread(enhanced_ct())
    plane = Dataset()
    plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.PerFrameFunctionalGroupsSequence[1].PlaneOrientationSequence = [plane]
    ds.save_as(tmp_path / "turned.dcm")
    with pytest.raises(ScanError, match=r"turned.dcm: the frames have different orientations: "
                       r"1 has .* 2 \[0.0, 1.0, 0.0, 0.0, 0.0, -1.0\]"):
        read_scan(tmp_path / "turned.dcm")


# -- series written from the phantom ------------------------------------------------------------
def test_shuffled_series_reads_in_slice_order(tmp_path, phantom):
    rng = np.random.default_rng(0)
    order = rng.permutation(SHAPE[0])
    names = {int(s): f"{n:08x}" for s, n in zip(order, rng.integers(0, 2**31, SHAPE[0]),
                                                  strict=True)}
    written = write_series(tmp_path / "s", phantom.ct, phantom.affine, slices=order, names=names)
    scan, texts = read(tmp_path / "s")
    assert texts == []
    np.testing.assert_array_equal(scan.array, phantom.ct.transpose(2, 1, 0))
    np.testing.assert_allclose(scan.affine, ijk_affine(phantom.affine), atol=1e-3)
    assert scan.dicom.files == tuple(written[s] for s in range(SHAPE[0]))
    assert scan.dicom.on_source_grid


def test_missing_slice_warns_and_resamples_to_a_regular_grid(tmp_path, phantom):
    kept = [s for s in range(SHAPE[0]) if s != 7]
    written = write_series(tmp_path / "s", phantom.ct, phantom.affine, slices=kept)
    scan, texts = read(tmp_path / "s")
    z6, z8 = (float(lps(phantom.affine @ [s, 0, 0, 1])[2]) for s in (6, 8))  # normal is +z
    assert len(texts) == 1
    assert texts[0].startswith(
        f"{tmp_path / 's'}: the slices are not evenly spaced: slices {written[6].name} and "
        f"{written[8].name} are 5 mm apart (at {z6:g} and {z8:g} mm along the slice normal), "
        "the others 2.5 mm, so a slice is probably missing; resampled the 15 slices onto a "
        "regular grid of 16 at 2.5 mm"
    )
    assert scan.array.shape == (48, 48, 16) and not scan.dicom.on_source_grid
    np.testing.assert_allclose(scan.affine, ijk_affine(phantom.affine), atol=1e-3)
    expected = phantom.ct.transpose(2, 1, 0).astype(np.float32)
    for k in kept:
        np.testing.assert_array_equal(scan.array[:, :, k], expected[:, :, k])
    np.testing.assert_allclose(
        scan.array[:, :, 7], (expected[:, :, 6] + expected[:, :, 8]) / 2, atol=1e-3
    )
    assert scan.dicom.files == tuple(written[s] for s in kept)


def test_truncated_slice_is_still_refused(tmp_path, phantom):
    written = write_series(tmp_path / "s", phantom.ct, phantom.affine)
    with open(written[5], "r+b") as f:
        f.truncate(written[5].stat().st_size - 100)  # pixel data cut short
    with pytest.raises(ScanError, match=rf"{written[5].name} looks like a DICOM slice of this "
                       r"series but cannot be read \(truncated or corrupt\); without it, slices"):
        read_scan(tmp_path / "s")


def test_two_series_in_one_folder_are_listed_and_chosen_by_uid(tmp_path, phantom):
    a, b = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"
    write_series(tmp_path, phantom.ct, phantom.affine, series_uid=a, description="thin",
                 names={s: f"a{s}" for s in range(SHAPE[0])})
    half = phantom.ct[::2]
    half_affine = phantom.affine @ np.diag([2.0, 1, 1, 1])
    write_series(tmp_path, half, half_affine, series_uid=b, description="thick",
                 names={s: f"b{s}" for s in range(8)})
    with pytest.raises(ScanError) as err:
        read_scan(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: the folder holds 2 DICOM series: {a} ('thin', CT, 16 slices); {b} "
        "('thick', CT, 8 slices); choose one: pass --series UID (series=UID in Python)"
    )
    scan, texts = read(tmp_path, series=b)
    assert texts == [] and scan.dicom.series_uid == b
    np.testing.assert_array_equal(scan.array, half.transpose(2, 1, 0))
    np.testing.assert_allclose(scan.affine, ijk_affine(half_affine), atol=1e-3)
    arr, _, _, files = read_image(tmp_path, series=a)
    np.testing.assert_array_equal(arr, phantom.ct.transpose(2, 1, 0))
    assert sorted(f.name for f in files) == sorted(f"a{s}" for s in range(SHAPE[0]))
    with pytest.raises(ScanError, match=rf"no DICOM series with UID '1.2.3' here; the folder "
                       rf"holds {a} \('thin', CT, 16 slices\); {b} .*--series UID"):
        read_scan(tmp_path, series="1.2.3")


def test_tilted_series_is_refused(tmp_path, phantom):
    written = write_series(tmp_path, phantom.ct, phantom.affine, tilt_deg=12.0)
    with pytest.raises(ScanError) as err:
        read_scan(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: the slices are tilted (gantry tilt): their "
                              "positions run 12 degrees off the slice normal")
    assert written[0].name in message and "dcm2niix" in message


def test_mixed_image_sizes_are_refused(tmp_path, phantom):
    written = write_series(tmp_path, phantom.ct, phantom.affine, crop={9: 40})
    with pytest.raises(ScanError) as err:
        read_scan(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path}: the slices differ in image size: {written[0].name} is 48 x 48 pixels "
        f"(rows x columns), {written[9].name} is 40 x 48; move the slices of one stack"
    )


def test_mixed_orientations_are_refused(tmp_path, phantom):
    written = write_series(tmp_path, phantom.ct, phantom.affine)
    ds = pydicom.dcmread(written[4])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal image in the axial series
    ds.save_as(written[4])
    with pytest.raises(ScanError) as err:
        read_scan(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path}: the slices have different orientations: {written[0].name} has "
        f"ImageOrientationPatient [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], {written[4].name} "
        "[0.0, 1.0, 0.0, 0.0, 0.0, -1.0] (e.g. a localizer or reformats in the series); move"
    )


def test_per_slice_rescale_is_applied(tmp_path, phantom):
    # slice 4 has fractional values: read as integers (ITK's type for the first slice),
    # they would be off by up to 0.75
    rescale = {3: (2.0, -1024.0), 4: (0.5, -1000.25), 10: (1.0, -2048.0)}
    written = write_series(tmp_path, phantom.ct, phantom.affine, rescale=rescale)
    scan, _ = read(tmp_path)
    for k, path in written.items():
        ds = pydicom.dcmread(path)
        np.testing.assert_allclose(
            scan.array[:, :, k].T, apply_modality_lut(ds.pixel_array, ds), atol=1e-4
        )
    np.testing.assert_array_equal(scan.array[:, :, 0], phantom.ct[0].T)  # slope 1: exact HU


def test_series_option_on_files(tmp_path):
    with pytest.raises(ScanError, match=r"belongs to series .*, not '1.2.3'"):
        read_scan(ct_small(), series="1.2.3")
    (tmp_path / "x.nii").write_bytes(b"")
    with pytest.raises(ScanError, match=r"x.nii: --series \(series= in Python\) selects"):
        read_scan(tmp_path / "x.nii", series="1.2.3")


def test_enhanced_frames_with_a_gap_and_per_frame_rescale(tmp_path):
    """Four frames of the enhanced CT at uneven positions, one with its own rescale."""
    import copy

    ds = pydicom.dcmread(enhanced_ct())
    first = ds.pixel_array[0]
    pixels = np.stack([np.roll(first, 37 * f, axis=1) for f in range(4)]).astype(first.dtype)
    zs = [-159.0, -149.0, -129.0, -119.0]  # normal is -z: 159, 149, 129, 119 mm along it
    items = []
    for f, z in enumerate(zs):
        item = copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[0])
        item.PlanePositionSequence[0].ImagePositionPatient = [99.5, -301.5, z]
        item.FrameContentSequence[0].InStackPositionNumber = f + 1
        if f == 2:
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept, own.RescaleType = "0.5", "-1000.5", "HU"
            item.PixelValueTransformationSequence = [own]
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = items
    ds.NumberOfFrames = 4
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "gap.dcm"
    ds.save_as(path)
    scan, texts = read(path)
    assert texts == [
        f"{path}: the frames are not evenly spaced: frames 3 and 2 are 20 mm apart (at 129 "
        "and 149 mm along the slice normal), the others 10 mm, so a frame is probably "
        "missing; resampled the 4 frames onto a regular grid of 5 at 10 mm along the slice "
        "normal (linear interpolation between neighbouring frames); check the series is "
        "complete"
    ]
    assert scan.dicom.frames == (4, 3, 2, 1) and not scan.dicom.on_source_grid
    back = pydicom.dcmread(path)
    shared = back.SharedFunctionalGroupsSequence[0]
    hu = []
    for f, item in enumerate(back.PerFrameFunctionalGroupsSequence):
        rescale = item.get("PixelValueTransformationSequence")
        rescale = rescale or shared.PixelValueTransformationSequence
        hu.append(apply_modality_lut(back.pixel_array[f], rescale[0]))
    assert scan.array.shape == (512, 512, 5)
    for k, f in [(0, 3), (1, 2), (3, 1), (4, 0)]:
        np.testing.assert_array_equal(scan.array[:, :, k].T, hu[f].astype(np.float32))
    np.testing.assert_allclose(scan.array[:, :, 2].T, (hu[2] + hu[1]) / 2, atol=1e-3)
    # the grid: K=0 at the frame at z = -119, 10 mm steps along -z
    np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], [-99.5, 301.5, -119.0, 1], atol=1e-3)
    np.testing.assert_allclose(scan.affine[:3, 2], [0, 0, -10.0], atol=1e-6)
