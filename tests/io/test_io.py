"""Reading scans (every error case), writing explanation NIfTI, reorientation."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from hirescam3d.errors import HiResCAMError, ScanError
from hirescam3d.io import scans as io_scans
from hirescam3d.io.outputs import write_explanation, write_labels
from hirescam3d.io.scans import (
    OutputError,
    ScanWarning,
    read_scan,
    reorient,
    scan_stem,
)


def ct_like(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """A small volume with CT-like intensities (air, soft tissue, bone)."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-800.0, 60.0, shape)
    inner = tuple(slice(n // 4, n - n // 4) for n in shape)
    vol[inner] = rng.normal(40.0, 20.0, vol[inner].shape)
    vol[tuple(n // 2 for n in shape)] = 900.0
    return vol.astype(np.float32)


def oblique_affine(spacing=(0.9, 1.3, 2.7), degrees=(4.0, -3.0, 5.0)) -> np.ndarray:
    """An oblique, LPS-oriented (i -> L, j -> P, k -> S), anisotropic voxel -> RAS affine."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rz @ ry @ rx @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    a[:3, 3] = [12.5, -40.0, 7.25]
    return a


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def pydicom_series_dir() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N"


# -- read_scan: errors ----------------------------------------------------------------------
def test_missing_path(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(ScanError, match="no such file or folder") as err:
        read_scan(path)
    assert str(path) in str(err.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ScanError, match=r"not a supported image file.*\.nii\.gz") as err:
        read_scan(path)
    assert str(path) in str(err.value)


def test_not_an_image_with_nifti_suffix(tmp_path):
    path = tmp_path / "fake.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header" * 3))
    with pytest.raises(ScanError, match="not a readable NIfTI image") as err:
        read_scan(path)
    assert str(path) in str(err.value)


def test_truncated_nifti(tmp_path):
    path = save_nifti(tmp_path / "ct.nii.gz", ct_like((40, 40, 40)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError, match="truncated or corrupt") as err:
        read_scan(path)
    assert str(path) in str(err.value)



def _int16_nifti_bytes(shape=(40, 36, 30)) -> tuple[bytes, np.ndarray]:
    """An uncompressed single-file NIfTI (int16 CT values) and its voxels."""
    data = ct_like(shape).astype(np.int16)
    return nib.Nifti1Image(data, np.eye(4)).to_bytes(), data


def test_gzip_members_read_as_gzip_does(tmp_path):
    """A .nii.gz of several gzip members (as bgzip and some exporters write) reads as
    Python's gzip module and nibabel read it."""
    raw, data = _int16_nifti_bytes()
    cut = [0, 1000, len(raw) // 2, len(raw)]
    path = tmp_path / "members.nii.gz"
    path.write_bytes(b"".join(gzip.compress(raw[a:b]) for a, b in itertools.pairwise(cut)))
    assert gzip.decompress(path.read_bytes()) == raw  # the oracle reads the same bytes
    np.testing.assert_array_equal(read_scan(path).array, nib.load(path).get_fdata())
    np.testing.assert_array_equal(read_scan(path).array, data)


def test_gzip_data_beyond_the_declared_volume_is_not_read(tmp_path):
    """Only the bytes the header declares are decompressed: trailing data in the stream
    (here 50 MB of zeros, 50 kB compressed) is neither read nor an error, as in nibabel."""
    raw, data = _int16_nifti_bytes()
    path = tmp_path / "trailing.nii.gz"
    path.write_bytes(gzip.compress(raw + bytes(50_000_000)))
    np.testing.assert_array_equal(read_scan(path).array, data)
    np.testing.assert_array_equal(nib.load(path).get_fdata(), data)



def _variant(kind: str) -> nib.Nifti1Image:
    """A small int16 CT stored the ways exporters store it."""
    data, affine = ct_like((30, 28, 26)).astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])
    if kind == "nifti2":
        return nib.Nifti2Image(data, affine)
    if kind == "big_endian":
        return nib.Nifti1Image(data.astype(">i2"), affine, nib.Nifti1Header(endianness=">"))
    if kind == "uint16":
        return nib.Nifti1Image((data.astype(np.int32) + 2000).astype(np.uint16), affine)
    if kind == "float64":
        return nib.Nifti1Image(data * 1.5, affine)
    img = nib.Nifti1Image(data, affine)
    if kind == "scaled":
        img.header.set_slope_inter(0.5, -1024.0)
    if kind == "extension":  # the voxels start after a header extension
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"exported by a scanner" * 9))
    return img


@pytest.mark.parametrize(
    "kind", ["plain", "nifti2", "big_endian", "uint16", "float64", "scaled", "extension"]
)
def test_gzip_variants_read_as_nibabel_reads_them(tmp_path, kind):
    """Every stored form gives nibabel's own float32 voxels, C-ordered; a scan read ahead
    (read_stored) keeps an unscaled int16 volume as stored and finishes to the same
    array."""
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(_variant(kind), str(path))
    expected = nib.load(path).get_fdata(dtype=np.float32)
    scan = read_scan(path)
    assert scan.array.dtype == np.float32 and scan.array.flags.c_contiguous
    np.testing.assert_array_equal(scan.array, expected)
    stored = io_scans.read_stored(path)
    if kind in ("plain", "extension"):  # an unscaled int16 CT: 2 bytes per voxel held
        assert stored.array.dtype == np.int16
    np.testing.assert_array_equal(io_scans.finish_scan(stored).array, expected)



@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_float32_c_copies_in_slabs_as_numpy_converts(order, dtype):
    """The slab-wise reordering copy equals NumPy's conversion for a volume whose second
    axis spans several slabs and a remainder (70 rows of 1000: slabs of 4)."""
    rng = np.random.default_rng(3)
    data = np.asarray(rng.normal(0, 90, (5, 70, 1000)), dtype=dtype, order=order)
    out = io_scans._float32_c(data)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.ascontiguousarray(data, dtype=np.float32))


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<u4", "<i2"])
def test_float32_c_puts_the_voxels_in_the_array_it_is_given(dtype):
    """With ``empty``, the voxels always land in the array it gives (a batch's kept
    memory), even when already C-ordered float32; without, such an array is returned as
    it is. Values as NumPy converts them."""
    data = np.asarray(np.arange(6 * 7 * 8).reshape(6, 7, 8) % 300, dtype=dtype)
    given = []

    def empty(shape):
        given.append(np.empty(shape, np.float32))
        return given[-1]

    out = io_scans._float32_c(data, empty)
    assert out is given[0] and out.flags.c_contiguous
    np.testing.assert_array_equal(out, data.astype(np.float32))
    if dtype == "<f4":
        assert io_scans._float32_c(data) is data


