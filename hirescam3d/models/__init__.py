"""Models: the zoo, bundles (ours and MONAI's), nnU-Net model folders and the model handle
that loads them; architectures in :mod:`hirescam3d.models.nets`, training recipes in
:mod:`hirescam3d.models.training`.

``from hirescam3d.models import AxialNet`` (and the other names of
:mod:`hirescam3d.models.nets`) keeps working.
"""

from importlib import import_module
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(import_module(f"{__name__}.nets"), name)
