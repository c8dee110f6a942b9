"""HiResCAMd inside a published MONAI bundle, run by MONAI's own runner (issue 22, item 5).

The Model Zoo's ``spleen_ct_segmentation/configs/inference.json`` (unchanged copy) gets,
through a second config file that ``monai.bundle.run`` merges (``+postprocessing#
transforms`` appends), ``HiResCAMd`` with ``"model": "@network"``, ``"inferer":
"@inferer"`` (the bundle's 96^3 ``SlidingWindowInferer``) and ``region="predicted"``, then
``Invertd`` and ``SaveImaged``. Weights: seeded random, made from the config's own
``network_def`` by MONAI's ``ConfigParser``. The scan: a phantom NIfTI whose axes are
S, P, L (as from DICOM), not the bundle's RAS 1.5 x 1.5 x 2 mm grid.
Oracle: the map MONAI writes must be finite, non-empty, on the scan's grid, and equal to
the sliding-window explanation computed here directly on the bundle's own preprocessing
of the scan.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("ignite", reason="monai.bundle.run's evaluator needs pytorch-ignite")

BUNDLE = Path(__file__).resolve().parents[1] / "fixtures" / "model_zoo" / "spleen_ct_segmentation"
MAP_KEY = "spleen_hirescam"
LAYER = "model.2.0"  # the last up-convolution: only the final (linear) residual unit follows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _bundle_with_weights(tmp_path: Path) -> Path:
    from monai.bundle import ConfigParser

    root = tmp_path / "spleen_ct_segmentation"
    shutil.copytree(BUNDLE, root)
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (root / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def _extra_config(tmp_path: Path, scan: Path, out: Path) -> Path:
    extra = {
        "dataset_dir": str(scan.parent),
        "datalist": [str(scan)],
        "output_dir": str(out),
        "+postprocessing#transforms": [
            {
                "_target_": "hirescam3d.monai.transforms.HiResCAMd",
                "keys": "@image_key",
                "model": "@network",
                "target_layer": LAYER,
                "inferer": "@inferer",
                "findings": ["spleen"],
                "class_names": ["background", "spleen"],
                "region": "predicted",
                "task": "softmax",
                "values": "density",
            },
            {
                "_target_": "Invertd",
                "keys": MAP_KEY,
                "transform": "@preprocessing",
                "orig_keys": "@image_key",
                "nearest_interp": False,
            },
            {
                "_target_": "SaveImaged",
                "keys": MAP_KEY,
                "output_dir": "@output_dir",
                "output_postfix": MAP_KEY,
                "separate_folder": False,
                "resample": False,
                "print_log": False,
            },
        ],
    }
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(extra, indent=2))
    return path


def test_hirescamd_in_spleen_bundle_under_monai_bundle_run(tmp_path):
    from monai.bundle import ConfigParser, run

    from hirescam3d.data.phantom import make_chest_ct
    from hirescam3d.monai.transforms import HiResCAMd

    root = _bundle_with_weights(tmp_path)
    published = (BUNDLE / "configs" / "inference.json").read_text()
    scan = make_chest_ct(seed=3, shape=(64, 96, 96), spacing=(3.0, 1.5, 1.5)).save(
        tmp_path / "scans", "chest"
    )["ct"]
    out = tmp_path / "eval"
    extra = _extra_config(tmp_path, scan, out)
    config = [str(root / "configs" / "inference.json"), str(extra)]
    run(
        run_id="run", init_id="initialize", config_file=config, bundle_root=str(root),
        **{"dataloader#num_workers": 0},
    )  # fmt: skip
    assert (BUNDLE / "configs" / "inference.json").read_text() == published  # unchanged

    written = sorted(out.rglob(f"*{MAP_KEY}*.nii.gz"))
    assert len(written) == 1, sorted(p.name for p in out.rglob("*"))
    heat = nib.load(written[0])
    ct = nib.load(scan)
    values = np.asarray(heat.dataobj, dtype=np.float64)
    assert heat.shape[:3] == ct.shape  # back on the scan's grid through Invertd
    assert np.allclose(heat.affine, ct.affine, atol=1e-3)
    assert np.isfinite(values).all() and np.abs(values).max() > 0

    # Oracles, on the bundle's own preprocessing of the scan (MONAI's parser):
    # 1. at this layer the density map sums to the spleen logits summed over the spleen
    #    MONAI's own SlidingWindowInferer predicts, minus the bias per voxel x its size;
    # 2. inverting it with MONAI's Invertd gives the file monai.bundle.run wrote.
    from monai.transforms import Invertd

    from hirescam3d.core.audit import audit_layer

    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network").eval()
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    preprocessing = parser.get_parsed_content("preprocessing")
    item = preprocessing({"image": str(scan)})
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        logits = inferer(item["image"].as_tensor()[None], network)[0]
    mask = logits.argmax(0) == 1
    assert 0 < int(mask.sum()) < mask.numel()
    verdict = audit_layer(network, LAYER, (1, *item["image"].shape[1:]))
    assert verdict.guaranteed
    transform = HiResCAMd("image", model=network, target_layer=LAYER, findings=["spleen"],
                          inferer=inferer, class_names=["background", "spleen"],
                          region="predicted", task="softmax", values="density")  # fmt: skip
    explained = transform(item)
    total = float(explained[MAP_KEY].as_tensor().double().sum())
    score = float(logits[1][mask].double().sum())
    assert total == pytest.approx(score - verdict.bias[1] * int(mask.sum()), rel=1e-3, abs=1e-2)
    inverted = Invertd(MAP_KEY, transform=preprocessing, orig_keys="image",
                       nearest_interp=False)(explained)[MAP_KEY]  # fmt: skip
    np.testing.assert_allclose(np.asarray(inverted)[0], values.reshape(ct.shape),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
