"""The ``hirescam3d`` command: a thin Typer app; each command delegates to a module here.

Exit codes: 0 ok, 1 runtime failure, 2 usage error (see :mod:`hirescam3d.cli.errors`).
"""

from __future__ import annotations

import enum
import gc
import os
from pathlib import Path
from typing import Annotated

import typer

from .errors import OneLineErrorGroup, reported_errors
from .models import use_bundle_options
from .nnunet import Checkpoint, Folds, Mirror, use_nnunet_options
from .startup import pause_collection
from .view import view


def _method_choices() -> type[enum.Enum]:
    """The built-in explanation methods as choices (named without importing torch)."""
    from hirescam3d.core.method_names import BUILTIN_METHODS

    return enum.Enum("MethodChoice", {name: name for name in BUILTIN_METHODS}, type=str)


MethodChoice = _method_choices()


class ValuesChoice(str, enum.Enum):
    unit = "unit"
    logit = "logit"


class DtypeChoice(str, enum.Enum):
    float32 = "float32"
    int16 = "int16"
    uint8 = "uint8"


class BatchRegionChoice(str, enum.Enum):
    predicted = "predicted"


class GridChoice(str, enum.Enum):
    scan = "scan"
    model = "model"


class DeviceChoice(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


app = typer.Typer(
    cls=OneLineErrorGroup,
    name="hirescam3d",
    help="Faithful explanations (HiResCAM, Grad-CAM, CAM) of 3D CT classifiers, written as "
    "NIfTI volumes that overlay on the scan in any viewer.",
    epilog="Exit codes: 0 ok; 1 runtime failure (unreadable scan, corrupt checkpoint, "
    "existing outputs without --force, unwritable or locked folder, a failed batch item); 2 "
    "usage error (bad option or combination, missing path, unknown model, finding, layer or "
    "series); 3 audit: not guaranteed; 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from hirescam3d import __version__

        typer.echo(f"hirescam3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Explain which voxels a CT classifier used for each finding."""
    use_bundle_options(None, False)  # each command starts from no model options
    use_nnunet_options()


# For a model that returns a tuple, list or dict (explain and audit)
ModelOutput = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="For a model that returns a tuple, list or dict: the INDEX or KEY of the "
        "logits to explain (as Explainer(..., output_selector=...) in Python).",
        metavar="INDEX|KEY",
        show_default=False,
    ),
]


# -- options shared by explain and batch --------------------------------------------------
Finding = Annotated[
    list[str] | None,
    typer.Option(
        "--finding",
        "-f",
        help="Finding to explain (repeatable). Default: every finding with probability >= 0.5.",
        show_default=False,
    ),
]
AllFindings = Annotated[
    bool, typer.Option("--all-findings", help="Explain every finding of the model.")
]
Method = Annotated[
    list[MethodChoice] | None,
    typer.Option(
        "--method",
        "-m",
        case_sensitive=False,
        metavar="METHOD",
        help="Explanation method (repeatable): "
        + ", ".join(m.value for m in MethodChoice)
        + ". Default: hirescam.",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model", help="Zoo model name or bundle folder. Default: demo.", show_default=False
    ),
]
BundleConfig = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="A MONAI bundle's config file in its configs/ (e.g. inference.yaml). "
        "Default: inference.json, .yaml or .yml.",
        metavar="NAME",
        show_default=False,
    ),
]
TrustBundle = Annotated[
    bool,
    typer.Option(
        "--trust-bundle",
        help="Let MONAI's ConfigParser run the bundle's config (its $ expressions and "
        "_target_ classes): the same trust as `python -m monai.bundle run`. Weights still "
        "load as tensors only.",
    ),
]
Layer = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Layer to explain (see 'hirescam3d layers'). Default: the model's.",
        show_default=False,
    ),
]
Organs = Annotated[
    Path | None,
    typer.Option(
        "--organs",
        help="Organ label map (e.g. TotalSegmentator) to report the "
        "share of each explanation inside each organ.",
        show_default=False,
    ),
]
OrganNames = Annotated[
    Path | None,
    typer.Option(
        "--organ-names",
        help='JSON {"1": "lung_upper_lobe_left", ...} naming the labels of --organs.',
        show_default=False,
    ),
]
Png = Annotated[bool, typer.Option("--png", help="Also save a PNG montage per map.")]
Scan = Annotated[
    Path,
    typer.Argument(
        help="CT scan: .nii/.nii.gz, .nrrd, .mha/.mhd or a DICOM folder.", show_default=False
    ),
]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output folder. Default: ./<scan-stem>_explanations.",
        show_default=False,
    ),
]
Values = Annotated[
    ValuesChoice,
    typer.Option(
        "--values",
        case_sensitive=False,
        help="unit: [0, 1] display maps; logit: signed HiResCAM contributions in logits per "
        "voxel (only where the audit proves the guarantee).",
    ),
]
Dtype = Annotated[
    DtypeChoice,
    typer.Option(
        "--dtype",
        case_sensitive=False,
        help="How maps are stored. float32: exact. int16: 16-bit with scl_slope (NIfTI has "
        "no float16), ~4x smaller. uint8: [0, 1] display maps in 255 steps (scl_slope = "
        "1/255), ~30x smaller; not for --values logit.",
    ),
]
Grid = Annotated[
    GridChoice,
    typer.Option(
        "--grid",
        case_sensitive=False,
        help="scan: maps on the scan's grid; model: on the model's input grid with its own "
        "affine (viewers place them by affine; much smaller files).",
    ),
]
Formats = Annotated[
    str,
    typer.Option(
        "--format",
        help="Output formats, comma-separated: nifti; dicom (a DICOM Parametric Map per map); "
        "dicom-seg (a DICOM Segmentation of each map at --seg-threshold). For a scan that "
        "is not DICOM, DICOM outputs come with the scan as a DICOM CT series "
        "(<stem>_ct_dicom/) that they reference. 2D images: nifti and/or png (16-bit map).",
    ),
]
SegThreshold = Annotated[
    float,
    typer.Option(
        "--seg-threshold",
        help="Level of the dicom-seg segmentations, in the map's units ([0, 1] display maps, "
        "or logits per voxel with --values logit).",
    ),
]
Series = Annotated[
    str | None,
    typer.Option(
        "--series",
        help="SeriesInstanceUID to read from a DICOM folder holding several series (without "
        "it, such a folder is refused with the list of its series).",
        show_default=False,
    ),
]
Region = Annotated[
    str | None,
    typer.Option(
        "--region",
        help="Segmentation models: the voxels whose logits make a finding's score (summed). "
        "A mask file on the scan's grid (nonzero = region; same shape and affine), or "
        "'predicted' (the default): each finding's own predicted mask, also written as "
        "<stem>_<finding>_predicted_mask.nii.gz.",
        metavar="MASK|predicted",
        show_default=False,
    ),
]
BatchRegion = Annotated[
    BatchRegionChoice | None,
    typer.Option(
        "--region",
        help="Segmentation models: 'predicted' sums each finding's logits over its own "
        "predicted mask (the default). Masks per scan go in a CSV manifest's 'region' column.",
        show_default=False,
    ),
]
RoiSize = Annotated[
    tuple[int, int, int] | None,
    typer.Option(
        "--roi-size",
        help="Segmentation models: explain window by window, as MONAI's "
        "sliding_window_inference predicts, with windows of Z Y X voxels of the model's "
        "grid. Default: the bundle's patch size for patch-based models.",
        metavar="Z Y X",
        show_default=False,
    ),
]
Overlap = Annotated[
    float,
    typer.Option("--overlap", help="Overlap of neighbouring sliding windows, in [0, 1)."),
]
SwBatchSize = Annotated[
    int,
    typer.Option("--sw-batch-size", help="Sliding windows explained per model pass.", min=1),
]
Device = Annotated[
    DeviceChoice, typer.Option("--device", case_sensitive=False, help="Where the model runs.")
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, tables or notes.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="If another run is writing into --out, wait for it to finish instead of "
        "refusing (one writer per output folder).",
    ),
]


