"""Explain a scan file, or a scan held in memory, on the scan's own grid.

:func:`explain_scan` runs the stages in order: check the options
(:mod:`~hirescam3d.pipeline.options`) -> read (:mod:`~hirescam3d.pipeline.read`) -> explain
on the model's grid (:func:`~hirescam3d.pipeline.arrays.explain_arrays`) -> write the maps on
the scan's grid and ``report.json`` (:mod:`~hirescam3d.pipeline.write`).
:func:`explain_image` keeps every map on the scan's grid in memory instead (the napari
widget and ``compare``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hirescam3d.io.outputs import _json_safe
from hirescam3d.pipeline.arrays import explain_arrays
from hirescam3d.pipeline.explanation import LazyMaps, ScanExplanation, scan_explanation
from hirescam3d.pipeline.options import ModelArg, Progress, check_scan_options, step
from hirescam3d.pipeline.read import read_inputs
from hirescam3d.pipeline.regions import RegionArg
from hirescam3d.pipeline.write import PendingOutputs, start_outputs


def explain_scan(
    scan_path: str | Path,
    out_dir: str | Path,
    model: ModelArg = "demo",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    organs_path: str | Path | None = None,
    organ_names_path: str | Path | None = None,
    png: bool = False,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    report_name: str = "report.json",
    values: str = "unit",
    dtype: str = "float32",
    grid: str = "scan",
    formats: str | Sequence[str] = ("nifti",),
    seg_threshold: float = 0.5,
    series: str | None = None,
    region: RegionArg = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    *,
    defer: bool = False,
) -> tuple[ScanExplanation, dict[str, Path]] | PendingScan:
    """Explain a scan file and write the results into ``out_dir``.

    Writes ``<scan-stem>_<finding>_<method>.nii.gz`` per explained finding and method, one
    map at a time (computed, written, dropped), optional PNG montages, and
    ``report.json`` last. ``grid="scan"``: the scan's exact shape and affine;
    ``"model"``: the model's input grid with its own affine (viewers place it by affine;
    small files). ``dtype``: ``float32`` (exact), ``int16`` or ``uint8`` (scaled
    integers, see :func:`hirescam3d.io.outputs.write_map`). ``formats``: any of ``nifti``,
    ``dicom`` (a DICOM Parametric Map per map) and ``dicom-seg`` (a DICOM Segmentation of
    each map at ``seg_threshold``, in the map's units); for a scan that is not DICOM
    these also write the scan as a DICOM CT series (``<stem>_ct_dicom/``) for the maps
    to reference (see :class:`hirescam3d.io.outputs.DicomMaps`). ``series``: the series UID
    to read from a DICOM folder holding several. Every target path is checked
    before the first is written: an existing one without ``force`` is an
    :class:`~hirescam3d.io.scans.OutputError` and nothing is written.

    Segmentation models (see :func:`explain_arrays`): ``region`` is a mask file
    (nonzero = region) on the scan's grid (same shape, affine within 1e-3 mm, else an
    InputError naming both grids), a mask array, or ``"predicted"`` (the default); with
    ``"predicted"``, each explained finding's predicted mask is also written, on the
    scan's grid with its affine, as the label map ``<stem>_<finding>_predicted_mask.nii.gz``.
    ``report.json`` holds each finding's region score (logits) and the ``region``
    section. ``roi_size``/``overlap``/``sw_batch_size``: the sliding window.

    Returns the explanation (its ``maps`` computed on access) and ``{key: path}`` of the
    written files (keys as in :func:`hirescam3d.io.outputs.output_paths`). With ``defer``,
    returns a :class:`PendingScan` once every map is handed to the writer; its ``finish``
    returns those (``hirescam3d batch`` runs it on its writer while the next scan is
    explained, see :func:`hirescam3d.pipeline.stages.batch_writer`).
    """
    start = time.perf_counter()
    options = check_scan_options(
        scan_path, out_dir, model, findings, methods, organs_path, region, formats, values,
        dtype, grid, png, seg_threshold, report_name, force,
    )  # fmt: skip
    step(progress, "read", 0.0)
    inputs = read_inputs(scan_path, series, organs_path, organ_names_path, region,
                         options.region_path)  # fmt: skip
    result = explain_arrays(
        inputs.scan.array, inputs.scan.affine, (options.network, options.info),
        options.requested, options.methods, layer, inputs.organs, inputs.organ_names, device,
        progress, values, inputs.region, roi_size, overlap, sw_batch_size,
    )  # fmt: skip
    inputs.region = None  # the scan-grid region is not needed any more
    result.warnings[:0] = inputs.notes
    pending = PendingScan(start_outputs(result, inputs, options, progress, start), progress)
    return pending if defer else pending.finish()


class PendingScan(NamedTuple):
    """:func:`explain_scan` with ``defer=True``: every map handed to the writer;
    :meth:`finish` writes the rest and returns what :func:`explain_scan` returns."""

    outputs: PendingOutputs
    progress: Progress | None

    @property
    def warnings(self) -> list[Any] | None:
        """The warnings of the writes kept for this scan on a batch's writer (see
        :class:`~hirescam3d.pipeline.write.PendingOutputs`)."""
        return self.outputs.warnings

    def finish(self) -> tuple[ScanExplanation, dict[str, Path]]:
        """Wait for the maps' writes, write the masks and the report, move the outputs
        into place: ``(explanation, {key: path})``."""
        written, report = self.outputs.finish()
        step(self.progress, "done", 1.0)
        result, inputs = self.outputs.result, self.outputs.inputs
        explanation = scan_explanation(result, LazyMaps(result), inputs.organs,
                                       inputs.organ_names)  # fmt: skip
        explanation.report = json.loads(json.dumps(_json_safe(report), default=str))
        return explanation, written


def explain_image(
    image: np.ndarray,
    affine: np.ndarray,
    model: ModelArg = "demo",
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("hirescam",),
    layer: str | None = None,
    organs: np.ndarray | None = None,
    organ_names: dict[int, str] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    values: str = "unit",
    region: RegionArg = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> ScanExplanation:
    """Explain a scan on its own grid: :func:`explain_arrays` with every map on the scan's
    grid, held in memory (what the napari widget and ``compare`` show). ``region``,
    ``roi_size``, ``overlap``, ``sw_batch_size``: for segmentation models, as in
    :func:`explain_arrays`; the predicted masks are in ``ScanExplanation.masks``.

    Maps are placed on the model's grid by the layer's traced geometry and brought back to
    ``(I, J, K)`` with linear interpolation, as MONAI ``Invertd`` does (and by ``Invertd``
    itself for preprocessing the separable path does not cover):

    - ``values="unit"``: display maps in [0, 1] (ReLU, divided by the maximum);
    - ``values="logit"``: signed contribution density in logits per scan voxel, summing
      (over the scan) to the part of the contributions inside the scan.

    The report holds, per finding and method, the logit contributions (HiResCAM at a
    guaranteed layer: total, bias, outside the scan and per organ) and, with ``organs``,
    each map's shares of positive evidence per organ, all on the explanation grid.
    """
    result = explain_arrays(image, affine, model, findings, methods, layer, organs,
                            organ_names, device, progress, values, region, roi_size, overlap,
                            sw_batch_size)  # fmt: skip
    step(progress, "invert", 0.6)
    t = time.perf_counter()
    maps = {p: result.scan_map(p) for p in result.pairs}
    result.timings["invert_s"] = time.perf_counter() - t
    explanation = scan_explanation(result, maps, organs, organ_names)
    explanation.masks = {f: result.mask_on_scan(f) for f in result.masks}
    return explanation
