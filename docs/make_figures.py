"""Make every figure of the documentation from the shipped models and sample scan.

    python docs/make_figures.py --out docs/images            # the figures + figures.json
    xvfb-run -a -s "-screen 0 1280x1024x24" \\
        python docs/make_figures.py --out docs/images --napari  # + napari screenshots

Everything is deterministic: the sample scan is the fixed-seed phantom shipped in
``sample_data/`` (regenerated from its seed if the folder is missing), the model is the
shipped ``demo`` bundle, and the script runs on the CPU. ``figures.json`` holds every
number the figures show; ``docs/why_hirescam.md`` quotes them (``quoted``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "sample_data"
COMMAND = "python docs/make_figures.py --out docs/images"
MODEL = "demo"
FINDING = "atelectasis"
METHODS = ("hirescam", "gradcam")
N_TOP_FEATURES = 4
LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600
DPI = 100
BODY_LABEL_NAME = "other_in_body"  # tissue inside the body that no organ label covers
PNG_NAMES = (
    "gradcam_vs_hirescam.png",
    "averaging.png",
    "steps.png",
    "organ_contributions.png",
    "readme.png",
)
NAPARI_NAMES = ("napari_explain.png", "napari_organs.png")
_CAPTURE = "_make_figures_capture"


# -- data -------------------------------------------------------------------------------------
@dataclass
class SampleRun:
    """The sample scan, its ground truth and the demo model's explanations of it.

    Volumes are ``(S, P, L)`` on the scan's grid, which for the demo model is also the
    model's input grid (checked). ``acts``: ``(F, T, h, w)`` the activations at the
    explained layer; ``grads``: ``{finding: (F, T, h, w)}`` the gradients of each
    finding's logit with respect to them (captured through a registered method).
    """

    ct: np.ndarray
    affine: np.ndarray
    organs: np.ndarray
    organ_names: dict[int, str]
    body: np.ndarray
    findings: dict[str, np.ndarray]
    maps: dict[tuple[str, str], np.ndarray]
    raw: dict[tuple[str, str], np.ndarray]
    report: dict[str, Any]
    layer: str
    acts: np.ndarray
    grads: dict[str, np.ndarray]
    tile: tuple[int, int, int]
    timings: dict[str, float] = field(default_factory=dict)


def load_sample(directory: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The sample scan's volumes (shipped files, else regenerated into a temporary folder)."""
    import nibabel as nib

    from hirescam3d.data.phantom import make_chest_ct
    from hirescam3d.data.sample import SAMPLE_FINDINGS, SAMPLE_SEED, sample_paths, write_sample

    tmp = None
    directory = directory or SAMPLE_DIR
    paths = sample_paths(directory)
    if not all(p.exists() for p in paths.values()):
        tmp = Path(tempfile.mkdtemp(prefix="hirescam3d-figures-"))
        paths = write_sample(tmp)
    img = nib.load(paths["scan"])
    ct = np.asarray(img.dataobj, dtype=np.int16)
    phantom = make_chest_ct(SAMPLE_SEED, findings=SAMPLE_FINDINGS)
    if not np.array_equal(phantom.ct, ct):
        raise RuntimeError(f"{paths['scan']} is not the phantom of seed {SAMPLE_SEED}")
    names = {int(k): v for k, v in json.loads(paths["organ_names"].read_text()).items()}
    data = {
        "ct": ct,
        "affine": np.asarray(img.affine, dtype=np.float64),
        "organs": np.asarray(nib.load(paths["organs"]).dataobj, dtype=np.uint8),
        "organ_names": names,
        "body": np.asarray(phantom.body, dtype=bool),
        "findings": {
            f: np.asarray(nib.load(paths[f]).dataobj) > 0 for f in SAMPLE_FINDINGS
        },
    }
    return data, tmp


def body_labels(organs: np.ndarray, names: dict[int, str], body: np.ndarray):
    """The organ map plus one label for the rest of the body: what no label covers is
    then the air outside the body."""
    extra = max(names) + 1
    labels = organs.astype(np.int16).copy()
    labels[(organs == 0) & body] = extra
    return labels, {**names, extra: BODY_LABEL_NAME}


