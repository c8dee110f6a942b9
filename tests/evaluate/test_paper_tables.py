"""benchmarks/paper_tables.py: its exact-contribution oracles, Table 1's claim on small
networks, and the shipped shortcut model's behaviour."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hirescam3d.core.explainer import Explainer
from hirescam3d.core.trace import AxisGeometry, LayerGeometry
from hirescam3d.data.phantom import FINDINGS, make_chest_ct
from hirescam3d.evaluate import metrics
from hirescam3d.models import zoo
from hirescam3d.models.bundle import apply_window
from hirescam3d.models.handle import ModelHandle
from hirescam3d.models.nets.axialnet import axialnet_tiny
from hirescam3d.models.nets.voc import VOCNet

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pt():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "benchmarks" /
                                                  "paper_tables.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(ROOT / "benchmarks"))


def test_exact_contributions_add_up_to_the_logits(pt):
    torch.manual_seed(0)
    voc = VOCNet("resnet34", class_names=("a", "b", "c"), input_size=(96, 96)).eval()
    x = torch.rand(2, 3, 96, 96)
    exact = pt.exact_vocnet(voc, x)
    assert exact.shape == (2, 3, *voc.grid)
    with torch.no_grad():
        logits = voc(x)
    torch.testing.assert_close(exact.sum((2, 3)) + voc.fc.bias, logits, atol=1e-4, rtol=1e-4)

    ax = axialnet_tiny(("a", "b")).eval()
    v = torch.rand(1, 1, 12, 128, 128)
    exact = pt.exact_axialnet(ax, v)
    assert exact.shape == (1, 2, 4, *ax.grid[1:])
    with torch.no_grad():
        logits = ax(v)
    torch.testing.assert_close(exact.sum((2, 3, 4)) + ax.fc.bias, logits, atol=1e-4, rtol=1e-4)


def test_table1_claim_on_a_small_network(pt):
    """HiResCAM equals the exact contributions (l2 ~ 0); Grad-CAM does not."""
    torch.manual_seed(1)
    voc = VOCNet("resnet34", class_names=("a", "b", "c", "d"), input_size=(96, 96)).eval()
    x = torch.rand(3, 3, 96, 96)
    rows = pt.l2_rows(voc, "head", x, [0, 1, 2, 3], pt.exact_vocnet(voc, x))
    assert rows["hirescam"].shape == (3, 4)
    assert float(rows["hirescam"].max()) < 1e-5
    assert float(rows["gradcam"].min()) > 1e-2


def test_cells_touching_any_voxel(pt):
    geometry = LayerGeometry(
        grid_shape=(2, 2, 2),
        input_shape=(8, 8, 8),
        axes=tuple(AxisGeometry(axis=d, first=1.5, step=4.0, extent=4.0) for d in range(3)),
    )
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[5, 0, 3] = True  # in the tile of cell (1, 0, 0)
    got = pt.cells_touching(mask, geometry)
    expected = torch.zeros(2, 2, 2, dtype=torch.bool)
    expected[1, 0, 0] = True
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_shipped_shortcut_model_reads_the_marker():
    """demo_shortcut calls a nodule from the marker alone, and HiResCAM shows it."""
    network, info = ModelHandle.resolve("demo_shortcut").load()
    assert info.bundle_path == zoo.SHORTCUT_BUNDLE
    k = FINDINGS.index("nodule")
    explainer = Explainer(network, info.target_layer)
    prob = {}
    for marker in (True, False):
        p = make_chest_ct(7, findings=(), marker=marker)
        x = apply_window(p.ct, info.input.window)[None, None]
        res = explainer.explain(x, targets=[k], methods=["hirescam"])["hirescam"]
        prob[marker] = float(torch.sigmoid(res.scores[0, k]))
        if marker:
            # the largest positive contribution sits in a cell holding marker voxels
            from hirescam3d.core.postprocess import pool_to_cells

            cells = pool_to_cells(torch.from_numpy(p.marker).float()[None], res.geometry)[0]
            top = torch.argmax(res.raw[0, 0])
            assert float(cells.flatten()[top]) > 0
            share = metrics.relevance_mass(res.raw, (cells > 0)[None, None])
            assert float(share) > 0.5
    assert prob[True] > 0.5 > prob[False]
