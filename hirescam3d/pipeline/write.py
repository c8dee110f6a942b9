"""The outputs of :func:`~hirescam3d.pipeline.scan.explain_scan`: every map, one at a time,
the predicted masks and ``report.json`` last.

Each map is computed on its grid (:mod:`~hirescam3d.pipeline.to_scan_grid`), written in the
background while the next one is placed (at most one map being written,
:mod:`hirescam3d.pipeline.stages`) and dropped. Everything is written into a temporary folder
inside the output folder and moved into place whole at the end: an error or a kill leaves
the output folder as it was (:mod:`hirescam3d.io.staging`). In ``hirescam3d batch`` the
writer is the batch's: the last map's write and the end (:meth:`PendingOutputs.finish`: the
masks, the report, the move into place) run on it while the next scan is explained.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hirescam3d.io import outputs
from hirescam3d.io.montage import save_montage
from hirescam3d.pipeline import scan_memory, stages
from hirescam3d.pipeline.explanation import Explanation
from hirescam3d.pipeline.options import Progress, ScanOptions, step
from hirescam3d.pipeline.read import ScanInputs
from hirescam3d.pipeline.report import scan_report


class MapsWritten(NamedTuple):
    """``written``: ``{key: path}`` of the files written so far (in their staging folder);
    ``dicom``: the :class:`~hirescam3d.io.outputs.DicomMaps` or None; ``timings``:
    ``invert_s`` (placing the maps) and ``write_s`` (writing them); ``last``: the last
    map's write (still running on a batch's writer, :func:`stages.scan_writer`; None if
    no map); ``spare``: its array, to keep for the next scan once that write is done."""

    written: dict[str, Path]
    dicom: Any
    timings: dict[str, float]
    last: Future | None
    spare: list[np.ndarray]


class _TwoBuffers:
    """Two float32 F-ordered arrays of the scan's shape, handed out in turn: one holds the
    map being placed, the other the map being written. The background writer runs one job
    at a time and starts one only after the one before has finished, so an array is free
    again when its turn comes. Reusing them spares the page faults of a fresh 300 MB array
    per map, which cost more than placing the map. ``first``: memory to use as the first
    array (the scan's own voxels, no longer needed), so at most one array is new."""

    def __init__(self, shape: tuple[int, ...], first: np.ndarray | None = None) -> None:
        self.shape, self.turn = shape, 0
        self.arrays = [] if first is None else [np.ndarray(shape, np.float32, first, order="F")]

    def next(self) -> np.ndarray:
        if len(self.arrays) < 2:
            self.arrays.append(scan_memory.empty(self.shape, order="F"))
        self.turn += 1
        return self.arrays[(self.turn - 1) % 2]

    def in_flight(self) -> list[np.ndarray]:
        """Keep (:func:`scan_memory.keep`) the arrays but the one last handed out (its map
        may still be being written); return that one in a list, to keep once it is."""
        if not self.arrays:
            return []
        last = self.arrays.pop((self.turn - 1) % len(self.arrays))
        scan_memory.keep(self.arrays)
        return [last]


def _release_voxels(scan: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """Empty ``scan.array``; return the old array if it is float32 of ``shape`` (the maps')
    and nothing else refers to it (a view or a tensor of it would see the maps), else
    None."""
    voxels, scan.array = scan.array, np.empty((0, 0, 0), np.float32)
    reusable = (
        voxels.shape == tuple(shape)
        and voxels.dtype == np.float32
        and voxels.flags.c_contiguous
        and voxels.flags.writeable
        and sys.getrefcount(voxels) == 2  # this name and the call's argument
    )
    return voxels if reusable else None


def _write_maps(
    result: Explanation,
    scan: Any,
    paths: dict[str, Path],
    options: ScanOptions,
    sink: list[Any] | None = None,
) -> MapsWritten:
    """Write every map of ``result`` on the chosen grid in every chosen format (and its PNG
    montage); the scan's voxels are freed first (``scan.array`` emptied). On a batch's
    writer the last map is still being written on return (``MapsWritten.last``), its
    warnings kept in ``sink``."""
    written: dict[str, Path] = {}
    dicom = None
    if options.dicom_out:  # before the scan's voxels are freed: a non-DICOM scan is written first
        dicom = outputs.DicomMaps(scan, options.formats, options.seg_threshold,
                                  paths.get("ct_dicom"), options.stem, options.force)  # fmt: skip
        if options.ct_series:
            written["ct_dicom"] = paths["ct_dicom"]
    png, on_scan_grid, force = options.png, options.grid == "scan", options.force
    ct = scan.array if png else None
    # the scan's voxels are not needed any more: their memory holds the first map
    spare = _release_voxels(scan, result.grid.scan_shape)
    timings = {"invert_s": 0.0, "write_s": 0.0}

    def write_pair(finding: str, method: str, volume: np.ndarray, volume_affine: Any,
                   on_scan: np.ndarray | None, clean: bool) -> None:  # fmt: skip
        t, key = time.perf_counter(), f"{finding}/{method}"
        if "nifti" in options.formats:
            written[key] = outputs.write_map(
                paths[key], volume, volume_affine, method, options.values, options.dtype,
                scan.header, force=force, checked=clean,
            )  # fmt: skip
        if dicom is not None:
            written.update(dicom.write(paths, volume, volume_affine, finding, method,
                                       options.values))  # fmt: skip
        if png:
            written[key + "/png"] = save_montage(
                ct, on_scan, paths[key + "/png"], affine=scan.affine,
                title=(f"{options.stem}: {finding} ({method}, "
                       f"p = {result.probabilities[finding]:.2f})"),
                force=force,
            )  # fmt: skip
        timings["write_s"] += time.perf_counter() - t

    buffers = _TwoBuffers(result.grid.scan_shape, spare)
    del spare
    last = None
    with stages.scan_writer() as writer:
        for pair in result.pairs:
            t = time.perf_counter()
            clean = False
            if on_scan_grid:
                placed = result.on_scan(pair, buffers.next())
                volume, volume_affine, clean = placed.volume, scan.affine, placed.clean
                del placed
            else:
                volume, volume_affine = result.model_map(pair), result.grid.affine
            on_scan = None
            if png:
                on_scan = volume if on_scan_grid else result.scan_map(pair)
            timings["invert_s"] += time.perf_counter() - t
            last = writer.submit(write_pair, *pair, volume, volume_affine, on_scan, clean,
                                 sink=sink)  # fmt: skip
            del volume, on_scan
    return MapsWritten(written, dicom, timings, last, buffers.in_flight())


def start_outputs(
    result: Explanation,
    inputs: ScanInputs,
    options: ScanOptions,
    progress: Progress | None,
    start: float,
) -> PendingOutputs:
    """Write the maps (:func:`_write_maps`) into a staging folder; then
    :meth:`PendingOutputs.finish` writes the predicted masks (on the scan's grid) and
    ``report.json`` last, and moves them all into place. ``start``: when the run began
    (``perf_counter``), for its total time. Nothing is left behind if any write fails.
    On a batch's writer (:func:`stages.batch_writer`) the last map is still being written
    on return, so ``finish`` may run as the writer's next job while the next scan is
    explained."""
    from hirescam3d.io.staging import Staging

    paths = options.paths(result.explained)
    outputs.check_writable(paths.values(), options.force)
    stage = Staging(options.out_dir)
    paths = stage.redirect(paths)
    sink: list[Any] | None = None if stages.shared_writer() is None else []
    try:
        step(progress, "write", 0.9)
        maps = _write_maps(result, inputs.scan, paths, options, sink)
    except BaseException:
        stage.discard()
        raise
    return PendingOutputs(result, inputs, options, start, stage, paths, maps,
                          scan_memory.active(), sink)  # fmt: skip


@dataclass
class PendingOutputs:
    """A scan's outputs with every map handed to the writer (:func:`start_outputs`).

    ``warnings``: those of the maps' writes kept for the scan on a batch's writer
    (``warnings.WarningMessage``; None where they were shown as they came)."""

    result: Explanation
    inputs: ScanInputs
    options: ScanOptions
    start: float
    stage: Any
    paths: dict[str, Path]
    maps: MapsWritten
    memory: scan_memory.ScanMemory | None
    warnings: list[Any] | None

    def finish(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """Wait for the last map's write, write the predicted masks and ``report.json``,
        move everything into place; ``(written {key: path}, report)``. Nothing is left
        behind if any of it fails."""
        result, inputs, options, paths = self.result, self.inputs, self.options, self.paths
        try:
            self._last_write()
            written, timings = self.maps.written, {**inputs.timings, **self.maps.timings}
            t = time.perf_counter()
            for finding in result.masks:  # the predicted masks, on the scan's grid
                written[f"{finding}/mask"] = outputs.write_labels(
                    paths[f"{finding}/mask"], result.mask_on_scan(finding), inputs.scan.affine,
                    force=options.force, name="predicted",
                )  # fmt: skip
            timings["write_s"] += time.perf_counter() - t
            timings.update(result.timings)
            timings["total_s"] = time.perf_counter() - self.start
            result.timings = timings
            report = scan_report(result, inputs, options, paths, self.maps.dicom)
            written["report"] = outputs.write_json(paths["report"], report, force=options.force)
            written = self.stage.commit(written)
        except BaseException:
            self.stage.discard()
            raise
        return written, report

    def _last_write(self) -> None:
        """Wait for the last map's write (raising its error); keep its array for the next
        scan."""
        try:
            if self.maps.last is not None:
                self.maps.last.result()
        finally:
            scan_memory.keep(self.maps.spare, self.memory)
