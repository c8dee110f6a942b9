"""Scan -> MONAI preprocessing -> one explained forward pass -> maps on the scan's grid.

The data path, one module per stage, top to bottom:

1. :mod:`~hirescam3d.pipeline.options` checks the options before any work (model, device,
   findings, methods, storage, output paths);
2. :mod:`~hirescam3d.pipeline.read` reads the scan, organ map and region file
   (:mod:`~hirescam3d.pipeline.regions` checks a region lies on the scan's grid);
3. :mod:`~hirescam3d.pipeline.to_model_grid` preprocesses the scan with the model's MONAI
   dictionary transforms (:func:`preprocess_transforms`);
4. one explained pass for every finding and method:
   :mod:`~hirescam3d.pipeline.classification` (one score per finding) or
   :mod:`~hirescam3d.pipeline.segmentation` (region scores, sliding windows, slices);
5. :mod:`~hirescam3d.pipeline.contributions`: contributions and organ shares on the
   explanation grid (:mod:`hirescam3d.core.attribution`); stages 3-5 are
   :func:`explain_arrays` (:mod:`~hirescam3d.pipeline.arrays`), returning a typed
   :class:`Explanation` (:mod:`~hirescam3d.pipeline.explanation`);
6. :mod:`~hirescam3d.pipeline.to_scan_grid` puts one map at a time on the scan's grid:
   placed by the layer's traced geometry and resampled as MONAI ``Invertd`` would, in one
   separable pass (:class:`~hirescam3d.core.placement.ModelGrid`; ``Invertd`` itself,
   :func:`~hirescam3d.core.placement.invert_maps`, is the reference and the fallback);
7. :mod:`~hirescam3d.pipeline.write` streams the maps to :mod:`hirescam3d.io.outputs` and
   writes ``report.json`` (:mod:`~hirescam3d.pipeline.report`) last.

:func:`explain_scan` (:mod:`~hirescam3d.pipeline.scan`) runs them in order;
:func:`explain_image` (every map on the scan's grid in memory) serves the napari widget
and ``compare``. This package only re-exports the names of the former single module.
"""

from hirescam3d.core.placement import ModelGrid, invert_maps
from hirescam3d.io.outputs import _json_safe, output_paths  # noqa: F401 - kept importable here
from hirescam3d.pipeline import stages
from hirescam3d.pipeline.arrays import explain_arrays
from hirescam3d.pipeline.explanation import Explanation, FindingScore, ScanExplanation
from hirescam3d.pipeline.options import (
    PROBABILITY_THRESHOLD,
    VALUES,
    ModelArg,
    Pair,
    Progress,
    check_findings,
    check_methods,
    check_storage,
    resolve_device,
    resolve_model,
    software_versions,
)
from hirescam3d.pipeline.regions import (
    REGION_TOLERANCE_MM,
    RegionArg,
    check_region_grid,
    grid_text,
    load_region,
)
from hirescam3d.pipeline.scan import explain_image, explain_scan
from hirescam3d.pipeline.to_model_grid import preprocess_transforms

__all__ = [
    "PROBABILITY_THRESHOLD", "REGION_TOLERANCE_MM", "VALUES", "Explanation", "FindingScore",
    "ModelArg", "ModelGrid", "Pair", "Progress", "RegionArg", "ScanExplanation",
    "check_findings", "check_methods", "check_region_grid", "check_storage", "explain_arrays",
    "explain_image", "explain_scan", "grid_text", "invert_maps", "load_region", "output_paths",
    "preprocess_transforms", "resolve_device", "resolve_model", "software_versions", "stages",
]  # fmt: skip
