"""Core benchmark: cost of an explanation relative to one no-grad inference pass.

For MONAI's 3D ResNet-18 (20 classes, target layer ``layer4``) at two input sizes,
on CPU (2 threads) and on CUDA when present, measures:
  - time of ``Explainer.explain`` (HiResCAM, 1 and 20 targets) / no-grad inference time;
  - peak memory of explain(20 targets) / peak memory of no-grad inference;
  - time of ``monai.visualize.GradCAM`` for the same work (20 targets = 20 calls)
    against our Grad-CAM for those targets;
  - time of placing 20 raw maps on the input by the layer's traced geometry (ReLU,
    placement, divide by max) against the stretching upsampler it replaced (ReLU,
    ``F.interpolate(align_corners=False)``, min-max).
Memory on CPU is the peak resident-set increase over a warmed-up baseline, each
measurement in a fresh process (Linux ``/proc/self/clear_refs`` resets the peak);
on CUDA it is ``max_memory_allocated`` over the baseline allocation.
Writes ``benchmarks/results.json`` (or ``--out``) with machine information.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SIZES = {"64x128x128": (64, 128, 128), "128x128x128": (128, 128, 128)}
N_CLASSES = 20


def _setup(size: tuple[int, ...], device: str):
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=N_CLASSES).eval().to(device)
    x = torch.randn(1, 1, *size, device=device)
    return net, x


def _ops(net, x):
    import torch.nn.functional as F
    from monai.visualize import GradCAM as MonaiGradCAM

    from hirescam3d import Explainer
    from hirescam3d.core import postprocess

    ex = Explainer(net, "layer4")
    targets20 = list(range(N_CLASSES))
    raw20 = ex.explain(x, targets=targets20, methods=["hirescam"], maps=False)["hirescam"].raw
    geometry = ex.geometry(x)
    size = tuple(x.shape[2:])

    def stretch_maps():  # the upsampling used before placement by geometry
        up = F.interpolate(raw20.clamp_min(0), size=size, mode="trilinear", align_corners=False)
        return postprocess.normalize(up, spatial_dims=3)

    def infer():
        with torch.no_grad():
            net(x)

    def monai_gradcam(targets):
        cam = MonaiGradCAM(net, "layer4")
        for t in targets:
            cam(x, class_idx=t)
        for m in net.modules():  # MONAI keeps its hooks; drop them so later runs are clean
            m._forward_hooks.clear()
            m._backward_hooks.clear()
        net.zero_grad(set_to_none=True)

    return {
        "inference": infer,
        "explain_1": lambda: ex.explain(x, targets=[3], methods=["hirescam"]),
        "explain_20": lambda: ex.explain(x, targets=targets20, methods=["hirescam"]),
        "gradcam_1": lambda: ex.explain(x, targets=[3], methods=["gradcam"]),
        "gradcam_20": lambda: ex.explain(x, targets=targets20, methods=["gradcam"]),
        "monai_gradcam_1": lambda: monai_gradcam([3]),
        "monai_gradcam_20": lambda: monai_gradcam(targets20),
        "stretch_maps_20": stretch_maps,
        "place_maps_20": lambda: postprocess.unit_maps(raw20, geometry, size),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(op, repeats: int) -> float:
    """Median wall time (s) of ``op()`` on the CPU over ``repeats`` calls, after a warm-up."""
    op()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_ops(size, device, repeats: int, names: list[str]) -> dict[str, float]:
    """Median wall time (s) of each op after one warm-up run."""
    net, x = _setup(size, device)
    ops = _ops(net, x)
    out = {}
    for name in names:
        n = 1 if name == "monai_gradcam_20" and device == "cpu" else repeats
        ops[name]()
        _sync(device)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ops[name]()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(factory, args, threads, queue) -> None:
    torch.set_num_threads(threads)
    op = factory(*args)
    op()  # warm up lazy initialisation
    import gc

    gc.collect()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    op()
    queue.put((_rss_kib("VmHWM") - base) * 1024)


def peak_cpu_of(factory, args: tuple, threads: int) -> int:
    """Peak resident bytes of ``factory(*args)()`` above a warmed-up baseline, measured
    in a fresh process (``factory`` must be a module-level function)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large tensors -> mmap, so frees show in RSS
    proc = ctx.Process(target=_peak_child, args=(factory, args, threads, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def _core_op(size, name):
    net, x = _setup(size, "cpu")
    return _ops(net, x)[name]


def peak_cpu(size, name, threads: int) -> int:
    """Peak resident bytes above a warmed-up baseline, in a fresh process."""
    return peak_cpu_of(_core_op, (size, name), threads)


def peak_cuda(size, name) -> int:
    net, x = _setup(size, "cuda")
    op = _ops(net, x)[name]
    op()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    op()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(device: str, threads: int, repeats: int, sizes: list[str], skip_monai20: bool) -> dict:
    if device == "cpu":
        torch.set_num_threads(threads)
    names = ["inference", "explain_1", "explain_20", "gradcam_1", "gradcam_20", "monai_gradcam_1",
             "stretch_maps_20", "place_maps_20"]
    if not skip_monai20:
        names.append("monai_gradcam_20")
    results = {}
    for label in sizes:
        size = SIZES[label]
        t = time_ops(size, device, repeats, names)
        if device == "cpu":
            mem = {n: peak_cpu(size, n, threads) for n in ("inference", "explain_20")}
        else:
            mem = {n: peak_cuda(size, n) for n in ("inference", "explain_20")}
        ratios = {
            "explain_1_time_over_inference": t["explain_1"] / t["inference"],
            "explain_20_time_over_inference": t["explain_20"] / t["inference"],
            "explain_20_peak_memory_over_inference": mem["explain_20"] / mem["inference"],
            "gradcam_1_time_over_monai_gradcam_1": t["gradcam_1"] / t["monai_gradcam_1"],
            "placement_time_over_stretch_upsampling": t["place_maps_20"] / t["stretch_maps_20"],
        }
        if "monai_gradcam_20" in t:
            monai20 = t["monai_gradcam_20"]
            ratios["gradcam_20_time_over_monai_gradcam_20"] = t["gradcam_20"] / monai20
        targets = {
            "explain_1_time_over_inference": 1.15,
            "explain_20_time_over_inference": 1.3,
            "explain_20_peak_memory_over_inference": 1.2,
            "gradcam_1_time_over_monai_gradcam_1": 0.5,
            "gradcam_20_time_over_monai_gradcam_20": 0.05,
            "placement_time_over_stretch_upsampling": 1.0,
        }
        results[label] = {
            "seconds": t,
            "peak_bytes": mem,
            "ratios": ratios,
            "meets_target": {k: v <= targets[k] for k, v in ratios.items()},
        }
        print(
            f"[{device} {label}] " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()),
            flush=True,
        )
    return results


def machine_info(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--skip-monai-20", action="store_true", help="skip the slow 20-call MONAI Grad-CAM baseline"
    )
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    for device in devices:
        report.setdefault("core", {})[device] = {
            "machine": machine_info(args.threads),
            "model": "monai resnet18, spatial_dims=3, 20 classes; target layer 'layer4'",
            "results": run(device, args.threads, args.repeats, args.sizes, args.skip_monai_20),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
