"""The CLI's nnU-Net options (``--folds``, ``--checkpoint``, ``--mirror/--no-mirror``)
and ``explain`` for an nnU-Net model folder."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    from .console import note, out_console

    report, paths = _explain_nnunet(scan, out, opts)
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


def check_nnunet_options(opts: Any) -> None:
    """CLIUsageError for ``explain``/``batch`` options the nnU-Net path does not take
    (methods other than hirescam, a region mask, storage and display options)."""
    from .errors import CLIUsageError

    if opts.methods != ["hirescam"] or opts.region not in (None, "predicted"):
        raise CLIUsageError(
            "nnU-Net model folders are explained with --method hirescam on nnU-Net's "
            "predicted regions: drop --method / --region"
        )
    if opts.roi_size is not None:
        raise CLIUsageError(
            "--roi-size: nnU-Net model folders are explained on nnU-Net's own tiles (the "
            "patch size of its plans); drop --roi-size"
        )
    unused = [name for name, given in (
        ("--format", opts.formats != "nifti"), ("--grid", opts.grid != "scan"),
        ("--series", opts.series is not None),
    ) if given]  # fmt: skip
    if unused:
        raise CLIUsageError(
            f"{', '.join(unused)}: not supported for nnU-Net model folders yet; drop "
            f"{'it' if len(unused) == 1 else 'them'} (maps are NIfTI on the NIfTI scan's grid)"
        )


def _explain_nnunet(scan: Path, out: Path, opts: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`hirescam3d.pipeline.nnunet_scan.explain_nnunet_scan` with the CLI's options."""
    from hirescam3d.pipeline.nnunet_scan import explain_nnunet_scan

    check_nnunet_options(opts)
    findings = None if opts.all_findings else (opts.findings or None)
    return explain_nnunet_scan(
        scan, out, opts.handle, findings, opts.layer, opts.values, opts.force,
        organs_path=opts.organs, organ_names_path=opts.organ_names, png=opts.png,
        dtype=opts.dtype,
    )  # fmt: skip


@dataclass
class NnunetItemResult:
    """What ``batch`` records of one nnU-Net scan (as it reads a pipeline result)."""

    report: dict[str, Any]
    findings: list[str] = field(default_factory=list)
    probabilities: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def explain_nnunet_item(
    scan: Path, out: Path, opts: Any, loaded: Any = None, progress: Any = None
) -> tuple[NnunetItemResult, dict[str, Any]]:
    """``batch``'s explain call for an nnU-Net model folder: the same
    :func:`hirescam3d.pipeline.nnunet_scan.explain_nnunet_scan` as ``explain`` (``loaded`` and
    ``progress`` are unused: the handle holds the opened folds)."""
    report, paths = _explain_nnunet(scan, out, opts)
    return NnunetItemResult(
        report=report, findings=list(report["findings"]),
        probabilities={n: e["mean_probability"] for n, e in report["findings"].items()},
        warnings=list(report.get("warnings", [])),
    ), paths  # fmt: skip


def nnunet_signature(handle: Any) -> dict[str, Any]:
    """The nnU-Net choices that change a batch's outputs (folds, checkpoint, mirroring)."""
    return {"nnunet": {"folds": [str(f) for f in handle.folds],
                       "checkpoint": handle.checkpoint, "mirror": handle.mirror}}  # fmt: skip
