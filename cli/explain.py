"""``hirescam3d explain SCAN``: option checks, the pipeline call and what is printed.

stdout holds only results (a table, output paths with ``--quiet``, the report with
``--json``); progress bars, notes and warnings go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .console import note, out_console, stage_progress
from .errors import CLIUsageError, print_warning, warnings_to_stderr
from .model_outputs import output_selector
from .models import check_findings, load_checked, model_text, resolve_handle


@dataclass
class ExplainOptions:
    """What to explain and how; shared by ``explain`` and ``batch``."""

    findings: list[str] = field(default_factory=list)
    all_findings: bool = False
    methods: list[str] = field(default_factory=lambda: ["hirescam"])
    model: str | None = None
    layer: str | None = None
    organs: Path | None = None
    organ_names: Path | None = None
    png: bool = False
    device: str = "auto"
    force: bool = False
    values: str = "unit"
    dtype: str = "float32"
    grid: str = "scan"
    formats: str = "nifti"
    seg_threshold: float = 0.5
    series: str | None = None  # explain only: a batch reads every scan whole
    # segmentation models: region mask file or "predicted"; sliding window
    region: str | None = None
    roi_size: tuple[int, ...] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 1
    wait: bool = False  # queue behind another run holding --out's lock (not an output option)
    output: str | None = None  # --output INDEX|KEY: the logits of a tuple/dict-output model
    # The resolved model (hirescam3d.models.handle.ModelHandle), set by check_options.
    handle: Any = field(default=None, repr=False, compare=False)

    def signature(self) -> dict[str, Any]:
        """The options that change the outputs (recorded in batch done-markers)."""
        return {
            "findings": sorted(self.findings),
            "all_findings": self.all_findings,
            "methods": sorted(self.methods),
            "model": str(self.model),
            "layer": self.layer,
            "organs": None if self.organs is None else os.path.abspath(self.organs),
            "organ_names": None if self.organ_names is None else os.path.abspath(self.organ_names),
            "png": self.png,
            "values": self.values,
            # storage choices only when not the default: markers of earlier runs stay valid
            **({"dtype": self.dtype} if self.dtype != "float32" else {}),
            **({"grid": self.grid} if self.grid != "scan" else {}),
            **({"formats": self.formats} if self.formats != "nifti" else {}),
            **({"seg_threshold": self.seg_threshold} if "dicom-seg" in self.formats else {}),
            **({"region": self.region if self.region == "predicted"
                else os.path.abspath(self.region)} if self.region else {}),
            **({"roi_size": list(self.roi_size), "overlap": self.overlap}
               if self.roi_size else {}),
        }  # fmt: skip


def require_path(path: Path | None, what: str) -> None:
    """CLIUsageError (exit 2) when a path given on the command line does not exist."""
    if path is not None and not Path(path).exists():
        raise CLIUsageError(f"{what} {path}: no such file or folder; check the path")


def check_options(opts: ExplainOptions) -> ExplainOptions:
    """Validate everything that can be checked without reading a scan or loading weights;
    fills ``model`` (zoo name or absolute bundle folder), ``handle`` and ``findings`` (as
    the model spells them).

    Raises CLIUsageError for conflicting flags, missing paths, unknown model/findings.
    """
    if opts.findings and opts.all_findings:
        raise CLIUsageError("--finding and --all-findings exclude each other; pass one of them")
    if opts.organ_names is not None and opts.organs is None:
        raise CLIUsageError("--organ-names needs --organs LABELMAP")
    if opts.dtype == "uint8" and opts.values == "logit":
        raise CLIUsageError(
            "--dtype uint8 stores [0, 1] display maps (scl_slope = 1/255); --values logit maps "
            "are signed: use --dtype float32 (exact) or int16"
        )
    from hirescam3d.errors import HiResCAMError
    from hirescam3d.io.outputs import check_formats

    try:
        opts.formats = ",".join(check_formats(opts.formats))
    except HiResCAMError as err:
        raise CLIUsageError(f"--format: {err}") from err
    check_value_options(opts)
    require_path(opts.organs, "--organs")
    require_path(opts.organ_names, "--organ-names")
    if not opts.methods:
        opts.methods = ["hirescam"]
    opts.methods = list(dict.fromkeys(m.lower() for m in opts.methods))
    opts.handle = resolve_handle(opts.model)
    opts.handle.output_selector = output_selector(opts.output)
    opts.model = model_text(opts.handle)
    opts.findings = check_findings(opts.handle, opts.findings)
    check_segmentation_options(opts)
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HiResCAMError(
                "--device cuda: no CUDA device is available here; use --device cpu or auto"
            )
    return opts


def check_value_options(opts: ExplainOptions) -> None:
    """CLIUsageError (exit 2) for values that cannot mean anything: a NaN/inf or
    out-of-range --seg-threshold, --values logit with methods that have no units."""
    import math

    t = opts.seg_threshold
    if not math.isfinite(t):
        raise CLIUsageError(f"--seg-threshold must be a finite number; got {t}")
    if "dicom-seg" in opts.formats.split(",") and opts.values == "unit" and not 0.0 < t <= 1.0:
        raise CLIUsageError(
            f"--seg-threshold {t:g} lies outside the maps' values: --values unit maps hold "
            "[0, 1], so a threshold outside (0, 1] segments nothing or everything; choose one "
            "in (0, 1], e.g. 0.5"
        )
    methods = [m.lower() for m in opts.methods or ["hirescam"]]
    if opts.values == "logit" and any(m != "hirescam" for m in methods):
        other = ", ".join(dict.fromkeys(m for m in methods if m != "hirescam"))
        raise CLIUsageError(
            f"--values logit gives HiResCAM's contributions in logits; --method {other} "
            "maps have no units: drop --values logit, or use --method hirescam only"
        )


def check_out_folder(out: Path | None) -> None:
    """CLIUsageError (exit 2) when --out names something that is not a folder."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CLIUsageError(
            f"--out {out} is a file, not a folder (--force does not replace it); choose a "
            "folder for the outputs"
        )


