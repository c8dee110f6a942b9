"""Atomic file writes: a temporary file beside the target, renamed into place.

A crash or a bad input never leaves a partial output: :func:`atomic_write` calls the
writer on a temporary name and renames it onto the target only when it returned.
:func:`check_writable` refuses existing outputs (without ``force``) before a run writes
its first file, and :func:`ensure_folder` creates an output folder or says why it
cannot. The writers of :mod:`hirescam3d.io.outputs` and :mod:`hirescam3d.io.dicom_write`
use these (``hirescam3d.io.outputs`` keeps the names importable).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hirescam3d.io.scans import OutputError, _suffix


def ensure_folder(folder: str | Path) -> None:
    """Create ``folder`` if needed; :class:`OutputError` if that fails or it is read-only."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create output folder {folder}: {err.strerror or err}; choose another "
            "output folder"
        ) from err
    if not os.access(folder, os.W_OK):
        raise OutputError(
            f"output folder {folder} is not writable; choose another output folder or fix "
            "its permissions"
        )


def check_writable(paths: Iterable[str | Path], force: bool = False) -> None:
    """Raise :class:`OutputError` if any path exists (without ``force``) or cannot be written.

    Call it for every output of a run before writing the first one.
    """
    paths = [Path(p) for p in paths]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"output {'file' if len(existing) == 1 else 'files'} {shown}{more} already "
            "exist; use --force (force=True) to overwrite, or choose another output folder"
        )
    for folder in sorted({p.parent for p in paths}):
        ensure_folder(folder)


def atomic_write(
    path: str | Path,
    write: Callable[[Path], Any],
    force: bool = False,
    durable: bool = False,
) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s suffix (writers pick the format from it). Nothing
    is left behind if ``write`` raises. Refuses to replace an existing file unless
    ``force``. ``durable``: flush the file to disk before the rename (small bookkeeping
    files whose presence means "done").
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; use --force (force=True) to overwrite it")
    ensure_folder(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}", dir=path.parent
        )
    except OSError as err:
        raise OutputError(
            f"cannot write to {path.parent}: {err.strerror or err}; choose another output folder"
        ) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(
    path: str | Path, text: str, force: bool = True, durable: bool = True
) -> Path:
    """Write ``text`` (UTF-8) atomically; by default replacing ``path`` and durable."""
    return atomic_write(
        path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force, durable=durable
    )
