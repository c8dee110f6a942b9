"""Standard gzip files, written from byte pieces deflated in parallel and read by a fast
inflate that does not hold the GIL.

:func:`write_gzip` writes a single-member gzip file (RFC 1952, mtime 0, as nibabel writes):
each piece is raw-deflated on its own in a thread pool and ends on a byte boundary (sync
flush), the last one closes the stream, so the concatenation is one valid deflate stream
that any gzip reader (nibabel, ITK, the ``gzip`` module, ``gunzip``) reads.

:class:`GzipReader` reads a gzip file (every member, CRC checked) with ISA-L's inflate,
8 MB of compressed input per call, so a scan read ahead in a thread barely slows down
beside Python work in the main thread; the ``gzip`` module takes the GIL back for every
few kB and such a read took minutes. Without ``isal`` it falls back to ``zlib``.

Levels are zlib's, 0-9. Levels 0 and 1 (float32 and int16 maps) are deflated with ISA-L's
igzip (the ``isal`` package, :data:`BACKEND` ``"isal"``) at its levels 0 and 1: on the
float32 maps of a 300 x 512 x 512 scan about 7.5x faster than zlib at level 1, for files
0.5 % larger (``benchmarks/bench_write.py``; zlib-ng and libdeflate measured in between).
Higher levels (uint8 maps: 6) use the standard library's ``zlib``, whose ratio there is
igzip's best by a third. ``zlib`` is also the fallback where ``isal`` is missing, or
when :data:`BACKEND` is set to ``"zlib"``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps files readable
    _isal = None

# "isal" (ISA-L igzip) where installed, else "zlib"; benchmarks set it to compare.
BACKEND = "isal" if _isal is not None else "zlib"
_GZIP_HEADER = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
#: What a corrupt deflate stream (or CRC) raises while a :class:`GzipReader` reads.
INFLATE_ERRORS: tuple[type[Exception], ...] = (
    (zlib.error,) if _isal is None else (zlib.error, _isal.error)
)


def _codec(backend: str, level: int) -> ModuleType:
    """The deflate module for zlib ``level``: igzip for levels 0-1, else zlib."""
    if backend not in ("isal", "zlib"):
        raise ValueError(f"unknown deflate backend {backend!r}; use isal or zlib")
    if not 0 <= level <= 9:
        raise ValueError(f"deflate level must lie in 0..9; got {level}")
    return _isal if backend == "isal" and _isal is not None and level <= 1 else zlib


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _deflate(
    codec: ModuleType, block: bytes | memoryview, level: int, last: bool
) -> tuple[bytes, bytes]:
    """One raw-deflate piece, ending on a byte boundary (sync flush) or closing the stream,
    in two parts (written one after the other: joining them would copy the piece)."""
    comp = codec.compressobj(level, codec.DEFLATED, -15)
    return comp.compress(block), comp.flush(codec.Z_FINISH if last else codec.Z_SYNC_FLUSH)


def write_gzip(
    path: str | Path, pieces: Iterable[bytes | memoryview], level: int, backend: str | None = None
) -> None:
    """Write ``pieces`` (in order) as one gzip member at zlib ``level`` (0-9), deflating on
    every core (at most 8) with ``backend`` (default :data:`BACKEND`).

    At most ``2 x workers + 1`` pieces are held in flight, so memory stays bounded by the
    piece size, whatever the file size.
    """
    level = int(level)
    codec = _codec(BACKEND if backend is None else backend, level)
    crc32 = _isal.crc32 if _isal is not None else zlib.crc32  # same CRC, ISA-L's is faster
    crc, size = 0, 0
    workers = _workers()
    with open(path, "wb") as f, ThreadPoolExecutor(workers) as pool:
        f.write(_GZIP_HEADER)
        pending: list[Any] = []
        previous: bytes | memoryview | None = None
        for piece in pieces:
            if previous is not None:
                pending.append(pool.submit(_deflate, codec, previous, level, False))
            crc = crc32(piece, crc)
            size += len(piece)
            previous = piece
            while len(pending) > 2 * workers:  # bound the memory held in flight
                f.writelines(pending.pop(0).result())
        pending.append(pool.submit(_deflate, codec, previous or b"", level, True))
        for job in pending:
            f.writelines(job.result())
        f.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


class GzipReader(io.RawIOBase):
    """The decompressed bytes of the gzip file ``path``, read forward only.

    Every member is read in turn and its CRC checked at its end (a corrupt stream raises
    ``isal_zlib.error`` or ``zlib.error``); bytes after the last member that are not gzip
    end the data. :meth:`seek` moves forward only, by reading:
    what nibabel needs to reach the voxels after the header. Wrap it in
    ``io.BufferedReader``.
    """

    _INPUT = 8 << 20  # compressed bytes per call: few GIL hand-overs, bounded memory

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._codec = _isal if _isal is not None else zlib
        self._inflate = self._codec.decompressobj(31)
        self._input, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # forward (see seek); io.BufferedReader and nibabel ask first

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if whence == io.SEEK_END or target < self._pos:
            raise io.UnsupportedOperation("a gzip stream is read forward only")
        while self._pos < target and self.readinto(bytearray(min(target - self._pos, 1 << 20))):
            pass
        return self._pos

    def _ready(self) -> bool:
        """Whether compressed input of an open member is at hand: the next member is
        opened after a finished one. False at the end of the file, or where what follows
        the last member is not gzip (zero padding, as ``gzip -d`` ignores it)."""
        if self._inflate.eof:
            if len(self._input) < 2:
                self._input += self._file.read(self._INPUT)
            if self._input[:2] != _GZIP_HEADER[:2]:
                return False
            self._inflate = self._codec.decompressobj(31)
        if not self._input:
            self._input = self._file.read(self._INPUT)
        return bool(self._input)

    def readinto(self, buffer: Any) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._ready():
            out = self._inflate.decompress(self._input, len(view) - done)
            inflate = self._inflate
            self._input = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
            view[done : done + len(out)] = out
            done += len(out)
        self._pos += done
        return done

    def close(self) -> None:
        self._file.close()
        super().close()
