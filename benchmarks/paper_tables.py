"""The HiResCAM paper's Tables 1 and 2, and its shortcut case, reproduced on our zoo.

    python benchmarks/paper_tables.py --out docs/results [--results benchmarks/results.json]

Writes ``paper_tables.md`` (the tables, each saying how it was made), ``paper_tables.json``
(the numbers they came from) and ``shortcut.png`` into ``--out``. Seeds are fixed, so a
rerun gives the same tables up to floating-point noise. Phantom seeds below 100000 are
held out: the shipped models never trained on them.

* **Table 1 shape**: ``metrics.l2_to_exact`` (ReLU, min-max to [0, 1] over the cells, L2
  over the explained layer's grid) between each method's raw map and the exact
  per-location contributions. The exact contributions are computed here from the final
  linear layer's weights and the captured activations, independently of the explainer:
  ``sum_f W[k, f, s] A[f, s]`` (``VOCNet``: ``head -> flatten -> fc``), and for AxialNet
  ``sum_f W[k, f, s] A[f, t, s] / T`` (a 1 x h x w convolution per triplet, then the mean
  over the T triplets).
* **Table 2 shape**: localisation against the planted finding masks on 200 phantoms.
* **Shortcut**: the ``demo_shortcut`` model (trained on phantoms that draw a bright marker
  whenever a nodule is present) on phantoms where marker and nodule are decoupled.
* **Cost**: every mask metric for 5 findings x 2 methods of one scan, against one
  ``Explainer.explain`` call on the same scan (target: at most 10 %).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from hirescam3d.core.explainer import Explainer
from hirescam3d.data.phantom import FINDING_ORGANS, FINDINGS, ORGAN_NAMES, make_chest_ct
from hirescam3d.evaluate import metrics
from hirescam3d.models.bundle import apply_window
from hirescam3d.models.handle import ModelHandle

METHODS = ("hirescam", "gradcam")
ORGAN_LABEL = {name: label for label, name in ORGAN_NAMES.items()}
TABLE1_SEEDS = range(0, 50)
TABLE2_SEEDS = range(0, 200)
DELETION_SEEDS = range(0, 30)
SHORTCUT_SEEDS = range(3000, 3120)
VOC_BATCH_SEED, VOC_BATCH = 1234, 8
COMMAND = "python benchmarks/paper_tables.py --out docs/results --results benchmarks/results.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mean_sd(values: Iterable[float]) -> dict[str, float | int | None]:
    v = [float(x) for x in values if x == x]  # drop NaN (no positive mass)
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
            "n": len(v)}  # fmt: skip


def captured(module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The output of ``module`` during ``run()``, by a forward hook of our own."""
    held: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: held.append(out.detach()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return held[-1]


def exact_vocnet(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)``: ``sum_f W[k, f, s] A[f, s]`` at ``head`` (flatten order f, h, w)."""
    acts = captured(network.head, lambda: network(x))
    weight = network.fc.weight.detach().reshape(-1, *acts.shape[1:])
    return torch.einsum("kfhw,bfhw->bkhw", weight.double(), acts.double()).float()


def exact_axialnet(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, h, w)``: ``sum_f W[k, f, s] A[f, t, s] / T`` at ``to_volume``."""
    acts = captured(network.to_volume, lambda: network(x))  # (B, F, T, h, w)
    weight = network.fc.weight.detach()[:, :, 0]  # (C, F, h, w)
    out = torch.einsum("kfhw,bfthw->bkthw", weight.double(), acts.double())
    return (out / acts.shape[2]).float()


def l2_rows(network, layer, x, targets, exact) -> dict[str, torch.Tensor]:
    results = Explainer(network, layer).explain(x, targets=targets, methods=METHODS, maps=False)
    return {m: metrics.l2_to_exact(results[m].raw, exact) for m in METHODS}


# -- phantoms ------------------------------------------------------------------------------
def _phantom(seed: int) -> dict:
    p = make_chest_ct(seed)
    organ = {
        f: np.isin(p.organs, [ORGAN_LABEL[o] for o in FINDING_ORGANS[f]]) for f in FINDINGS
    }
    return {"seed": seed, "ct": p.ct, "findings": p.findings, "organ": organ}


def phantoms(seeds: Iterable[int], workers: int):
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_phantom, list(seeds), chunksize=2)


