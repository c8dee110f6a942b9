"""Compare explanation methods on one scan and finding: one figure, one ``compare.json``.

:func:`compare_scan` explains the scan once (every method from one forward pass, with
:func:`hirescam3d.pipeline.explain_image`), scores each method's map with
:mod:`hirescam3d.evaluate.metrics` and draws a figure like the HiResCAM paper's Figure 1: the
most attended axial, coronal and sagittal slices (rows), one column per method, the CT
in a lung window, organ outlines and the finding mask's outline.

Mask metrics (pointing game, relevance mass, best-threshold IoU and its threshold,
Grad-CAM box IoU, relevance mass per organ) are computed on the scan's grid, on the
display maps ``explain`` writes (ReLU, divided by the maximum, mapped back to the
scan). ``l2_to_exact`` compares each method's raw map with the HiResCAM raw map on the
explained layer's grid, and only where the audit proves the guarantee at that layer
(then the HiResCAM map *is* each cell's exact contribution).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from hirescam3d.errors import InputError, TargetError
from hirescam3d.pipeline import ModelArg, Progress, RegionArg, ScanExplanation

if TYPE_CHECKING:
    from hirescam3d.io.scans import Scan

__all__ = ["COMPARE_JSON", "VIEWS", "compare_paths", "compare_scan", "most_attended_planes"]

COMPARE_JSON = "compare.json"
#: Figure rows, in order; in S, P, L orientation each is a slice along one axis.
VIEWS = ("axial", "coronal", "sagittal")
LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600
GRID_TOLERANCE_MM = 1e-3
_ORGAN_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
)


def compare_paths(out_dir: str | Path, stem: str, finding: str) -> dict[str, Path]:
    """The two files :func:`compare_scan` writes: ``png`` and ``json``."""
    out = Path(out_dir)
    return {"png": out / f"{stem}_{finding}_compare.png", "json": out / COMPARE_JSON}


def most_attended_planes(volume: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the index of the slice holding the most positive mass of ``volume``
    (the first on ties)."""
    mass = np.clip(np.asarray(volume, dtype=np.float64), 0.0, None)
    return tuple(  # type: ignore[return-value]
        int(np.argmax(mass.sum(axis=tuple(a for a in range(3) if a != axis))))
        for axis in range(3)
    )


def _read_mask(path: Path, shape: tuple[int, ...], affine: np.ndarray, scan: Path) -> np.ndarray:
    """The finding mask as bool on the scan's grid; InputError naming both grids if not."""
    from hirescam3d.io.nifti import affine_distance_mm, grid_differences
    from hirescam3d.io.scans import read_image

    arr, mask_affine, _, _ = read_image(path)
    arr = np.asarray(arr)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    mask_shape = tuple(int(n) for n in arr.shape)
    same = arr.ndim == 3 and mask_shape == tuple(shape)
    off = affine_distance_mm(mask_affine, affine, shape) if same else float("inf")
    if not same or off > GRID_TOLERANCE_MM:
        spacing = np.linalg.norm(np.asarray(mask_affine)[:3, :3], axis=0)
        scan_spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)

        def grid(s: Sequence[int], sp: np.ndarray, a: np.ndarray) -> str:
            origin = ", ".join(f"{v:.4g}" for v in np.asarray(a)[:3, 3])
            return (
                f"{'x'.join(str(n) for n in s)} voxels of "
                f"{' x '.join(f'{v:.4g}' for v in sp)} mm, origin ({origin}) mm"
            )

        differ = "; ".join(
            grid_differences(mask_shape[:3], mask_affine, shape, affine, atol=GRID_TOLERANCE_MM)
        ) or f"voxel positions up to {off:.3g} mm apart"
        mask_grid = grid(mask_shape, spacing, mask_affine)
        raise InputError(
            f"mask {path} is not on the scan's grid: mask grid {mask_grid} vs scan {scan} "
            f"grid {grid(shape, scan_spacing, affine)} ({differ}); resample "
            "the mask to the scan's grid (same shape and affine within 1e-3 mm)"
        )
    mask = arr != 0
    if not mask.any():  # as --region: an empty mask makes every metric 0, meaninglessly
        raise InputError(
            f"mask {path} is empty (every voxel is 0): the localisation metrics need a "
            "finding to compare with; pass the finding's mask (nonzero = finding)"
        )
    return mask


