"""hirescam3d.data.sample.write_sample: the demo scan, organ map and finding masks on disk."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from hirescam3d.data import phantom
from hirescam3d.data.sample import SAMPLE_FINDINGS, SAMPLE_SEED, sample_paths, write_sample
from hirescam3d.io.scans import OutputError

KEYS = {"scan", "organs", "organ_names", "findings_json", "atelectasis", "pleural_effusion"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample") / "new"  # created by write_sample
    return folder, write_sample(folder)


def test_files_and_their_content(sample):
    folder, paths = sample
    assert set(paths) == KEYS
    assert paths == sample_paths(folder)
    # Only the sample files: no temporary folder or file is left behind.
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths.values())
    scan = nib.load(str(paths["scan"]))
    assert scan.shape == (96, 128, 128)
    assert scan.get_data_dtype() == np.int16
    assert "".join(nib.orientations.aff2axcodes(scan.affine)) == "SPL"
    np.testing.assert_allclose(np.linalg.norm(scan.affine[:3, :3], axis=0), (3.0, 2.5, 2.5))
    ct = np.asarray(scan.dataobj)
    assert ct.min() <= -900 and ct.max() >= 100  # air and tissue in Hounsfield units
    organs = np.asarray(nib.load(str(paths["organs"])).dataobj)
    assert organs.shape == scan.shape
    names = {int(k): v for k, v in json.loads(paths["organ_names"].read_text()).items()}
    assert names == phantom.ORGAN_NAMES
    assert set(np.unique(organs)) - {0} <= set(names)
    assert json.loads(paths["findings_json"].read_text()) == list(SAMPLE_FINDINGS)
    lungs = [k for k, v in names.items() if v.endswith("lung")]
    atelectasis = np.asarray(nib.load(str(paths["atelectasis"])).dataobj) > 0
    assert atelectasis.sum() > 100
    assert np.isin(organs[atelectasis], lungs).all()  # planted inside a lung
    effusion = np.asarray(nib.load(str(paths["pleural_effusion"])).dataobj) > 0
    assert np.isin(organs[effusion], lungs).all() and effusion.sum() > 1000


def test_refuses_to_overwrite_without_force(sample):
    folder, paths = sample
    before = {p: p.stat().st_mtime_ns for p in paths.values()}
    with pytest.raises(OutputError, match="already exist.*force"):
        write_sample(folder)
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == before


def test_force_rewrites_the_same_seeded_phantom(sample, tmp_path):
    _, reference = sample
    planted = sample_paths(tmp_path)["scan"]
    planted.write_bytes(b"an old file")
    paths = write_sample(tmp_path, force=True)
    expected = phantom.make_chest_ct(SAMPLE_SEED, findings=SAMPLE_FINDINGS)
    for path in (paths["scan"], reference["scan"]):
        np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj), expected.ct)
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(paths["organs"])).dataobj), expected.organs
    )


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    small = phantom.make_chest_ct(
        1, findings=SAMPLE_FINDINGS, shape=(16, 20, 20), spacing=(18.0, 16.0, 16.0)
    )
    monkeypatch.setattr(phantom, "make_chest_ct", lambda *a, **k: small)

    def broken_save(self, directory, stem="chest"):
        (directory / f"{stem}_ct.nii.gz").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phantom.ChestPhantom, "save", broken_save)
    with pytest.raises(OutputError, match="No space left"):
        write_sample(tmp_path)
    assert list(tmp_path.iterdir()) == []