# -- Table 1 -------------------------------------------------------------------------------
def table1_voc(name: str) -> dict:
    network, info = ModelHandle.resolve(name, seed=0).load()
    torch.manual_seed(VOC_BATCH_SEED)
    x = torch.rand(VOC_BATCH, 3, *info.input.spatial_size)  # one fixed batch of [0, 1] images
    classes = list(range(len(info.class_names)))
    rows = l2_rows(network, info.target_layer, x, classes, exact_vocnet(network, x))
    return {
        "model": name,
        "weights": "zoo seed 0 (untrained)",
        "inputs": f"{VOC_BATCH} images, torch.rand seed {VOC_BATCH_SEED}",
        "per_class": {
            c: {m: mean_sd(rows[m][:, k].tolist()) for m in METHODS}
            for k, c in enumerate(info.class_names)
        },
        "max": {m: float(rows[m].max()) for m in METHODS},
        "min": {m: float(rows[m].min()) for m in METHODS},
    }


# -- the demo model over the phantoms: Table 1 and Table 2 in one pass ----------------------
def demo_tables(workers: int, deletion_steps: int) -> dict:
    network, info = ModelHandle.resolve("demo").load()
    explainer = Explainer(network, info.target_layer)
    l2: dict[str, dict[str, list[float]]] = {m: {f: [] for f in FINDINGS} for m in METHODS}
    loc = {m: {f: {k: [] for k in ("iou", "pointing", "mass", "box", "del", "ins")}
               for f in FINDINGS} for m in METHODS}  # fmt: skip
    start = time.time()
    for i, p in enumerate(phantoms(TABLE2_SEEDS, workers)):
        x = apply_window(p["ct"], info.input.window)[None, None]
        res = explainer.explain(x, targets=list(range(len(FINDINGS))), methods=METHODS)
        if p["seed"] in TABLE1_SEEDS:
            exact = exact_axialnet(network, x)
            for m in METHODS:
                dist = metrics.l2_to_exact(res[m].raw, exact)[0]
                for k, f in enumerate(FINDINGS):
                    l2[m][f].append(float(dist[k]))
        present = [k for k, f in enumerate(FINDINGS) if f in p["findings"]]
        if present:
            masks = torch.stack([torch.from_numpy(p["findings"][FINDINGS[k]]) for k in present])
            organs = torch.stack([torch.from_numpy(p["organ"][FINDINGS[k]]) for k in present])
            for m in METHODS:
                maps = res[m].maps[:, present]
                got = metrics.localisation_metrics(maps, masks[None])
                mass = metrics.relevance_mass(maps, organs[None])[0]
                di = None
                if p["seed"] in DELETION_SEEDS:
                    di = metrics.deletion_insertion(
                        network, x, res[m].raw[:, present], [present], steps=deletion_steps,
                        baseline=0.0, unit="cell", geometry=res[m].geometry, max_batch=8,
                    )  # fmt: skip
                for j, k in enumerate(present):
                    row = loc[m][FINDINGS[k]]
                    row["iou"].append(float(got.iou[0, j]))
                    row["pointing"].append(float(got.pointing_game[0, j]))
                    row["box"].append(float(got.gradcam_box[0, j]))
                    row["mass"].append(float(mass[j]))
                    if di is not None:
                        row["del"].append(float(di.deletion_auc[0, j]))
                        row["ins"].append(float(di.insertion_auc[0, j]))
        if (i + 1) % 25 == 0:
            log(f"demo: {i + 1}/{len(TABLE2_SEEDS)} phantoms ({time.time() - start:.0f} s)")
    return {
        "table1": {m: {f: mean_sd(l2[m][f]) for f in FINDINGS} for m in METHODS},
        "table1_max": {m: max(max(v) for v in l2[m].values()) for m in METHODS},
        "table2": {m: {f: {k: mean_sd(v) for k, v in loc[m][f].items()} for f in FINDINGS}
                   for m in METHODS},  # fmt: skip
        "seconds": round(time.time() - start, 1),
    }


