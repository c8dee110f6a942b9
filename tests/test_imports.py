"""The library imports without the CLI or GUI stacks."""

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
