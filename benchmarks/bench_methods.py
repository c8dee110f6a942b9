"""Benchmark of every registered explanation method on MONAI's 3D ResNet-18 (layer4).

Per method: median seconds per explained target (one target per call, after a warm-up
call) relative to Grad-CAM on the same model and input, and the peak resident-memory
increase of one call in a fresh process (CPU). Perturbation methods run far more model
passes (their docstrings give the count), so they are measured on a smaller input whose
size is recorded with them. Writes the ``methods`` entry of ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_core import machine_info, median_seconds, peak_cpu_of

SIZES = {"gradient": (64, 128, 128), "perturbation": (32, 64, 64)}
PERTURBATION = ("scorecam", "ablationcam", "occlusion")


def _setup(size: tuple[int, ...]):
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=20).eval()
    return net, torch.randn(1, 1, *size)


def _op(method: str, size: tuple[int, ...]):
    from hirescam3d import Explainer

    net, x = _setup(size)
    explainer = Explainer(net, "layer4", method=method, batch_size=16)
    return lambda: explainer.explain(x, targets=[3], methods=[method])


def seconds(method: str, size: tuple[int, ...], repeats: int) -> float:
    return median_seconds(_op(method, size), repeats)


def main() -> None:
    from hirescam3d.core.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kind", choices=[*SIZES, "all"], default="all",
                        help="measure only the gradient or only the perturbation methods "
                        "(rows of the other kind already in --out are kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: dict[str, dict] = dict(report.get("methods", {}).get("results", {}))

    def save() -> None:  # after every row, so an interrupted run keeps what it measured
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report["methods"] = {
            "machine": machine_info(args.threads),
            "model": "monai resnet18, spatial_dims=3, 20 classes; target layer 'layer4'; "
            "1 target",
            "targets": {"gradient_methods_time_over_gradcam": 1.1},
            "results": rows,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for kind, size in SIZES.items():
        if args.kind not in ("all", kind):
            continue
        baseline = seconds("gradcam", size, args.repeats)
        names = [
            m for m in sorted(METHODS) if (m in PERTURBATION) == (kind == "perturbation")
        ] + (["gradcam"] if kind == "perturbation" else [])
        for name in names:
            t = baseline if name == "gradcam" else seconds(name, size, max(1, args.repeats // 2))
            peak = peak_cpu_of(_op, (name, size), args.threads)
            key = name if kind == "gradient" else f"{name}@{'x'.join(map(str, size))}"
            rows[key] = {
                "input": list(size),
                "seconds_per_target": t,
                "time_over_gradcam": t / baseline,
                "peak_bytes": peak,
            }
            save()
            print(f"{key}: {t:.3f} s, {t / baseline:.2f}x Grad-CAM, peak {peak / 2**20:.0f} MiB",
                  flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
