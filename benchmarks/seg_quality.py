"""Quality of the segmentation demo ``demo_seg`` on held-out phantoms, and where its
explanations lie.

    python benchmarks/seg_quality.py --first-seed 0 --count 100 [--results benchmarks/results.json]

For phantoms with seeds ``first_seed .. first_seed + count - 1`` (training and the choice
of the bundle's mask post-processing use seeds >= 100000), the predicted mask of a
channel is the bundle's post-processed mask (``hirescam3d.mask_postprocessing``:
per-class probability thresholds, small components removed; ``--raw``: sigmoid >= 0.5,
logit >= 0, as before the post-processing existed). The ground truth is the phantom's
own label masks. Reported:

* ``dice``: per organ, the mean Dice over all phantoms; per finding, the mean Dice over
  the phantoms where the finding is present;
* ``false_positive_rate``: per finding, the share of phantoms without it where the
  model predicts at least ``FP_VOXELS`` (10) voxels of it (``false_positive_rate_any``:
  at least one voxel);
* for every finding the model segments (any predicted voxel), HiResCAM at the model's
  default layer with ``region="predicted"`` (the finding's logits summed over its own
  predicted mask): ``in_organ``, the mean share of the positive contributions inside
  the finding's allowed organ (lungs for atelectasis, pleural effusion and nodule; heart
  for cardiomegaly and pericardial effusion; ground-truth organ masks, voxel exact), and
  ``in_finding``, inside the true finding mask (0 for a false-positive finding);
* ``sample``: ``hirescam3d explain`` (the CLI, no ``--finding``) on the shipped sample
  CT: the findings it explains and the findings the sample has
  (``sample_data/sample_chest_findings.json``).

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from demo_quality import held_out_seeds, report

from hirescam3d.core.explainer import Explainer
from hirescam3d.data.phantom import FINDING_ORGANS, FINDINGS, ORGAN_NAMES, make_chest_ct
from hirescam3d.evaluate.metrics import relevance_mass
from hirescam3d.models.bundle import apply_window
from hirescam3d.models.handle import ModelHandle
from hirescam3d.models.training.train_seg import seg_targets
from hirescam3d.models.zoo import SEG_CHANNELS

ORGAN_LABEL = {name: label for label, name in ORGAN_NAMES.items()}
FP_VOXELS = 10  # an absent finding counts as called from this many predicted voxels
ROOT = Path(__file__).resolve().parents[1]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """``2 |P & T| / (|P| + |T|)``; 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    p = make_chest_ct(seed)
    allowed = {f: np.isin(p.organs, [ORGAN_LABEL[o] for o in FINDING_ORGANS[f]]) for f in FINDINGS}
    return p.ct, seg_targets(p.organs, p.organ_names, p.findings), allowed


