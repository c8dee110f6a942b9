"""The documentation stays true (issue 17).

- Every ```python block of ``docs/**/*.md`` and ``README.md`` runs: each page's blocks in
  order, in one namespace, in a fresh working folder that holds a copy of
  ``sample_data/``. A block that must not run is
  preceded by a visible ``<!-- no-run: reason -->`` comment. A block followed by a line
  ``prints`` and a ```text block must print exactly that text.
- Every ``hirescam3d ...`` command of a ```bash block parses with the app's own parser
  (command, options, option values, arity); those whose inputs exist after the page's
  earlier commands (``hirescam3d sample data`` first) and that read no GUI also run, in
  process, and must exit with 0.
- The site builds with ``mkdocs build --strict`` and no warning, and its CLI reference
  lists every command and option of the Typer app, found here by walking the app's command
  tree independently of the hook that renders the page.
"""

from __future__ import annotations

import contextlib
import glob
import html
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import installed_console_script

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), REPO / "README.md"]

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")
SHELL = {"bash", "sh", "shell", "console"}
# Pages whose examples take more than a few seconds (demo model, DICOM writing,
# subprocesses); still part of `make test`, left out of `make test-fast`.
SLOW_PAGES = {"README.md", "api.md", "batch.md", "dicom.md", "metrics.md", "why_hirescam.md",
              "monai_pipeline.md", "quickstart.md", "zoo.md"}  # fmt: skip
# Commands that run for real when their inputs exist (never `view`: it opens a window).
RUNNABLE = {"sample", "explain", "batch", "compare", "models", "findings", "layers", "audit"}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    no_run: str | None  # the reason, for a block marked <!-- no-run: reason -->
    expected: str | None  # the ```text block after "prints", if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order."""
    text = page.read_text()
    found: list[Block] = []
    matches = list(FENCE.finditer(text))
    for i, m in enumerate(matches):
        before = text[: m.start()].rstrip().splitlines()
        marker = NO_RUN.search(before[-1]) if before else None
        expected = None
        if i + 1 < len(matches):
            between = text[m.end() : matches[i + 1].start()].strip()
            if between == "prints" and matches[i + 1]["lang"] == "text":
                expected = textwrap.dedent(matches[i + 1]["body"])
        found.append(
            Block(
                page=page,
                line=text.count("\n", 0, m.start()) + 1,
                lang=m["lang"].lower(),
                body=textwrap.dedent(m["body"]),
                no_run=marker["reason"] if marker else None,
                expected=expected,
            )
        )
    return found


def python_pages() -> list:
    params = []
    for page in PAGES:
        if any(b.lang == "python" and b.no_run is None for b in blocks(page)):
            marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
            params.append(pytest.param(page, id=str(page.relative_to(REPO)), marks=marks))
    return params


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working folder holding a copy of the checkout's ``sample_data/``, which the
    pages name as a user in the checkout would."""
    shutil.copytree(REPO / "sample_data", tmp_path / "sample_data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def method_registry():
    """Pages may register methods (methods.md does): the registry is restored after."""
    from hirescam3d.core import methods

    saved = dict(methods.METHODS)
    yield
    methods.METHODS.clear()
    methods.METHODS.update(saved)


@pytest.fixture()
def console_on_path(monkeypatch):
    """``hirescam3d`` on PATH for examples that start it as a program."""
    script = installed_console_script()
    if script is not None:
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.parametrize("page", python_pages())
def test_python_examples_run(page, workdir, method_registry, console_on_path):
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.lang != "python" or block.no_run is not None:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.body, block.where, "exec"), namespace)  # noqa: S102
        if block.expected is not None:
            assert _lines(out.getvalue()) == _lines(block.expected), (
                f"{block.where}: the printed output differs from the page's"
            )


def test_no_run_markers_are_rare_and_explained():
    marked = [b for page in PAGES for b in blocks(page) if b.lang == "python" and b.no_run]
    for b in marked:
        assert len(b.no_run) > 10, f"{b.where}: say why the block does not run"
    assert len(marked) <= 3, [b.where for b in marked]


def test_every_expected_output_follows_a_python_block():
    for page in PAGES:
        for b in blocks(page):
            assert b.expected is None or b.lang == "python", b.where


# -- shell examples -------------------------------------------------------------------------
def shell_commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(where, argv after 'hirescam3d')`` for each hirescam3d command of the page's shell
    blocks, continuation lines joined and comments dropped (also under torchrun)."""
    found = []
    for b in blocks(page):
        if b.lang not in SHELL:
            continue
        for line in b.body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "$":
                words = words[1:]
            if words[:1] == ["hirescam3d"]:
                found.append((b.where, words[1:]))
            elif "hirescam3d.cli.main" in words:  # torchrun ... -m hirescam3d.cli.main ...
                found.append((b.where, words[words.index("hirescam3d.cli.main") + 1 :]))
    return found


