"""GPU benchmark (``make bench-gpu``, issue 25): the explanation's cost on an accelerator.

Three measures, each a median over ``--repeats`` timed calls after a warm-up, with the
device synchronised around every call; peak memory is CUDA's ``max_memory_allocated``
over what was allocated before the call (0 on the CPU, where it is not measured):

* ``core``: MONAI's 3D ResNet-18 (20 classes, layer ``layer4``, as ``bench_core``) at
  128 x 128 x 128: ``Explainer.explain`` (HiResCAM) with 1 and with 20 targets against
  one no-grad inference;
* ``axialnet``: the full AxialNet of the zoo (untrained, seeded) on a 405 x 420 x 420
  input, all five findings explained (HiResCAM, maps placed), in ms per scan, against
  its no-grad inference;
* ``sliding_window``: the shipped ``demo_seg`` UNet over the 300 x 512 x 512 chest
  phantom of ``bench_sliding`` (windows 96 x 128 x 128, overlap 0.25, gaussian,
  ``sw_batch_size`` 2): ``Explainer.sliding_window`` for right lung and heart over
  their organ masks against MONAI's ``sliding_window_inference``.

``--quick`` shrinks every size (for a test on the CPU: ``--device cpu --quick``).
Writes ``benchmarks/results_gpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SEED, SPACING = 20260105, (1.0, 0.7, 0.7)
FULL = {"core": (128, 128, 128), "axialnet": (405, 420, 420), "sliding": (300, 512, 512),
        "roi": (96, 128, 128), "axialnet_model": "axialnet", "spacing": SPACING}  # fmt: skip
# quick: AxialNet-tiny (the full one is built for 420 x 420 slices)
QUICK = {"core": (16, 32, 32), "axialnet": (12, 128, 128), "sliding": (16, 40, 40),
         "roi": (16, 32, 32), "axialnet_model": "axialnet_tiny",
         "spacing": (18.0, 9.0, 9.0)}  # fmt: skip
CLASSES = ("right_lung", "heart")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(op: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """``{"seconds": median, "runs_s": [...], "peak_bytes": ...}`` of ``op()``."""
    op()  # warm-up (kernels, allocator, cuDNN autotuning)
    _sync(device)
    runs = []
    peak = 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        op()
        _sync(device)
        runs.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
    return {"seconds": statistics.median(runs), "runs_s": runs, "peak_bytes": peak}


def bench_core(size: tuple[int, ...], device: torch.device, repeats: int) -> dict[str, Any]:
    from monai.networks.nets import resnet18

    from hirescam3d import Explainer

    torch.manual_seed(0)
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=20).eval().to(device)
    x = torch.randn(1, 1, *size, device=device)
    explainer = Explainer(net, "layer4")

    def infer() -> None:
        with torch.no_grad():
            net(x)

    t = {"inference": measure(infer, device, repeats)}
    for k in (1, 20):
        t[f"explain_{k}"] = measure(
            lambda k=k: explainer.explain(x, targets=list(range(k)), methods=["hirescam"]),
            device, repeats,
        )  # fmt: skip
    base = t["inference"]["seconds"]
    return {"size": list(size), "model": "monai resnet18, 20 classes, layer4", **t,
            "explain_1_over_inference": t["explain_1"]["seconds"] / base,
            "explain_20_over_inference": t["explain_20"]["seconds"] / base}  # fmt: skip


def bench_axialnet(
    size: tuple[int, ...], device: torch.device, repeats: int, model: str = "axialnet"
) -> dict[str, Any]:
    from hirescam3d import Explainer
    from hirescam3d.models import zoo

    network, info = zoo.load(model)
    network = network.to(device)
    x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0)).to(device)
    explainer = Explainer(network, info.target_layer, "hirescam", class_names=info.class_names)
    findings = list(info.class_names)

    def infer() -> None:
        with torch.no_grad():
            network(x)

    t = {"inference": measure(infer, device, repeats),
         "explain": measure(lambda: explainer(x, targets=findings), device, repeats)}  # fmt: skip
    return {"size": list(size), "model": model, "findings": findings, **t,
            "explain_ms_per_scan": 1000 * t["explain"]["seconds"],
            "inference_ms_per_scan": 1000 * t["inference"]["seconds"],
            "explain_over_inference": t["explain"]["seconds"] / t["inference"]["seconds"]}


def bench_sliding(
    size: tuple[int, ...], roi: tuple[int, ...], device: torch.device, repeats: int,
    spacing: tuple[float, ...] = SPACING,
) -> dict[str, Any]:
    from monai.inferers import sliding_window_inference

    from hirescam3d import Explainer
    from hirescam3d.data.phantom import make_chest_ct
    from hirescam3d.models.bundle import apply_window
    from hirescam3d.models.handle import ModelHandle

    network, info = ModelHandle.resolve("demo_seg").load()
    network = network.to(device)
    phantom = make_chest_ct(SEED, shape=size, spacing=spacing)
    x = apply_window(phantom.ct, info.input.window)[None, None].to(device)
    labels = {1: "right_lung", 2: "heart", 3: "left_lung"}
    organs = torch.from_numpy(phantom.organs)
    region = torch.stack([organs == next(v for v, n in labels.items() if n == c)
                          for c in CLASSES])[None].to(device)  # fmt: skip
    del phantom, organs
    explainer = Explainer(network, info.target_layer, "hirescam", class_names=info.class_names,
                          task="sigmoid")  # fmt: skip

    def infer() -> None:
        with torch.no_grad():
            sliding_window_inference(x, roi, 2, network, overlap=0.25, mode="gaussian")

    def explain() -> None:
        explainer.sliding_window(x, targets=list(CLASSES), region=region, roi_size=roi,
                                 overlap=0.25, sw_batch_size=2, mode="gaussian", maps=False)

    t = {"inference": measure(infer, device, repeats), "explain": measure(explain, device,
                                                                          repeats)}  # fmt: skip
    return {"size": list(size), "spacing_mm": list(spacing), "roi_size": list(roi),
            "classes": list(CLASSES), **t,
            "explain_over_inference": t["explain"]["seconds"] / t["inference"]["seconds"]}


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda)  # fmt: skip
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a test on the CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results_gpu.json")
    parser.add_argument("--only", choices=("core", "axialnet", "sliding"), action="append",
                        help="run only these measures (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or pass --device cpu "
              "(with --quick for a smoke test)", file=sys.stderr)  # fmt: skip
        return 2
    sizes = QUICK if args.quick else FULL
    chosen = args.only or ["core", "axialnet", "sliding"]
    report: dict[str, Any] = {"machine": machine(device), "quick": args.quick,
                              "repeats": args.repeats}  # fmt: skip
    started = time.perf_counter()
    if "core" in chosen:
        report["core"] = bench_core(sizes["core"], device, args.repeats)
        print(f"core {sizes['core']}: explain(1) {report['core']['explain_1_over_inference']:.2f}x"
              f", explain(20) {report['core']['explain_20_over_inference']:.2f}x inference",
              flush=True)  # fmt: skip
    if "axialnet" in chosen:
        report["axialnet"] = bench_axialnet(sizes["axialnet"], device, args.repeats,
                                            sizes["axialnet_model"])  # fmt: skip
        print(f"axialnet {sizes['axialnet']}: {report['axialnet']['explain_ms_per_scan']:.0f} ms "
              f"per scan (5 findings), inference "
              f"{report['axialnet']['inference_ms_per_scan']:.0f} ms", flush=True)  # fmt: skip
    if "sliding" in chosen:
        report["sliding_window"] = bench_sliding(sizes["sliding"], sizes["roi"], device,
                                                 args.repeats, sizes["spacing"])  # fmt: skip
        s = report["sliding_window"]
        print(f"demo_seg sliding window {sizes['sliding']}: explain {s['explain']['seconds']:.2f}"
              f" s, inference {s['inference']['seconds']:.2f} s "
              f"({s['explain_over_inference']:.2f}x)", flush=True)  # fmt: skip
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
