"""Stitched (sliding-window) vs whole-volume explanations for networks with and without
window-wide normalisation (issue 27, point 1; docs/segmentation.md "Sliding windows").

A 64^3 random input, roi 48, overlap 0.5 (gaussian blending), class 1 over a central
16^3 box, HiResCAM at the audit's default layer, seeded weights. Reported on the central
8^3 voxels (every window covering them sees their whole neighbourhood): the largest
difference between the stitched and the whole-volume map (logits per voxel), the largest
map value there, and the largest difference of MONAI's own windowed prediction from the
whole-volume prediction (logits). Run: ``python benchmarks/sliding_norms.py``.
"""

from __future__ import annotations

import json

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet, UNet

from hirescam3d import Explainer
from hirescam3d.core import postprocess
from hirescam3d.models.handle import ModelHandle

SIZE, ROI, OVERLAP = 64, 48, 0.5
NETS = {
    "UNet (InstanceNorm, MONAI default)": lambda: UNet(3, 1, 2, (8, 16, 32), (2, 2)),
    "SegResNet (GroupNorm, MONAI default)": lambda: SegResNet(3, 8, 1, 2),
    "UNet (norm='batch')": lambda: UNet(3, 1, 2, (8, 16, 32), (2, 2), norm="batch"),
}


def measure(build) -> dict[str, float | str]:
    torch.manual_seed(0)
    net = build().eval()
    layer = ModelHandle.from_network(net, ["a", "b"], (1, SIZE, SIZE, SIZE)).default_layer
    x = torch.randn(1, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    box = torch.zeros(1, 1, SIZE, SIZE, SIZE, dtype=torch.bool)
    box[..., 24:40, 24:40, 24:40] = True
    ex = Explainer(net, layer, method="hirescam", class_names=["a", "b"], task="softmax",
                   postprocessing=postprocess.density)  # logits per input voxel
    whole = ex(x, targets=["b"], region=box)
    sw = ex.sliding_window(x, targets=["b"], region=box, roi_size=ROI, overlap=OVERLAP,
                           mode="gaussian")  # fmt: skip
    with torch.no_grad():
        pred_sw = sliding_window_inference(x, ROI, 4, net, overlap=OVERLAP, mode="gaussian")
        pred = net(x)
    c = slice(28, 36)
    whole_map = whole.maps
    centre = (0, 0, c, c, c)
    return {
        "layer": layer,
        "map_max_abs_difference": float((sw.maps - whole_map)[centre].abs().max()),
        "map_max_abs_value": float(whole_map[centre].abs().max()),
        "prediction_max_abs_difference": float((pred_sw - pred)[0, :, c, c, c].abs().max()),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({name: measure(build) for name, build in NETS.items()}, indent=2))
