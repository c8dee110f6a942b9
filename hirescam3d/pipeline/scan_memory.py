"""Scan-sized float32 arrays kept from one scan of a batch to the next.

Each scan of a batch needs two float32 arrays of its size: its voxels (which then hold its
first map, see :mod:`hirescam3d.pipeline.write`) and the array of the map being written
while the next is placed. A fresh 300 MB array costs its page faults: the kernel zeroes
every page, 1 to 3 s per GB on a 2-core machine, paid again for every scan. Inside
:func:`reuse` (``hirescam3d batch``), :func:`keep` keeps those arrays when a scan is done
and :func:`empty` hands their memory to the next scan of the same size. At most
:data:`KEEP` arrays are kept, so the peak is that of one scan. Outside :func:`reuse`,
:func:`empty` is ``np.empty`` and :func:`keep` lets the arrays go.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterator

import numpy as np

#: Arrays kept at most: the voxels (then the first map) and the second map.
KEEP = 2

_active = threading.local()


class ScanMemory:
    """The memory of up to :data:`KEEP` float32 arrays, kept flat."""

    def __init__(self) -> None:
        self.free: list[np.ndarray] = []
        self._lock = threading.Lock()  # a batch's writer thread keeps the last map's array

    def empty(self, shape: tuple[int, ...], order: str) -> np.ndarray:
        """A float32 array of ``shape``: kept memory of that size, else a new array (kept
        memory of other sizes is let go first)."""
        size = math.prod(shape)
        with self._lock:
            for i, flat in enumerate(self.free):
                if flat.size == size:
                    return self.free.pop(i).reshape(shape, order=order)
            self.free.clear()
        return np.empty(shape, np.float32, order=order)

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Make the :data:`KEEP` arrays of a scan of ``shape`` now, every page touched: in a
        thread that would be idle (``batch`` does it while the model loads), so the kernel
        zeroes their pages there rather than while the scan is explained."""
        while len(self.free) < KEEP:
            array = np.empty(shape, np.float32)
            array.fill(0.0)
            self.free.append(array.reshape(-1))

    def keep(self, array: np.ndarray) -> None:
        """Keep ``array``'s memory if it is a contiguous float32 array that nothing else
        refers to (``array`` itself is then the only name of it), and fewer than
        :data:`KEEP` are kept."""
        unshared = sys.getrefcount(array) <= 3  # the caller's name, this one, the call's
        contiguous = array.flags.c_contiguous or array.flags.f_contiguous
        with self._lock:
            if unshared and contiguous and array.dtype == np.float32 and len(self.free) < KEEP:
                self.free.append(array.reshape(-1, order="A"))


@contextlib.contextmanager
def reuse() -> Iterator[ScanMemory]:
    """Keep scan-sized arrays between the scans run inside the block (this thread)."""
    memory = ScanMemory()
    previous = getattr(_active, "memory", None)
    _active.memory = memory
    try:
        yield memory
    finally:
        _active.memory = previous
        memory.free.clear()


def active() -> ScanMemory | None:
    """The :class:`ScanMemory` of the :func:`reuse` block this thread runs in, if any."""
    return getattr(_active, "memory", None)


def empty(shape: tuple[int, ...], order: str = "C") -> np.ndarray:
    """A float32 array of ``shape`` (``order`` "C" or "F"), from the kept memory inside
    :func:`reuse`, else new."""
    memory = active()
    if memory is None:
        return np.empty(shape, np.float32, order=order)
    return memory.empty(tuple(shape), order)


def keep(arrays: list[np.ndarray], memory: ScanMemory | None = None) -> None:
    """Empty the list ``arrays``, keeping the memory of those nothing else refers to for
    the next scan in ``memory`` (default: that of the :func:`reuse` block this thread runs
    in; else they are let go)."""
    memory = memory or active()
    while arrays:
        array = arrays.pop()
        if memory is not None:
            memory.keep(array)