def sample_run(model: str) -> dict:
    """The findings ``hirescam3d explain`` explains on the shipped sample without
    ``--finding`` (the CLI in a child process), next to the findings the sample has."""
    scan = ROOT / "sample_data" / "sample_chest_ct.nii.gz"
    truth = json.loads((ROOT / "sample_data" / "sample_chest_findings.json").read_text())
    cli = Path(sys.executable).with_name("hirescam3d")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [str(cli), "explain", str(scan), "--model", model, "--out", tmp, "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"hirescam3d explain on the sample failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    explained = [f for f in report["explained"] if f in FINDINGS]
    voxels = {f: int(report["findings"][f]["region_voxels"]) for f in explained}
    return {"explained_findings": explained, "voxels": voxels, "truth": sorted(truth),
            "exact": sorted(explained) == sorted(truth)}  # fmt: skip


def evaluate(model: str, seeds: list[int], workers: int, raw: bool = False) -> dict:
    network, info = ModelHandle.resolve(model).load()
    rule = None if raw else info.mask_postprocessing
    if tuple(info.class_names) != SEG_CHANNELS:
        raise SystemExit(f"model {model!r} does not segment the channels {SEG_CHANNELS}")
    explainer = Explainer(
        network, info.target_layer, "hirescam", class_names=info.class_names, task="sigmoid"
    )
    n_organs = len(SEG_CHANNELS) - len(FINDINGS)
    dices: dict[str, list[float]] = {c: [] for c in SEG_CHANNELS}
    false_pos: dict[str, list[bool]] = {f: [] for f in FINDINGS}
    false_any: dict[str, list[bool]] = {f: [] for f in FINDINGS}
    in_organ: dict[str, list[float]] = {f: [] for f in FINDINGS}
    in_finding: dict[str, list[float]] = {f: [] for f in FINDINGS}
    start = time.time()
    with mp.get_context("fork").Pool(workers) as pool:
        for done, (ct, truth, allowed) in enumerate(pool.imap(_phantom, seeds, chunksize=2), 1):
            x = apply_window(ct[None], info.input.window).unsqueeze(1)
            with torch.no_grad():
                logits = network(x)
            pred = (logits[0] >= 0 if rule is None else rule.masks(logits, SEG_CHANNELS)[0]).numpy()
            for c, name in enumerate(SEG_CHANNELS):
                if c < n_organs or truth[c].any():
                    dices[name].append(dice(pred[c], truth[c]))
                else:
                    false_pos[name].append(int(pred[c].sum()) >= FP_VOXELS)
                    false_any[name].append(bool(pred[c].any()))
            segmented = [f for f in FINDINGS if pred[SEG_CHANNELS.index(f)].any()]
            if segmented:  # explained over the masks shown (the post-processed ones)
                region = torch.from_numpy(pred[[SEG_CHANNELS.index(f) for f in segmented]])[None]
                res = explainer(x, targets=segmented, region=region)
                organ = torch.from_numpy(np.stack([allowed[f] for f in segmented]))[None]
                found = torch.from_numpy(truth[[SEG_CHANNELS.index(f) for f in segmented]])[None]
                shares = relevance_mass(res.raw, organ)[0]  # NaN: no positive contribution
                inside = relevance_mass(res.raw, found)[0]
                for k, f in enumerate(segmented):
                    if not torch.isnan(shares[k]):
                        in_organ[f].append(float(shares[k]))
                        in_finding[f].append(float(inside[k]))
            print(f"{done}/{len(seeds)} phantoms ({time.time() - start:.0f} s)", file=sys.stderr)

    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 4) if values else None

    return {
        "dice": {c: mean(v) for c, v in dices.items()},
        "false_positive_rate": {f: mean(v) for f, v in false_pos.items()},
        "false_positive_rate_any": {f: mean(v) for f, v in false_any.items()},
        "absent": {f: len(v) for f, v in false_pos.items()},
        "present": {f: len(dices[f]) for f in FINDINGS},
        "hirescam_predicted_region": {
            "in_organ": {f: mean(v) for f, v in in_organ.items()},
            "in_finding": {f: mean(v) for f, v in in_finding.items()},
            "explained": {f: len(v) for f, v in in_organ.items()},
        },
        "count": len(seeds),
        "model": model,
        "mask_postprocessing": None if rule is None else rule.to_dict(),
        "seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--model", default="demo_seg", help="zoo name or bundle folder")
    parser.add_argument("--workers", type=int, default=1, help="phantom-generation processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--raw", action="store_true",
                        help="masks at logit >= 0, without the bundle's post-processing")
    parser.add_argument("--no-sample", action="store_true",
                        help="skip the CLI run on the shipped sample")
    parser.add_argument(
        "--results", type=Path, default=None,
        help="also store the result under 'demo_seg_quality' in this JSON file",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seeds = held_out_seeds(parser, args)
    torch.set_num_threads(args.threads)
    result = evaluate(args.model, seeds, args.workers, args.raw)
    if not args.no_sample and not args.raw:
        result["sample"] = sample_run(args.model)
    report(result, seeds, args.results, "demo_seg_quality")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
