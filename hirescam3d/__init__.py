"""hirescam3d: faithful explanations of 2D and 3D convolutional networks.

The core is free of GUI and CLI dependencies. ``import hirescam3d`` itself imports
nothing heavy: torch loads with the first use of ``Explainer`` or a method (so that the
command line answers listings and ``--help`` without it); MONAI, nibabel and SimpleITK
are imported by the modules that use them.
"""

from typing import TYPE_CHECKING, Any

from hirescam3d import _moved
from hirescam3d.errors import (
    HiResCAMError,
    InputError,
    LayerError,
    ModelError,
    ScanError,
    TargetError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.core.explainer import Explainer, ExplanationResult
    from hirescam3d.core.methods import METHODS, cam, gradcam, hirescam, register_method

_LAZY = {
    "Explainer": "core.explainer",
    "ExplanationResult": "core.explainer",
    "METHODS": "core.methods",
    "cam": "core.methods",
    "gradcam": "core.methods",
    "hirescam": "core.methods",
    "register_method": "core.methods",
}

_moved.install(__name__)


def __getattr__(name: str) -> Any:
    """Import the torch-backed names on first use."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ExplanationResult",
    "Explainer",
    "HiResCAMError",
    "InputError",
    "LayerError",
    "ModelError",
    "ScanError",
    "TargetError",
    "__version__",
    "cam",
    "gradcam",
    "hirescam",
    "register_method",
]
