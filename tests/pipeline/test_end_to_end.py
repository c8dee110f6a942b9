"""The main job, end to end: the installed command on the shipped sample scan and model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import installed_console_script

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"


def _console_script() -> str:
    script = installed_console_script()
    if script is None:
        pytest.skip("hirescam3d is not pip-installed in this environment (make test installs it)")
    return str(script)


@pytest.mark.slow
def test_sample_scan_atelectasis_explanation_peaks_in_the_planted_atelectasis(tmp_path):
    scan = SAMPLE / "sample_chest_ct.nii.gz"
    out = subprocess.run(
        [_console_script(), "explain", str(scan), "--finding", "atelectasis",
         "--method", "hirescam", "--method", "gradcam", "--out", str(tmp_path), "--json",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["findings"]["atelectasis"]["probability"] >= 0.5
    assert report["hirescam_guaranteed_faithful"] is True

    source = nib.load(str(scan))
    mask = np.asarray(nib.load(str(SAMPLE / "sample_chest_atelectasis.nii.gz")).dataobj) > 0
    organs = np.asarray(nib.load(str(SAMPLE / "sample_chest_organs.nii.gz")).dataobj)
    lungs = np.isin(organs, (1, 3))
    heat = nib.load(str(tmp_path / "sample_chest_ct_atelectasis_hirescam.nii.gz"))
    assert heat.shape == source.shape
    np.testing.assert_array_equal(heat.affine, source.affine)
    data = np.asarray(heat.dataobj)
    peak = np.unravel_index(np.argmax(data), data.shape)
    assert mask[peak], f"HiResCAM peak {peak} is outside the planted atelectasis"
    assert data[mask].mean() > 2 * data[lungs & ~mask].mean()
