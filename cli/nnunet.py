"""The CLI's nnU-Net options (``--folds``, ``--checkpoint``, ``--mirror/--no-mirror``)
and ``explain`` for an nnU-Net model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Folds = Annotated[
    list[str] | None,
    typer.Option(
        "--folds",
        help="nnU-Net model folders: the folds to average (repeatable or comma-separated, "
        "e.g. --folds 0,1,2, or 'all'). Default: every fold present.",
        show_default=False,
    ),
]
Checkpoint = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="nnU-Net model folders: the checkpoint file of each fold. "
        "Default: checkpoint_final.pth.",
        show_default=False,
    ),
]
Mirror = Annotated[
    bool | None,
    typer.Option(
        "--mirror/--no-mirror",
        help="nnU-Net model folders: average the mirrored passes (test-time mirroring). "
        "Default: what the checkpoint's inference_allowed_mirroring_axes allows.",
        show_default=False,
    ),
]

NNUNET_OPTIONS: dict[str, Any] = {}


def use_nnunet_options(
    folds: list[str] | None = None, checkpoint: str | None = None, mirror: bool | None = None
) -> None:
    """Remember the nnU-Net options of this command for :func:`with_nnunet_options`."""
    NNUNET_OPTIONS.clear()
    NNUNET_OPTIONS.update({"folds": folds, "checkpoint": checkpoint, "mirror": mirror})


def with_nnunet_options(handle: Any) -> Any:
    """``handle`` with the remembered nnU-Net options (an nnU-Net handle), else as is;
    CLIUsageError when they are given for another kind of model."""
    from .errors import CLIUsageError

    given = {k: v for k, v in NNUNET_OPTIONS.items() if v not in (None, [])}
    if "folds" in given:  # --folds 0 --folds 1, or --folds 0,1
        given["folds"] = [f for text in given["folds"] for f in text.replace(",", " ").split()]
    if not given:
        return handle
    if getattr(handle, "source", None) != "nnunet":
        names = ", ".join("--" + k if k != "mirror" else "--mirror/--no-mirror" for k in given)
        raise CLIUsageError(f"{names}: only for nnU-Net model folders; drop it for this model")
    return handle.with_options(**given)


def explain_nnunet_command(
    scan: Path, out: Path, opts: Any, json_out: bool = False, quiet: bool = False
) -> None:
    """``hirescam3d explain`` for an nnU-Net model folder (after the option checks)."""
    import json

    from hirescam3d.nnunet_scan import explain_nnunet_scan

    from .console import note, out_console
    from .errors import CLIUsageError

    if opts.methods != ["hirescam"] or opts.region not in (None, "predicted"):
        raise CLIUsageError(
            "nnU-Net model folders are explained with --method hirescam on nnU-Net's "
            "predicted regions: drop --method / --region"
        )
    unused = [name for name, given in (
        ("--organs", opts.organs is not None), ("--png", opts.png),
        ("--format", opts.formats != "nifti"), ("--grid", opts.grid != "scan"),
        ("--dtype", opts.dtype != "float32"), ("--roi-size", opts.roi_size is not None),
        ("--series", opts.series is not None),
    ) if given]  # fmt: skip
    if unused:
        raise CLIUsageError(
            f"{', '.join(unused)}: not supported for nnU-Net model folders yet; drop "
            f"{'it' if len(unused) == 1 else 'them'} (maps are float32 NIfTI on the scan's grid)"
        )
    findings = None if opts.all_findings else (opts.findings or None)
    report, paths = explain_nnunet_scan(
        scan, out, opts.handle, findings, opts.layer, opts.values, opts.force
    )
    passes = len(report["passes"])
    note(f"averaged {passes} pass(es): folds {', '.join(report['folds'])}, mirroring "
         f"{'on' if report['mirror'] else 'off'}; layer {report['layer']}", quiet)  # fmt: skip
    if json_out:
        print(json.dumps(report, indent=2))
        return
    console = out_console()
    for name, entry in report["findings"].items():
        console.print(
            f"{name}: region score {entry['region_score']:.6g} logits over "
            f"{entry['region_voxels']:.0f} voxels, map sum {entry['map_sum']:.6g}"
        )
    for path in paths.values():
        console.print(str(path))
