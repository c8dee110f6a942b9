"""How far hirescam3d's drop-in GradCAM is from MONAI's, by design (issue 27, point 8;
docs/monai_pipeline.md): Pearson correlation of the two heatmaps with the defaults (our
geometry placement and [0, 1] normaliser vs MONAI's stretching and inverted normaliser,
compared as 1 - MONAI's map), and the largest difference when ours is given MONAI's own
``default_upsampler`` and ``default_normalizer``. Seeded random weights, a 64^3 random
input, the last feature block. Run: ``python benchmarks/monai_placement.py``.
"""

from __future__ import annotations

import json

import torch
from monai.networks.nets import DenseNet121, resnet18
from monai.visualize import GradCAM as MonaiGradCAM
from monai.visualize.class_activation_maps import default_normalizer, default_upsampler

from hirescam3d.monai.visualize import GradCAM

NETS = {
    "DenseNet121": (lambda: DenseNet121(3, 1, 3), "class_layers.relu"),
    "resnet18": (lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=3), "layer4"),
}


def measure(build, layer: str) -> dict[str, object]:
    torch.manual_seed(0)
    net = build().eval()
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    out: dict[str, object] = {"layer": layer}
    for c in range(3):
        theirs = MonaiGradCAM(nn_module=net, target_layers=layer)(x, class_idx=c)
        ours = GradCAM(nn_module=net, target_layers=layer)(x, class_idx=c)
        exact = GradCAM(nn_module=net, target_layers=layer, upsampler=default_upsampler,
                        postprocessing=default_normalizer)(x, class_idx=c)  # fmt: skip
        flipped = (1 - theirs).flatten()  # MONAI's normaliser puts the maximum at 0
        if float(ours.std()) == 0:  # no positive evidence: nothing to correlate
            corr = None
        else:
            corr = round(float(torch.corrcoef(torch.stack([ours.flatten(), flipped]))[0, 1]), 3)
        out[f"class_{c}"] = {
            "correlation_default": corr,
            "max_abs_difference_with_monai_upsampler": float((exact - theirs).abs().max()),
        }
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({n: measure(b, layer) for n, (b, layer) in NETS.items()}, indent=2))