def check_series_option(scan: Path, series: str | None) -> None:
    """CLIUsageError (exit 2) for --series on a scan that is not DICOM."""
    if series is None or Path(scan).is_dir():
        return
    from hirescam3d.io.scans import looks_like_dicom

    if Path(scan).suffix.lower() != ".dcm" and not looks_like_dicom(Path(scan)):
        raise CLIUsageError(
            f"--series selects a series of a DICOM folder, and {scan} is not DICOM; drop "
            "--series"
        )


def check_segmentation_options(opts: ExplainOptions) -> None:
    """CLIUsageError for --region/--roi-size/--overlap that cannot apply: a classifier, a
    missing mask file, an overlap outside [0, 1), a window of no voxels."""
    given = [name for name, on in (("--region", opts.region is not None),
                                   ("--roi-size", opts.roi_size is not None)) if on]  # fmt: skip
    if given and opts.handle.kind != "segmentation":
        verb, it = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise CLIUsageError(
            f"{' and '.join(given)} {verb} to segmentation models; {opts.model} is a "
            f"classifier (one score per finding): drop {it}"
        )
    if opts.region is not None and opts.region != "predicted":
        require_path(Path(opts.region), "--region")
    if not 0.0 <= opts.overlap < 1.0:
        raise CLIUsageError(f"--overlap must lie in [0, 1); got {opts.overlap}")
    if opts.roi_size is not None and any(n <= 0 for n in opts.roi_size):
        raise CLIUsageError(f"--roi-size {' '.join(map(str, opts.roi_size))}: give 3 positive "
                            "numbers of voxels (Z Y X of the model's grid)")  # fmt: skip


def default_out_dir(scan: Path) -> Path:
    """``./<scan-stem>_explanations`` in the current folder."""
    from hirescam3d.io.scans import scan_stem

    return Path.cwd() / f"{scan_stem(scan)}_explanations"


def region_arg(opts: ExplainOptions) -> str | Path | None:
    """``--region`` as the pipeline takes it: None, ``"predicted"`` or a mask file."""
    if opts.region is None or opts.region == "predicted":
        return opts.region
    return Path(opts.region)


