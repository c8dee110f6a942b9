"""The CLI's garbage collection at start (cli/startup.py). Oracle: the gc module's state and
a reference cycle's weakref."""

from __future__ import annotations

import gc
import weakref

from hirescam3d.cli import startup


class _Node:
    pass


def test_collection_resumes_after_the_start_and_frees_its_garbage():
    frozen = gc.get_freeze_count()
    try:
        startup.pause_collection()
        assert not gc.isenabled()
        node = _Node()
        node.self = node  # a cycle: only the collector frees it
        gone = weakref.ref(node)
        del node
        startup.startup_done()
        assert gc.isenabled() and gone() is None  # collected before the freeze, not kept
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_caller_with_collection_on_keeps_its_setting():
    frozen = gc.get_freeze_count()
    startup.startup_done()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