def test_an_uncompressed_scan_read_ahead_holds_its_voxels(tmp_path):
    """read_stored reads the voxels of a .nii now (no memory map): the file rewritten in
    place afterwards does not change what finish_scan gives."""
    data = ct_like((30, 28, 26)).astype(np.int16)
    path = save_nifti(tmp_path / "plain.nii", data)
    stored = io_scans.read_stored(path)
    with open(path, "r+b") as f:  # every voxel byte overwritten in place
        f.seek(352)
        f.write(bytes(data.nbytes))
    np.testing.assert_array_equal(io_scans.finish_scan(stored).array, data)


@pytest.mark.parametrize("where", ["data", "crc"])
def test_corrupt_gzip_data(tmp_path, where):
    """Damaged voxel data after an intact header, or a damaged CRC: one line naming the
    file (nibabel alone returns the damaged voxels without a word)."""
    raw, _ = _int16_nifti_bytes()
    packed = bytearray(gzip.compress(raw))
    at = len(packed) // 2 if where == "data" else len(packed) - 8
    packed[at : at + 4] = bytes(4) if where == "data" else bytes(b ^ 1 for b in packed[at : at + 4])
    path = tmp_path / "damaged.nii.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(OSError):  # the oracle: Python's gzip module refuses it too
        gzip.decompress(bytes(packed))
    with pytest.raises(ScanError, match="truncated or corrupt") as err:
        read_scan(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1), (1, 16, 16)])
def test_2d_image(tmp_path, shape):
    path = save_nifti(tmp_path / "slice.nii.gz", ct_like((16, 16, 1)).reshape(shape))
    with pytest.raises(ScanError, match="the image is 2D") as err:
        read_scan(path)
    assert "3D volume" in str(err.value)