def _options(finding, all_findings, method, model, layer, organs, organ_names, png, device, force,  # noqa: ANN001, ANN202, E501 - plain pass-through of the typed options above
             values=ValuesChoice.unit, dtype=DtypeChoice.float32, grid=GridChoice.scan,
             formats="nifti", seg_threshold=0.5, series=None, region=None, roi_size=None,
             overlap=0.25, sw_batch_size=1):
    from .explain import ExplainOptions

    return ExplainOptions(
        findings=list(finding or []),
        all_findings=all_findings,
        methods=[m.value for m in method] if method else ["hirescam"],
        model=model,
        layer=layer,
        organs=organs,
        organ_names=organ_names,
        png=png,
        device=device.value,
        force=force,
        values=values.value,
        dtype=dtype.value,
        grid=grid.value,
        formats=formats,
        seg_threshold=seg_threshold,
        series=series,
        region=region,
        roi_size=None if roi_size is None else tuple(roi_size),
        overlap=overlap,
        sw_batch_size=sw_batch_size,
    )


@app.command()
def explain(
    scan: Scan,
    finding: Finding = None,
    all_findings: AllFindings = False,
    method: Method = None,
    model: Model = None,
    layer: Layer = None,
    organs: Organs = None,
    organ_names: OrganNames = None,
    out: Out = None,
    png: Png = False,
    values: Values = ValuesChoice.unit,
    dtype: Dtype = DtypeChoice.float32,
    grid: Grid = GridChoice.scan,
    formats: Formats = "nifti",
    seg_threshold: SegThreshold = 0.5,
    series: Series = None,
    region: Region = None,
    roi_size: RoiSize = None,
    overlap: Overlap = 0.25,
    sw_batch_size: SwBatchSize = 1,
    device: Device = DeviceChoice.auto,
    force: Force = False,
    wait: Wait = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: BundleConfig = None,
    trust_bundle: TrustBundle = False,
    folds: Folds = None,
    checkpoint: Checkpoint = None,
    mirror: Mirror = None,
    output: ModelOutput = None,
    debug: Debug = False,
) -> None:
    """Explain one scan: <stem>_<finding>_<method>.nii.gz on the scan's grid + report.json.

    For a segmentation model, a finding's score is its logits summed over a region
    (--region); --roi-size explains scans larger than the model's window."""
    use_bundle_options(config, trust_bundle)
    use_nnunet_options(folds, checkpoint, mirror)
    from .explain import explain_command

    opts = _options(
        finding, all_findings, method, model, layer, organs, organ_names, png, device, force,
        values, dtype, grid, formats, seg_threshold, series, region, roi_size, overlap,
        sw_batch_size,
    )
    opts.wait, opts.output = wait, output
    with reported_errors(debug):
        explain_command(scan, out, opts, json_out=json_out, quiet=quiet, debug=debug)