def _root():
    import typer.main
    from hirescam3d.cli.main import app

    return typer.main.get_command(app)


def parse(argv: list[str]):
    """``(command name, command, its parsed context)``; raises the parser's usage error."""
    root = _root()
    ctx = root.make_context("hirescam3d", list(argv))
    pending = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
    name, command, rest = root.resolve_command(ctx, pending)
    return name, command, command.make_context(name, rest, parent=ctx)


def test_shell_examples_parse():
    commands = [c for page in PAGES for c in shell_commands(page)]
    assert len(commands) > 20
    seen = set()
    for where, argv in commands:
        try:
            name, _, _ = parse(argv)
        except Exception as err:  # noqa: BLE001 - the parser's error is the message
            pytest.fail(f"{where}: hirescam3d {shlex.join(argv)}: {err}")
        seen.add(name)
    assert {"explain", "batch", "audit", "sample", "view", "compare"} <= seen


def _inputs_exist(command, ctx) -> bool:
    """Whether every file the parsed command reads exists in the working folder."""
    from hirescam3d.models import zoo

    for param in command.params:
        value = ctx.params.get(param.name)
        if value in (None, (), []) or param.name in ("out", "directory"):  # written, not read
            continue
        if param.name == "model":
            if value in zoo.names():
                bundle = zoo.entry(value).info.bundle_path
                if bundle is not None and not bundle.is_dir():
                    return False  # trained weights that do not ship (yet)
            elif not Path(value).exists():
                return False
        elif param.name == "region" and value != "predicted":
            if not Path(value).exists():
                return False
        elif param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(glob.glob(str(v)) for v in values):
                return False
        elif isinstance(value, Path) and not value.exists():
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=str(p.relative_to(REPO))) for p in PAGES if shell_commands(p)],
)
def test_shell_examples_run_where_their_inputs_exist(page, workdir):
    from hirescam3d.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    ran = []
    for where, argv in shell_commands(page):
        name, command, ctx = parse(argv)
        if name not in RUNNABLE or not _inputs_exist(command, ctx):
            continue
        result = runner.invoke(app, [*argv, *(["--force"] if name == "sample" else [])])
        assert result.exit_code == 0, f"{where}: hirescam3d {shlex.join(argv)}\n{result.output}"
        ran.append(name)
    if page.name in ("quickstart.md", "README.md"):
        assert ran[:2] == ["sample", "explain"], ran  # the main flow really runs


# -- the site -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    return out


def test_site_builds_strict_without_warnings(site):
    for page in ["index.html", "cli/index.html", "api/index.html", "quickstart/index.html"]:
        assert (site / page).is_file(), page


def _walk(command, ctx, path: tuple[str, ...]):
    """Oracle: every visible command of the app, with its visible option names."""
    yield path, command, ctx
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, sub.make_context(name, [], resilient_parsing=True,
                                                       parent=ctx), (*path, name))  # fmt: skip


def test_cli_reference_lists_every_command_and_option(site):
    page = (site / "cli" / "index.html").read_text()
    # Sections: each h2 heading's text and the HTML up to the next h2.
    parts = re.split(r"<h2[^>]*>", page)[1:]
    sections = {}
    for part in parts:
        heading = html.unescape(re.sub(r"<[^>]+>", "", part.split("</h2>")[0])).strip(" ¶")
        sections[heading] = html.unescape(re.sub(r"<[^>]+>", " ", part))
    root = _root()
    ctx = root.make_context("hirescam3d", [], resilient_parsing=True)
    commands = list(_walk(root, ctx, ("hirescam3d",)))
    assert len(commands) >= 10
    for path, command, sub in commands:
        title = " ".join(path)
        assert title in sections, f"{title} missing from the CLI reference"
        text = sections[title]
        for param in command.get_params(sub):
            if param.hidden:
                continue
            names = param.opts if param.param_type_name != "argument" else [param.name.upper()]
            for name in names:
                assert name in text, f"{title}: {name} missing from the CLI reference"
        if command.help:
            first = command.help.split("\n")[0].split(":")[0]
            assert first in text, f"{title}: its help text is missing"


def test_readme_links_and_pictures_exist():
    """The README is read outside the site (mkdocs checks the pages' links, not its)."""
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert "docs/images/readme.png" in local
    for target in local:
        assert (REPO / target).exists(), f"README.md links to missing {target}"