def test_4d_image(tmp_path):
    path = save_nifti(tmp_path / "series.nii.gz", np.stack([ct_like()] * 3, axis=-1))
    with pytest.raises(ScanError, match=r"the image is 4D with shape \(12, 10, 8, 3\)"):
        read_scan(path)


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    vol = ct_like()
    path = save_nifti(tmp_path / "one.nii.gz", vol[..., None])
    scan = read_scan(path)
    assert scan.array.shape == vol.shape
    np.testing.assert_array_equal(scan.array, vol)


@pytest.mark.parametrize("bad,word", [(np.nan, "2 NaN and 0 infinite"), (np.inf, "0 NaN and 2")])
def test_non_finite_voxels(tmp_path, bad, word):
    vol = ct_like()
    vol[1, 1, 1] = vol[2, 2, 2] = bad
    path = save_nifti(tmp_path / "bad.nii.gz", vol)
    with pytest.raises(ScanError, match=word) as err:
        read_scan(path)
    assert str(path) in str(err.value)


def test_constant_volume(tmp_path):
    path = save_nifti(tmp_path / "flat.nii.gz", np.full((8, 8, 8), -1000.0, np.float32))
    with pytest.raises(ScanError, match=r"constant \(every voxel is -1000\)"):
        read_scan(path)


@pytest.mark.parametrize(
    "lo,hi,reason",
    [(0.0, 1.0, "0..1"), (0.0, 255.0, "0..255"), (-900.0, -50.0, "maximum is below 0"),
     (-100.0, 3000.0, "minimum is above -500")],
)
def test_non_hu_intensities_warn(tmp_path, lo, hi, reason):
    vol = np.linspace(lo, hi, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    path = save_nifti(tmp_path / "mr.nii.gz", vol)
    with pytest.warns(ScanWarning, match="do not look like Hounsfield units") as record:
        scan = read_scan(path)
    assert reason in str(record[0].message)
    assert scan.warnings and reason in scan.warnings[0]


def test_hu_volume_reads_without_warning(tmp_path):
    path = save_nifti(tmp_path / "ct.nii.gz", ct_like())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanWarning)
        scan = read_scan(path)
    assert scan.warnings == []


# -- read_scan: formats and geometry --------------------------------------------------------
def test_nifti_geometry_is_the_files(tmp_path):
    vol = ct_like().astype(np.int16)
    affine = oblique_affine()
    path = save_nifti(tmp_path / "scan.nii.gz", vol, affine)
    scan = read_scan(path)
    ref = nib.load(str(path))
    assert scan.array.dtype == np.float32 and scan.array.shape == vol.shape
    np.testing.assert_array_equal(scan.array, vol)
    np.testing.assert_array_equal(scan.affine, ref.affine)
    assert scan.axcodes == "LPS"
    np.testing.assert_allclose(scan.spacing, (0.9, 1.3, 2.7), atol=1e-5)
    assert scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert scan.header is not None and scan.path == path


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_match_nifti_reading(tmp_path, suffix):
    """The same ITK image written as NRRD/MHA and as NIfTI (by ITK) reads identically."""
    vol = ct_like((7, 9, 11)).astype(np.int16)  # numpy (z, y, x)
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-30.0, 12.0, 85.0))
    c, s = np.cos(np.deg2rad(7)), np.sin(np.deg2rad(7))
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    itk = read_scan(tmp_path / f"scan{suffix}")
    nifti = read_scan(tmp_path / "scan.nii.gz")
    assert itk.array.shape == (11, 9, 7)  # x, y, z
    np.testing.assert_array_equal(itk.array, nifti.array)
    np.testing.assert_array_equal(itk.array, vol.transpose(2, 1, 0))
    np.testing.assert_allclose(itk.affine, nifti.affine, atol=1e-4)
    assert itk.header is None


def test_dicom_series_folder():
    folder = pydicom_series_dir()
    import pydicom

    scan = read_scan(folder)
    assert scan.array.shape == (16, 16, 5)
    np.testing.assert_allclose(scan.spacing, (0.488281, 0.488281, 2.5), atol=1e-5)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    expected_sha = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    assert scan.sha256 == expected_sha
    inv = np.linalg.inv(scan.affine)
    for f in files:  # every pixel of every slice lands at its DICOM world position
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in [(0, 0), (3, 11), (15, 15), (9, 2)]:
            lps = ipp + iop[:3] * dc * c + iop[3:] * dr * r
            ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
            i, j, k = np.rint(inv @ ras)[:3].astype(int)
            assert scan.array[i, j, k] == hu[r, c]


