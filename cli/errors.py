"""How the CLI reports problems: one ``error: ...`` line on stderr and an exit code.

Exit codes: 0 success, 1 runtime failure (unreadable or corrupt file, failing model,
read-only or locked output folder, a failed batch item), 2 usage error (bad option or
combination of options, missing path, unknown model, finding, layer, method or DICOM
series UID), 3 ``audit``: not guaranteed, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.25 vendors click and exposes its exception base as TyperException
    from typer import TyperException as _ClickException
except ImportError:  # pragma: no cover - older typer on top of click
    from click import ClickException as _ClickException

from hirescam3d.errors import (
    HiResCAMError,
    LayerError,
    ModelOutputError,
    OptionError,
    TargetError,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIUsageError(HiResCAMError):
    """The command line itself is wrong (exit code 2): a missing path, an unknown name."""


# Library errors that mean "the command line asked for something that does not exist".
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    CLIUsageError, TargetError, LayerError, OptionError, ModelOutputError,
)


def exit_code_for(err: BaseException) -> int:
    """2 for usage errors, 130 for Ctrl-C, 1 for everything else."""
    if isinstance(err, USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


def one_line(text: str) -> str:
    """Collapse a message to one line (multi-line library messages become '; '-joined)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts)


def describe(err: BaseException) -> str:
    """The user-facing message of ``err``, without the ``error:`` prefix."""
    if isinstance(err, PermissionError) and err.filename:
        where = Path(err.filename)
        folder = where if where.is_dir() else where.parent
        return (
            f"permission denied writing {where}: the folder {folder} is not writable; "
            "choose another --out folder or fix its permissions"
        )
    if isinstance(err, FileExistsError) and err.filename:
        return f"{err.filename} already exists; pass --force to overwrite it"
    if isinstance(err, OSError):
        reason = err.strerror or str(err) or type(err).__name__
        where = f" {err.filename}" if err.filename else ""
        hint = "; choose another --out folder" if err.errno == errno.EROFS else ""
        return f"cannot access{where}: {reason}{hint}"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, HiResCAMError):
        return one_line(str(err)) or type(err).__name__
    return f"{type(err).__name__}: {one_line(str(err))} (rerun with --debug for the traceback)"


def print_error(message: str) -> None:
    """Write ``error: message`` as one line on stderr."""
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


def print_warning(message: str) -> None:
    """Write ``warning: message`` as one line on stderr."""
    sys.stderr.write(f"warning: {one_line(message)}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def reported_errors(debug: bool = False) -> Iterator[None]:
    """Turn library and OS errors raised inside the block into ``error:`` + exit code.

    With ``debug`` the traceback is printed too. ``typer.Exit`` passes through.
    Unexpected exceptions (bugs) are reported the same way with exit code 1.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, _ClickException):
        raise
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        print_error(describe(err))
        raise typer.Exit(exit_code_for(err)) from None


_LIBRARY_DIR = str(Path(__file__).resolve().parent.parent / "hirescam3d")


def _from_library(category: type[Warning], filename: str) -> bool:
    """True for warnings hirescam3d itself raises (not torch's or MONAI's internals)."""
    module = getattr(category, "__module__", "") or ""
    if module.startswith("hirescam3d"):
        return True
    try:
        import hirescam3d

        roots = [str(Path(p).resolve()) for p in hirescam3d.__path__]
    except Exception:  # noqa: BLE001 - fall back to the source-tree location
        roots = [_LIBRARY_DIR]
    here = str(Path(filename).resolve()) if filename else ""
    return any(here.startswith(root) for root in roots)


def _show_once(
    message: Any, category: type[Warning], filename: str, debug: bool, shown: set[str]
) -> None:
    """Print one ``warning:`` line for ``message`` unless it was shown (``shown``) or it is
    another library's (and not ``debug``)."""
    if not debug and not _from_library(category, filename):
        return
    text = one_line(str(message))
    if text not in shown:
        shown.add(text)
        print_warning(text)


def show_kept(kept: Sequence[Any], debug: bool, shown: set[str]) -> None:
    """Show warnings kept for later (``warnings.WarningMessage``, see
    :func:`hirescam3d.pipeline.stages.BackgroundWriter.submit`) as
    :func:`warnings_to_stderr` shows them; deprecations only with ``debug``."""
    for msg in kept:
        if debug or not issubclass(msg.category, (DeprecationWarning, PendingDeprecationWarning)):
            _show_once(msg.message, msg.category, msg.filename, debug, shown)


@contextlib.contextmanager
def warnings_to_stderr(debug: bool = False, seen: set[str] | None = None) -> Iterator[set[str]]:
    """Show warnings raised inside the block as one ``warning:`` line each on stderr.

    Only hirescam3d's own warnings are shown (each text once); with ``debug`` those of
    other libraries too. Yields the set of texts shown, so callers can avoid repeats.
    """
    shown: set[str] = set() if seen is None else seen

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        _show_once(message, category, filename, debug, shown)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        if not debug:
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        old = warnings.showwarning
        warnings.showwarning = show
        try:
            yield shown
        finally:
            warnings.showwarning = old


class OneLineErrorGroup(TyperGroup):
    """A Typer group whose usage errors print as one ``error: ...`` line (exit code 2)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # noqa: ANN002, ANN003
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except _ClickException as err:
            if not standalone_mode:
                raise
            if type(err).__name__ == "NoArgsIsHelpError":
                err.show()  # the group's help text
            else:
                message = err.format_message()
                ctx = getattr(err, "ctx", None)
                if ctx is not None and getattr(err, "exit_code", 1) == EXIT_USAGE:
                    message += f" (see '{ctx.command_path} --help')"
                print_error(message)
            sys.exit(err.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            print_error("aborted")
            sys.exit(EXIT_INTERRUPTED)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else EXIT_OK)
