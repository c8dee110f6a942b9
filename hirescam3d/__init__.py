"""hirescam3d: faithful explanations of 2D and 3D convolutional networks.

The core is free of GUI and CLI dependencies: ``import hirescam3d`` needs only
torch (MONAI, nibabel and SimpleITK are imported by the modules that use them).
"""

from .errors import HiResCAMError, InputError, LayerError, ModelError, ScanError, TargetError
from .explainer import Explainer, ExplanationResult
from .methods import METHODS, cam, gradcam, hirescam, register_method

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
