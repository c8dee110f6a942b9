"""nnU-Net benchmark: ``hirescam3d explain`` of one predicted region of an nnU-Net model
folder against ``nnUNetPredictor`` alone on the same scan and passes (issue 23).

The model folder is made by ``hirescam3d.data.nnunet_phantom`` with nnU-Net's planned network
width (``--width 0``), its ``3d_fullres`` plans then given ``--patch`` and ``--spacing``
(the network built from the plans is the same U-Net; only the tiles and the resampling
change). The scan: ``make_chest_ct(SEED, shape=--shape, spacing=--scan-spacing)`` as
NIfTI. Each run is its own process, timed from start to exit, with its peak resident
memory from ``wait4``:

* ``nnunet``: ``nnUNetPredictor.predict_from_files_sequential`` (folds, mirroring as
  given; step 0.5, Gaussian), writing the segmentation;
* ``explain``: ``hirescam3d explain SCAN --model FOLDER --finding heart`` with the same
  folds and mirroring (nnU-Net's prediction, then the explanation passes, then the maps,
  segmentation and report written).

Targets: time <= 2.5x and peak memory <= 1.5x of ``nnunet``. Writes the ``nnunet`` entry
of ``benchmarks/results.json`` (other keys are kept). Heavy at the default 300 x 512 x 512.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_scale import run_measured

HERE = Path(__file__).resolve().parent
SEED = 20260105
TARGETS = {"wall_over_nnunet": 2.5, "peak_rss_over_nnunet": 1.5}
PREDICT = """
import sys, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
folder, scan, out, folds, mirror, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror == "1",
                    perform_everything_on_device=False, device=torch.device("cpu"),
                    verbose=False, allow_tqdm=False)
p.initialize_from_trained_model_folder(folder, [int(f) for f in folds.split(",")])
p.predict_from_files_sequential([[scan]], out, save_probabilities=False)
"""
EXPLAIN = """
import sys, torch
torch.set_num_threads(int(sys.argv.pop(1)))
from hirescam3d.cli.main import main
main()
"""


def make_model(root: Path, patch: list[int], spacing: list[float], folds: list[int]) -> Path:
    """The phantom model folder, nnU-Net's planned width, with ``patch`` and ``spacing``."""
    subprocess.run([sys.executable, "-m", "hirescam3d.data.nnunet_phantom", str(root), "--width",
                    "0", "--folds", *map(str, folds)], check=True, capture_output=True)  # fmt: skip
    folder = root / "nnUNet_results" / "Dataset501_Phantom"
    folder = folder / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=patch, spacing=spacing)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    return folder


def make_scan(path: Path, shape: list[int], spacing: list[float]) -> Path:
    code = ("import sys; from pathlib import Path; from hirescam3d.data.nnunet_phantom import "
            "write_phantom_ct as w; w(Path(sys.argv[1]), int(sys.argv[2]), "
            "tuple(map(int, sys.argv[3].split(','))), tuple(map(float, sys.argv[4].split(','))))")
    subprocess.run([sys.executable, "-c", code, str(path), str(SEED), ",".join(map(str, shape)),
                    ",".join(map(str, spacing))], check=True)  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    parser.add_argument("--scan-spacing", type=float, nargs=3, default=[1.0, 0.7, 0.7])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.0, 1.0])
    parser.add_argument("--patch", type=int, nargs=3, default=[96, 128, 128])
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--mirror", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    try:
        folder = make_model(work / "model", args.patch, args.spacing, args.folds)
        scan = make_scan(work / "case_0000.nii.gz", args.shape, args.scan_spacing)
        folds, mirror = ",".join(map(str, args.folds)), "1" if args.mirror else "0"
        (work / "nnunet").mkdir()
        nnunet = run_measured([sys.executable, "-c", PREDICT, str(folder), str(scan),
                               str(work / "nnunet"), folds, mirror, str(args.threads)])  # fmt: skip
        explain = run_measured([sys.executable, "-c", EXPLAIN, str(args.threads), "explain",
                                str(scan), "--model", str(folder), "--folds", folds,
                                "--mirror" if args.mirror else "--no-mirror", "--finding",
                                "heart", "--out", str(work / "explain"), "--quiet"])  # fmt: skip
        sys.path.insert(0, str(HERE))
        from bench_core import machine_info

        entry = {
            "machine": machine_info(args.threads),
            "case": {"seed": SEED, "shape": args.shape, "scan_spacing_mm": args.scan_spacing,
                     "plans_spacing_mm": args.spacing, "patch": args.patch,
                     "folds": args.folds, "mirror": args.mirror, "finding": "heart"},
            "nnunet": {k: nnunet[k] for k in ("wall_s", "peak_rss_bytes")},
            "explain": {k: explain[k] for k in ("wall_s", "peak_rss_bytes")},
            "ratios": {"wall_over_nnunet": explain["wall_s"] / nnunet["wall_s"],
                       "peak_rss_over_nnunet":
                           explain["peak_rss_bytes"] / nnunet["peak_rss_bytes"]},
            "targets": TARGETS,
        }  # fmt: skip
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results["nnunet"] = entry
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(entry["ratios"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