def _num(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _mask_metrics(
    maps: torch.Tensor,
    methods: Sequence[str],
    mask: np.ndarray | None,
    organs: np.ndarray | None,
    organ_names: dict[int, str] | None,
) -> dict[str, dict[str, Any]]:
    """Per method, the mask metrics of ``maps`` ``(1, M, *S)`` on the scan's grid."""
    from hirescam3d.evaluate import metrics

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    if mask is not None:
        loc = metrics.localisation_metrics(maps, torch.from_numpy(mask)[None, None])
        for i, m in enumerate(methods):
            out[m].update(
                pointing_game=_num(loc.pointing_game[0, i]),
                relevance_mass=_num(loc.relevance_mass[0, i]),
                iou_best=_num(loc.iou[0, i]),
                iou_best_threshold=_num(loc.iou_threshold[0, i]),
                gradcam_box_iou=_num(loc.gradcam_box[0, i]),
            )
    if organs is not None:
        labels = torch.from_numpy(organs.astype(np.int64))
        by_name: dict[str, list[int]] = {}
        for label, name in sorted((organ_names or {}).items()):
            by_name.setdefault(name, []).append(int(label))
        for m in methods:
            out[m]["relevance_mass_per_organ"] = {}
        for name, labs in by_name.items():
            organ = torch.isin(labels, torch.tensor(labs))[None, None]
            mass = metrics.relevance_mass(maps, organ)
            for i, m in enumerate(methods):
                out[m]["relevance_mass_per_organ"][name] = _num(mass[0, i])
    return out


def _l2_to_exact(
    raw: dict[tuple[str, str], torch.Tensor], finding: str, methods: Sequence[str],
    guaranteed: bool,
) -> tuple[dict[str, float | None], str | None]:
    """Per method, ``l2_to_exact`` against the HiResCAM raw map (None where it cannot
    be computed), and why not for all when the guarantee does not hold."""
    from hirescam3d.evaluate import metrics

    if not guaranteed:
        return {m: None for m in methods}, (
            "the audit does not prove HiResCAM faithful at this layer, so there is no exact "
            "map to compare with"
        )
    exact = raw[(finding, "hirescam")].float()
    out: dict[str, float | None] = {}
    for m in methods:
        cells = raw[(finding, m)].float()
        if cells.shape != exact.shape:  # an input-resolution method: not on the cells' grid
            out[m] = None
            continue
        out[m] = _num(metrics.l2_to_exact(cells[None, None], exact[None, None])[0, 0])
    return out, None


def _draw(
    tmp: Path,
    ct: np.ndarray,
    maps: dict[str, np.ndarray],
    planes: tuple[int, int, int],
    spacing: np.ndarray,
    labels: list[str],
    organs: np.ndarray | None,
    mask: np.ndarray | None,
    organ_names: dict[int, str] | None,
    title: str,
) -> int:
    """Draw the figure into ``tmp`` (all volumes in S, P, L order); returns its panels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    methods = list(maps)
    cols = len(methods)
    fig = Figure(figsize=(2.8 * cols + 1.6, 3 * 2.8 + 0.8), dpi=100)
    grid = fig.add_gridspec(len(VIEWS), cols + 1, width_ratios=[1] * cols + [0.06])
    present = [] if organs is None else [int(v) for v in np.unique(organs) if v != 0]
    colour = {v: _ORGAN_COLOURS[i % len(_ORGAN_COLOURS)] for i, v in enumerate(present)}

    def cut(volume: np.ndarray, view: int) -> np.ndarray:
        return np.take(volume, planes[view], axis=view)

    # (row spacing / column spacing, origin) per view: axial (P, L) anterior at the top;
    # coronal (S, L) and sagittal (S, P) superior at the top; patient right on the left.
    aspect = [spacing[1] / spacing[2], spacing[0] / spacing[2], spacing[0] / spacing[1]]
    origin = ["upper", "lower", "lower"]
    heat = None
    panels = 0
    for row in range(len(VIEWS)):
        ct_slice = cut(ct, row)
        for col, method in enumerate(methods):
            ax = fig.add_subplot(grid[row, col])
            panels += 1
            ax.imshow(ct_slice, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1],
                      interpolation="nearest", origin=origin[row], aspect=aspect[row])
            values = cut(maps[method], row)
            heat = ax.imshow(np.ma.masked_where(values < 0.05, values), cmap="inferno",
                             vmin=0.0, vmax=1.0, alpha=0.55, interpolation="bilinear",
                             origin=origin[row], aspect=aspect[row])
            if organs is not None:
                organ_slice = cut(organs, row)
                for v in present:
                    inside = organ_slice == v
                    if inside.any() and not inside.all():
                        ax.contour(inside.astype(np.float32), levels=[0.5],
                                   colors=[colour[v]], linewidths=0.6)
            if mask is not None:
                inside = cut(mask, row)
                if inside.any() and not inside.all():
                    ax.contour(inside.astype(np.float32), levels=[0.5], colors=["cyan"],
                               linewidths=1.4, linestyles="dashed")
            if row == 0:
                ax.set_title(method, fontsize=11)
            if col == 0:
                ax.set_ylabel(labels[row], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if heat is not None:
        bar = fig.colorbar(heat, cax=fig.add_subplot(grid[:, cols]))
        bar.set_label("explanation (0 = none, 1 = strongest)")
    handles = []
    if mask is not None:
        handles.append(Line2D([], [], color="cyan", linestyle="dashed", label="finding mask"))
    names = organ_names or {}
    handles += [Line2D([], [], color=colour[v], label=names.get(v, f"label {v}")) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
                   frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(tmp, format="png")
    return panels


def _checked_finding(finding: str, class_names: Sequence[str]) -> str:
    """The one finding to compare, as the model spells it; TargetError if not one name."""
    from hirescam3d.pipeline import check_findings

    if not isinstance(finding, str):
        raise TargetError("compare explains one finding; give its name as a string")
    return check_findings([finding], class_names)[0]


class _Inputs(NamedTuple):
    """What :func:`compare_scan` reads: the scan, the finding mask and the organ map on the
    scan's grid (bool / int ``(I, J, K)``), the region to explain, and warnings so far."""

    scan_path: Path
    mask_path: Path | None
    organs_path: Path | None
    scan: Scan
    mask: np.ndarray | None
    organs: np.ndarray | None
    organ_names: dict[int, str] | None
    region: RegionArg
    notes: list[str]


def _read_inputs(
    scan_path: str | Path,
    mask_path: str | Path | None,
    organs_path: str | Path | None,
    organ_names_path: str | Path | None,
    region: RegionArg,
) -> _Inputs:
    """Read the scan, then the mask, the organ map (aligned to the scan) and a region file."""
    from hirescam3d.io import scans as io
    from hirescam3d.io.organs import organs_on_grid
    from hirescam3d.pipeline import load_region

    scan = io.read_scan(scan_path)
    notes = list(scan.warnings)
    shape = tuple(int(n) for n in scan.array.shape)
    mask = None
    if mask_path is not None:
        mask = _read_mask(Path(mask_path), shape, scan.affine, Path(scan_path))
    organs = organ_names = None
    if organs_path is not None:
        organs, organ_names, note = organs_on_grid(organs_path, organ_names_path, shape,
                                                   scan.affine)  # fmt: skip
        if note:
            notes.append(note)
    if isinstance(region, (str, Path)) and str(region) != "predicted":
        region = load_region(Path(region), shape, scan.affine)
    return _Inputs(
        scan_path=Path(scan_path),
        mask_path=None if mask_path is None else Path(mask_path),
        organs_path=None if organs_path is None else Path(organs_path),
        scan=scan, mask=mask, organs=organs, organ_names=organ_names, region=region, notes=notes,
    )


class _Scores(NamedTuple):
    """Per method its metrics (compare.json's ``metrics``); whether the audit proves the
    guarantee, and else why ``l2_to_exact`` was not computed."""

    metrics: dict[str, dict[str, Any]]
    guaranteed: bool
    why_not: str | None


def _score_methods(
    result: ScanExplanation, finding: str, methods: Sequence[str], inputs: _Inputs
) -> _Scores:
    """Score each method's display map against the mask and organs, and its raw map
    against the HiResCAM raw map (``l2_to_exact``)."""
    maps = torch.stack([torch.from_numpy(result.maps[(finding, m)]) for m in methods])[None]
    scores = _mask_metrics(maps, methods, inputs.mask, inputs.organs, inputs.organ_names)
    guaranteed = bool(result.report["hirescam_guaranteed_faithful"])
    l2, why = _l2_to_exact(result.raw, finding, methods, guaranteed)
    for m in methods:
        scores[m]["l2_to_exact"] = l2[m]
    return _Scores(scores, guaranteed, why)


class _Figure(NamedTuple):
    """The figure written: its file and panels, the method whose map chose the slices, the
    slices (S, P, L index) and their positions per view (axis letter, mm)."""

    path: Path
    panels: int
    chosen_from: str
    planes: tuple[int, int, int]
    positions: dict[str, tuple[str, float]]


def _plane_positions(spl: np.ndarray, planes: tuple[int, int, int]) -> dict[str, tuple[str, float]]:
    """Per view, the world position (axis letter, mm) of its slice; ``spl``: the affine of
    the volume in S, P, L orientation."""
    world = [spl @ np.array([*(p if a == i else 0 for a in range(3)), 1.0])
             for i, p in enumerate(planes)]
    return {
        "axial": ("S", float(world[0][2])),
        "coronal": ("A", float(world[1][1])),
        "sagittal": ("R", float(world[2][0])),
    }


def _write_figure(
    path: Path,
    inputs: _Inputs,
    result: ScanExplanation,
    finding: str,
    methods: Sequence[str],
    stem: str,
    force: bool,
) -> _Figure:
    """Draw the figure in S, P, L orientation (radiological display) and write it to
    ``path``, atomically."""
    from hirescam3d.io import scans as io
    from hirescam3d.io.outputs import atomic_write

    scan = inputs.scan
    ct, spl = io.reorient(scan.array, scan.affine, "SPL")
    shown = {m: io.reorient(result.maps[(finding, m)], scan.affine, "SPL")[0] for m in methods}
    chosen_from = "hirescam" if "hirescam" in methods else methods[0]
    planes = most_attended_planes(shown[chosen_from])
    positions = _plane_positions(spl, planes)
    row_labels = [f"{v} ({axis} {mm:.0f} mm)" for v, (axis, mm) in positions.items()]
    organs, mask = inputs.organs, inputs.mask
    organs_spl = None if organs is None else io.reorient(organs, scan.affine, "SPL")[0]
    mask_spl = None if mask is None else io.reorient(mask, scan.affine, "SPL")[0]
    spacing = np.linalg.norm(spl[:3, :3], axis=0)
    title = f"{stem}: {finding} (p = {result.probabilities[finding]:.2f})"
    panels: list[int] = []
    written = atomic_write(
        path,
        lambda tmp: panels.append(
            _draw(tmp, ct, shown, planes, spacing, row_labels, organs_spl, mask_spl,
                  inputs.organ_names, title)
        ),
        force=force,
    )
    return _Figure(written, panels[0] if panels else 0, chosen_from, planes, positions)


def _compare_record(
    inputs: _Inputs,
    finding: str,
    methods: Sequence[str],
    result: ScanExplanation,
    scores: _Scores,
    figure: _Figure,
    timings: dict[str, float],
) -> dict[str, Any]:
    """compare.json's record (before :func:`hirescam3d.pipeline._json_safe`)."""
    from hirescam3d.pipeline import software_versions

    report, scan = result.report, inputs.scan
    return {
        "scan": {"path": str(inputs.scan_path.resolve()), "sha256": scan.sha256,
                 "shape": list(scan.array.shape), "affine": np.asarray(scan.affine).tolist()},
        "finding": finding,
        "probability": result.probabilities[finding],
        "logit": result.logits[finding],
        "model": report["model"],
        "layer": report["layer"],
        "hirescam_guaranteed_faithful": scores.guaranteed,
        "region": report.get("region"),
        "methods": list(methods),
        "mask": None if inputs.mask_path is None else str(inputs.mask_path.resolve()),
        "organ_map": None if inputs.organs_path is None else str(inputs.organs_path.resolve()),
        "maps": "display maps on the scan's grid (ReLU, divided by the maximum, mapped "
        "back to the scan's grid as MONAI Invertd would), as `hirescam3d explain` writes them",
        "metrics": scores.metrics,
        "l2_to_exact": {
            "reference": "the HiResCAM raw map on the explained layer's grid",
            "normalization": "relu-minmax",
            "computed": scores.why_not is None,
            "why_not": scores.why_not,
        },
        "figure": {
            "path": figure.path.name,
            "rows": list(VIEWS),
            "columns": list(methods),
            "panels": figure.panels,
            "slices_chosen_from": figure.chosen_from,
            "slices_spl_index": dict(zip(VIEWS, figure.planes, strict=True)),
            "slices_mm": {v: {"axis": a, "mm": mm} for v, (a, mm) in figure.positions.items()},
            "window_hu": list(LUNG_WINDOW),
        },
        "timings_s": timings,
        "versions": software_versions(),
        "warnings": inputs.notes + result.warnings,
    }


def compare_scan(
    scan_path: str | Path,
    finding: str,
    out_dir: str | Path,
    methods: Sequence[str] = ("hirescam", "gradcam"),
    model: ModelArg = "demo",
    layer: str | None = None,
    organs_path: str | Path | None = None,
    organ_names_path: str | Path | None = None,
    mask_path: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    region: RegionArg = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Explain ``finding`` on a scan with every method in one pass and compare them.

    Writes ``<stem>_<finding>_compare.png`` (rows: the axial, coronal and sagittal slices
    with the most positive mass of the HiResCAM map, else of the first method's; one
    column per method; CT in a lung window W1500/L-600, organ outlines with
    ``organs_path``, the mask's outline dashed) and ``compare.json`` (returned as a dict):
    per method the mask metrics against ``mask_path`` (a finding mask on the scan's grid:
    same shape, affine within 1e-3 mm, else :class:`InputError` naming both grids),
    relevance mass per organ with ``organs_path``, and ``l2_to_exact`` against the
    HiResCAM raw map where the audit proves the guarantee (HiResCAM is computed for that
    even when not requested). Existing outputs need ``force``
    (:class:`~hirescam3d.io.scans.OutputError`). ``region``: for a segmentation model, as in
    :func:`hirescam3d.pipeline.explain_scan` (default: the finding's predicted mask).
    Returns ``(record, {"png": path, "json": path})``.
    """
    from hirescam3d.pipeline import check_methods, explain_image, resolve_model

    methods = check_methods(methods)
    network, info = resolve_model(model)

    def explain(inputs: _Inputs, name: str, run: list[str]) -> Any:
        return explain_image(
            inputs.scan.array, inputs.scan.affine, (network, info), [name], run, layer,
            inputs.organs, inputs.organ_names, device, progress, region=inputs.region,
        )

    sources = (scan_path, mask_path, organs_path, organ_names_path)
    return compared(sources, finding, info.class_names, out_dir, methods, explain, force,
                    progress, region)  # fmt: skip


def compared(
    sources: tuple[str | Path, str | Path | None, str | Path | None, str | Path | None],
    finding: str,
    class_names: Sequence[str],
    out_dir: str | Path,
    methods: list[str],
    explain: Any,
    force: bool,
    progress: Progress | None,
    region: RegionArg = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The steps of :func:`compare_scan` around the model's own: check ``finding`` among
    ``class_names`` and the outputs, read ``sources`` (scan, mask, organ map, organ
    names), ``explain(inputs, finding, methods and HiResCAM)``, score, draw, and write
    ``compare.json`` (with the keys of ``extra``). Returns ``(record, paths)``."""
    from hirescam3d.io.outputs import atomic_write, check_writable, ensure_folder
    from hirescam3d.io.scans import scan_stem
    from hirescam3d.pipeline import _json_safe

    start = time.perf_counter()
    scan_path = sources[0]
    finding = _checked_finding(finding, class_names)
    stem = scan_stem(scan_path)
    paths = compare_paths(out_dir, stem, finding)
    ensure_folder(out_dir)
    check_writable(paths.values(), force)
    inputs = _read_inputs(*sources, region)

    # One prediction for every method; HiResCAM rides along as the exact reference.
    run = list(methods) + ([] if "hirescam" in methods else ["hirescam"])
    result = explain(inputs, finding, run)
    timings = {"explain_s": time.perf_counter() - start}
    t = time.perf_counter()
    scores = _score_methods(result, finding, methods, inputs)
    timings["metrics_s"] = time.perf_counter() - t

    if progress is not None:
        progress("figure", 0.9)
    t = time.perf_counter()
    figure = _write_figure(paths["png"], inputs, result, finding, methods, stem, force)
    timings["figure_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    record = _compare_record(inputs, finding, methods, result, scores, figure, timings)
    record = _json_safe({**record, **(extra or {})})
    text = json.dumps(record, indent=2) + "\n"
    written_json = atomic_write(paths["json"], lambda tmp: tmp.write_text(text), force=force)
    return record, {"png": figure.path, "json": written_json}
