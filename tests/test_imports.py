"""The library imports without the CLI or GUI stacks."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys, pkgutil, importlib
import hirescam3d
for mod in pkgutil.walk_packages(hirescam3d.__path__, "hirescam3d."):
    skip = ("hirescam3d.cli", "hirescam3d.napari._", "hirescam3d.models.training")
    if mod.name.startswith(skip):
        continue
    importlib.import_module(mod.name)
import hirescam3d.napari  # the plugin package itself must not pull napari in
bad = sorted(m for m in sys.modules if m.split(".")[0] in {"typer", "napari", "qtpy", "PyQt5",
                                                          "PySide2", "PySide6", "PyQt6", "click"})
print(",".join(bad))
"""


def test_library_does_not_import_cli_or_gui_stacks():
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_library_never_imports_from_cli_folder():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "hirescam3d").rglob("*.py")
        if "from hirescam3d.cli" in p.read_text() or "import hirescam3d.cli" in p.read_text()
    ]
    assert offenders == []


OLD_PATHS = """
import importlib, json
from hirescam3d._moved import MOVED
bad = [old for old, new in MOVED.items()
       if importlib.import_module(f"hirescam3d.{old}") is not importlib.import_module(
           f"hirescam3d.{new}") or importlib.import_module(f"hirescam3d.{old}").__spec__.name
       != f"hirescam3d.{new}"]
from hirescam3d.models.axialnet import AxialNet as old_class
from hirescam3d.models.nets import architecture
print(json.dumps({"bad": bad, "same_class": architecture(
    "hirescam3d.models.axialnet.AxialNet") is old_class}))
"""


def test_paths_of_the_flat_layout_import_the_modules_of_their_new_home():
    """Every pre-0.2 module path is the very module at its new path (fresh interpreter, so
    old and new paths are imported in this order for the first time), and a bundle naming
    the old architecture path builds the same class."""
    out = subprocess.run(
        [sys.executable, "-c", OLD_PATHS], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"bad": [], "same_class": True}


def test_recorded_training_commands_with_old_module_paths_still_run():
    """Bundles trained before 0.2 record ``python -m hirescam3d.models.train_seg ...``."""
    out = subprocess.run(
        [sys.executable, "-m", "hirescam3d.models.train_seg", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--pos-mean" in out.stdout