def test_single_dicom_slice_is_2d():
    import pydicom.data

    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    with pytest.raises(ScanError, match="the image is 2D") as err:
        read_scan(path)
    assert "folder holding all slices" in str(err.value)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ScanError, match="holds no DICOM series"):
        read_scan(tmp_path)


def test_scan_stem():
    assert scan_stem("a/b/ct.nii.gz") == "ct"
    assert scan_stem("ct.NII") == "ct"
    assert scan_stem("x/lung.nrrd") == "lung"
    assert scan_stem("x/series_01") == "series_01"


# -- writing --------------------------------------------------------------------------------
def test_explanation_header_contract(tmp_path):
    src = save_nifti(tmp_path / "scan.nii.gz", ct_like().astype(np.int16), oblique_affine())
    scan = read_scan(src)
    vol = np.random.default_rng(1).random(scan.array.shape).astype(np.float64)
    out = write_explanation(tmp_path / "out.nii.gz", vol, scan.affine, "hirescam", scan.header)
    img = nib.load(str(out))
    hdr = img.header
    assert img.shape == scan.array.shape
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, scan.affine)
    sform, scode = hdr.get_sform(coded=True)
    qform, qcode = hdr.get_qform(coded=True)
    assert int(scode) == 1 and int(qcode) == 1
    np.testing.assert_array_equal(sform, scan.affine)
    np.testing.assert_allclose(qform, scan.affine, atol=1e-4)
    assert hdr.get_intent() == ("estimate", (), "hirescam")
    assert float(hdr["cal_min"]) == 0.0 and float(hdr["cal_max"]) == 1.0
    assert hdr.get_xyzt_units()[0] == "mm"
    slope, inter = hdr.get_slope_inter()
    assert slope is None and inter is None  # no scaling for viewers to apply
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz", "scan.nii.gz"]


def test_explanation_refuses_overwrite_and_force(tmp_path):
    path = tmp_path / "map.nii.gz"
    vol = np.zeros((4, 5, 6), np.float32)
    write_explanation(path, vol, np.eye(4), "gradcam")
    before = path.read_bytes()
    with pytest.raises(OutputError, match="already exists; use --force") as err:
        write_explanation(path, vol + 0.5, np.eye(4), "gradcam")
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    write_explanation(path, vol + 0.5, np.eye(4), "gradcam", force=True)
    assert np.allclose(nib.load(str(path)).get_fdata(), 0.5)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from hirescam3d.io import outputs

    def broken_write(path, pieces, level):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "write_gzip", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_explanation(tmp_path / "map.nii.gz", np.zeros((3, 3, 3)), np.eye(4), "cam")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_explanation(folder / "m.nii.gz", np.zeros((3, 3, 3)), np.eye(4), "cam")
    finally:
        folder.chmod(0o700)


def test_write_rejects_bad_geometry(tmp_path):
    with pytest.raises(HiResCAMError, match="3D"):
        write_explanation(tmp_path / "m.nii.gz", np.zeros((3, 3)), np.eye(4), "cam")
    with pytest.raises(HiResCAMError, match="4x4"):
        write_explanation(tmp_path / "m.nii.gz", np.zeros((3, 3, 3)), np.eye(3), "cam")


def test_labels_contract(tmp_path):
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 2:5, 3:7] = 2
    labels[4, 4, 4] = 6
    affine = oblique_affine()
    out = write_labels(tmp_path / "organs.nii.gz", labels, affine)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)
    with pytest.raises(OutputError):
        write_labels(tmp_path / "organs.nii.gz", labels, affine)


# -- reorient ---------------------------------------------------------------------------------
@pytest.mark.parametrize("codes", ["SPL", "RAS", "LPS", "IAR"])
def test_reorient_keeps_world_positions(codes):
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = oblique_affine()
    out, new_affine = reorient(vol, affine, codes)
    assert "".join(nib.aff2axcodes(new_affine)) == codes
    inv = np.linalg.inv(new_affine)
    for idx in [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2, 0, 5)]:
        world = affine @ np.array([*idx, 1.0])
        new_idx = tuple(np.rint(inv @ world)[:3].astype(int))
        assert out[new_idx] == vol[idx]


def test_output_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create output folder"):
        write_explanation(blocker / "sub" / "m.nii.gz", np.zeros((3, 3, 3)), np.eye(4), "cam")