@app.command()
def batch(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Scans, folders, globs ('scans/*.nii.gz') or a CSV "
            "manifest with a 'path' column (optional 'id').",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output folder (one subfolder per scan).", show_default=False
        ),
    ],
    finding: Finding = None,
    all_findings: AllFindings = False,
    method: Method = None,
    model: Model = None,
    layer: Layer = None,
    organs: Organs = None,
    organ_names: OrganNames = None,
    png: Png = False,
    device: Device = DeviceChoice.auto,
    force: Annotated[bool, typer.Option("--force", help="Redo items already done.")] = False,
    values: Values = ValuesChoice.unit,
    dtype: Dtype = DtypeChoice.float32,
    grid: Grid = GridChoice.scan,
    formats: Formats = "nifti",
    seg_threshold: SegThreshold = 0.5,
    region: BatchRegion = None,
    roi_size: RoiSize = None,
    overlap: Overlap = 0.25,
    sw_batch_size: SwBatchSize = 1,
    wait: Wait = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: BundleConfig = None,
    trust_bundle: TrustBundle = False,
    folds: Folds = None,
    checkpoint: Checkpoint = None,
    mirror: Mirror = None,
    debug: Debug = False,
) -> None:
    """Explain many scans; resumable, and sharded over ranks under torchrun.

    Segmentation models: a CSV manifest's 'region' column gives each scan's mask."""
    use_bundle_options(config, trust_bundle)
    use_nnunet_options(folds, checkpoint, mirror)
    from .batch import batch_command

    opts = _options(
        finding, all_findings, method, model, layer, organs, organ_names, png, device, force,
        values, dtype, grid, formats, seg_threshold, None,
        None if region is None else region.value, roi_size, overlap, sw_batch_size,
    )
    opts.wait = wait
    with reported_errors(debug):
        code = batch_command(inputs, out, opts, json_out=json_out, quiet=quiet, debug=debug)
    raise typer.Exit(code)


@app.command()
def models(json_out: Json = False, debug: Debug = False) -> None:
    """List the model zoo: names, inputs, whether trained weights ship."""
    from .info import models_command

    with reported_errors(debug):
        models_command(json_out=json_out)


