"""Old module paths that still import: the flat layout before the subpackages.

``import hirescam3d.zoo`` and ``from hirescam3d.methods import hirescam`` keep working, and
so do bundles whose ``network_def`` names ``hirescam3d.models.axialnet.AxialNet``: each old
name is the very module object of its new home (no copy, no second import).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

MOVED: dict[str, str] = {
    "attribution": "core.attribution",
    "audit": "core.audit",
    "capture": "core.capture",
    "explainer": "core.explainer",
    "method_names": "core.method_names",
    "methods": "core.methods",
    "postprocess": "core.postprocess",
    "regions": "core.regions",
    "scan_grid": "core.placement",
    "slices": "core.slices",
    "sliding": "core.sliding",
    "trace": "core.trace",
    "dicom": "io.dicom",
    "dicom_out": "io.dicom_write",
    "gzip_stream": "io.gzip_stream",
    "image2d": "io.image2d",
    "input_checks": "io.input_checks",
    "nifti": "io.nifti",
    "organs": "io.organs",
    "out_lock": "io.out_lock",
    "outputs": "io.outputs",
    "staging": "io.staging",
    "totalseg": "io.totalseg",
    "nnunet_phantom": "data.nnunet_phantom",
    "phantom": "data.phantom",
    "sample": "data.sample",
    "bundle": "models.bundle",
    "bundle_config": "models.bundle_config",
    "bundle_monai": "models.bundle_monai",
    "handle": "models.handle",
    "nnunet": "models.nnunet",
    "nnunet_handle": "models.nnunet_handle",
    "seg_postprocess": "models.seg_postprocess",
    "zoo": "models.zoo",
    "models.axialnet": "models.nets.axialnet",
    "models.baselines": "models.nets.baselines",
    "models.voc": "models.nets.voc",
    "models.train_demo": "models.training.train_demo",
    "models.train_seg": "models.training.train_seg",
    "models.tune_seg_masks": "models.training.tune_seg_masks",
    "explain2d": "pipeline.explain2d",
    "nnunet_explain": "pipeline.nnunet_explain",
    "nnunet_scan": "pipeline.nnunet_scan",
    "scan_prediction": "pipeline.scan_prediction",
    "stages": "pipeline.stages",
    "compare": "evaluate.compare",
    "figures": "evaluate.figures",
    "metrics": "evaluate.metrics",
    "monai_api": "monai.visualize",
    "transforms": "monai.transforms",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``hirescam3d.<old>`` and hands back the module at its new path."""

    def __init__(self, package: str) -> None:
        self.targets = {f"{package}.{old}": f"{package}.{new}" for old, new in MOVED.items()}
        self.specs: dict[str, ModuleSpec] = {}

    def find_spec(self, name: str, path: object = None, target: object = None):
        if name in self.targets:
            origin = importlib.util.find_spec(self.targets[name]).origin
            return importlib.util.spec_from_loader(name, self, origin=origin)
        return None

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(self.targets[spec.name])
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed at its new path. Only give it back its
        own spec, which the import system replaced with the old name's."""
        module.__spec__ = self.specs[module.__spec__.name]

    def get_code(self, name: str):
        """The new module's code, so ``python -m hirescam3d.<old>`` (the commands recorded
        in bundles trained before 0.2) still runs."""
        new = self.targets[name]
        return importlib.util.find_spec(new).loader.get_code(new)


def install(package: str) -> None:
    """Let the old module paths of ``package`` import (idempotent)."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths(package))