# -- shortcut ------------------------------------------------------------------------------
def _decoupled(seed: int) -> dict:
    """Group ``seed % 4``: nodule and marker (0), nodule alone (1), marker alone (2), none."""
    group = seed % 4
    nodule, marker = group in (0, 1), group in (0, 2)
    p = make_chest_ct(seed, findings=("nodule",) if nodule else (), marker=marker)
    return {"seed": seed, "group": group, "nodule": nodule, "marker": marker, "ct": p.ct,
            "marker_mask": p.marker, "nodule_mask": p.findings.get("nodule")}  # fmt: skip


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cells_touching(mask: np.ndarray, geometry) -> torch.Tensor:
    """Bool ``(T, h, w)``: the explanation cells whose tile holds any voxel of ``mask``."""
    from hirescam3d.core.postprocess import pool_to_cells

    return pool_to_cells(torch.from_numpy(mask).float()[None], geometry)[0] > 0


def shortcut(workers: int, figure: Path) -> dict:
    k = FINDINGS.index("nodule")
    models = {name: ModelHandle.resolve(name).load() for name in ("demo_shortcut", "demo")}
    explainers = {n: Explainer(net, info.target_layer) for n, (net, info) in models.items()}
    window = models["demo_shortcut"][1].input.window
    probs: dict[str, list[float]] = {n: [] for n in models}
    groups, shares, example = [], {m: [] for m in METHODS}, None
    empty = dict.fromkeys(METHODS, 0)  # maps with no positive value: nothing to show
    logit_parts: list[tuple[float, float, float]] = []
    with mp.get_context("fork").Pool(workers) as pool:
        for p in pool.imap(_decoupled, list(SHORTCUT_SEEDS), chunksize=2):
            x = apply_window(p["ct"], window)[None, None]
            groups.append((p["nodule"], p["marker"]))
            for name, explainer in explainers.items():
                res = explainer.explain(x, targets=[k], methods=METHODS)
                probs[name].append(float(torch.sigmoid(res["hirescam"].scores[0, k])))
                if name != "demo_shortcut" or not p["marker"]:
                    continue
                cells = cells_touching(p["marker_mask"], res["hirescam"].geometry)
                for m in METHODS:
                    pos = res[m].raw[0, 0].clamp_min(0)
                    shares[m].append(float(pos[cells].sum() / pos.sum()) if pos.sum() > 0
                                     else float("nan"))  # fmt: skip
                    empty[m] += int(pos.sum() == 0)
                raw = res["hirescam"].raw[0, 0].double()
                logit_parts.append((float(raw[cells].sum()), float(raw.sum()),
                                    float(res["hirescam"].scores[0, k])))  # fmt: skip
                if example is None and p["nodule"]:
                    example = (p, res)
    nod = np.array([g[0] for g in groups])
    mark = np.array([g[1] for g in groups])
    names = {0: "nodule + marker", 1: "nodule alone", 2: "marker alone", 3: "neither"}
    out = {
        "seeds": [SHORTCUT_SEEDS[0], SHORTCUT_SEEDS[-1]],
        "mean_nodule_probability": {
            model: {names[g]: float(np.mean([pr for pr, gg in zip(v, groups, strict=True)
                                             if gg == (g in (0, 1), g in (0, 2))]))
                    for g in names}
            for model, v in probs.items()
        },  # fmt: skip
        "auroc_nodule_present": {m: auroc(np.array(v), nod) for m, v in probs.items()},
        "auroc_marker_present": {m: auroc(np.array(v), mark) for m, v in probs.items()},
        "marker_cells_share_of_positive": {m: mean_sd(v) for m, v in shares.items()},
        "maps_without_positive_value": {m: [n, len(shares[m])] for m, n in empty.items()},
        "marker_cells_logit": mean_sd(c for c, _, _ in logit_parts),
        "all_cells_logit": mean_sd(t for _, t, _ in logit_parts),
    }
    if example is not None:
        save_shortcut_figure(*example, figure)
    return out


