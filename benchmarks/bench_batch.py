"""Cohort benchmark: ``hirescam3d batch`` of 4 phantoms against reading and inferring them
(issue 25).

The case: ``make_chest_ct(20260105 + i, shape=(300, 512, 512), spacing=(1.0, 0.7, 0.7))``
for i = 0..3 saved as NIfTI, explained with ``hirescam3d batch '*_ct.nii.gz'
--all-findings --method hirescam --method gradcam --device cpu`` (5 findings x 2
methods, float32 maps on each scan's grid). The baseline is one process that imports
the library and, for the same 4 scans, reads each with the same reader, runs the model's
MONAI preprocessing and one no-grad inference. Each process is timed from start to exit
with its peak resident memory from ``wait4`` (``bench_scale.run_measured``); baseline and
batch runs alternate and the ratios use the medians over ``--repeats``. Also recorded:
the per-scan stage timings the batch log holds. Writes the ``batch_scale`` entry of
``benchmarks/results.json`` (other keys are kept).
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
from typing import Any

from bench_scale import EXPLAIN, run_measured

HERE = Path(__file__).resolve().parent
SEED, SHAPE, SPACING, COUNT = 20260105, (300, 512, 512), (1.0, 0.7, 0.7), 4
TARGETS = {"wall_over_baseline": 1.5, "peak_rss_over_baseline": 1.5}
BASELINE = """
import sys
import torch
from monai.data import MetaTensor
from hirescam3d.io import scans as io
from hirescam3d.models import zoo
from hirescam3d.pipeline import preprocess_transforms
network, info = zoo.load("demo")
pre = preprocess_transforms(info, "image", from_array=True)
for path in sys.argv[1:]:
    scan = io.read_scan(path)
    image = pre({"image": MetaTensor(torch.from_numpy(scan.array),
                                     affine=torch.as_tensor(scan.affine))})["image"]
    del scan
    with torch.no_grad():
        network(image.as_tensor()[None])
"""
MAKE = ("import sys; from hirescam3d.data.phantom import make_chest_ct; "
        "make_chest_ct(int(sys.argv[2]), shape=tuple(map(int, sys.argv[3].split(','))), "
        "spacing=tuple(map(float, sys.argv[4].split(','))))"
        ".save(sys.argv[1], f'p{sys.argv[2]}')")  # fmt: skip


def make_scans(folder: Path, shape: tuple[int, ...], spacing: tuple[float, ...],
               count: int) -> list[Path]:  # fmt: skip
    """The phantoms as ``p<seed>_ct.nii.gz`` in ``folder`` (each made in a child process, so
    this one stays small for the ``wait4`` measurements; reused when there)."""
    paths = []
    for i in range(count):
        path = folder / f"p{SEED + i}_ct.nii.gz"
        if not path.exists():
            subprocess.run([sys.executable, "-c", MAKE, str(folder), str(SEED + i),
                            ",".join(map(str, shape)), ",".join(map(str, spacing))],
                           check=True)  # fmt: skip
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--data", type=Path, default=None, help="folder for the phantom files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)))
    parser.add_argument("--spacing", default=",".join(map(str, SPACING)))
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    spacing = tuple(float(s) for s in args.spacing.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        data = args.data or work / "data"
        data.mkdir(parents=True, exist_ok=True)
        scans = make_scans(data, shape, spacing, args.count)
        baseline: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []
        stages: list[list[dict[str, float]]] = []
        for r in range(args.repeats):
            m = run_measured([sys.executable, "-c", BASELINE, *map(str, scans)])
            baseline.append({"wall_s": m["wall_s"], "peak_rss_bytes": m["peak_rss_bytes"]})
            out = work / f"batch{r}"
            m = run_measured([sys.executable, "-c", EXPLAIN, "batch", str(data / "*_ct.nii.gz"),
                              "--all-findings", "--method", "hirescam", "--method", "gradcam",
                              "--out", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
            batch.append({"wall_s": m["wall_s"], "peak_rss_bytes": m["peak_rss_bytes"]})
            log = [json.loads(line) for line in (out / "batch_log.jsonl").read_text().splitlines()]
            if [rec["status"] for rec in log] != ["ok"] * len(scans):
                raise SystemExit(f"batch run {r} did not explain every scan: {log}")
            stages.append([rec.get("timings_s") or {} for rec in log])
            shutil.rmtree(out)
            print(f"[{r}] baseline {baseline[-1]['wall_s']:.1f} s, "
                  f"{baseline[-1]['peak_rss_bytes'] / 1e9:.2f} GB; batch {batch[-1]['wall_s']:.1f}"
                  f" s, {batch[-1]['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
        base = {k: statistics.median(b[k] for b in baseline) for k in baseline[0]}
        main_run = {k: statistics.median(b[k] for b in batch) for k in batch[0]}
        ratios = {"wall_over_baseline": main_run["wall_s"] / base["wall_s"],
                  "peak_rss_over_baseline": main_run["peak_rss_bytes"] / base["peak_rss_bytes"]}
        sys.path.insert(0, str(HERE))
        import torch
        from bench_core import machine_info

        entry = {
            "machine": machine_info(torch.get_num_threads()),
            "case": {"seeds": [SEED + i for i in range(args.count)], "shape": list(shape),
                     "spacing_mm": list(spacing), "repeats": args.repeats,
                     "command": "hirescam3d batch '*_ct.nii.gz' --all-findings --method "
                     "hirescam --method gradcam --device cpu", "maps_per_scan": 10},
            "baseline": {"what": "import, then per scan io.read_scan, MONAI preprocessing, one "
                         "no-grad inference of the demo model", **base, "runs": baseline},
            "batch": {**main_run, "runs": batch, "stages_s": stages},
            "ratios": ratios,
            "targets": TARGETS,
            "meets_target": {k: v <= TARGETS[k] for k, v in ratios.items()},
        }
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report["batch_scale"] = entry
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(", ".join(f"{k} = {v:.2f} (target <= {TARGETS[k]})" for k, v in ratios.items()))
        print(f"wrote the batch_scale entry of {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
