"""The garbage collector while the CLI starts.

Importing torch and MONAI and loading a model make a few million objects, and every full
collection in the meantime walks all of them: about 0.7 s of each run on a 2-core
machine. :func:`~hirescam3d.cli.main.main` pauses collection when the process starts; the
commands that load a model resume it once it is loaded (:func:`startup_done`): one
collection frees the garbage of the start (the model load leaves some 200 MB of it in
cycles), and what is left is frozen (``gc.freeze``), so later collections skip it. The
commands that load no model are short and run without collection to their end.
"""

from __future__ import annotations

import gc


def pause_collection() -> None:
    """Stop automatic garbage collection until :func:`startup_done`."""
    gc.disable()


def startup_done() -> None:
    """If :func:`pause_collection` stopped collection: collect once, freeze what is left
    and collect automatically again (else nothing: a caller's own setting stays)."""
    if not gc.isenabled():
        gc.collect()
        gc.freeze()
        gc.enable()