def run_pipeline(
    scan: Path,
    out: Path,
    opts: ExplainOptions,
    loaded: tuple[Any, Any],
    progress: Callable[[str, float], None] | None = None,
    defer: bool = False,
) -> Any:
    """One :func:`hirescam3d.pipeline.explain_scan` call with already-checked options:
    ``(result, {key: path})``, or with ``defer`` a :class:`~hirescam3d.pipeline.scan.PendingScan`
    whose ``finish`` returns those."""
    from hirescam3d.pipeline import explain_scan

    network, info = loaded
    findings: Sequence[str] | None = opts.findings or None
    if opts.all_findings:
        findings = list(info.class_names)
    return explain_scan(
        scan,
        out,
        model=(network, info),
        findings=findings,
        methods=tuple(opts.methods),
        layer=opts.layer,
        organs_path=opts.organs,
        organ_names_path=opts.organ_names,
        png=opts.png,
        device=opts.device,
        force=opts.force,
        progress=progress,
        values=opts.values,
        dtype=opts.dtype,
        grid=opts.grid,
        formats=opts.formats,
        seg_threshold=opts.seg_threshold,
        series=opts.series,
        region=region_arg(opts),
        roi_size=opts.roi_size,
        overlap=opts.overlap,
        sw_batch_size=opts.sw_batch_size,
        defer=defer,
    )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def print_summary(result: Any, paths: dict[str, Path], out: Path) -> None:
    """A table of every finding's probability and explained methods, then the files."""
    from rich.table import Table

    segmentation = "region" in result.report
    table = Table(title="Findings", title_justify="left")
    table.add_column("finding")
    if segmentation:  # scores over a region: the sum of logits, its size, mean probability
        table.add_column("region score (logits)", justify="right")
        table.add_column("region voxels", justify="right")
        table.add_column("mean probability", justify="right")
    else:
        table.add_column("probability", justify="right")
    table.add_column("explained with")
    for finding, p in result.probabilities.items():
        methods = list(dict.fromkeys(
            key.split("/")[1] for key in paths
            if key.startswith(finding + "/") and key != f"{finding}/mask"
        ))  # fmt: skip
        if segmentation:
            entry = result.report["findings"][finding]
            size = entry.get("region_voxels")
            cells = [f"{entry['region_score']:.4g}", "-" if size is None else f"{size:.0f}",
                     "-" if entry.get("mean_probability") is None else f"{p:.3f}"]  # fmt: skip
        else:
            cells = [f"{p:.3f}"]
        table.add_row(finding, *cells, ", ".join(methods) or "-")
    console = out_console()
    console.print(table)
    console.print(f"outputs in {out}:")
    for path in sorted(paths.values(), key=lambda p: Path(p).name):
        console.print(f"  {_rel(path, out)}")


def explain_command(
    scan: Path,
    out: Path | None,
    opts: ExplainOptions,
    json_out: bool = False,
    quiet: bool = False,
    debug: bool = False,
) -> None:
    """Run ``hirescam3d explain``; raise library/usage errors for the caller to report."""
    from hirescam3d.pipeline import PROBABILITY_THRESHOLD as THRESHOLD

    require_path(scan, "scan")
    check_out_folder(out)
    check_series_option(scan, opts.series)
    from .explain2d import explain_2d_command, route

    if route(scan, opts):  # a 2D image and a 2D model: hirescam3d.pipeline.explain2d
        return explain_2d_command(scan, out, opts, json_out, quiet, debug)
    opts = check_options(opts)
    from hirescam3d.io.input_checks import precheck_scan_file

    precheck_scan_file(scan)  # header-only problems before the model loads
    out = Path(out) if out is not None else default_out_dir(scan)
    check_out_folder(out)
    if opts.handle.source == "nnunet":  # nnU-Net's own preprocessing, tiles and export
        from hirescam3d.io.out_lock import output_lock

        from .nnunet import explain_nnunet_command

        with output_lock(out, "hirescam3d explain", wait=opts.wait), warnings_to_stderr(debug):
            return explain_nnunet_command(scan, out, opts, json_out, quiet)
    rule = f"probability >= {THRESHOLD}"
    if opts.handle.kind == "segmentation":
        rule = (
            "a non-empty predicted mask" if opts.region in (None, "predicted")
            else f"mean probability >= {THRESHOLD} over the region"
        )  # fmt: skip
    if not opts.findings and not opts.all_findings:
        note(
            f"no --finding given: explaining every finding with {rule} "
            "(use --finding NAME or --all-findings to choose)",
            quiet,
        )
    from hirescam3d.io.out_lock import output_lock
    from hirescam3d.io.staging import remove_stale_staging

    with output_lock(out, "hirescam3d explain", wait=opts.wait), warnings_to_stderr(debug) \
            as shown, stage_progress(not quiet) as progress:  # fmt: skip
        remove_stale_staging(out, depth=0)  # what a killed run left (we hold the lock)
        progress("loading model", 0.0)
        loaded = load_checked(opts.handle, opts.layer)
        result, paths = run_pipeline(scan, out, opts, loaded, progress)
    for text in result.warnings:
        if text not in shown:
            print_warning(text)
    if not opts.findings and not opts.all_findings and result.findings:
        # (none reached the threshold: the pipeline's own warning says so)
        note(f"explained ({rule}): {', '.join(result.findings)}", quiet)
    if json_out:
        sys.stdout.write(json.dumps(result.report, indent=2, default=str) + "\n")
    elif quiet:
        for path in sorted(paths.values(), key=str):
            sys.stdout.write(f"{path}\n")
    else:
        print_summary(result, paths, out)
