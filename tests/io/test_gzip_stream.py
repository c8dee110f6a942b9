"""The fast parallel gzip writer and the GIL-free reader (issue 25): files read back
bit-exact by independent readers (the standard library's gzip, the gzip program, nibabel,
SimpleITK), and gzip files of theirs read as they read them."""

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


# -- reading ----------------------------------------------------------------------------------
def _payload(n=3_000_000, seed=0) -> bytes:
    """Bytes that compress like a CT: runs and noise."""
    rng = np.random.default_rng(seed)
    return (np.repeat(rng.integers(-1000, 1000, n // 50, dtype=np.int16), 25)).tobytes()


def _read_all(path) -> bytes:
    with gzip_stream.GzipReader(path) as reader:
        parts = []
        while chunk := reader.read(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("members", [1, 3])
def test_reader_gives_what_gzip_gives(tmp_path, members, monkeypatch):
    """Every member, across input refills (forced small here), as the gzip module reads."""
    monkeypatch.setattr(gzip_stream.GzipReader, "_INPUT", 4096)
    data = _payload()
    cuts = np.linspace(0, len(data), members + 1).astype(int)
    path = tmp_path / "x.gz"
    path.write_bytes(b"".join(gzip.compress(data[a:b]) for a, b in zip(cuts, cuts[1:],
                                                                         strict=False)))
    assert gzip.decompress(path.read_bytes()) == data  # the oracle
    assert _read_all(path) == data
    with gzip_stream.GzipReader(path) as reader:  # small reads from large inflates
        assert b"".join(reader.read(7) for _ in range(143)) == data[:1001]


def test_reader_seeks_forward_only(tmp_path):
    data = _payload()
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(data))
    with gzip_stream.GzipReader(path) as reader:
        assert reader.seek(1_000_001) == 1_000_001
        assert reader.read(10) == data[1_000_001:1_000_011]
        assert reader.seek(5, 1) == 1_000_016 and reader.read(3) == data[1_000_016:1_000_019]
        with pytest.raises(OSError, match="forward only"):
            reader.seek(0)


def test_reader_stops_at_zero_padding_and_refuses_a_bad_crc(tmp_path):
    """Zero padding after the last member ends the data (``gzip -d`` ignores it too); a
    damaged CRC raises one of INFLATE_ERRORS, as the gzip module refuses it."""
    data = _payload(200_000)
    padded = tmp_path / "padded.gz"
    padded.write_bytes(gzip.compress(data) + bytes(512))
    assert _read_all(padded) == data
    if shutil.which("gzip"):
        run = subprocess.run(["gzip", "-dc", str(padded)], capture_output=True, check=False)
        assert run.stdout == data
    packed = bytearray(gzip.compress(data))
    packed[-8] ^= 0xFF
    bad = tmp_path / "bad.gz"
    bad.write_bytes(bytes(packed))
    with pytest.raises(OSError):
        gzip.decompress(bytes(packed))
    with pytest.raises(gzip_stream.INFLATE_ERRORS):
        _read_all(bad)
