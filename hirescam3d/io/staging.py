"""Outputs written whole or not at all: a temporary folder inside the output folder.

:class:`Staging` gives a run a hidden temporary folder ``OUT/.tmp-<hex>``; the run writes
every output (maps, DICOM series and Segmentations, PNGs, report) there, then
:meth:`Staging.commit` moves each one into ``OUT`` with a rename (the report last) and
removes the temporary folder. :meth:`Staging.discard` (on any error) removes it and
leaves ``OUT`` as it was. A run killed outright leaves only its hidden ``.tmp-<hex>``
folder, which blocks nothing; the next run holding the folder's lock removes it
(:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

PREFIX = ".tmp-"
_STAGING_NAME = re.compile(r"^\.tmp-[0-9a-f]{12}$")


class Staging:
    """The temporary folder of one run's outputs to ``out_dir`` (created on first use)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / f"{PREFIX}{uuid.uuid4().hex[:12]}"
        self._made = False

    def redirect(self, paths: Mapping[str, Path]) -> dict[str, Path]:
        """``paths`` (inside ``out_dir``) moved into the temporary folder (created)."""
        if not self._made:
            self.path.mkdir(parents=True)
            self._made = True
        return {key: self.path / Path(p).relative_to(self.out_dir) for key, p in paths.items()}

    def final(self, path: Path) -> Path:
        """Where the staged ``path`` goes in ``out_dir``."""
        return self.out_dir / Path(path).relative_to(self.path)

    def commit(
        self, written: Mapping[str, Path], last: Iterable[str] = ("report",)
    ) -> dict[str, Path]:
        """Move every staged ``written`` path into ``out_dir`` (the keys in ``last`` after
        the others), replacing what is there; return ``{key: final path}``."""
        order = [k for k in written if k not in last] + [k for k in written if k in last]
        moved: dict[str, Path] = {}
        for key in order:
            staged = Path(written[key])
            target = self.final(staged)
            if staged.is_dir() and target.is_dir() and not target.is_symlink():
                old = self.path / f".old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)  # a folder cannot replace a folder: swap it out
            os.replace(staged, target)
            moved[key] = target
        self.discard()
        return {key: moved[key] for key in written}

    def discard(self) -> None:
        """Remove the temporary folder and everything in it."""
        if self._made:
            shutil.rmtree(self.path, ignore_errors=True)
            self._made = False


def remove_stale_staging(folder: str | Path, depth: int = 1) -> list[Path]:
    """Remove the temporary folders of killed runs in ``folder`` (and in its subfolders,
    ``depth`` levels down). Call it only while holding the folder's lock."""
    removed: list[Path] = []
    folder = Path(folder)
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if _STAGING_NAME.match(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
            elif depth > 0 and not entry.name.startswith("."):
                removed.extend(remove_stale_staging(entry.path, depth - 1))
    return removed
