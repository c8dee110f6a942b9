"""Overlapped stages of a run: read the next scan ahead, write maps in the background.

Two small helpers with bounded memory, used by :func:`hirescam3d.pipeline.explain_scan` and
``hirescam3d batch``:

- :class:`ReadAhead`: ``batch`` asks it to read scan k+1 (and its organ map) in a thread
  while scan k is explained, from when scan k is in memory as float32
  (:func:`scan_in_memory`); ``explain_scan`` then takes the result through :func:`read`
  instead of reading again. At most one scan (and its organ map) is read ahead, on top
  of the scan being explained. A read that fails keeps its exception, and its warnings
  are kept too (``warnings._showwarnmsg`` is routed per thread): both are raised where
  the scan would have been read, so the scan fails or warns exactly as before. Nothing is
  written, so a killed run leaves nothing of it behind.
- :class:`BackgroundWriter`: runs write jobs one at a time, in order, in a thread, while
  the caller computes the next map; :meth:`BackgroundWriter.submit` first waits for the
  job before, so at most one map is being written while the next is computed. A failed
  job's exception is raised by the next :meth:`~BackgroundWriter.submit` or by
  :meth:`~BackgroundWriter.drain`; :meth:`~BackgroundWriter.close` always waits for the
  running job, so nothing writes after the caller has given up. Inside
  :func:`batch_writer` every scan uses the batch's writer (:func:`scan_writer`): a scan's
  last map is still being written when the scan hands over, and ``batch`` queues the
  scan's end (:meth:`~BackgroundWriter.then`) behind it, so it runs while the next scan
  is read and explained. Warnings of such jobs are kept for their scan
  (:func:`keep_warnings`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")

_active = threading.local()
_capture = threading.local()  # the warnings kept by keep_warnings, per thread
_passed_on: list[Callable[..., Any]] = []


def _dispatch(msg: Any) -> None:
    """``warnings._showwarnmsg``: a thread inside :func:`keep_warnings` (a read running
    ahead, a write on a batch's writer) keeps its warnings for the scan they belong to;
    every other thread shows them as before."""
    sink = getattr(_capture, "sink", None)
    if sink is not None:
        sink.append(msg)
    else:
        _passed_on[0](msg)


def _install_dispatch() -> None:
    if warnings._showwarnmsg is not _dispatch:  # type: ignore[attr-defined]
        _passed_on[:] = [warnings._showwarnmsg]  # type: ignore[attr-defined]
        warnings._showwarnmsg = _dispatch  # type: ignore[attr-defined]


def _kept(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, Any, list[Any]]:
    """``fn(*args)`` in a read-ahead thread: ``(result, error, warnings)``, never raising."""
    sink: list[Any] = []
    with keep_warnings(sink):
        try:
            return fn(*args), None, sink
        except Exception as err:  # noqa: BLE001 - raised again where the scan is read
            return None, err, sink


class ReadAhead:
    """Reads started ahead in one thread, taken by key (:func:`read`).

    Each :meth:`start` opens a generation (the reads of one scan); what the generation
    before started and was not taken yet stays (the scan about to be explained), anything
    older is dropped: at most the reads of the current scan and of the next one are held.
    """

    def __init__(self) -> None:
        _install_dispatch()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hirescam3d-read-ahead")
        self._entries: list[tuple[int, Hashable, Future]] = []
        self._generation = 0
        self._held: dict[Hashable, tuple[Callable[..., Any], tuple[Any, ...]]] | None = None

    def start(self, reads: dict[Hashable, tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
        """Start reading ``{key: (function, args)}`` in the background."""
        self._generation += 1
        self._entries = [e for e in self._entries if e[0] >= self._generation - 1]
        for key, (fn, args) in reads.items():
            self._entries.append((self._generation, key, self._pool.submit(_kept, fn, args)))

    def start_after_read(
        self, reads: dict[Hashable, tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> None:
        """:meth:`start` ``reads`` once the scan being explained is in memory as float32
        (:func:`scan_in_memory`) or at :meth:`release`: the next scan's voxels are not
        read while this one's are being converted, so the two are not held at once."""
        self._held = reads

    def release(self) -> None:
        """Start the reads :meth:`start_after_read` held back, if any."""
        reads, self._held = self._held, None
        if reads is not None:
            self.start(reads)

    def take(self, key: Hashable) -> Future | None:
        """The earliest read of ``key`` started and not taken yet, else None."""
        for i, (_, k, future) in enumerate(self._entries):
            if k == key:
                del self._entries[i]
                return future
        return None

    def close(self) -> None:
        """Drop what was not taken and wait for a read still running."""
        self._entries, self._held = [], None
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _made_active(name: str, value: T) -> Iterator[T]:
    """``value`` as this thread's active ``name`` inside the block (the one before after)."""
    previous = getattr(_active, name, None)
    setattr(_active, name, value)
    try:
        yield value
    finally:
        setattr(_active, name, previous)


@contextlib.contextmanager
def read_ahead() -> Iterator[ReadAhead]:
    """Make a :class:`ReadAhead` the one :func:`read` consults (in this thread)."""
    reader = ReadAhead()
    try:
        with _made_active("reader", reader):
            yield reader
    finally:
        reader.close()


def read(key: Hashable, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, or the result (or exception) of the same read started ahead under
    ``key`` by the active :class:`ReadAhead`."""
    reader = getattr(_active, "reader", None)
    future = reader.take(key) if reader is not None else None
    if future is None:
        return fn(*args)
    result, error, kept = future.result()
    for msg in kept:  # shown now, as if raised here (the scan's own warnings)
        warnings.warn_explicit(msg.message, msg.category, msg.filename, msg.lineno,
                               source=msg.source)  # fmt: skip
    if error is not None:
        raise error
    return result


def scan_in_memory() -> None:
    """The scan being explained is in memory: the active :class:`ReadAhead` (if any) starts
    the reads it held back (:meth:`ReadAhead.start_after_read`)."""
    reader = getattr(_active, "reader", None)
    if reader is not None:
        reader.release()


class BackgroundWriter:
    """Write jobs run in order in one thread. :meth:`submit` waits for the job before, so
    at most one runs while the caller works; :meth:`then` queues one more behind it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hirescam3d-writer")
        self._last: Future | None = None

    def submit(self, fn: Callable[..., T], *args: Any, sink: list[Any] | None = None) -> Future:
        """Wait for the job before (raising its exception), then start ``fn(*args)``.
        ``sink``: a list that keeps the job's warnings (shown later, by its scan) instead
        of showing them now."""
        self.drain()
        return self.then(fn, *args, sink=sink)

    def then(self, fn: Callable[..., T], *args: Any, sink: list[Any] | None = None) -> Future:
        """Queue ``fn(*args)`` after the jobs before without waiting for them; the next
        :meth:`submit` or :meth:`drain` waits for it and raises its exception."""
        self._last = self._pool.submit(_kept_in, sink, fn, *args)
        return self._last

    def drain(self) -> None:
        """Wait for the running job; raise its exception if it failed."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def idle(self) -> None:
        """Wait for every job queued so far, without raising their exceptions."""
        if self._last is not None:
            wait([self._last])

    def close(self) -> None:
        """Wait for the jobs queued (their exceptions, if any, are left to :meth:`drain`)."""
        self._pool.shutdown(wait=True)


def _kept_in(sink: list[Any] | None, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, its warnings kept in ``sink`` if one is given."""
    with keep_warnings(sink):
        return fn(*args)


@contextlib.contextmanager
def keep_warnings(sink: list[Any] | None) -> Iterator[None]:
    """Keep the warnings raised in this thread inside the block in ``sink`` (as
    ``warnings.WarningMessage``) instead of showing them; None: show them as they come."""
    if sink is None:
        yield
        return
    _install_dispatch()
    _capture.sink = sink
    try:
        yield
    finally:
        _capture.sink = None


@contextlib.contextmanager
def background_writer() -> Iterator[BackgroundWriter]:
    """A :class:`BackgroundWriter`, drained on success and always closed: on an error no
    job is still writing when the error leaves the block."""
    writer = BackgroundWriter()
    try:
        yield writer
        writer.drain()
    finally:
        writer.close()


@contextlib.contextmanager
def batch_writer() -> Iterator[BackgroundWriter]:
    """One :class:`BackgroundWriter` for every scan explained inside the block (in this
    thread, see :func:`scan_writer`), closed at its end after its queued jobs ran."""
    with background_writer() as writer, _made_active("writer", writer):
        yield writer


def shared_writer() -> BackgroundWriter | None:
    """The writer of the :func:`batch_writer` block this thread runs in, if any."""
    return getattr(_active, "writer", None)


@contextlib.contextmanager
def scan_writer() -> Iterator[BackgroundWriter]:
    """The writer of one scan's maps: the :func:`shared_writer`, left running on success
    (the scan's last write overlaps what comes next; its caller waits for it), or a
    :func:`background_writer` of its own. Either way, on an error no job is still
    writing when the error leaves the block."""
    shared = shared_writer()
    if shared is None:
        with background_writer() as writer:
            yield writer
        return
    try:
        yield shared
    except BaseException:
        shared.idle()
        raise


def scan_key(path: Any, series: str | None) -> tuple[str, str, str | None]:
    """The :func:`read` key of ``io.read_stored(path, series=series)``."""
    return ("scan", os.path.abspath(os.fspath(path)), series)


def organs_key(path: Any, names: Any) -> tuple[str, str, str | None]:
    """The :func:`read` key of ``organs.load_organ_map(path, names)``."""
    return ("organs", os.path.abspath(os.fspath(path)),
            None if names is None else os.path.abspath(os.fspath(names)))  # fmt: skip
