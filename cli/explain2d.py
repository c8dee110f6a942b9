"""``hirescam3d explain IMAGE`` for 2D images and 2D models (PNG, JPEG, TIFF, a
single-slice DICOM, a 2D NIfTI): option checks, the 2D pipeline call and what is printed.

:func:`route` decides, before any work, whether a command line is a 2D one, and gives a
2D image with a 3D model (or a 3D scan with a 2D model) one error line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .console import note, stage_progress
from .errors import CLIUsageError, print_warning, warnings_to_stderr
from .models import check_findings, load_checked, model_text, resolve_handle


def _spatial_dims(handle: Any) -> int:
    return int(handle.input.spatial_dims)


def route(scan: Path, opts: Any) -> bool:
    """True when ``scan`` is a 2D image and the model a 2D one (explain it here); False
    for a 3D scan and a 3D model. ScanError (one line, exit 1 as for any unusable image)
    when they disagree."""
    from hirescam3d.errors import ScanError
    from hirescam3d.io.image2d import SUPPORTED_2D, spatial_dims_of_file

    dims = spatial_dims_of_file(scan)
    handle = resolve_handle(opts.model)
    model = _spatial_dims(handle)
    inferer = getattr(handle.info, "inferer", None) or {}
    if model == 2 and (inferer.get("kind") == "slice"
                       or str(inferer.get("_target_", "")).endswith("SliceInferer")):
        model = 3  # a 2D network run over volumes slice by slice (MONAI SliceInferer)
    size = " x ".join(map(str, (handle.input.in_channels, *handle.input.spatial_size)))
    if dims == 2 and model != 2:  # the input is wrong for the model: exit 1, as a 2D scan
        raise ScanError(
            f"{scan}: a 2D image; {handle.name} is a {model}D model (input {size}): pass a "
            "3D scan (NIfTI, NRRD, MHA/MHD or a DICOM series), or a 2D model such as "
            "--model resnet34v"
        )
    if model == 2 and dims != 2:
        what = "a 3D volume" if dims == 3 else "not a 2D image"
        raise ScanError(
            f"{scan}: {what}; {handle.name} is a 2D model (input {size}): pass {SUPPORTED_2D}"
        )
    return model == 2


def _check_2d_options(opts: Any) -> None:
    """CLIUsageError for options that have no meaning for a 2D image."""
    unused = [name for name, on in (
        ("--organs", opts.organs is not None), ("--organ-names", opts.organ_names is not None),
        ("--region", opts.region is not None), ("--roi-size", opts.roi_size is not None),
        ("--series", opts.series is not None), ("--grid model", opts.grid != "scan"),
        ("--dtype", opts.dtype != "float32"),
    ) if on]  # fmt: skip
    if unused:
        raise CLIUsageError(
            f"{', '.join(unused)} {'do' if len(unused) > 1 else 'does'} not apply to 2D "
            "images; drop it"
        )
    if opts.findings and opts.all_findings:
        raise CLIUsageError("--finding and --all-findings exclude each other; pass one of them")


def explain_2d_command(
    scan: Path, out: Path | None, opts: Any, json_out: bool, quiet: bool, debug: bool
) -> None:
    """Run ``hirescam3d explain`` on a 2D image; raise library/usage errors for the caller."""
    from hirescam3d.errors import HiResCAMError
    from hirescam3d.pipeline.explain2d import check_formats_2d, explain_picture

    from .explain import default_out_dir

    _check_2d_options(opts)
    try:
        formats = check_formats_2d(opts.formats)
    except HiResCAMError as err:
        raise CLIUsageError(f"--format: {err}") from err
    if opts.values == "logit" and "png" in formats:
        raise CLIUsageError("--format png holds [0, 1] maps and --values logit maps are "
                            "signed: use --format nifti with --values logit")  # fmt: skip
    opts.handle = resolve_handle(opts.model)
    opts.model = model_text(opts.handle)
    opts.findings = check_findings(opts.handle, opts.findings)
    methods = list(dict.fromkeys(m.lower() for m in opts.methods or ["hirescam"]))
    out = Path(out) if out is not None else default_out_dir(scan)
    if not opts.findings and not opts.all_findings:
        note("no --finding given: explaining every finding with probability >= 0.5 "
             "(use --finding NAME or --all-findings to choose)", quiet)  # fmt: skip
    from hirescam3d.io.out_lock import output_lock

    with output_lock(out, "hirescam3d explain", wait=getattr(opts, "wait", False)), \
            warnings_to_stderr(debug) as shown, stage_progress(not quiet) as progress:
        progress("loading model", 0.0)
        network, info = load_checked(opts.handle, opts.layer)
        findings = list(info.class_names) if opts.all_findings else (opts.findings or None)
        result, paths = explain_picture(
            scan, out, (network, info), findings, methods, opts.layer, opts.png, opts.device,
            opts.force, opts.values, formats, progress,
        )  # fmt: skip
    for text in result.warnings:
        if text not in shown:
            print_warning(text)
    report = json.loads(paths["report"].read_text(encoding="utf-8"))
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif quiet:
        for path in sorted(paths.values(), key=str):
            sys.stdout.write(f"{path}\n")
    else:
        from .explain import print_summary

        summary = SimpleNamespace(report=report, probabilities=result.probabilities)
        print_summary(summary, paths, out)
