"""Published-bundle benchmark: explaining MONAI's ``spleen_ct_segmentation`` (its configs
from tests/fixtures/model_zoo, unchanged; seeded random weights built by MONAI from its
``network_def``) against the bundle's own inference (issue 22).

The case: ``make_chest_ct(20260105, shape=(300, 512, 512), spacing=(1.0, 0.7, 0.7))``
written as NIfTI with an LPS-style affine (as from DICOM). Each run is its own process,
timed around the work and from start to exit, with its peak resident memory (``wait4``):

* ``bundle``: MONAI's ``ConfigParser`` builds the bundle's preprocessing (``LoadImaged``
  on the file), ``SlidingWindowInferer`` and postprocessing (``Activationsd``, ``Invertd``,
  ``AsDiscreted``; ``SaveImaged`` left out) and runs them under ``no_grad``;
* ``explain``: hirescam3d reads the scan, runs the same bundle's preprocessing, explains
  the predicted ``spleen`` region with HiResCAM on the bundle's sliding-window schedule,
  and puts the map and the predicted mask on the scan's grid.

Targets: explanation time <= 2.5x and peak memory <= 1.5x of the bundle's run. Writes the
``bundle_spleen`` entry of ``benchmarks/results.json`` (other keys are kept).
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
BUNDLE = HERE.parent / "tests" / "fixtures" / "model_zoo" / "spleen_ct_segmentation"
SEED, SHAPE, SPACING = 20260105, (300, 512, 512), (1.0, 0.7, 0.7)
TARGETS = {"call_over_bundle": 2.5, "peak_rss_over_bundle": 1.5}
MAKE = """
import shutil, sys
from pathlib import Path
import nibabel as nib, numpy as np, torch
from monai.bundle import ConfigParser
from hirescam3d.data.phantom import make_chest_ct
work, bundle = Path(sys.argv[1]), Path(sys.argv[2])
p = make_chest_ct(int(sys.argv[3]), shape=tuple(map(int, sys.argv[4].split(","))),
                  spacing=tuple(map(float, sys.argv[5].split(","))))
image = nib.Nifti1Image(p.ct.astype(np.int16), p.affine)
ornt = nib.orientations.ornt_transform(nib.io_orientation(p.affine),
                                       nib.orientations.axcodes2ornt(("L", "P", "S")))
nib.save(image.as_reoriented(ornt), work / "ct.nii.gz")
root = work / "spleen_ct_segmentation"
shutil.copytree(bundle, root)
(root / "models").mkdir()
parser = ConfigParser()
parser.read_config(str(root / "configs" / "inference.json"))
torch.manual_seed(0)
net = parser.get_parsed_content("network_def")
torch.save({"model": net.state_dict()}, root / "models" / "model.pt")
"""
RUN = """
import json, sys, time
import torch
work, kind = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
root = work + "/spleen_ct_segmentation"
start = time.perf_counter()
if kind == "bundle":
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged
    parser = ConfigParser()
    parser.read_config(root + "/configs/inference.json")
    parser["bundle_root"] = root
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root + "/models/model.pt", weights_only=True)["model"])
    network.eval()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms
                    if not isinstance(t, SaveImaged)])
    data = pre({"image": work + "/ct.nii.gz"})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    labels = post(data)["pred"]
    extra = {"spleen_voxels": int((labels == 1).sum())}
else:
    from hirescam3d.io import scans as io
    from hirescam3d.models.handle import ModelHandle
    from hirescam3d.pipeline import explain_arrays
    handle = ModelHandle.resolve(root)
    scan = io.read_scan(work + "/ct.nii.gz")
    e = explain_arrays(scan.array, scan.affine, model=handle, findings=["spleen"])
    scan_map = e.scan_map(("spleen", "hirescam"))
    mask = e.mask_on_scan("spleen")
    extra = {"spleen_voxels": int(mask.sum()), "map_shape": list(scan_map.shape)}
print(json.dumps({"call_s": time.perf_counter() - start, **extra}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shape",
        default="x".join(map(str, SHAPE)),
        help="phantom shape, e.g. 300x512x512 (smaller for a smoke run)",
    )
    args = parser.parse_args()
    size = tuple(int(n) for n in args.shape.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_bundle_"))
    try:
        shape, spacing = ",".join(map(str, size)), ",".join(map(str, SPACING))
        subprocess.run([sys.executable, "-c", MAKE, str(work), str(BUNDLE), str(SEED), shape,
                        spacing], check=True)  # fmt: skip
        runs: dict[str, list[dict]] = {"bundle": [], "explain": []}
        for r in range(args.repeats):
            for kind, done in runs.items():
                done.append(run([sys.executable, "-c", RUN, str(work), kind, str(args.threads)]))
                print(f"[{r}] {kind}: call {done[-1]['call_s']:.1f} s, process "
                      f"{done[-1]['wall_s']:.1f} s, peak {done[-1]['peak_rss_bytes'] / 1e9:.2f} GB",
                      flush=True)  # fmt: skip
        measures = ("call_s", "wall_s", "peak_rss_bytes")
        med = {k: {m: statistics.median(run[m] for run in v) for m in measures}
               for k, v in runs.items()}  # fmt: skip
        base, ours = med["bundle"], med["explain"]
        ratios = {
            "call_over_bundle": ours["call_s"] / base["call_s"],
            "wall_over_bundle": ours["wall_s"] / base["wall_s"],
            "peak_rss_over_bundle": ours["peak_rss_bytes"] / base["peak_rss_bytes"],
        }
        sys.path.insert(0, str(HERE))
        import torch
        from bench_core import machine_info

        entry = {
            "machine": machine_info(args.threads),
            "case": {"seed": SEED, "shape": list(size), "spacing_mm": list(SPACING),
                     "bundle": "spleen_ct_segmentation (Model Zoo configs, seeded weights)",
                     "finding": "spleen", "region": "predicted", "method": "hirescam",
                     "repeats": args.repeats,
                     "device": "cuda" if torch.cuda.is_available() else "cpu"},
            "median": med,
            "runs": runs,
            "ratios": ratios,
            "targets": TARGETS,
            "meets_target": {k: ratios[k] <= TARGETS[k] for k in TARGETS},
        }  # fmt: skip
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report["bundle_spleen"] = entry
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
        print(f"wrote the bundle_spleen entry of {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
