"""One writer per output folder: an advisory OS lock on a file in the folder.

``hirescam3d explain`` and ``hirescam3d batch`` hold :func:`output_lock` on their ``--out``
folder for the whole run. The lock is ``fcntl.flock`` on ``OUT/.hirescam3d.lock``: the
kernel releases it when the process ends, however it ends (``kill -9`` included), so a
stale lock file never blocks a later run. A second run on a locked folder is refused
with :class:`FolderLockedError` naming the holder, or waits for it (``wait=True``).

While it holds the lock a run may remove what a killed run left behind: the temporary
folders of :mod:`hirescam3d.io.staging` (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from hirescam3d.errors import HiResCAMError

LOCK_NAME = ".hirescam3d.lock"


class FolderLockedError(HiResCAMError):
    """Another run holds the output folder's lock."""


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file ("" if unknown)."""
    try:
        info = json.loads(path.read_text())
        return f" (process {int(info['pid'])}, {info.get('command', 'hirescam3d')}, since " \
               f"{info.get('since', '?')})"  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _try_lock(fd: int, block: bool) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str = "hirescam3d", wait: bool = False,
                poll_s: float = 0.2) -> Iterator[Path]:  # fmt: skip
    """Hold the exclusive lock of ``folder`` (created if needed) for the block.

    FolderLockedError when another process holds it and ``wait`` is False; with ``wait``
    block until it is released. On exit the lock file is removed (while still locked, so a
    waiting run re-checks it), and ``folder`` too if this call created it and it is empty.
    """
    from hirescam3d.io.atomic import ensure_folder

    folder = Path(folder)
    created = not folder.exists()
    ensure_folder(folder)  # OutputError naming the folder if it cannot be made or written
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, block=False):
            if not wait:
                os.close(fd)
                raise FolderLockedError(
                    f"output folder {folder} is in use by another hirescam3d run"
                    f"{_holder(path)}; wait for it to finish, pass --wait to queue behind it, "
                    "or choose another --out folder"
                )
            os.close(fd)
            time.sleep(poll_s)
            continue
        # The holder before us may have removed the file after we opened it: lock the
        # file that is at the path now, or try again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "command": command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the lock
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a refused run leaves no new folder
