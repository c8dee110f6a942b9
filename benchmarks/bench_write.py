"""Map-writing benchmark: ten float32 explanation maps of a 300 x 512 x 512 scan (issue 25).

The maps are the real ones of the ``bench_scale`` case (``make_chest_ct(20260105, shape=(300,
512, 512), spacing=(1.0, 0.7, 0.7))``, demo model, all five findings x HiResCAM and
Grad-CAM, on the scan's grid): each is computed, then written with
:func:`hirescam3d.io.outputs.write_map` once per deflate backend (``zlib``: the standard
library, as before issue 25; ``isal``: ISA-L's igzip, the default now), in alternating
order; only the ``write_map`` calls are timed. Every written file is checked against the
map with the standard library's ``gzip`` reader. Writes the ``map_write`` entry of
``benchmarks/results.json`` (other keys are kept): per backend the summed seconds for the
ten maps (median over ``--repeats``) and the bytes written.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED, SHAPE, SPACING = 20260105, (300, 512, 512), (1.0, 0.7, 0.7)
TARGET_S = 3.3  # issue 25: 10.0 s before, at least 3x faster


def maps(shape: tuple[int, int, int]):
    """Yield ``(name, volume, affine)`` for the ten maps of the case (F-ordered float32)."""
    from hirescam3d.data.phantom import make_chest_ct
    from hirescam3d.models.zoo import CHEST_FINDINGS
    from hirescam3d.pipeline import explain_arrays

    phantom = make_chest_ct(SEED, shape=shape, spacing=SPACING)
    affine = np.diag([*SPACING, 1.0])
    result = explain_arrays(phantom.ct, affine, "demo", list(CHEST_FINDINGS),
                            ["hirescam", "gradcam"])
    del phantom
    for pair in result.pairs:
        yield f"{pair[0]}_{pair[1]}", result.scan_map(pair), affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)))
    args = parser.parse_args()
    import torch

    from hirescam3d.io import gzip_stream, outputs

    shape = tuple(int(s) for s in args.shape.split(","))
    backends = ["zlib", "isal"]
    seconds: dict[str, list[float]] = {b: [0.0] * args.repeats for b in backends}
    sizes = dict.fromkeys(backends, 0)
    with tempfile.TemporaryDirectory(prefix="bench_write_") as tmp:
        for n, (name, volume, affine) in enumerate(maps(shape)):
            for r in range(args.repeats):
                for b in backends if (n + r) % 2 == 0 else backends[::-1]:
                    path = Path(tmp) / f"{name}_{b}.nii.gz"
                    gzip_stream.BACKEND = b
                    start = time.perf_counter()
                    outputs.write_map(path, volume, affine, "hirescam", force=True)
                    seconds[b][r] += time.perf_counter() - start
                    if r == 0:
                        sizes[b] += path.stat().st_size
                        with gzip.open(path) as f:
                            f.seek(352)
                            back = np.frombuffer(f.read(), "<f4").reshape(volume.shape, order="F")
                        if not np.array_equal(back, volume):
                            raise SystemExit(f"{path}: read back differs from the map")
                    path.unlink()
            print(f"{name}: " + ", ".join(f"{b} {seconds[b][args.repeats - 1]:.2f} s" for b in
                                           backends), flush=True)
    sys.path.insert(0, str(HERE))
    from bench_core import machine_info

    median = {b: statistics.median(seconds[b]) for b in backends}
    entry = {
        "machine": machine_info(torch.get_num_threads()),
        "case": {"seed": SEED, "shape": list(shape), "spacing_mm": list(SPACING), "maps": 10,
                 "dtype": "float32", "repeats": args.repeats,
                 "what": "summed seconds of outputs.write_map for the ten maps of the "
                         "bench_scale case, per deflate backend (same maps, alternating)"},
        "seconds": median,
        "runs_s": seconds,
        "bytes": sizes,
        "speedup": median["zlib"] / median["isal"],
        "target_s": TARGET_S,
        "meets_target": median["isal"] <= TARGET_S,
    }
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["map_write"] = entry
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(", ".join(f"{b}: {median[b]:.2f} s, {sizes[b] / 1e6:.1f} MB" for b in backends)
          + f"; speedup {entry['speedup']:.2f}x (target isal <= {TARGET_S} s)")


if __name__ == "__main__":
    main()
