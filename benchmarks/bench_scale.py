"""Scan-scale benchmark: the ``explain`` process against a plain inference process.

The case of issue 13: ``make_chest_ct(20260105, shape=(300, 512, 512), spacing=(1.0, 0.7,
0.7))`` saved as NIfTI, explained with ``hirescam3d explain chest_ct.nii.gz --all-findings
--method hirescam --method gradcam --organs chest_organs.nii.gz`` (5 findings x 2
methods = 10 maps on the scan's grid, organ shares).

The baseline process imports the library, reads the scan with the same reader, runs the
model's MONAI preprocessing and one no-grad inference. Each process is timed from start
to exit and its peak resident memory taken from ``wait4`` (the kernel's ``ru_maxrss`` of
that child alone). Baseline and explain runs alternate; the ratios use the medians.
Also measured: the other storage choices (``--dtype int16``, ``--dtype uint8``,
``--grid model``: wall, peak and file sizes) and the read time of nibabel against
SimpleITK for the scan. Writes the ``scan_scale`` entry of ``benchmarks/results.json``
(other keys are kept) and prints a per-stage table.
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
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED, SHAPE, SPACING = 20260105, (300, 512, 512), (1.0, 0.7, 0.7)
TARGETS = {"wall_over_baseline": 2.0, "peak_rss_over_baseline": 1.5}  # issue 25 (was 3.0)
STAGES = ("read_s", "read_organs_s", "audit_s", "preprocess_s", "explain_s", "attribute_s",
          "invert_s", "write_s", "total_s")
BASELINE = """
import sys
import numpy as np, torch
from monai.data import MetaTensor
from hirescam3d.io import scans as io
from hirescam3d.models import zoo
from hirescam3d.pipeline import preprocess_transforms
network, info = zoo.load("demo")
scan = io.read_scan(sys.argv[1])
pre = preprocess_transforms(info, "image", from_array=True)
image = pre({"image": MetaTensor(torch.from_numpy(scan.array),
                                 affine=torch.as_tensor(scan.affine))})["image"]
with torch.no_grad():
    network(image.as_tensor()[None])
"""
EXPLAIN = "from hirescam3d.cli.main import main; main()"


def make_case(folder: Path) -> dict[str, Path]:
    """The issue's phantom as NIfTI files in ``folder`` (reused when already there)."""
    ct, organs = folder / "chest_ct.nii.gz", folder / "chest_organs.nii.gz"
    if not (ct.exists() and organs.exists()):
        # In a child process: a child's peak RSS (wait4) counts its parent's resident
        # memory at fork, so this process must stay small for the measurements.
        code = ("import sys; from hirescam3d.data.phantom import make_chest_ct; "
                f"make_chest_ct({SEED}, shape={SHAPE}, spacing={SPACING})"
                ".save(sys.argv[1], 'chest')")  # fmt: skip
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return {"ct": ct, "organs": organs}


