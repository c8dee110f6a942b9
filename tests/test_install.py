"""The package installs both ways: editable (the Makefile's) and as a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import installed_console_script

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_console_script(tmp_path):
    script = installed_console_script()
    if script is None:
        pytest.skip("hirescam3d is not pip-installed in this environment (make test installs it)")
    out = subprocess.run(
        [script, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "explain" in out.stdout


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("hirescam3d-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hirescam3d/cli/main.py" in names
    assert not any(n.startswith("cli/") for n in names), "a top-level 'cli' package would leak"
    assert "hirescam3d/napari/napari.yaml" in names
    for part in ("models/model.pt", "configs/metadata.json", "configs/inference.json"):
        assert f"hirescam3d/bundles/demo/{part}" in names, part

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    vbin = venv / "bin"
    pip = subprocess.run(
        [str(vbin / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    # Dependencies come from this environment's site-packages through a .pth path entry;
    # .pth files inside it (the editable finder) are not processed, so only the wheel
    # provides hirescam3d.
    vsite = subprocess.run(
        [str(vbin / "python"), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(vsite, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(vbin / "hirescam3d"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "explain" in out.stdout
    where = subprocess.run(
        [
            str(vbin / "python"),
            "-c",
            "import hirescam3d, hirescam3d.cli; print(hirescam3d.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    assert where.stdout.strip().startswith(str(venv))