def save_shortcut_figure(p: dict, res: dict, path: Path) -> None:
    """Axial slices through the marker and through the nodule: CT, HiResCAM, Grad-CAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"marker": p["marker_mask"], "nodule": p["nodule_mask"]}
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.8))
    for row, (what, mask) in zip(axes, rows.items(), strict=True):
        z = int(np.argwhere(mask)[:, 0].mean())
        ct = np.clip((p["ct"][z] + 1000.0) / 1400.0, 0, 1)
        for ax, m in zip(row, (None,) + METHODS, strict=True):
            ax.imshow(ct, cmap="gray")
            title = f"CT, slice {z} (through the {what})"
            if m is not None:
                heat = res[m].maps[0, 0, z].numpy()
                ax.imshow(heat, cmap="inferno", alpha=0.6 * (heat > 0.02), vmin=0, vmax=1)
                title = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM"}[m]
                if float(res[m].raw.clamp_min(0).sum()) == 0:
                    title += " (no positive value)"
            for outline, colour in ((p["nodule_mask"], "cyan"), (p["marker_mask"], "lime")):
                if outline[z].any():
                    ax.contour(outline[z], levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    fig.suptitle(f"demo_shortcut, nodule logit (phantom seed {p['seed']}; nodule cyan, "
                 "marker green; patient right on the left)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- cost ----------------------------------------------------------------------------------
def metrics_cost(rounds: int = 9) -> dict:
    """Seconds of every mask metric for 5 findings x 2 methods of the sample scan, against
    the ``explain`` command's work on it (``explain_scan``: read, preprocess, explain,
    invert, organs, write) and against the network part alone (``Explainer.explain``).

    Medians of ``rounds`` rounds of one call of each, after one warm-up call of each:
    taken in turn, the three see the same phases of a shared machine, which a ratio of
    figures measured one after the other does not."""
    import tempfile

    from hirescam3d.data.sample import sample_paths
    from hirescam3d.pipeline import explain_scan

    network, info = ModelHandle.resolve("demo").load()
    explainer = Explainer(network, info.target_layer)
    p = _phantom(TABLE2_SEEDS[0])
    x = apply_window(p["ct"], info.input.window)[None, None]
    targets = list(range(len(FINDINGS)))
    masks = torch.stack([torch.from_numpy(p["findings"].get(f, p["organ"][f])) for f in FINDINGS])
    masks = torch.cat([masks, masks])[None]  # (1, 10, S, H, W): 5 findings x 2 methods
    res = explainer.explain(x, targets=targets, methods=METHODS)
    maps = torch.cat([res[m].maps for m in METHODS], dim=1)
    paths = sample_paths(Path(__file__).resolve().parents[1] / "sample_data")
    with tempfile.TemporaryDirectory() as tmp:
        ops = {
            "explain_scan_s": lambda: explain_scan(
                paths["scan"], tmp, methods=METHODS, organs_path=paths["organs"], force=True
            ),
            "explainer_s": lambda: explainer.explain(x, targets=targets, methods=METHODS),
            "mask_metrics_s": lambda: metrics.localisation_metrics(maps, masks),
        }
        times: dict[str, list[float]] = {name: [] for name in ops}
        for op in ops.values():
            op()
        for _ in range(rounds):
            for name, op in ops.items():
                t0 = time.perf_counter()
                op()
                times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(t) for name, t in times.items()}
    return {**out, "ratio": out["mask_metrics_s"] / out["explain_scan_s"],
            "ratio_to_explainer": out["mask_metrics_s"] / out["explainer_s"],
            "rounds": rounds, "target": 0.10}  # fmt: skip


# -- report --------------------------------------------------------------------------------
def fmt(cell: dict, digits: int = 3) -> str:
    if cell["mean"] is None:
        return "n/a"
    if abs(cell["mean"]) < 1e-3 and cell["mean"] != 0:
        return f"{cell['mean']:.1e} ± {cell['sd']:.1e}"
    return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        "# The HiResCAM paper's tables, reproduced on hirescam3d's zoo",
        "",
        f"Made by `{COMMAND}` in {report['seconds'] / 60:.1f} min on "
        f"{report['machine']['cpu_count']} CPU cores, {report['machine']['torch_threads']} torch "
        f"threads (torch {report['machine']['torch']}, MONAI {report['machine'].get('monai')}).",
        "Phantom seeds below 100000 are held out from training. Values are mean ± SD.",
        "",
        "## Table 1 shape: distance to the exact explanation",
        "",
        "`l2_to_exact`: both maps through a ReLU, min-max scaled to [0, 1] over the cells, L2 "
        "of the difference over the explained layer's grid. The exact contributions are "
        "computed from the final linear layer's weights and the activations captured by a "
        "hook of the script's own (`sum_f W[k, f, s] A[f, s]`, divided by the triplet count "
        "for AxialNet's mean over triplets).",
        "",
    ]
    for t in report["table1_voc"]:
        lines += [
            f"### {t['model']} ({t['weights']}; {t['inputs']}; layer `head`, 6 x 6 cells)",
            "",
            "| class | HiResCAM | Grad-CAM |",
            "|---|---|---|",
            *(f"| {c} | {fmt(v['hirescam'])} | {fmt(v['gradcam'])} |"
              for c, v in t["per_class"].items()),  # fmt: skip
            f"| **max over all** | {t['max']['hirescam']:.1e} | {t['max']['gradcam']:.3f} |",
            "",
        ]
    demo = report["demo"]
    lines += [
        f"### demo (shipped weights; {len(TABLE1_SEEDS)} phantoms, seeds "
        f"{TABLE1_SEEDS[0]}..{TABLE1_SEEDS[-1]}; layer `to_volume`, 32 x 8 x 8 cells)",
        "",
        "| finding | HiResCAM | Grad-CAM |",
        "|---|---|---|",
        *(f"| {f} | {fmt(demo['table1']['hirescam'][f])} | {fmt(demo['table1']['gradcam'][f])} |"
          for f in FINDINGS),  # fmt: skip
        f"| **max over all** | {demo['table1_max']['hirescam']:.1e} | "
        f"{demo['table1_max']['gradcam']:.3f} |",
        "",
        "## Table 2 shape: localisation of the planted findings (demo model)",
        "",
        f"{len(TABLE2_SEEDS)} phantoms (seeds {TABLE2_SEEDS[0]}..{TABLE2_SEEDS[-1]}); every "
        "present finding is explained (whether or not the model detects it), from maps "
        "placed on the model's input grid (96 x 128 x 128). IoU: `iou_at_best_threshold` "
        "against the finding's mask (thresholds 0.02..0.98); pointing: the maximum inside "
        "the finding's mask; mass: `relevance_mass` in the finding's allowed organ (lungs, "
        "or the heart); box: the Grad-CAM paper's box IoU at 15 %. Deletion / insertion: "
        f"AUC of the finding's probability, {report['deletion_steps']} steps of explanation "
        "cells, baseline air (-1000 HU, 0 after windowing), on the first "
        f"{len(DELETION_SEEDS)} phantoms (lower deletion and higher insertion are better).",
        "",
        "| finding | method | n | IoU | pointing | mass in organ | box IoU | deletion AUC | "
        "insertion AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in FINDINGS:
        for m in METHODS:
            r = demo["table2"][m][f]
            lines.append(
                f"| {f} | {m} | {r['iou']['n']} | {fmt(r['iou'])} | {fmt(r['pointing'], 2)} | "
                f"{fmt(r['mass'])} | {fmt(r['box'])} | {fmt(r['del'])} | {fmt(r['ins'])} |"
            )
    s = report["shortcut"]
    lines += [
        "",
        "## The shortcut model",
        "",
        "`demo_shortcut` is AxialNet-tiny trained like `demo`, but on phantoms that draw a "
        "bright marker (1500 HU, 12 mm) in the air at the anterior-right corner whenever a "
        f"nodule is present. It is tested on {len(SHORTCUT_SEEDS)} phantoms (seeds "
        f"{s['seeds'][0]}..{s['seeds'][1]}) in four equal groups that decouple marker and "
        "nodule. `demo` (never shown a marker) is the control.",
        "",
        "| mean nodule probability | " + " | ".join(s["mean_nodule_probability"]["demo"]) + " |",
        "|---|---|---|---|---|",
        *(f"| {model} | " + " | ".join(f"{v:.3f}" for v in groups.values()) + " |"
          for model, groups in s["mean_nodule_probability"].items()),  # fmt: skip
        "",
        "| AUROC for | demo_shortcut | demo |",
        "|---|---|---|",
        f"| nodule present | {s['auroc_nodule_present']['demo_shortcut']:.3f} | "
        f"{s['auroc_nodule_present']['demo']:.3f} |",
        f"| marker present | {s['auroc_marker_present']['demo_shortcut']:.3f} | "
        f"{s['auroc_marker_present']['demo']:.3f} |",
        "",
        "Where the evidence lies, over the phantoms that show the marker (nodule logit of "
        "`demo_shortcut`, cells whose tile holds any marker voxel):",
        "",
        *(f"- {name}: share of the positive map in the marker's cells "
          f"{fmt(s['marker_cells_share_of_positive'][m])}; maps with no positive value at "
          f"all (nothing to show after the ReLU): {s['maps_without_positive_value'][m][0]} of "
          f"{s['maps_without_positive_value'][m][1]}"
          for m, name in (("hirescam", "HiResCAM"), ("gradcam", "Grad-CAM"))),  # fmt: skip
        f"- HiResCAM contributions: the marker's cells add {fmt(s['marker_cells_logit'])} "
        f"logits; all cells together {fmt(s['all_cells_logit'])} logits (the logit minus "
        "the bias): the rest of the scan pulls the nodule logit down.",
        "",
        "![shortcut](shortcut.png)",
        "",
        "## Cost of the mask metrics",
        "",
        "Every mask metric (`localisation_metrics`) for 5 findings x 2 methods of one scan "
        f"(96 x 128 x 128 maps): {report['cost']['mask_metrics_s'] * 1000:.0f} ms, against "
        f"{report['cost']['explain_scan_s'] * 1000:.0f} ms for the `explain` command's work "
        "on the sample scan (`explain_scan`, all findings, both methods, with organs): ratio "
        f"**{report['cost']['ratio']:.3f}** (target at most 0.10). Against the network part "
        f"alone (`Explainer.explain`, {report['cost']['explainer_s'] * 1000:.0f} ms) the "
        f"ratio is {report['cost']['ratio_to_explainer']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--results", type=Path, default=None,
                        help="also store the cost ratio under 'paper_tables' in this JSON")
    parser.add_argument("--workers", type=int, default=2, help="phantom-generation processes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deletion-steps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench_core import machine_info

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": COMMAND, "machine": machine_info(args.threads),
              "deletion_steps": args.deletion_steps}  # fmt: skip
    log("cost of the mask metrics")
    report["cost"] = metrics_cost()
    log("table 1: resnet34v, densenet121v")
    report["table1_voc"] = [table1_voc(n) for n in ("resnet34v", "densenet121v")]
    log("tables 1 and 2: demo")
    report["demo"] = demo_tables(args.workers, args.deletion_steps)
    log("shortcut")
    report["shortcut"] = shortcut(args.workers, args.out / "shortcut.png")
    report["seconds"] = time.time() - start
    (args.out / "paper_tables.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "paper_tables.md").write_text(markdown(report))
    if args.results is not None:
        stored = json.loads(args.results.read_text()) if args.results.exists() else {}
        stored["paper_tables"] = {"metrics_cost": report["cost"], "seconds": report["seconds"]}
        args.results.write_text(json.dumps(stored, indent=2) + "\n")
    log(f"wrote {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
