"""Sliding-window benchmark: explaining ``demo_seg`` on a clinical-size volume against
MONAI's ``sliding_window_inference`` alone (issue 16).

The case: ``make_chest_ct(20260105, shape=(300, 512, 512), spacing=(1.0, 0.7, 0.7))``, HU
windowed as the model's preprocessing does, as one ``(1, 1, 300, 512, 512)`` tensor; windows
of the model's 96 x 128 x 128, overlap 0.25, gaussian blending, ``sw_batch_size`` 2. Each
run is its own process, timed around the call and from start to exit, with its peak
resident memory from ``wait4``:

* ``inference``: ``sliding_window_inference(x, roi, 2, network)`` under ``no_grad``;
* ``explain_mask``: ``Explainer.sliding_window`` with HiResCAM for 2 classes (right lung,
  heart), each over its ground-truth organ mask (one pass over the windows);
* ``explain_predicted``: ``region="predicted"`` for the 2 classes the inference run
  predicts most voxels of (the model is run at the scan's own 1 x 0.7 x 0.7 mm, not its
  training grid, so its masks there are not meaningful, only their cost is); it runs one
  ``sliding_window_inference`` pass first to find the model's own masks.

Targets: explanation time <= 2.5x and peak memory <= 1.5x of the inference run. Writes the
``sliding_window`` entry of ``benchmarks/results.json`` (other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_scale import run_json as run

HERE = Path(__file__).resolve().parent
SEED, SHAPE, SPACING = 20260105, (300, 512, 512), (1.0, 0.7, 0.7)
ROI, OVERLAP, SW_BATCH = (96, 128, 128), 0.25, 2
CLASSES = ("right_lung", "heart")
TARGETS = {"call_over_inference": 2.5, "peak_rss_over_inference": 1.5}
MAKE = """
import sys, numpy as np
from hirescam3d.data.phantom import make_chest_ct
p = make_chest_ct(int(sys.argv[2]), shape=tuple(map(int, sys.argv[3].split(","))),
                  spacing=tuple(map(float, sys.argv[4].split(","))))
np.save(sys.argv[1] + "/ct.npy", p.ct)
np.save(sys.argv[1] + "/organs.npy", p.organs)
"""
RUN = """
import json, sys, time
import numpy as np, torch
from hirescam3d.models.bundle import apply_window
from hirescam3d.models.handle import ModelHandle
folder, kind, classes = sys.argv[1], sys.argv[2], sys.argv[6].split(",")
roi, overlap, sw = tuple(map(int, sys.argv[3].split(","))), float(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[7]))
network, info = ModelHandle.resolve("demo_seg").load()
x = apply_window(np.load(folder + "/ct.npy"), info.input.window)[None, None]
if kind == "inference":
    from monai.inferers import sliding_window_inference
    start = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(x, roi, sw, network, overlap=overlap, mode="gaussian")
    seconds = time.perf_counter() - start
    extra = {"predicted_voxels": {n: int((out[0, c] >= 0).sum())
                                  for c, n in enumerate(info.class_names)}}
else:
    from hirescam3d import Explainer
    explainer = Explainer(network, info.target_layer, "hirescam", class_names=info.class_names,
                          task="sigmoid")
    if kind == "explain_mask":
        organs = torch.from_numpy(np.load(folder + "/organs.npy"))
        labels = {v: k for k, v in {1: "right_lung", 2: "heart", 3: "left_lung"}.items()}
        region = torch.stack([organs == labels[c] for c in classes])[None]
        del organs
    else:
        region = "predicted"
    start = time.perf_counter()
    res = explainer.sliding_window(x, targets=classes, region=region, roi_size=roi,
                                   overlap=overlap, sw_batch_size=sw, mode="gaussian", maps=False)
    seconds = time.perf_counter() - start
    extra = {"map_sum_logits": res.raw.sum(dim=tuple(range(2, res.raw.ndim)))[0].tolist(),
             "region_scores": res.region_scores[0].tolist()}
print(json.dumps({"call_s": seconds, **extra}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_sliding_"))
    try:
        shape, spacing = ",".join(map(str, SHAPE)), ",".join(map(str, SPACING))
        subprocess.run([sys.executable, "-c", MAKE, str(work), str(SEED), shape, spacing],
                       check=True)  # fmt: skip
        runs: dict[str, list[dict]] = {"inference": [], "explain_mask": [], "explain_predicted": []}
        predicted_classes = list(CLASSES)
        for r in range(args.repeats):
            for kind, done in runs.items():
                roi = ",".join(map(str, ROI))
                classes = predicted_classes if kind == "explain_predicted" else CLASSES
                done.append(run([sys.executable, "-c", RUN, str(work), kind, roi, str(OVERLAP),
                                 str(SW_BATCH), ",".join(classes), str(args.threads)]))  # fmt: skip
                if kind == "inference":  # the 2 classes it predicts most of (not empty)
                    counts = done[-1]["predicted_voxels"]
                    predicted_classes = sorted(counts, key=counts.get, reverse=True)[:2]
                print(f"[{r}] {kind}: call {done[-1]['call_s']:.1f} s, process "
                      f"{done[-1]['wall_s']:.1f} s, peak {done[-1]['peak_rss_bytes'] / 1e9:.2f} GB",
                      flush=True)  # fmt: skip
        measures = ("call_s", "wall_s", "peak_rss_bytes")
        med = {k: {m: statistics.median(run[m] for run in v) for m in measures}
               for k, v in runs.items()}  # fmt: skip
        base = med["inference"]
        ratios = {
            kind: {
                "call_over_inference": med[kind]["call_s"] / base["call_s"],
                "wall_over_inference": med[kind]["wall_s"] / base["wall_s"],
                "peak_rss_over_inference": med[kind]["peak_rss_bytes"] / base["peak_rss_bytes"],
            }
            for kind in ("explain_mask", "explain_predicted")
        }
        sys.path.insert(0, str(HERE))
        import torch
        from bench_core import machine_info

        entry = {
            "machine": machine_info(args.threads),
            "case": {"seed": SEED, "shape": list(SHAPE), "spacing_mm": list(SPACING),
                     "model": "demo_seg", "method": "hirescam",
                     "classes": {"explain_mask": list(CLASSES),
                                 "explain_predicted": predicted_classes},
                     "roi_size": list(ROI), "overlap": OVERLAP, "sw_batch_size": SW_BATCH,
                     "mode": "gaussian", "repeats": args.repeats,
                     "device": "cuda" if torch.cuda.is_available() else "cpu"},
            "median": med,
            "runs": runs,
            "ratios": ratios,
            "targets": TARGETS,
            "meets_target": {kind: {k: r[k] <= TARGETS[k] for k in TARGETS}
                             for kind, r in ratios.items()},
        }  # fmt: skip
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report["sliding_window"] = entry
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out)
        for kind, r in ratios.items():
            print(f"{kind}: " + ", ".join(f"{k} = {v:.2f}" for k, v in r.items()))
        print(f"wrote the sliding_window entry of {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
