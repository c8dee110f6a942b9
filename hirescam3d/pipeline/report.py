"""``report.json`` of :func:`~hirescam3d.pipeline.scan.explain_scan`: the explanation's report
(:meth:`~hirescam3d.pipeline.explanation.Explanation.to_dict`) with the input files and the
outputs written (names, formats, storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hirescam3d.pipeline.explanation import Explanation
from hirescam3d.pipeline.options import ScanOptions
from hirescam3d.pipeline.read import ScanInputs


def organ_map_entry(path: str | Path, names: dict[int, str] | None) -> dict[str, Any]:
    """The report's ``organ_map`` section: the organ map's path and its label names."""
    return {"path": str(Path(path).resolve()),
            "names": {str(k): v for k, v in (names or {}).items()}}  # fmt: skip


def _dicom_section(
    result: Explanation, options: ScanOptions, paths: dict[str, Path], dicom: Any
) -> dict[str, Any]:
    """The report's ``dicom`` section: the map files per format, finding and method, the
    source series, the CT series written for a non-DICOM scan and the SEG threshold."""
    from hirescam3d.io import outputs

    section: dict[str, Any] = {
        fmt: {f: {m: paths[outputs.map_key(f, m, fmt)].name for m in options.methods}
              for f in result.explained}
        for fmt in dicom.formats
    }  # fmt: skip
    section["source_series_uid"] = dicom.source.series_uid
    if options.ct_series:
        section["ct_series"] = paths["ct_dicom"].name
    if "dicom-seg" in options.formats:
        section["seg_threshold"] = float(options.seg_threshold)
    return section


def scan_report(
    result: Explanation,
    inputs: ScanInputs,
    options: ScanOptions,
    paths: dict[str, Path],
    dicom: Any,
) -> dict[str, Any]:
    """The JSON-ready ``report.json`` of a run that wrote ``paths`` (``dicom``: its
    :class:`~hirescam3d.io.outputs.DicomMaps`, or None)."""
    from hirescam3d.io import outputs

    scan, methods = inputs.scan, options.methods
    report = result.to_dict()
    report["input"] = {
        **report.pop("image", {}),
        "path": str(Path(options.scan_path).resolve()),
        "sha256": scan.sha256,
        "spacing_mm": list(scan.spacing),
        "axcodes": scan.axcodes,
    }
    if result.region is not None:
        region_path = options.region_path
        report["region"]["path"] = None if region_path is None else str(region_path.resolve())
        if result.masks:
            report["region"]["masks"] = {f: paths[f"{f}/mask"].name for f in result.masks}
    if options.organs_path is not None:
        report["organ_map"] = organ_map_entry(options.organs_path, inputs.organ_names)
    if "nifti" in options.formats:
        report["outputs"] = {
            f: {m: paths[f"{f}/{m}"].name for m in methods} for f in result.explained
        }
    if dicom is not None:
        report["dicom"] = _dicom_section(result, options, paths, dicom)
    report["storage"] = {
        "formats": list(options.formats),
        "grid": options.grid,
        "dtype": options.dtype,
        "compresslevel": outputs.COMPRESSLEVEL[options.dtype],
        "affine": (scan.affine if options.grid == "scan" else result.grid.affine).tolist(),
    }
    if options.png:
        report["png"] = {
            f: {m: paths[f"{f}/{m}/png"].name for m in methods} for f in result.explained
        }
    return report
