"""The napari widget with a segmentation model: the predicted region comes back as a
Labels layer on the CT's grid, and painting it re-explains with the painted region.

The worker's job (``_explain``) is checked without a display; the widget itself needs an X
display (run under ``xvfb-run``, as ``test_napari_gui``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("napari", reason="napari is not installed (pip install hirescam3d[napari])")

from hirescam3d.errors import InputError  # noqa: E402
from hirescam3d.napari._widget import _explain  # noqa: E402
from tests.cli.test_segmentation_cli import (  # noqa: E402
    CLASSES,
    MODEL_SPACING,
    bundle,
    ct_volume,
    network,
    window,
)
from tests.models.test_user_bundles import UNET_ARGS, seeded  # noqa: E402

WORKER_TIMEOUT_MS = 120_000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def state():
    from monai.networks.nets import UNet

    return seeded(UNet, 0, **UNET_ARGS).state_dict()


@pytest.fixture(scope="module")
def ras_scan():
    """A RAS scan at the model's spacing: the model's input is the scan, windowed."""
    ct = ct_volume((24, 20, 16), seed=3)
    affine = np.diag([*MODEL_SPACING, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.0]
    return ct, affine


def oracle(state, ct) -> torch.Tensor:
    with torch.no_grad():
        return network(state)(torch.from_numpy(window(ct))[None, None])[0].double()


def test_explain_job_returns_the_predicted_region_and_takes_a_painted_one(
    tmp_path, state, ras_scan
):
    ct, affine = ras_scan
    model = str(bundle(tmp_path, state, "softmax", patch=False))
    logits = oracle(state, ct)
    models: dict = {}

    def quiet(*_):
        return None

    result = _explain(ct, affine, model, ["liver"], ["hirescam"], None, None, None, quiet,
                      models)  # fmt: skip
    expected = (logits.argmax(0) == CLASSES.index("liver")).numpy()
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(result.masks["liver"], expected.astype(np.uint8))
    painted = np.zeros(ct.shape, bool)
    painted[2:9, 3:12, 4:10] = True
    result = _explain(ct, affine, model, ["liver"], ["hirescam"], None, None, None, quiet,
                      models, "unit", painted)  # fmt: skip
    assert result.masks == {}
    probs = torch.softmax(logits, 0)[1][torch.from_numpy(painted)]
    assert result.probabilities["liver"] == pytest.approx(float(probs.mean()), rel=1e-5)
    assert result.maps[("liver", "hirescam")].shape == ct.shape
    with pytest.raises(InputError, match="a region applies to segmentation models"):
        _explain(np.zeros((48, 64, 64), np.float32), np.diag([6.0, 5.0, 5.0, 1.0]),
                 "axialnet_tiny", ["atelectasis"], ["hirescam"], None, None, None, quiet, {},
                 "unit", np.ones((48, 64, 64), bool))  # fmt: skip


@pytest.mark.gui
@pytest.mark.skipif(
    not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen",
    reason="napari canvases need an X display with OpenGL: run under xvfb-run",
)
def test_widget_shows_the_region_and_re_explains_when_painted(
    make_napari_viewer, qtbot, tmp_path, state, ras_scan
):
    import nibabel as nib

    from hirescam3d.napari._layers import display_geometry, to_display
    from hirescam3d.napari._widget import PREDICTED, ExplainWidget

    ct, affine = ras_scan
    model = str(bundle(tmp_path, state, "softmax", patch=False))
    viewer = make_napari_viewer(show=True)
    shown, shown_affine = to_display(ct, affine)  # napari shows S, P, L axes
    layer = viewer.add_image(shown, name="ct", **display_geometry(shown_affine))
    # RAS (the scan, the model's grid) -> SPL (the layer), by nibabel's orientation tools
    to_spl = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("SPL")
    )

    def on_layer(volume: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(volume, to_spl)

    np.testing.assert_array_equal(on_layer(ct), shown)
    widget = ExplainWidget(viewer)
    widget.model_combo.setCurrentText(model)
    widget.set_findings(["liver"])
    widget.set_methods(["hirescam"])
    assert widget.region_combo.currentText() == PREDICTED
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WORKER_TIMEOUT_MS)
    assert widget.status.text().startswith("done"), widget.status.text()
    region = viewer.layers["liver region"]
    assert type(region).__name__ == "Labels"
    np.testing.assert_allclose(region.scale, layer.scale)
    np.testing.assert_allclose(region.translate, layer.translate)
    expected = on_layer((oracle(state, ct).argmax(0) == 1).numpy().astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(region.data), expected)
    first = np.array(viewer.layers["liver · hirescam"].data)
    # Paint: erase the predicted mask, draw one small box: the widget re-explains it.
    region.data = np.zeros_like(expected)
    region.selected_label = 1
    region.brush_size = 3
    region.paint((12, 10, 8), 1)
    qtbot.waitUntil(lambda: widget.worker is not None or widget.result is None, timeout=5000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WORKER_TIMEOUT_MS)
    assert widget.region_combo.currentText() == "liver region"
    assert widget.status.text().startswith("done"), widget.status.text()
    painted = np.asarray(region.data) != 0
    assert 0 < painted.sum() < 100  # the user's region, kept
    probs = torch.softmax(oracle(state, ct), 0)[1].numpy()
    probs = on_layer(probs)[painted]
    assert widget.result.probabilities["liver"] == pytest.approx(float(probs.mean()), rel=1e-4)
    assert not np.array_equal(np.array(viewer.layers["liver · hirescam"].data), first)