@app.command()
def findings(
    model: Model = None,
    config: BundleConfig = None,
    trust_bundle: TrustBundle = False,
    json_out: Json = False,
    folds: Folds = None,
    checkpoint: Checkpoint = None,
    debug: Debug = False,
) -> None:
    """List the findings (classes) a model predicts."""
    use_bundle_options(config, trust_bundle)
    use_nnunet_options(folds, checkpoint)
    from .info import findings_command

    with reported_errors(debug):
        findings_command(model, json_out=json_out)


AuditModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Zoo name, bundle folder, or module:callable returning your nn.Module. "
        "Default: demo.",
        show_default=False,
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="One input's shape without batch, e.g. 1x96x128x128 (C x spatial); needed "
        "for module:callable.",
        show_default=False,
    ),
]
AllRows = Annotated[
    bool, typer.Option("--all", help="Show every layer (default: the certified ones, the "
                       "default and a count of the rest).")
]


@app.command()
def layers(
    model: AuditModel = None,
    input_shape: InputShape = None,
    config: BundleConfig = None,
    trust_bundle: TrustBundle = False,
    json_out: Json = False,
    folds: Folds = None,
    checkpoint: Checkpoint = None,
    debug: Debug = False,
) -> None:
    """List a model's explanation layers and where HiResCAM is guaranteed faithful."""
    use_bundle_options(config, trust_bundle)
    use_nnunet_options(folds, checkpoint)
    from .info import layers_command

    with reported_errors(debug):
        layers_command(model, json_out=json_out, input_shape=input_shape)



@app.command()
def audit(
    model: AuditModel = None,
    layer: Layer = None,
    input_shape: InputShape = None,
    output: ModelOutput = None,
    config: BundleConfig = None,
    trust_bundle: TrustBundle = False,
    show_all: AllRows = False,
    json_out: Json = False,
    folds: Folds = None,
    checkpoint: Checkpoint = None,
    debug: Debug = False,
) -> None:
    """Compute whether HiResCAM is guaranteed faithful at a layer (exit 0 yes, 3 no)."""
    use_bundle_options(config, trust_bundle)
    use_nnunet_options(folds, checkpoint)
    from .audit import audit_command

    with reported_errors(debug):
        code = audit_command(model, layer, input_shape, json_out=json_out, output=output,
                             show_all=show_all)  # fmt: skip
    raise typer.Exit(code)


@app.command()
def sample(
    directory: Annotated[
        Path, typer.Argument(help="Folder to write into (created).", show_default=False)
    ],
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Write the demo chest CT, its organ map and finding masks (synthetic phantom)."""
    from .sample import sample_command

    with reported_errors(debug):
        sample_command(directory, force=force, quiet=quiet)


@app.command()
def compare(
    scan: Scan,
    finding: Finding = None,
    method: Method = None,
    model: Model = None,
    layer: Layer = None,
    organs: Organs = None,
    organ_names: OrganNames = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="The finding's mask on the scan's grid (nonzero = finding), for the "
            "localisation metrics and the figure's outline.",
            show_default=False,
        ),
    ] = None,
    region: Region = None,
    out: Out = None,
    device: Device = DeviceChoice.auto,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: BundleConfig = None,
    trust_bundle: TrustBundle = False,
    folds: Folds = None,
    checkpoint: Checkpoint = None,
    mirror: Mirror = None,
    debug: Debug = False,
) -> None:
    """Compare methods on one finding (one pass): <stem>_<finding>_compare.png + compare.json."""
    use_bundle_options(config, trust_bundle)
    use_nnunet_options(folds, checkpoint, mirror)
    from .compare import DEFAULT_METHODS, compare_command

    opts = _options(finding, False, method, model, layer, organs, organ_names, False, device,
                    force, region=region)
    if not method:
        opts.methods = list(DEFAULT_METHODS)
    with reported_errors(debug):
        compare_command(scan, out, opts, mask, json_out=json_out, quiet=quiet, debug=debug)


# `hirescam3d view` lives in cli/view.py and imports napari only when it runs.
app.command()(view)


def main() -> None:
    """Console-script entry point (``hirescam3d``)."""
    # torch's OpenMP threads sleep between parallel regions instead of spinning, leaving the
    # cores to the background reader and writer: 7 % less CPU time in a 4-scan batch. Set
    # before torch loads (nothing imports it yet); a value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    pause_collection()  # until the model is loaded (cli/startup.py)
    try:
        app(prog_name="hirescam3d")
    finally:
        # Spare the interpreter's last full garbage collection at exit, which walks every
        # object torch and MONAI made at import: about 1 s of each run on a 2-core machine.
        gc.freeze()


if __name__ == "__main__":
    main()
