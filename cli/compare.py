"""``hirescam3d compare SCAN --finding F``: option checks, one library call, what is printed.

The work (one explain pass for every method, metrics, figure) is
:func:`hirescam3d.evaluate.compare.compare_scan`; stdout holds the result (a table, the paths
with ``--quiet``, ``compare.json`` with ``--json``); progress and warnings go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .console import out_console, stage_progress
from .errors import CLIUsageError, print_warning, warnings_to_stderr
from .explain import (
    ExplainOptions,
    check_options,
    check_out_folder,
    default_out_dir,
    region_arg,
    require_path,
)
from .models import load_checked

DEFAULT_METHODS = ["hirescam", "gradcam"]


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def check_mask_not_empty(mask: Path) -> None:
    """InputError (exit 1, as --region) for a --mask without any nonzero voxel; checked
    before the model loads or any folder is made."""
    import numpy as np

    from hirescam3d.errors import InputError
    from hirescam3d.io.scans import read_image

    if not np.any(np.asarray(read_image(mask)[0])):
        raise InputError(
            f"--mask {mask} is empty (every voxel is 0): the localisation metrics need a "
            "finding to compare with; pass the finding's mask (nonzero = finding)"
        )


def compare_command(
    scan: Path,
    out: Path | None,
    opts: ExplainOptions,
    mask: Path | None = None,
    json_out: bool = False,
    quiet: bool = False,
    debug: bool = False,
) -> None:
    """Run ``hirescam3d compare``; raise library/usage errors for the caller to report."""
    from hirescam3d.evaluate.compare import compare_scan

    require_path(scan, "scan")
    require_path(mask, "--mask")
    check_out_folder(out)
    if mask is not None:
        check_mask_not_empty(mask)
    if len(opts.findings) != 1:
        raise CLIUsageError(
            "compare explains one finding: pass exactly one --finding NAME "
            f"(got {len(opts.findings)})"
        )
    opts = check_options(opts)
    nnunet = opts.handle.source == "nnunet"
    if nnunet and opts.region not in (None, "predicted"):
        raise CLIUsageError("nnU-Net model folders are compared on nnU-Net's predicted "
                            "region: drop --region")  # fmt: skip
    out = Path(out) if out is not None else default_out_dir(scan)
    with warnings_to_stderr(debug) as shown, stage_progress(not quiet, "comparing") as progress:
        progress("loading model", 0.0)
        loaded = load_checked(opts.handle, opts.layer)
        common = {"methods": opts.methods, "layer": opts.layer, "organs_path": opts.organs,
                  "organ_names_path": opts.organ_names, "mask_path": mask,
                  "force": opts.force, "progress": progress}  # fmt: skip
        if nnunet:
            from hirescam3d.evaluate.compare_nnunet import compare_nnunet_scan

            record, paths = compare_nnunet_scan(scan, opts.findings[0], out, opts.handle,
                                                **common)  # fmt: skip
        else:
            record, paths = compare_scan(scan, opts.findings[0], out, model=loaded,
                                         device=opts.device, region=region_arg(opts), **common)

    for text in record["warnings"]:
        if text not in shown:
            print_warning(text)
    if json_out:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    if quiet:
        for path in paths.values():
            sys.stdout.write(f"{path}\n")
        return
    from rich.table import Table

    columns = {  # compare.json key: short column title
        "pointing_game": "pointing",
        "relevance_mass": "mass in mask",
        "iou_best": "best IoU",
        "iou_best_threshold": "at",
        "gradcam_box_iou": "box IoU",
        "l2_to_exact": "L2 to exact",
    }
    table = Table(title=f"{record['finding']} (p = {record['probability']:.3f})",
                  title_justify="left")
    table.add_column("method")
    for title in columns.values():
        table.add_column(title, justify="right")
    for method, scores in record["metrics"].items():
        table.add_row(method, *(_fmt(scores.get(key)) for key in columns))
    console = out_console()
    console.print(table)
    console.print(f"outputs in {out}:")
    for path in paths.values():
        console.print(f"  {Path(path).name}")
