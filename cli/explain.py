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
    # The resolved model (hirescam3d.handle.ModelHandle), set by check_options.
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
        }


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
    require_path(opts.organs, "--organs")
    require_path(opts.organ_names, "--organ-names")
    if not opts.methods:
        opts.methods = ["hirescam"]
    opts.methods = list(dict.fromkeys(m.lower() for m in opts.methods))
    opts.handle = resolve_handle(opts.model)
    opts.model = model_text(opts.handle)
    opts.findings = check_findings(opts.handle, opts.findings)
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from hirescam3d.errors import HiResCAMError

            raise HiResCAMError(
                "--device cuda: no CUDA device is available here; use --device cpu or auto"
            )
    return opts


def default_out_dir(scan: Path) -> Path:
    """``./<scan-stem>_explanations`` in the current folder."""
    from hirescam3d.io import scan_stem

    return Path.cwd() / f"{scan_stem(scan)}_explanations"


def run_pipeline(
    scan: Path,
    out: Path,
    opts: ExplainOptions,
    loaded: tuple[Any, Any],
    progress: Callable[[str, float], None] | None = None,
) -> tuple[Any, dict[str, Path]]:
    """One :func:`hirescam3d.pipeline.explain_scan` call with already-checked options."""
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
    )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def print_summary(result: Any, paths: dict[str, Path], out: Path) -> None:
    """A table of every finding's probability and explained methods, then the files."""
    from rich.table import Table

    table = Table(title="Findings", title_justify="left")
    table.add_column("finding")
    table.add_column("probability", justify="right")
    table.add_column("explained with")
    for finding, p in result.probabilities.items():
        methods = [
            key.split("/")[1]
            for key in paths
            if key.count("/") == 1 and key.startswith(finding + "/")
        ]
        table.add_row(finding, f"{p:.3f}", ", ".join(methods) or "-")
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
    opts = check_options(opts)
    out = Path(out) if out is not None else default_out_dir(scan)
    if not opts.findings and not opts.all_findings:
        note(
            f"no --finding given: explaining every finding with probability >= {THRESHOLD} "
            "(use --finding NAME or --all-findings to choose)",
            quiet,
        )
    with warnings_to_stderr(debug) as shown, stage_progress(not quiet) as progress:
        progress("loading model", 0.0)
        loaded = load_checked(opts.handle, opts.layer)
        result, paths = run_pipeline(scan, out, opts, loaded, progress)
    for text in result.warnings:
        if text not in shown:
            print_warning(text)
    if not opts.findings and not opts.all_findings and result.findings:
        # (none reached the threshold: the pipeline's own warning says so)
        note(f"explained (probability >= {THRESHOLD}): {', '.join(result.findings)}", quiet)
    if json_out:
        sys.stdout.write(json.dumps(result.report, indent=2, default=str) + "\n")
    elif quiet:
        for path in sorted(paths.values(), key=str):
            sys.stdout.write(f"{path}\n")
    else:
        print_summary(result, paths, out)