def run_measured(args: list[str]) -> dict[str, Any]:
    """Run the command ``args`` in a child process: ``{"stdout", "wall_s",
    "peak_rss_bytes"}``, the peak resident memory of that child alone (``wait4``'s
    rusage; this process must stay small, see :func:`make_case`). RuntimeError with the
    end of its stderr if it fails. The files the runs before wrote are flushed to disk
    first (``os.sync``), so their writeback does not land in this run's time."""
    os.sync()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(args[:4])}... failed: {err.read().decode()[-2000:]}")
    return {"stdout": out.decode(), "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def run_json(args: list[str]) -> dict[str, Any]:
    """Run ``args``: the JSON of its last stdout line, with ``wall_s`` and ``peak_rss_bytes``
    of that process (:func:`run_measured`)."""
    measured = run_measured(args)
    result = json.loads(measured.pop("stdout").strip().splitlines()[-1])
    return {**result, **measured}


def run_process(args: list[str]) -> dict[str, float]:
    """Run ``args``; ``{"wall_s", "peak_rss_bytes"}`` of that process."""
    measured = run_measured(args)
    return {"wall_s": measured["wall_s"], "peak_rss_bytes": measured["peak_rss_bytes"]}


def explain_args(case: dict[str, Path], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", EXPLAIN, "explain", str(case["ct"]), "--all-findings",
            "--method", "hirescam", "--method", "gradcam", "--organs", str(case["organs"]),
            "--out", str(out), "--device", "cpu", "--force", "--quiet", *extra]


def _busy(stop: threading.Event) -> None:
    """Pure Python work until ``stop``: what the main thread does beside a read ahead."""
    while not stop.is_set():
        sum(range(100))


def read_times(path: Path) -> dict[str, float]:
    """Seconds to read the scan into a float32 array (in process): nibabel, SimpleITK and
    ``io.read_scan`` (ISA-L inflate, checks and hash included), the last also while a
    thread does pure Python work, as the main thread does beside a read ahead."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    from hirescam3d.io import scans as io

    t = time.perf_counter()
    np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    out = {"nibabel_s": time.perf_counter() - t}
    t = time.perf_counter()
    sitk.GetArrayFromImage(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32))
    out["simpleitk_s"] = time.perf_counter() - t
    t = time.perf_counter()
    io.read_scan(path)
    out["read_scan_s"] = time.perf_counter() - t
    stop = threading.Event()
    busy = threading.Thread(target=_busy, args=(stop,))
    busy.start()
    try:
        t = time.perf_counter()
        io.read_scan(path)
        out["read_scan_beside_busy_thread_s"] = time.perf_counter() - t
    finally:
        stop.set()
        busy.join()
    return out


def stage_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one column per run, one row per stage (seconds)."""
    names = list(rows)
    lines = ["| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for stage in STAGES:
        cells = [f"{rows[n][stage]:.2f}" if stage in rows[n] else "-" for n in names]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--data", type=Path, default=None, help="folder for the phantom files")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-variants", action="store_true",
                        help="only the default (float32, scan grid) explain run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        data = args.data or work / "data"
        data.mkdir(parents=True, exist_ok=True)
        case = make_case(data)
        baseline, explain, stages = [], [], []
        for r in range(args.repeats):
            baseline.append(run_process([sys.executable, "-c", BASELINE, str(case["ct"])]))
            out = work / f"explain{r}"
            explain.append(run_process(explain_args(case, out, [])))
            stages.append(json.loads((out / "report.json").read_text())["timings_s"])
            print(f"[{r}] baseline {baseline[-1]['wall_s']:.1f} s, "
                  f"{baseline[-1]['peak_rss_bytes'] / 1e9:.2f} GB; explain "
                  f"{explain[-1]['wall_s']:.1f} s, {explain[-1]['peak_rss_bytes'] / 1e9:.2f} GB",
                  flush=True)
        out = work / "explain0"
        sizes = {"float32": sum(p.stat().st_size for p in out.glob("*.nii.gz"))}
        base = {k: statistics.median(b[k] for b in baseline) for k in baseline[0]}
        main_run = {k: statistics.median(e[k] for e in explain) for k in explain[0]}
        variants: dict[str, Any] = {}
        rows = {"explain (float32, scan grid)": stages[0]}
        if not args.skip_variants:
            for name, extra in {"int16": ["--dtype", "int16"], "uint8": ["--dtype", "uint8"],
                                "grid_model": ["--grid", "model"]}.items():
                folder = work / name
                measured = run_process(explain_args(case, folder, extra))
                measured["maps_bytes"] = sum(p.stat().st_size for p in folder.glob("*.nii.gz"))
                variants[name] = measured
                rows[f"explain ({name})"] = json.loads((folder / "report.json").read_text())[
                    "timings_s"]
                sizes[name] = measured["maps_bytes"]
                shutil.rmtree(folder)
                print(f"{name}: {measured['wall_s']:.1f} s, "
                      f"{measured['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"{measured['maps_bytes'] / 1e6:.1f} MB", flush=True)
        ratios = {
            "wall_over_baseline": main_run["wall_s"] / base["wall_s"],
            "peak_rss_over_baseline": main_run["peak_rss_bytes"] / base["peak_rss_bytes"],
        }
        sys.path.insert(0, str(HERE))
        import torch
        from bench_core import machine_info

        entry = {
            "machine": machine_info(torch.get_num_threads()),
            "case": {"seed": SEED, "shape": list(SHAPE), "spacing_mm": list(SPACING),
                     "command": "hirescam3d explain chest_ct.nii.gz --all-findings --method "
                     "hirescam --method gradcam --organs chest_organs.nii.gz --device cpu",
                     "maps": 10, "repeats": args.repeats},
            "baseline": {"what": "import, io.read_scan, MONAI preprocessing, one no-grad "
                         "inference of the demo model", **base, "runs": baseline},
            "explain": {**main_run, "runs": explain, "stages_s": stages},
            "variants": variants,
            "maps_bytes": sizes,
            "read_s": read_times(case["ct"]),
            "ratios": ratios,
            "targets": TARGETS,
            "meets_target": {k: v <= TARGETS[k] for k, v in ratios.items()},
        }
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report["scan_scale"] = entry
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(stage_table(rows))
        print(", ".join(f"{k} = {v:.2f} (target <= {TARGETS[k]})" for k, v in ratios.items()))
        print(f"wrote the scan_scale entry of {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
