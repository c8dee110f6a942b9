"""Quality of a chest-CT zoo model on held-out synthetic phantoms: AUROC and explanation focus.

    python benchmarks/demo_quality.py --first-seed 0 --count 200 [--model demo]

For phantoms with seeds ``first_seed .. first_seed + count - 1`` (training uses seeds
>= 100000) it reports, per finding:

* ``auroc``: area under the ROC curve of the predicted probability (rank formula, ties
  counted half); null when the phantoms hold only one class;
* ``organ_fraction``: over true positives (finding present, probability >= 0.5), the mean
  fraction of positive HiResCAM mass (raw map at the model's default layer, ReLU) that
  lies inside the finding's allowed organ (lungs for atelectasis, pleural effusion and
  nodule; heart for cardiomegaly and pericardial effusion). It is measured on the
  explanation's own grid (T, h, w): a grid cell is inside when ANY of its voxels is.

Progress goes to stderr; the last stdout line is one JSON object.
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
from scipy.stats import rankdata

from hirescam3d.core.explainer import Explainer
from hirescam3d.data.phantom import FINDING_ORGANS, FINDINGS, ORGAN_NAMES, make_chest_ct
from hirescam3d.models.bundle import apply_window
from hirescam3d.models.handle import ModelHandle

ORGAN_LABEL = {name: label for label, name in ORGAN_NAMES.items()}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney AUROC; None if only one class is present."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def organ_fraction(raw: torch.Tensor, organ_mask: np.ndarray) -> float | None:
    """Share of positive mass of ``raw`` (T, h, w) in cells touching ``organ_mask`` (S, H, W)."""
    pos = raw.clamp(min=0)
    total = float(pos.sum())
    if total <= 0:
        return None
    mask = torch.from_numpy(organ_mask).float()[None, None]
    inside = torch.nn.functional.adaptive_max_pool3d(mask, tuple(raw.shape))[0, 0] > 0
    return float(pos[inside].sum()) / total


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    p = make_chest_ct(seed)
    masks = {f: np.isin(p.organs, [ORGAN_LABEL[o] for o in FINDING_ORGANS[f]]) for f in p.present}
    return p.ct, p.labels, masks


def evaluate(model: str, seeds: list[int], batch: int, workers: int) -> dict:
    network, info = ModelHandle.resolve(model).load()
    if tuple(info.class_names) != FINDINGS:
        raise SystemExit(f"model {model!r} does not predict the phantom findings {FINDINGS}")
    if info.input.window is None:
        raise SystemExit(f"model {model!r} declares no HU window")
    explainer = Explainer(network, info.target_layer, method="hirescam")
    probs, truth = [], []
    fractions: dict[str, list[float]] = {f: [] for f in FINDINGS}
    start = time.time()
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        phantoms = pool.imap(_phantom, seeds, chunksize=2)
        done = 0
        while done < len(seeds):
            chunk = [next(phantoms) for _ in range(min(batch, len(seeds) - done))]
            done += len(chunk)
            x = apply_window(np.stack([c[0] for c in chunk]), info.input.window).unsqueeze(1)
            res = explainer(x, targets=list(range(len(FINDINGS))))
            p = torch.sigmoid(res.scores).numpy()
            for i, (_, labels, masks) in enumerate(chunk):
                probs.append(p[i])
                truth.append(labels > 0.5)
                for k, f in enumerate(FINDINGS):
                    if f in masks and p[i, k] >= 0.5:
                        frac = organ_fraction(res.raw[i, k], masks[f])
                        if frac is not None:
                            fractions[f].append(frac)
            print(f"{done}/{len(seeds)} phantoms ({time.time() - start:.0f} s)", file=sys.stderr)
    prob, pos = np.array(probs), np.array(truth)
    result = {
        "auroc": {f: auroc(prob[:, k], pos[:, k]) for k, f in enumerate(FINDINGS)},
        "organ_fraction": {f: float(np.mean(v)) if v else None for f, v in fractions.items()},
        "count": len(seeds),
        "positives": {f: int(pos[:, k].sum()) for k, f in enumerate(FINDINGS)},
        "true_positives": {f: len(v) for f, v in fractions.items()},
        "model": model,
        "seconds": round(time.time() - start, 1),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--model", default="demo", help="zoo name or bundle folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="phantom-generation processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--results", type=Path, default=None,
        help="also store the result under 'demo_quality' in this JSON file (e.g. "
        "benchmarks/results.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seeds = held_out_seeds(parser, args)
    torch.set_num_threads(args.threads)
    report(evaluate(args.model, seeds, args.batch, args.workers), seeds, args.results,
           "demo_quality")  # fmt: skip
    return 0


def held_out_seeds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """``first_seed .. first_seed + count - 1``; a parser error unless all are held out."""
    if args.first_seed < 0 or args.count < 1 or args.first_seed + args.count > 100_000:
        parser.error("seeds must lie in 0..99999 (training uses seeds >= 100000)")
    return list(range(args.first_seed, args.first_seed + args.count))


def report(result: dict, seeds: list[int], results: Path | None, key: str) -> None:
    """Print ``result`` (with its seed range) as the last stdout line; also store it under
    ``key`` in the JSON file ``results`` when given (other keys are kept)."""
    result["seeds"] = [seeds[0], seeds[-1]]
    if results is not None:
        stored = json.loads(results.read_text()) if results.exists() else {}
        stored[key] = result
        results.write_text(json.dumps(stored, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    raise SystemExit(main())
