"""The architecture of docs/architecture.md holds (issue "architecture").

- ``lint-imports`` keeps the contracts of pyproject.toml (layers; no cycles between siblings),
  and breaks them, naming the import, on a copy of the package given an upward import or a
  cycle between two sibling modules;
- no function or method is longer than ``MAX_FUNCTION_LINES``;
- ``import hirescam3d`` loads no torch;
- docs/architecture.md holds the current import graph.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_FUNCTION_LINES = 80
# "path:qualified.name" of functions allowed to be longer (tables of data, not logic).
LONG_FUNCTIONS_ALLOWED: frozenset[str] = frozenset()

needs_lint_imports = pytest.mark.skipif(
    not LINT_IMPORTS.exists(),
    reason=f"import-linter is not installed ({LINT_IMPORTS} is missing; pip install -e '.[dev]')",
)


def lint_imports(where: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` run in ``where``: it reads ``where/pyproject.toml`` and, as it puts its
    working folder first on sys.path, analyses ``where/hirescam3d``."""
    args = [str(LINT_IMPORTS), "--no-cache", *(f"--contract={c}" for c in contracts)]
    env = {**os.environ, "PYTHONPATH": str(where), "COLUMNS": "250"}  # COLUMNS: no wrapping
    return subprocess.run(args, cwd=where, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def package_copy(tmp_path: Path) -> Path:
    """A folder holding a copy of ``hirescam3d/`` (no bundles) and of ``pyproject.toml``."""
    source = ROOT / "hirescam3d"

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or Path(folder, n) == source / "bundles"}

    shutil.copytree(source, tmp_path / "hirescam3d", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, line: str) -> int:
    """Append ``line`` to ``path``; its line number."""
    text = path.read_text().rstrip("\n")
    path.write_text(f"{text}\n{line}\n")
    return text.count("\n") + 2


@needs_lint_imports
def test_lint_imports_keeps_the_contracts():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_lint_imports
def test_lint_imports_names_an_upward_import(package_copy):
    core = package_copy / "hirescam3d" / "core"
    line = append(core / "methods.py", "from hirescam3d.pipeline import explain_scan  # noqa")
    out = lint_imports(package_copy, "layers")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "hirescam3d.core is not allowed to import hirescam3d.pipeline" in out.stdout
    # "- importer -> imported (l.N)"; imported may be pipeline.explain_scan if that is a module
    named = [s for s in out.stdout.splitlines() if "- hirescam3d.core.methods -> " in s]
    assert any(".pipeline" in s and re.search(rf"\bl\.{line}\b", s) for s in named), out.stdout


@needs_lint_imports
def test_lint_imports_names_a_cycle_between_siblings(package_copy):
    core = package_copy / "hirescam3d" / "core"
    append(core / "methods.py", "import hirescam3d.core.regions  # noqa")
    append(core / "regions.py", "import hirescam3d.core.methods  # noqa")
    out = lint_imports(package_copy, "acyclic")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "No cycles are allowed in hirescam3d.core." in out.stdout
    assert ".regions -> .methods" in out.stdout or ".methods -> .regions" in out.stdout


Function = ast.FunctionDef | ast.AsyncFunctionDef


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """Every function and method of ``tree``, nested ones too, by qualified name."""
    for node in ast.iter_child_nodes(tree):
        name = prefix
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            name += "."
        yield from functions(node, name)


def test_no_function_is_longer_than_the_limit():
    lengths: dict[str, int] = {}
    for path in sorted([*(ROOT / "hirescam3d").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        for name, node in functions(ast.parse(path.read_text(), str(path))):
            lengths[f"{path.relative_to(ROOT)}:{name}"] = node.end_lineno - node.lineno + 1
    long = {w: n for w, n in lengths.items() if n > MAX_FUNCTION_LINES}
    offenders = [f"{w} ({n} lines)" for w, n in long.items() if w not in LONG_FUNCTIONS_ALLOWED]
    assert offenders == [], f"longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
    stale = sorted(LONG_FUNCTIONS_ALLOWED - long.keys())
    assert stale == [], f"in LONG_FUNCTIONS_ALLOWED but gone or short enough now: {stale}"


def test_import_hirescam3d_does_not_load_torch():
    code = "import sys, hirescam3d; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "`import hirescam3d` loads torch"


@needs_lint_imports  # grimp comes with import-linter
def test_import_graph_page_is_current():
    args = [sys.executable, str(ROOT / "docs" / "make_import_graph.py"), "--check"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
