"""Files -> arrays on the scan's grid: the scan, its organ map and a region file.

A scan ``hirescam3d batch`` read ahead is taken from :mod:`hirescam3d.pipeline.stages`
instead of being read again; the organ map is read first, so the reader's temporaries never
meet the scan's, and aligned onto the scan's grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.pipeline import scan_memory, stages
from hirescam3d.pipeline.regions import RegionArg, load_region
from hirescam3d.pipeline.stages import organs_key, scan_key


@dataclass
class ScanInputs:
    """What :func:`read_inputs` read: the :class:`~hirescam3d.io.scans.Scan`, the organ
    labels on its grid (and their names) if given, the region (read from its file, else as
    given), the readers' warnings and ``timings`` (``read_organs_s``, ``read_s``)."""

    scan: Any
    organs: np.ndarray | None
    organ_names: dict[int, str] | None
    region: RegionArg
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def read_inputs(
    scan_path: str | Path,
    series: str | None,
    organs_path: str | Path | None,
    organ_names_path: str | Path | None,
    region: RegionArg,
    region_path: Path | None,
) -> ScanInputs:
    """Read the scan (``series``: of a DICOM folder holding several), the organ map (aligned
    onto the scan's grid) and the region file ``region_path`` (checked to lie on the scan's
    grid; None: ``region`` as given)."""
    from hirescam3d.io import scans as io
    from hirescam3d.io.organs import align_organs, load_organ_map

    organs = organ_names = labels = None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if organs_path is not None:
        # stages.read: the result read ahead while the scan before was explained (batch)
        labels, labels_affine, organ_names = stages.read(
            organs_key(organs_path, organ_names_path), load_organ_map, organs_path,
            organ_names_path,
        )  # fmt: skip
    timings["read_organs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # as stored (int16 CT: half the memory of float32) while read ahead; float32 here, in
    # the memory a batch keeps for its scans (not beside it, even where already float32)
    empty = scan_memory.empty if scan_memory.active() is not None else None
    scan = io.finish_scan(stages.read(scan_key(scan_path, series), io.read_stored,
                                      scan_path, series), empty)  # fmt: skip
    stages.scan_in_memory()  # batch: the next scan's read may start now
    notes = list(scan.warnings)
    timings["read_s"] = time.perf_counter() - t
    if labels is not None:
        t = time.perf_counter()
        organs, note = align_organs(
            labels, labels_affine, scan.array.shape, scan.affine, f"organ map {organs_path}"
        )
        labels = None
        if note:
            notes.append(note)
        timings["read_organs_s"] += time.perf_counter() - t
    if region_path is not None:
        region = load_region(region_path, scan.array.shape, scan.affine)
    return ScanInputs(scan, organs, organ_names, region, notes, timings)