def run_sample(sample_dir: Path | None = None) -> SampleRun:
    """Explain every finding of the sample scan with HiResCAM and Grad-CAM (demo model),
    and capture the activations and gradients at the explained layer."""
    from hirescam3d import Explainer, pipeline
    from hirescam3d.core import methods
    from hirescam3d.models.handle import ModelHandle
    from hirescam3d.models.zoo import CHEST_FINDINGS

    timings: dict[str, float] = {}
    t = time.perf_counter()
    data, tmp = load_sample(sample_dir)
    timings["load_s"] = time.perf_counter() - t
    network, info = ModelHandle.resolve(MODEL).load()
    labels, names = body_labels(data["organs"], data["organ_names"], data["body"])

    t = time.perf_counter()
    res = pipeline.explain_image(
        data["ct"], data["affine"], (network, info), findings=list(CHEST_FINDINGS),
        methods=list(METHODS), organs=labels, organ_names=names, device="cpu",
    )  # fmt: skip
    timings["explain_s"] = time.perf_counter() - t
    grid = res.report["image"]
    if grid["model_grid_shape"] != list(data["ct"].shape) or not np.allclose(
        grid["model_grid_affine"], data["affine"], atol=1e-4
    ):
        raise RuntimeError("the demo model's grid is not the sample scan's grid")

    # Activations and gradients at the layer, through the library's own capture: a
    # registered method sees exactly what HiResCAM and Grad-CAM see.
    t = time.perf_counter()
    held: dict[str, torch.Tensor] = {}

    def capture(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Keep the activations and gradients; return HiResCAM."""
        held["acts"], held["grads"] = activations.detach().clone(), gradients.detach().clone()
        return methods.hirescam(activations, gradients)

    pre = pipeline.preprocess_transforms(info, "image", from_array=True)
    from monai.data import MetaTensor

    x = pre({"image": MetaTensor(torch.from_numpy(data["ct"].astype(np.float32)),
                                 affine=torch.as_tensor(data["affine"]))})["image"]
    methods.register_method(_CAPTURE, capture)
    try:
        explainer = Explainer(network, info.target_layer, _CAPTURE, class_names=info.class_names)
        out = explainer.explain(x.as_tensor()[None], list(CHEST_FINDINGS), maps=False)
    finally:
        methods.unregister_method(_CAPTURE)
    timings["capture_s"] = time.perf_counter() - t
    acts = held["acts"][0].numpy()
    grads = {f: held["grads"][k, 0].numpy() for k, f in enumerate(CHEST_FINDINGS)}
    for k, f in enumerate(CHEST_FINDINGS):  # the capture matches the pipeline's maps
        np.testing.assert_allclose(
            out[_CAPTURE].raw[0, k].numpy(), res.raw[(f, "hirescam")].numpy(), atol=1e-4
        )
    tile = tuple(int(n // c) for n, c in zip(data["ct"].shape, acts.shape[1:], strict=True))
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return SampleRun(
        ct=data["ct"], affine=data["affine"], organs=data["organs"],
        organ_names=data["organ_names"], body=data["body"], findings=data["findings"],
        maps={k: np.asarray(v) for k, v in res.maps.items()},
        raw={k: v.numpy() for k, v in res.raw.items()}, report=res.report,
        layer=info.target_layer, acts=acts, grads=grads, tile=tile, timings=timings,
    )  # fmt: skip


# -- measurements -----------------------------------------------------------------------------
def outside_fraction(volume: np.ndarray, body: np.ndarray) -> float:
    """Share of the positive mass of ``volume`` that lies outside ``body``."""
    positive = np.clip(volume, 0.0, None).astype(np.float64)
    total = positive.sum()
    return float(positive[~body].sum() / total) if total > 0 else float("nan")


def peak_voxel(volume: np.ndarray) -> tuple[int, int, int]:
    """Index of the map's maximum (first in C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(volume)), volume.shape))


def measure(run: SampleRun) -> dict[str, Any]:
    """Per finding and method: where the map's positive mass and its peak lie."""
    out: dict[str, Any] = {}
    names = {**run.organ_names, 0: None}
    shares = run.report.get("organs", {})
    for (finding, method), volume in run.maps.items():
        peak = peak_voxel(volume)
        mask = run.findings.get(finding)
        positive = np.clip(volume, 0.0, None).astype(np.float64)
        entry = {
            "outside_body": outside_fraction(volume, run.body),
            "outside_body_cells": shares[finding][method]["outside_labels"],
            "peak_voxel": list(peak),
            "peak_in_body": bool(run.body[peak]),
            "peak_organ": names.get(int(run.organs[peak])),
            "peak_in_finding": None if mask is None else bool(mask[peak]),
            "mass_in_finding": (
                None if mask is None else float(positive[mask].sum() / positive.sum())
            ),
            "raw_positive": float(np.clip(run.raw[(finding, method)], 0, None).sum()),
            "raw_negative": float(np.clip(-run.raw[(finding, method)], 0, None).sum()),
        }
        entry["raw_positive_share"] = entry["raw_positive"] / (
            entry["raw_positive"] + entry["raw_negative"])
        out.setdefault(finding, {})[method] = entry
    return out


def feature_terms(run: SampleRun, finding: str) -> dict[str, np.ndarray]:
    """HiResCAM's and Grad-CAM's per-feature terms at the layer, ``(F, T, h, w)`` each."""
    a, g = run.acts, run.grads[finding]
    weights = g.reshape(g.shape[0], -1).mean(axis=1)
    return {
        "hires": g * a,
        "grad": weights[:, None, None, None] * a,
        "weights": weights,
    }


def cell_body_fraction(run: SampleRun) -> np.ndarray:
    """Share of each cell's tile inside the body, ``(T, h, w)``."""
    return tile_fractions(run, run.body)


# -- drawing helpers --------------------------------------------------------------------------
@dataclass(frozen=True)
class Plane:
    """An axial, coronal or sagittal plane through voxel ``index`` of an ``(S, P, L)``
    volume, shown in radiological convention (superior at the top of the other planes)."""

    kind: str
    index: int

    def cut(self, volume: np.ndarray) -> np.ndarray:
        if self.kind == "axial":
            return volume[self.index]
        if self.kind == "coronal":
            return volume[::-1, self.index, :]
        return volume[::-1, :, self.index]

    def cells(self, cells: np.ndarray, tile: tuple[int, int, int]) -> np.ndarray:
        """The plane of cells ``(T, h, w)`` whose tiles hold this plane."""
        axis = {"axial": 0, "coronal": 1, "sagittal": 2}[self.kind]
        return self.cut_index(cells, self.index // tile[axis])

    def cut_index(self, volume: np.ndarray, i: int) -> np.ndarray:
        return Plane(self.kind, i).cut(volume)

    @property
    def aspect(self) -> float:
        return 1.0 if self.kind == "axial" else 3.0 / 2.5  # 3 mm slices, 2.5 mm pixels

    @property
    def sides(self) -> tuple[str, str]:
        return ("A", "P") if self.kind == "sagittal" else ("R", "L")

    @property
    def label(self) -> str:
        return f"{self.kind}, {'slice' if self.kind == 'axial' else 'voxel'} {self.index}"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return compress_png(path)


def compress_png(path: Path) -> Path:
    """Rewrite a PNG with a 256-colour palette (a third of the size; plots lose nothing
    visible)."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True
    )
    return path


def _ct(ax: Any, image: np.ndarray, aspect: float = 1.0) -> None:
    ax.imshow(image, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1],
              interpolation="nearest", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])


def _heat(ax: Any, image: np.ndarray, aspect: float = 1.0) -> Any:
    shown = np.ma.masked_where(image < 0.05, image)
    return ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.75,
                     interpolation="bilinear", aspect=aspect)


def _outline(ax: Any, mask: np.ndarray, color: str, style: str = "-", width: float = 1.2):
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linestyles=style,
                   linewidths=width)


def _sides(ax: Any, plane: Plane) -> None:
    for x, text, ha in ((0.02, plane.sides[0], "left"), (0.98, plane.sides[1], "right")):
        ax.text(x, 0.97, text, color="w", transform=ax.transAxes, fontsize=8, va="top", ha=ha)


def _pct(value: float) -> str:
    """A share as the page writes it: ``88.8 %``, small ones with two digits (``0.053 %``)."""
    percent = 100 * value
    if percent == 0:
        return "0 %"
    return f"{percent:.2g} %" if abs(percent) < 1 else f"{percent:.1f} %"


def finding_centre(run: SampleRun, finding: str) -> tuple[int, int, int]:
    """The voxel nearest the centre of the finding's mask."""
    idx = np.argwhere(run.findings[finding])
    return tuple(int(v) for v in np.round(idx.mean(axis=0)))


def comparison_planes(run: SampleRun, numbers: dict[str, Any]) -> list[Plane]:
    """Axial through the atelectasis, axial through Grad-CAM's peak, sagittal through
    Grad-CAM's peak (which crosses the right lung's atelectasis too)."""
    peak = numbers[FINDING]["gradcam"]["peak_voxel"]
    return [Plane("axial", finding_centre(run, FINDING)[0]), Plane("axial", peak[0]),
            Plane("sagittal", peak[2])]


# -- figures ----------------------------------------------------------------------------------
def figure_comparison(run: SampleRun, numbers: dict[str, Any], path: Path,
                      compact: bool = False) -> Path:
    """CT, HiResCAM and Grad-CAM of ``FINDING`` in the same planes, with the finding and
    body outlines (``compact``: the sagittal plane only, for the README)."""
    planes = comparison_planes(run, numbers)
    if compact:
        planes = planes[-1:]
    mask, body = run.findings[FINDING], run.body
    rows = len(planes)
    fig = Figure(figsize=(8.6, 3.0) if compact else (9.6, 3.15 * rows + 0.8))
    grid = fig.add_gridspec(rows, 4, width_ratios=[1, 1, 1, 0.05], wspace=0.05, hspace=0.12)
    heat = None
    pretty = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM"}
    for r, plane in enumerate(planes):
        panels = [("CT", None)] + [(m, run.maps[(FINDING, m)]) for m in METHODS]
        for c, (name, volume) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            _ct(ax, plane.cut(run.ct), plane.aspect)
            if volume is not None:
                heat = _heat(ax, plane.cut(volume), plane.aspect)
            _outline(ax, plane.cut(body), "w", "--", 0.8)
            _outline(ax, plane.cut(mask), "c", "-", 1.4)
            _sides(ax, plane)
            if r == 0:
                if volume is None:
                    title = f"CT, {FINDING} outlined"
                else:
                    e = numbers[FINDING][name]
                    where = "inside the atelectasis" if e["peak_in_finding"] else (
                        "outside the body" if not e["peak_in_body"] else "elsewhere in the body")
                    title = (f"{pretty[name]}: {_pct(e['outside_body'])} outside the body,"
                             f"\npeak {where}")
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(plane.label, fontsize=8)
    if heat is not None:
        cbar = fig.colorbar(heat, cax=fig.add_subplot(grid[:, 3]))
        cbar.set_label("map / its maximum", fontsize=8)
    p = run.report["findings"][FINDING]["probability"]
    fig.suptitle(f"{FINDING} (cyan), demo model (p = {p:.3f}), layer {run.layer}; dashed: "
                 "body outline", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.92, top=0.78 if compact else 0.91,
                        bottom=0.03 if compact else 0.02)
    return _save(fig, path)


def _cell_image(ax: Any, run: SampleRun, plane: Plane, cells: np.ndarray, cmap: str,
                limit: float, symmetric: bool) -> Any:
    """A plane of cells (each over its tile) on the CT, with outlines."""
    _ct(ax, plane.cut(run.ct), plane.aspect)
    h, w = plane.cut(run.ct).shape
    shown = plane.cells(cells, run.tile)
    if cmap == "inferno":  # a display map: only where it is visible
        shown = np.ma.masked_where(shown < 0.05 * limit, shown)
    img = ax.imshow(shown, cmap=cmap, vmin=-limit if symmetric else 0.0,
                    vmax=limit, alpha=0.75, interpolation="nearest",
                    extent=(-0.5, w - 0.5, h - 0.5, -0.5), aspect=plane.aspect)
    _outline(ax, plane.cut(run.body), "k", "--", 0.8)
    _outline(ax, plane.cut(run.findings[FINDING]), "lime", "-", 1.2)
    _sides(ax, plane)
    return img


def _limit(values: np.ndarray) -> float:
    return float(np.abs(values).max()) or 1.0


def select_features(run: SampleRun, finding: str, n: int) -> list[int]:
    """The ``n - 1`` features that add the most to the logit (HiResCAM), then the one
    whose Grad-CAM term puts the most positive mass outside the body."""
    terms = feature_terms(run, finding)
    contribution = np.abs(terms["hires"].reshape(len(terms["weights"]), -1).sum(axis=1))
    top = [int(i) for i in np.argsort(-contribution, kind="stable")[: n - 1]]
    air = averaging_air_feature(run, finding, exclude=top)
    return top + [air]


def averaging_air_feature(run: SampleRun, finding: str, exclude: list[int] = ()) -> int:
    """The feature whose Grad-CAM term puts the most positive mass outside the body."""
    terms = feature_terms(run, finding)
    outside = 1.0 - cell_body_fraction(run)
    mass = (np.clip(terms["grad"], 0, None) * outside).reshape(len(terms["weights"]), -1)
    mass = mass.sum(axis=1)
    mass[list(exclude)] = -1.0
    return int(np.argmax(mass))


def averaging_feature(run: SampleRun, finding: str) -> int:
    """The feature that adds the most to the logit (largest HiResCAM sum)."""
    terms = feature_terms(run, finding)
    return int(np.argmax(terms["hires"].reshape(len(terms["weights"]), -1).sum(axis=1)))


def figure_steps(run: SampleRun, features: list[int], plane: Plane, path: Path
                 ) -> dict[str, Any]:
    """Paper Figure 7, on the demo model: top feature maps, their gradients, Grad-CAM's
    averaged weights against HiResCAM's element-wise products, and the two maps."""
    terms = feature_terms(run, FINDING)
    g = run.grads[FINDING]
    n = len(features)
    fig = Figure(figsize=(10.0, 2.45 * (n + 1) + 0.7))
    grid = fig.add_gridspec(n + 1, 4, wspace=0.3, hspace=0.3)
    heads = ["activation $A_f$", "gradient $G_f$", "Grad-CAM term\nmean$(G_f)\\cdot A_f$",
             "HiResCAM term\n$G_f \\odot A_f$"]
    for r, f in enumerate(features):
        cells = [
            (run.acts[f], "viridis", _limit(run.acts[f]), False),
            (g[f], "RdBu_r", _limit(g[f]), True),
            (terms["grad"][f], "RdBu_r", _limit(terms["grad"][f]), True),
            (terms["hires"][f], "RdBu_r", _limit(terms["hires"][f]), True),
        ]
        for c, (image, cmap, limit, symmetric) in enumerate(cells):
            ax = fig.add_subplot(grid[r, c])
            img = _cell_image(ax, run, plane, image, cmap, limit, symmetric)
            fig.colorbar(img, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(heads[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"feature {f}", fontsize=9)
            if c == 2:
                ax.set_xlabel(f"mean$(G_f)$ = {terms['weights'][f]:+.1e}", fontsize=7)
            if c == 3:
                ax.set_xlabel(f"sum = {terms['hires'][f].sum():+.2f} logits", fontsize=7)
    total = {"Grad-CAM": terms["grad"].sum(axis=0), "HiResCAM": terms["hires"].sum(axis=0)}
    c = 0
    for name, cells in total.items():
        shown = np.clip(cells, 0, None) / max(float(cells.max()), 1e-30)
        for image, title, cmap, symmetric in (
            (cells, f"{name} map: sum of the terms", "RdBu_r", True),
            (shown, f"{name} displayed:\nReLU, / maximum", "inferno", False),
        ):
            ax = fig.add_subplot(grid[n, c])
            img = _cell_image(ax, run, plane, image, cmap, _limit(image), symmetric)
            fig.colorbar(img, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.set_title(title, fontsize=8)
            c += 1
    fig.suptitle(
        f"{FINDING} logit at layer {run.layer} ({run.acts.shape[0]} features, "
        f"{'x'.join(map(str, run.acts.shape[1:]))} cells), sagittal plane of cells through "
        "the right lung;\ngreen: atelectasis, dashed: body; every panel has its own colour "
        "scale (blue < 0 < red).", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.97, top=0.93, bottom=0.02)
    _save(fig, path)
    return {
        "plane": [plane.kind, plane.index],
        "features": features,
        "gradcam_weights": {str(f): float(terms["weights"][f]) for f in features},
        "hirescam_contribution_logit": {
            str(f): float(terms["hires"][f].sum()) for f in features
        },
    }


def figure_averaging(run: SampleRun, f: int, plane: Plane, path: Path) -> dict[str, Any]:
    """One feature: its gradient, the gradient's average, its activation and the two
    products, in a plane through the atelectasis."""
    terms = feature_terms(run, FINDING)
    g, a = run.grads[FINDING][f], run.acts[f]
    weight = float(terms["weights"][f])
    panels = [
        ("gradient $G_f$", g, "RdBu_r", _limit(g), True),
        (f"Grad-CAM's weight, everywhere:\nmean$(G_f)$ = {weight:+.1e} (same scale)",
         np.full_like(g, weight), "RdBu_r", _limit(g), True),
        ("activation $A_f$", a, "viridis", _limit(a), False),
        ("HiResCAM term $G_f\\odot A_f$", terms["hires"][f], "RdBu_r",
         _limit(terms["hires"][f]), True),
        ("Grad-CAM term mean$(G_f)\\cdot A_f$\n(own colour scale)", terms["grad"][f], "RdBu_r",
         _limit(terms["grad"][f]), True),
    ]
    fig = Figure(figsize=(13.0, 3.3))
    grid = fig.add_gridspec(1, 5, wspace=0.3)
    for c, (title, image, cmap, limit, symmetric) in enumerate(panels):
        ax = fig.add_subplot(grid[0, c])
        img = _cell_image(ax, run, plane, image, cmap, limit, symmetric)
        fig.colorbar(img, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        ax.set_title(title, fontsize=9)
    hires = terms["hires"].reshape(len(terms["weights"]), -1).sum(axis=1)
    flipped = (hires > 0) & (terms["weights"] < 0)
    stats = {
        "feature": f,
        "plane": [plane.kind, plane.index],
        "gradcam_weight": weight,
        "gradient_where_active": float((g * a).sum() / a.sum()),
        "hirescam_contribution_logit": float(terms["hires"][f].sum()),
        "gradcam_term_sum": float(terms["grad"][f].sum()),
        "features_positive_hirescam_negative_weight": int(flipped.sum()),
        "their_hirescam_contribution_logit": float(hires[flipped].sum()),
        "all_features_hirescam_contribution_logit": float(hires.sum()),
    }
    fig.suptitle(
        f"feature {f} of {run.layer}, {FINDING} logit, {plane.label}: where the feature is "
        f"active its gradient averages {stats['gradient_where_active']:+.1e} and it adds "
        f"{stats['hirescam_contribution_logit']:+.2f} logits;\nover all cells its gradient "
        f"averages {weight:+.1e}, so Grad-CAM counts it as evidence against. Green: "
        "atelectasis, dashed: body.", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.97, top=0.76, bottom=0.03)
    _save(fig, path)
    return stats


def tile_fractions(run: SampleRun, mask: np.ndarray) -> np.ndarray:
    """Share of each cell's tile inside ``mask``, ``(T, h, w)``."""
    (t, h, w), shape = run.tile, run.acts.shape[1:]
    return mask.reshape(shape[0], t, shape[1], h, shape[2], w).mean(axis=(1, 3, 5))


def other_tissue_share(run: SampleRun, finding: str) -> float:
    """Of HiResCAM's contribution from body tissue outside the organ labels, the share
    that comes from cells whose tile also holds part of the finding."""
    labels, names = body_labels(run.organs, run.organ_names, run.body)
    other = tile_fractions(run, labels == max(names))
    parts = run.raw[(finding, "hirescam")] * other
    return float(parts[tile_fractions(run, run.findings[finding]) > 0].sum() / parts.sum())


def organ_contributions(run: SampleRun) -> dict[str, dict[str, Any]]:
    """HiResCAM's logit contributions per region for every finding (from the report)."""
    out = {}
    for finding, methods_ in run.report["contributions"].items():
        c = methods_["hirescam"]
        parts = dict(c["by_organ"])
        parts["outside_body"] = c["outside_organs"]
        if abs(c["outside_scan"]) > 1e-6:
            parts["outside_scan"] = c["outside_scan"]
        out[finding] = {
            "logit": c["logit"], "bias": c["bias"], "total": c["total"],
            "probability": run.report["findings"][finding]["probability"],
            "present": finding in run.findings, "parts": parts,
        }
    return out


def figure_organs(contrib: dict[str, dict[str, Any]], path: Path) -> Path:
    """Bar chart: each region's HiResCAM contribution (logits) to each finding's logit."""
    findings = list(contrib)
    regions = list(next(iter(contrib.values()))["parts"])
    fig = Figure(figsize=(12.0, 3.9))
    grid = fig.add_gridspec(1, len(findings), wspace=0.08)
    limit = max(abs(v) for c in contrib.values() for v in c["parts"].values()) * 1.15
    y = np.arange(len(regions))
    for i, finding in enumerate(findings):
        c = contrib[finding]
        values = np.array([c["parts"][r] for r in regions])
        ax = fig.add_subplot(grid[0, i])
        ax.barh(y, values, color=np.where(values >= 0, "#c0392b", "#2e86c1"))
        ax.axvline(0, color="k", linewidth=0.6)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(len(regions) - 0.5, -0.5)
        ax.set_yticks(y)
        ax.set_yticklabels([r.replace("_", " ") for r in regions] if i == 0 else [], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        mark = "present" if c["present"] else "absent"
        ax.set_title(
            f"{finding.replace('_', ' ')} ({mark})\nlogit {c['logit']:+.2f} = "
            f"{c['total']:+.2f} + bias {c['bias']:+.2f}", fontsize=8)
        ax.set_xlabel("logits", fontsize=8)
    fig.suptitle("HiResCAM contributions by region, demo model on the sample scan "
                 "(cells add up to the logit minus the bias)", fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.99, top=0.8, bottom=0.13)
    return _save(fig, path)


# -- napari screenshots -----------------------------------------------------------------------
def napari_screenshots(out: Path, viewer: Any = None, timeout_s: float = 300.0
                       ) -> dict[str, Any]:
    """``napari_explain.png`` (the Explain widget after a HiResCAM run on the sample scan)
    and ``napari_organs.png`` (the organ map over the scan). Needs a display with OpenGL
    (run under ``xvfb-run -a -s "-screen 0 1280x1024x24"``): a viewer that is not shown
    screenshots black. ``viewer``: a shown viewer to use (kept open); by default one is
    made and closed."""
    import napari
    from qtpy.QtWidgets import QApplication

    if not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        raise RuntimeError("napari screenshots need an X display: run under xvfb-run")
    from imageio.v3 import imwrite

    scan = SAMPLE_DIR / "sample_chest_ct.nii.gz"
    organs_path = SAMPLE_DIR / "sample_chest_organs.nii.gz"
    own = viewer is None
    viewer = napari.Viewer(show=True) if own else viewer
    try:
        viewer.window._qt_window.resize(1280, 900)
        ct = viewer.open(str(scan), plugin="hirescam3d")[0]
        organs = viewer.open(str(organs_path), plugin="hirescam3d")[0]
        s = _centre_slice(SAMPLE_DIR / "sample_chest_atelectasis.nii.gz")
        viewer.dims.set_point(0, float(ct.data_to_world([s, 0, 0])[0]))
        organs.opacity = 0.45
        _settle(QApplication, 0.5)
        imwrite(out / "napari_organs.png", viewer.screenshot(canvas_only=False, flash=False))
        compress_png(out / "napari_organs.png")

        _, widget = viewer.window.add_plugin_dock_widget("hirescam3d", "Explain")
        widget.model_combo.setCurrentText(MODEL)
        widget.set_findings([FINDING])
        widget.set_methods(["hirescam"])
        widget.organs_combo.setCurrentText(organs.name)
        organs.visible = False
        start = time.perf_counter()
        widget.run()
        while widget.worker is not None:
            if time.perf_counter() - start > timeout_s:
                raise RuntimeError("the Explain widget did not finish in time")
            _settle(QApplication, 0.05)
        if not widget.status.text().startswith("done"):
            raise RuntimeError(f"the Explain widget reported: {widget.status.text()}")
        viewer.reset_view()
        _settle(QApplication, 0.5)
        imwrite(out / "napari_explain.png", viewer.screenshot(canvas_only=False, flash=False))
        compress_png(out / "napari_explain.png")
        return {"explain_s": time.perf_counter() - start, "status": widget.status.text()}
    finally:
        if own:
            viewer.close()


def _settle(app: Any, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def _centre_slice(path: Path) -> int:
    import nibabel as nib

    idx = np.argwhere(np.asarray(nib.load(path).dataobj) > 0)
    return int(np.round(idx[:, 0].mean()))


# -- the whole set ----------------------------------------------------------------------------
def quoted_numbers(numbers: dict[str, Any]) -> dict[str, str]:
    """The numbers ``why_hirescam.md`` quotes, formatted as the page writes them."""
    m = numbers["measures"]
    contrib = numbers["contributions"]
    avg = numbers["averaging"]
    steps = numbers["steps"]
    a = contrib[FINDING]
    q = {
        "gradcam_outside_body": _pct(m[FINDING]["gradcam"]["outside_body"]),
        "hirescam_outside_body": _pct(m[FINDING]["hirescam"]["outside_body"]),
        "gradcam_outside_body_cells": _pct(m[FINDING]["gradcam"]["outside_body_cells"]),
        "hirescam_outside_body_cells": _pct(m[FINDING]["hirescam"]["outside_body_cells"]),
        "hirescam_mass_in_atelectasis": _pct(m[FINDING]["hirescam"]["mass_in_finding"]),
        "gradcam_mass_in_atelectasis": _pct(m[FINDING]["gradcam"]["mass_in_finding"]),
        "atelectasis_logit": f"{a['logit']:.2f}",
        "atelectasis_bias": f"{a['bias']:.2f}",
        "atelectasis_total": f"{a['total']:.2f}",
        "atelectasis_right_lung": f"{a['parts']['right_lung']:.2f}",
        "atelectasis_left_lung": f"{a['parts']['left_lung']:.2f}",
        "atelectasis_outside_body": f"{a['parts']['outside_body']:.2f}",
        "atelectasis_probability": f"{a['probability']:.4f}",
        "gradcam_positive_share": _pct(m[FINDING]["gradcam"]["raw_positive_share"]),
        "hirescam_positive_share": _pct(m[FINDING]["hirescam"]["raw_positive_share"]),
        "gradcam_peak_slice": str(m[FINDING]["gradcam"]["peak_voxel"][0]),
        "averaging_feature": str(avg["feature"]),
        "averaging_weight": f"{avg['gradcam_weight']:+.1e}",
        "averaging_gradient_where_active": f"{avg['gradient_where_active']:+.1e}",
        "averaging_contribution": f"{avg['hirescam_contribution_logit']:+.2f}",
        "flipped_features": str(avg["features_positive_hirescam_negative_weight"]),
        "flipped_contribution": f"{avg['their_hirescam_contribution_logit']:+.2f}",
        "n_features": str(numbers["model"]["features"]),
        "steps_features": ", ".join(str(f) for f in steps["features"][:-1]),
        "steps_contributions": ", ".join(
            f"{steps['hirescam_contribution_logit'][str(f)]:+.2f}" for f in steps["features"][:-1]
        ),
        "steps_weights": ", ".join(
            f"{steps['gradcam_weights'][str(f)]:+.1e}" for f in steps["features"][:-1]
        ),
        "steps_air_feature": str(steps["features"][-1]),
        "steps_air_weight": f"{steps['gradcam_weights'][str(steps['features'][-1])]:+.1e}",
        "effusion_gradcam_outside_body": _pct(m["pleural_effusion"]["gradcam"]["outside_body"]),
        "effusion_hirescam_outside_body": _pct(m["pleural_effusion"]["hirescam"]["outside_body"]),
        "effusion_hirescam_in_finding": _pct(m["pleural_effusion"]["hirescam"]["mass_in_finding"]),
        "effusion_gradcam_in_finding": _pct(m["pleural_effusion"]["gradcam"]["mass_in_finding"]),
        "effusion_logit": f"{contrib['pleural_effusion']['logit']:.2f}",
        "effusion_gradcam_positive_share": _pct(
            m["pleural_effusion"]["gradcam"]["raw_positive_share"]),
        "effusion_hirescam_positive_share": _pct(
            m["pleural_effusion"]["hirescam"]["raw_positive_share"]),
        "cardiomegaly_heart": f"{contrib['cardiomegaly']['parts']['heart']:.2f}",
        "cardiomegaly_logit": f"{contrib['cardiomegaly']['logit']:.2f}",
        "nodule_bias": f"{contrib['nodule']['bias']:.2f}",
        "nodule_total": f"{contrib['nodule']['total']:+.2f}",
        "pericardial_bias": f"{contrib['pericardial_effusion']['bias']:.2f}",
        "pericardial_total": f"{contrib['pericardial_effusion']['total']:+.2f}",
        "effusion_other_from_effusion_cells": _pct(
            numbers["effusion_other_tissue_from_effusion_cells"]),
        "hirescam_in_lungs": _pct(sum(
            numbers["organ_shares"][FINDING]["hirescam"]["by_group"][lung]
            for lung in ("right_lung", "left_lung"))),
        "effusion_outside_body": f"{contrib['pleural_effusion']['parts']['outside_body']:.2f}",
        "effusion_other_in_body": f"{contrib['pleural_effusion']['parts'][BODY_LABEL_NAME]:.2f}",
    }
    return q


def make_figures(out: str | Path, napari: bool = False, sample_dir: Path | None = None,
                 run: SampleRun | None = None) -> dict[str, Any]:
    """Write every figure into ``out`` and ``figures.json`` with the measured numbers;
    returns that dict. ``napari``: also the two napari screenshots (needs a display)."""
    from hirescam3d.pipeline import software_versions

    start = time.perf_counter()
    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = run or run_sample(sample_dir)
    numbers: dict[str, Any] = {
        "command": COMMAND + (" --napari" if napari else ""),
        "model": {
            "name": MODEL,
            "layer": run.layer,
            "cells": list(run.acts.shape[1:]),
            "features": int(run.acts.shape[0]),
            "weights_sha256": run.report["model"]["weights_sha256"],
        },
        "scan": "sample_data/sample_chest_ct.nii.gz",
        "findings": run.report["findings"],
        "measures": measure(run),
        "contributions": organ_contributions(run),
        "organ_shares": run.report["organs"],
        "effusion_other_tissue_from_effusion_cells": other_tissue_share(run, "pleural_effusion"),
    }
    figure_comparison(run, numbers["measures"], out / "gradcam_vs_hirescam.png")
    figure_comparison(run, numbers["measures"], out / "readme.png", compact=True)
    centre = finding_centre(run, FINDING)
    feature = averaging_feature(run, FINDING)
    numbers["averaging"] = figure_averaging(run, feature, Plane("axial", centre[0]),
                                            out / "averaging.png")
    top = select_features(run, FINDING, N_TOP_FEATURES)
    sagittal = comparison_planes(run, numbers["measures"])[-1]
    numbers["steps"] = figure_steps(run, top, sagittal, out / "steps.png")
    figure_organs(numbers["contributions"], out / "organ_contributions.png")
    numbers["quoted"] = quoted_numbers(numbers)
    numbers["timings_s"] = {**run.timings, "total_without_napari": time.perf_counter() - start}
    if napari:
        numbers["napari"] = napari_screenshots(out)
    numbers["versions"] = software_versions()
    (out / "figures.json").write_text(json.dumps(numbers, indent=1, sort_keys=False) + "\n")
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="output folder")
    parser.add_argument("--napari", action="store_true",
                        help="also the napari screenshots (run under xvfb-run)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    numbers = make_figures(args.out, napari=args.napari)
    g, h = numbers["measures"][FINDING]["gradcam"], numbers["measures"][FINDING]["hirescam"]
    print(
        f"{FINDING}: positive mass outside the body: Grad-CAM {_pct(g['outside_body'])}, "
        f"HiResCAM {_pct(h['outside_body'])}; peak in the atelectasis: "
        f"Grad-CAM {g['peak_in_finding']}, HiResCAM {h['peak_in_finding']}"
    )
    print(f"wrote figures to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
