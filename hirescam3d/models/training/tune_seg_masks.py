"""Choose ``demo_seg``'s mask post-processing on validation phantoms and store it in the bundle.

    python -m hirescam3d.models.training.tune_seg_masks --bundle hirescam3d/bundles/demo_seg

For every class, a probability threshold (from :data:`THRESHOLDS`) and a smallest kept
component size (from :data:`MIN_VOXELS`) are chosen on phantoms with seeds
``first_seed .. first_seed + count - 1``: training seeds (>= 100000) that the training
run did not use (it uses ``SEG_SEED0 .. SEG_SEED0 + n_train - 1``); the held-out seeds of
``benchmarks/seg_quality.py`` (below 100000) are refused. The pair chosen maximises the
mean per-phantom score: the Dice of the class where it is present, and where it is
absent 1 for fewer than ``FP_VOXELS`` predicted voxels, else 0 (ties: the smaller size,
then the lower threshold). The result goes to ``configs/metadata.json``
(``hirescam3d.mask_postprocessing``, read by :mod:`hirescam3d.models.seg_postprocess`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hirescam3d.models.training.seg_data import SEG_SEED0, seg_targets
from hirescam3d.models.training.train_demo import log

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
MIN_VOXELS = (0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 30000, 40000)
FP_VOXELS = 10  # an absent finding counts as called from this many predicted voxels


def component_table(logit: np.ndarray, truth: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per threshold of :data:`THRESHOLDS`: the sizes of the predicted mask's components
    (face-connected) and how many of their voxels lie in ``truth``."""
    from scipy import ndimage

    out = []
    flat_truth = truth.ravel()
    for t in THRESHOLDS:
        labels, n = ndimage.label(logit >= np.log(t / (1 - t)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        inside = np.bincount(labels.ravel(), weights=flat_truth, minlength=n + 1)[1:]
        out.append((sizes, inside))
    return out


def score_table(tables: list[list], truth_sizes: list[int]) -> np.ndarray:
    """``(len(THRESHOLDS), len(MIN_VOXELS))`` mean per-phantom score (see the module)."""
    scores = np.zeros((len(THRESHOLDS), len(MIN_VOXELS)))
    for table, t_size in zip(tables, truth_sizes, strict=True):
        for i, (sizes, inside) in enumerate(table):
            for j, n in enumerate(MIN_VOXELS):
                keep = sizes >= n
                p_size, hit = int(sizes[keep].sum()), float(inside[keep].sum())
                if t_size:
                    scores[i, j] += 2 * hit / (p_size + t_size)
                else:
                    scores[i, j] += p_size < FP_VOXELS
    return scores / max(len(truth_sizes), 1)


def best(scores: np.ndarray) -> tuple[float, int]:
    """The (threshold, min voxels) of the highest score; ties: smaller size, lower threshold."""
    top = scores.round(4).max()
    for j in range(len(MIN_VOXELS)):
        for i in range(len(THRESHOLDS)):
            if round(float(scores[i, j]), 4) == top:
                return THRESHOLDS[i], MIN_VOXELS[j]
    raise AssertionError("unreachable")


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from hirescam3d.data.phantom import make_chest_ct

    p = make_chest_ct(seed)
    return p.ct, seg_targets(p.organs, p.organ_names, p.findings)


def tune(bundle: Path, seeds: list[int], workers: int = 1) -> dict:
    """The chosen ``mask_postprocessing`` entry and the validation scores behind it."""
    from hirescam3d.models.bundle import apply_window
    from hirescam3d.models.handle import ModelHandle

    if min(seeds) < 100_000:
        raise ValueError("validation seeds must be >= 100000 (seeds below are held out)")
    network, info = ModelHandle.resolve(str(bundle)).load()
    names = list(info.class_names)
    tables: list[list] = [[] for _ in names]
    truth_sizes: list[list[int]] = [[] for _ in names]
    start = time.time()
    with mp.get_context("fork").Pool(workers) as pool:
        for done, (ct, truth) in enumerate(pool.imap(_phantom, seeds), 1):
            x = apply_window(ct[None], info.input.window).unsqueeze(1)
            with torch.no_grad():
                logits = network(x)[0].numpy()
            for c in range(len(names)):
                tables[c].append(component_table(logits[c], truth[c]))
                truth_sizes[c].append(int(truth[c].sum()))
            log(f"{done}/{len(seeds)} validation phantoms ({time.time() - start:.0f} s)")
    threshold, min_voxels, scores = {}, {}, {}
    for c, name in enumerate(names):
        table = score_table(tables[c], truth_sizes[c])
        t, n = best(table)
        threshold[name], min_voxels[name] = t, n
        scores[name] = {"default": round(float(table[0, 0]), 4),
                        "chosen": round(float(table.max()), 4)}  # fmt: skip
    return {
        "threshold": threshold,
        "min_voxels": min_voxels,
        "chosen_on": f"phantom seeds {seeds[0]}..{seeds[-1]} (validation: training seeds the "
        "training run did not use), by hirescam3d.models.training.tune_seg_masks",
        "validation_scores": scores,
    }


def write(bundle: Path, entry: dict) -> None:
    """Store ``entry`` (without its scores) as the bundle's ``mask_postprocessing``."""
    from hirescam3d.models.bundle import METADATA

    path = bundle / METADATA
    meta = json.loads(path.read_text())
    meta["hirescam3d"]["mask_postprocessing"] = {
        k: entry[k] for k in ("threshold", "min_voxels", "chosen_on")
    }
    meta["hirescam3d"].setdefault("training", {})["mask_validation_scores"] = entry[
        "validation_scores"
    ]
    path.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("hirescam3d/bundles/demo_seg"))
    parser.add_argument("--first-seed", type=int, default=SEG_SEED0 + 800)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1, help="phantom-generation processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.first_seed < 100_000:
        parser.error("--first-seed must be >= 100000: seeds below are held out for evaluation")
    torch.set_num_threads(args.threads)
    entry = tune(args.bundle, list(range(args.first_seed, args.first_seed + args.count)),
                 args.workers)  # fmt: skip
    write(args.bundle, entry)
    print(json.dumps(entry, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
