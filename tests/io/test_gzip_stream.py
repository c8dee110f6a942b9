"""The fast parallel gzip writer (issue 25): files read back bit-exact by independent
readers (the standard library's gzip, the gzip program, nibabel, SimpleITK)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from hirescam3d.io import gzip_stream, outputs

AFFINE = np.diag([0.7, 0.8, 1.5, 1.0])


def _map(shape, seed):
    """A map like the pipeline's: F-ordered float32 in [0, 1], zero outside a blob."""
    rng = np.random.default_rng(seed)
    volume = np.zeros(shape, np.float32, order="F")
    i, j, k = (s // 4 for s in shape)
    volume[i : 3 * i, j : 3 * j, k : 3 * k] = rng.random((2 * i, 2 * j, 2 * k), np.float32)
    return volume


@pytest.mark.parametrize("backend", ["isal", "zlib"])
@pytest.mark.parametrize("level", [0, 1, 4, 6, 9])
def test_pieces_make_one_standard_gzip_member(tmp_path, backend, level):
    rng = np.random.default_rng(level)
    pieces = [b"", rng.integers(0, 4, 70_001, np.uint8).tobytes(), b"",
              rng.random(5000).astype("<f4").tobytes(), b"\x00" * 100_000, b"x"]  # fmt: skip
    path = tmp_path / "p.gz"
    gzip_stream.write_gzip(path, iter(pieces), level, backend=backend)
    raw = path.read_bytes()
    assert gzip.decompress(raw) == b"".join(pieces)
    # exactly one member: a raw inflate of the body ends at the 8-byte trailer
    inflate = zlib.decompressobj(-15)
    assert inflate.decompress(raw[10:]) == b"".join(pieces)
    assert inflate.eof and len(inflate.unused_data) == 8
    gunzip = shutil.which("gzip")
    if gunzip:  # the gzip program (zlib's own inflate) checks the CRC and length too
        out = subprocess.run([gunzip, "-dc", str(path)], capture_output=True, check=True)
        assert out.stdout == b"".join(pieces)


def test_empty_input_and_bad_arguments(tmp_path):
    gzip_stream.write_gzip(tmp_path / "e.gz", iter([]), 1)
    assert gzip.decompress((tmp_path / "e.gz").read_bytes()) == b""
    with pytest.raises(ValueError, match="backend"):
        gzip_stream.write_gzip(tmp_path / "b.gz", [b"a"], 1, backend="lz4")
    with pytest.raises(ValueError, match="0..9"):
        gzip_stream.write_gzip(tmp_path / "c.gz", [b"a"], 10, backend="isal")


def test_isal_is_the_default_backend():
    """isal is a dependency: without it the writer would silently fall back to zlib."""
    import isal  # noqa: F401

    assert gzip_stream.BACKEND == "isal"


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_float32_maps_read_back_bit_exact(tmp_path, monkeypatch, backend):
    """Many small blocks (so many deflate pieces and threads), read by three readers."""
    monkeypatch.setattr(outputs, "_BLOCK", 40 * 36 * 4 * 3)  # 3 slices a piece
    monkeypatch.setattr(gzip_stream, "BACKEND", backend)
    volume = _map((40, 36, 50), seed=3)
    path = outputs.write_map(tmp_path / "m.nii.gz", volume, AFFINE, "hirescam")

    with gzip.open(path, "rb") as f:
        data = f.read()
    assert len(data) == 352 + volume.nbytes
    assert data[352:] == np.asarray(volume, "<f4").tobytes(order="F")

    img = nib.load(str(path))
    back = np.asarray(img.dataobj)
    assert back.dtype == np.float32 and np.array_equal(back, volume)
    assert np.allclose(img.affine, AFFINE)

    itk = sitk.ReadImage(str(path))
    assert itk.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), volume)


def test_integer_maps_read_back_by_simpleitk(tmp_path, monkeypatch):
    """uint8 display maps are deflated at zlib level 6 (zlib itself): same values back."""
    monkeypatch.setattr(outputs, "_BLOCK", 32 * 30 * 2)
    volume = _map((32, 30, 20), seed=5)
    path = outputs.write_map(tmp_path / "u.nii.gz", volume, AFFINE, "gradcam", dtype="uint8")
    expected = np.rint(volume * 255).astype(np.uint8)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    # ITK applies scl_slope = 1/255 (stored as float32)
    assert np.allclose(itk, expected * np.float32(1 / 255), atol=1e-6)
    assert np.array_equal(np.asarray(nib.load(str(path)).dataobj.get_unscaled()), expected)
