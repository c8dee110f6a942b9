"""napari plugin in a shown viewer (run under Xvfb): widget end to end and a screenshot test.

Run as ``xvfb-run -a -s "-screen 0 1280x1024x24" pytest tests/napari/test_napari_gui.py``. Set
``HIRESCAM3D_SCREENSHOTS=DIR`` to keep the screenshots for a look.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install hirescam3d[napari])")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
if not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
    pytest.skip(
        "napari canvases need an X display with OpenGL: run under xvfb-run",
        allow_module_level=True,
    )

from hirescam3d.models import zoo  # noqa: E402
from hirescam3d.napari import _layers  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]

MANIFEST = Path(__file__).resolve().parents[2] / "hirescam3d" / "napari" / "napari.yaml"
FINDING = "atelectasis"
WORKER_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private sample cache shared by this module's tests."""
    folder = tmp_path_factory.mktemp("hirescam3d-cache")
    previous = os.environ.get("HIRESCAM3D_CACHE")
    os.environ["HIRESCAM3D_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("HIRESCAM3D_CACHE", None)
    else:
        os.environ["HIRESCAM3D_CACHE"] = previous


@pytest.fixture(scope="module")
def sample(cache):
    from hirescam3d.napari._sample_data import sample_files

    return sample_files()


@pytest.fixture
def plugin(npe2pm):
    """This plugin registered from its manifest, whether or not the package is installed."""
    with npe2pm.tmp_plugin(manifest=str(MANIFEST)):
        yield npe2pm


def _save(image: np.ndarray, name: str, tmp_path: Path) -> Path:
    from imageio.v3 import imwrite

    folder = Path(os.environ.get("HIRESCAM3D_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    imwrite(path, image)
    return path


def _grid(viewer):
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def test_explain_widget_end_to_end(make_napari_viewer, plugin, qtbot, sample, tmp_path):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer(show=True)
    ct = viewer.open(str(sample["scan"]), plugin="hirescam3d")[0]
    organs = viewer.open(str(sample["organs"]), plugin="hirescam3d")[0]
    assert type(ct).__name__ == "Image" and type(organs).__name__ == "Labels"
    assert tuple(ct.scale) == (3.0, 2.5, 2.5) and ct.data.shape == (96, 128, 128)
    names = set(organs.features["name"])
    assert {"right_lung", "left_lung", "heart"} <= names
    np.testing.assert_allclose(
        organs.get_color(1)[:3], _layers.ORGAN_COLORS["right_lung"], atol=1e-6
    )

    _, widget = viewer.window.add_plugin_dock_widget("hirescam3d", "Explain")
    assert widget.ct_combo.currentText() == ct.name
    widget.model_combo.setCurrentText("demo")
    assert FINDING in [widget.findings_list.item(i).text() for i in range(5)]
    widget.set_findings([FINDING])
    widget.set_methods(["hirescam", "gradcam"])
    widget.organs_combo.setCurrentText(organs.name)

    # Bad inputs: a message in the widget, no worker; a bad model fails in the worker.
    widget.set_findings([])
    assert widget.run() is None and "check at least one finding" in widget.status.text()
    widget.set_findings([FINDING])
    widget.model_combo.setCurrentText(str(tmp_path / "no_bundle"))
    assert widget.run() is None and "no_bundle: not a model bundle" in widget.status.text()
    broken = tmp_path / "broken_bundle"  # metadata but no network config or weights
    (broken / "configs").mkdir(parents=True)
    (broken / "configs" / "metadata.json").write_text('{"hirescam3d": {"class_names": ["x"]}}')
    widget.model_combo.setCurrentText(str(broken))
    assert widget.findings() == ["x"]
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WORKER_TIMEOUT_MS)
    assert widget.status.text().startswith("error:"), widget.status.text()
    assert "broken_bundle" in widget.status.text()
    widget.model_combo.setCurrentText("demo")
    widget.set_findings([FINDING])

    # Cancel right after starting: no layers, status says so, buttons come back.
    n_layers = len(viewer.layers)
    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WORKER_TIMEOUT_MS)
    assert widget.status.text() == "cancelled" and len(viewer.layers) == n_layers
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    # The GUI thread keeps running while the worker explains: a 20 ms timer keeps ticking.
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    start = time.perf_counter()
    widget.run()
    assert not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WORKER_TIMEOUT_MS)
    timer.stop()
    elapsed = time.perf_counter() - start
    gaps = np.diff([start, *ticks])
    assert widget.status.text().startswith("done"), widget.status.text()
    print(f"worker {elapsed:.1f} s, {len(ticks)} timer ticks, longest gap {gaps.max():.2f} s")
    assert len(ticks) >= 3 and gaps.max() < 2.0, (elapsed, len(ticks), gaps.max())

    for method in ("hirescam", "gradcam"):
        layer = viewer.layers[f"{FINDING} · {method}"]
        assert layer.data.shape == ct.data.shape
        np.testing.assert_allclose(layer.scale, ct.scale)
        np.testing.assert_allclose(layer.translate, ct.translate)
        assert tuple(layer.contrast_limits) == (0.0, 1.0)
        assert layer.colormap.name == _layers.HEAT_COLORMAP
        assert str(layer.blending) == "additive" and layer.opacity == pytest.approx(0.5)
        assert 0.0 <= layer.data.min() and layer.data.max() <= 1.0 and layer.data.max() > 0
        entry = layer.metadata["hirescam3d"]
        assert (entry["finding"], entry["method"]) == (FINDING, method)
        assert entry["kind"] == "explanation"
        np.testing.assert_allclose(entry["affine"], ct.metadata["hirescam3d"]["affine"])

    # Probabilities of every class; attention per organ for both maps.
    table = widget.prob_table
    rows = {table.item(r, 0).text().rstrip(" *"): float(table.item(r, 1).text())
            for r in range(table.rowCount())}
    assert set(rows) == set(zoo.CHEST_FINDINGS) and all(0 <= p <= 1 for p in rows.values())
    n_organs = widget.organ_table.rowCount()
    organ_rows = [widget.organ_table.item(r, 0).text() for r in range(n_organs)]
    assert {"right_lung", "left_lung", "heart"} <= set(organ_rows)
    headers = [widget.organ_table.horizontalHeaderItem(c).text() for c in (1, 2)]
    assert headers == [f"{FINDING} · hirescam", f"{FINDING} · gradcam"]
    shares = [
        float(widget.organ_table.item(r, 1).text().rstrip(" %")) for r in range(len(organ_rows))
    ]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)  # organs + outside = all attention

    # The slider sits on the slice with the most HiResCAM attention.
    hires = viewer.layers[f"{FINDING} · hirescam"].data
    best = int(np.argmax(hires.reshape(hires.shape[0], -1).sum(axis=1)))
    assert viewer.dims.point[0] == pytest.approx(ct.translate[0] + best * ct.scale[0])

    # Grid mode: Grad-CAM | HiResCAM, each over its own copy of the CT.
    widget.grid_box.setChecked(True)
    grid = _grid(viewer)
    assert grid.enabled and grid.stride == -2
    top = [layer.name for layer in viewer.layers][-4:]
    assert top == [
        f"{ct.name} [{FINDING} · hirescam]", f"{FINDING} · hirescam",
        f"{ct.name} [{FINDING} · gradcam]", f"{FINDING} · gradcam",
    ]
    assert not ct.visible and not organs.visible
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    _save(shot, "grid.png", tmp_path)
    half = shot.shape[1] // 2
    assert shot[..., :3].mean(axis=(0, 1)).sum() > 0  # something is drawn
    # both halves show a CT (not one empty viewbox)
    assert shot[:, :half, :3].mean() > 10 and shot[:, half:, :3].mean() > 10
    widget.grid_box.setChecked(False)
    assert not grid.enabled and ct.visible and organs.visible
    assert len([ly for ly in viewer.layers if "[" in ly.name]) == 0

    # Signed maps: logit contributions with a diverging colormap centred on 0.
    widget.set_methods(["hirescam"])
    widget.values_combo.setCurrentText("logit")
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WORKER_TIMEOUT_MS)
    assert widget.status.text().startswith("done"), widget.status.text()
    layer = viewer.layers[f"{FINDING} · hirescam"]
    top = float(np.abs(layer.data).max())
    assert layer.data.min() < 0 < layer.data.max()  # evidence for and against
    assert tuple(layer.contrast_limits) == pytest.approx((-top, top))
    assert layer.colormap.name == "hirescam3d_signed"
    np.testing.assert_allclose(layer.colormap.map(np.array([0.5]))[0], [0, 0, 0, 1])


def _camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _canvas_box(viewer, shot_shape, world_lo, world_hi, margin_mm=0.0):
    """Canvas pixel box ``(row0, row1, col0, col1)`` of a world (P, L) mm rectangle grown
    by ``margin_mm``, for the 2D view of axes (P, L), clipped to the canvas."""
    camera = _camera(viewer)
    height, width = viewer.canvas.size
    center = np.asarray(camera.center[-2:], dtype=float)
    zoom = camera.zoom * np.array([shot_shape[0] / height, shot_shape[1] / width])
    mid = np.array(shot_shape[:2]) / 2
    lo = (np.asarray(world_lo) - margin_mm - center) * zoom + mid
    hi = (np.asarray(world_hi) + margin_mm - center) * zoom + mid
    r0, c0 = np.clip(np.floor(lo).astype(int), 0, None)
    r1, c1 = np.minimum(np.ceil(hi).astype(int), shot_shape[:2])
    return r0, r1, c0, c1


def _planted_heat(viewer, sample):
    """An "explanation" whose location is known: the smoothed planted finding mask."""
    import nibabel as nib
    from scipy import ndimage

    from hirescam3d.napari._reader import read_path

    mask = np.asarray(nib.load(str(sample[FINDING])).dataobj).astype(np.float32)
    (_, kwargs, _), = read_path(sample[FINDING], kind="explanation")
    heat = ndimage.gaussian_filter(mask, 1.0)
    kwargs["name"] = f"{FINDING} · planted"
    return viewer.add_image(heat / heat.max(), **kwargs)


def _screenshots(viewer, qtbot, heat, z, ct):
    """Canvas without and with ``heat`` on slice ``z``: (plain, overlaid, diff) arrays."""
    viewer.dims.set_point(0, ct.translate[0] + z * ct.scale[0])
    viewer.reset_view()
    heat.visible = False
    qtbot.wait(100)
    plain = viewer.screenshot(canvas_only=True, flash=False).astype(np.int16)
    heat.visible = True
    qtbot.wait(100)
    overlaid = viewer.screenshot(canvas_only=True, flash=False).astype(np.int16)
    diff = np.abs(overlaid[..., :3] - plain[..., :3]).sum(axis=-1)
    return plain, overlaid, diff


def _draw_boxes(image, boxes):
    out = image.astype(np.uint8).copy()
    for (a, b, c, d), colour in boxes:
        out[a:b, [c, d - 1], :3] = colour
        out[[a, b - 1], c:d, :3] = colour
    return out


def test_overlay_changes_the_canvas_only_at_the_planted_finding(
    make_napari_viewer, plugin, qtbot, sample, tmp_path
):
    """Rendering geometry with a map of known location: the finding's own mask, smoothed."""
    import nibabel as nib

    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("hirescam3d", "chest_ct")
    assert [ly.name for ly in layers] == ["sample_chest_ct", "sample_chest_organs"]
    ct = layers[0]
    layers[1].visible = False
    heat = _planted_heat(viewer, sample)
    mask_img = nib.load(str(sample[FINDING]))
    mask = np.asarray(mask_img.dataobj) > 0  # the sample is stored in SPL order
    assert mask.shape == ct.data.shape == heat.data.shape
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    plain, overlaid, diff = _screenshots(viewer, qtbot, heat, z, ct)

    box, far_box = _finding_boxes(viewer, diff.shape, mask_img, z, margin_mm=10.0)
    _save(plain.astype(np.uint8), "planted_ct.png", tmp_path)
    _save(_draw_boxes(overlaid, [(box, (0, 255, 0)), (far_box, (255, 0, 0))]),
          "planted_overlay_boxes.png", tmp_path)
    inside, far = _changed_inside_and_far(diff, box, far_box)
    assert inside > 0.5, f"finding box: {inside:.2f} changed"
    assert far < 0.01, f"{far:.3f} of far pixels changed"


def _finding_boxes(viewer, shape, mask_img, z, margin_mm):
    """Canvas boxes of the finding on slice ``z`` (world mm from the mask file's affine,
    independent of napari's layer transforms): tight, and grown by ``margin_mm``."""
    mask = np.asarray(mask_img.dataobj) > 0
    rows, cols = np.nonzero(mask[z])
    spl_from_ras = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    corners = np.array(
        [[z, rows.min() - 0.5, cols.min() - 0.5, 1], [z, rows.max() + 0.5, cols.max() + 0.5, 1]]
    )
    world = (spl_from_ras @ (mask_img.affine @ corners.T)[:3]).T[:, 1:]
    lo, hi = world.min(axis=0), world.max(axis=0)
    return _canvas_box(viewer, shape, lo, hi), _canvas_box(viewer, shape, lo, hi, margin_mm)


def _changed_inside_and_far(diff, box, far_box, threshold=30):
    """Fractions of changed pixels inside ``box`` and outside ``far_box``."""
    changed = diff > threshold
    r0, r1, c0, c1 = box
    inside = changed[r0:r1, c0:c1]
    assert inside.size > 100, "the finding box is (almost) off the canvas"
    far = np.ones(diff.shape, bool)
    r0, r1, c0, c1 = far_box
    far[r0:r1, c0:c1] = False
    return float(inside.mean()), float(changed[far].mean())


def _map_on_canvas(viewer, layer, z, shape):
    """The value of ``layer`` on slice ``z`` under each canvas pixel (NaN off the volume)."""
    camera = _camera(viewer)
    height, width = viewer.canvas.size
    zoom = camera.zoom * np.array([shape[0] / height, shape[1] / width])
    center = np.asarray(camera.center[-2:], dtype=float)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    world_p = center[0] + (rows - shape[0] / 2) / zoom[0]
    world_l = center[1] + (cols - shape[1] / 2) / zoom[1]
    j = np.rint((world_p - layer.translate[1]) / layer.scale[1]).astype(int)
    k = np.rint((world_l - layer.translate[2]) / layer.scale[2]).astype(int)
    ok = (j >= 0) & (j < layer.data.shape[1]) & (k >= 0) & (k < layer.data.shape[2])
    out = np.full(shape, np.nan)
    out[ok] = np.asarray(layer.data[z])[j[ok], k[ok]]
    return out


def test_demo_model_overlay_changes_the_canvas_where_its_map_is_high(
    make_napari_viewer, plugin, qtbot, sample, tmp_path
):
    """The sample's HiResCAM map (demo model) brightens the CT exactly where it is high.

    Where the demo model looks is the model's business (benchmarks/demo_quality.py); this
    checks that the plugin shows the real model's map where it belongs on the canvas.
    """
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("hirescam3d", "chest_ct_explained")
    assert [ly.name for ly in layers] == [
        "sample_chest_ct", "sample_chest_organs", f"{FINDING} · gradcam", f"{FINDING} · hirescam"
    ]
    assert [ly.visible for ly in layers] == [True, True, False, True]
    ct, heat = layers[0], layers[3]
    layers[1].visible = False
    z = int(np.argmax(heat.data.reshape(heat.data.shape[0], -1).sum(axis=1)))
    plain, overlaid, diff = _screenshots(viewer, qtbot, heat, z, ct)
    _save(plain.astype(np.uint8), "demo_ct.png", tmp_path)
    _save(overlaid.astype(np.uint8), "demo_ct_hirescam.png", tmp_path)
    values = _map_on_canvas(viewer, heat, z, diff.shape)
    changed = diff > 30
    white = (plain[..., :3] >= 250).all(axis=-1)  # saturated CT (bone) cannot brighten
    high = (values >= 0.5) & ~white
    low = values < 0.02
    assert high.sum() > 100, "the map is not high anywhere on its own best slice"
    assert changed[high].mean() > 0.9, f"{changed[high].mean():.3f} of high pixels changed"
    assert changed[low].mean() < 0.01, f"{changed[low].mean():.3f} of zero-map pixels changed"


def test_view_command_opens_aligned_layers_and_the_widget(
    make_napari_viewer, monkeypatch, sample, tmp_path
):
    import napari
    import nibabel as nib
    import typer
    from typer.testing import CliRunner

    from hirescam3d.io.outputs import write_explanation

    try:
        from hirescam3d.cli.view import view
    except ImportError:  # source tree without an install: cli/ is a top-level package
        import sys

        sys.path.insert(0, str(MANIFEST.parents[2]))
        from cli.view import view

    mask_img = nib.load(str(sample[FINDING]))
    heat = tmp_path / f"sample_chest_ct_{FINDING}_hirescam.nii.gz"
    write_explanation(heat, np.asarray(mask_img.dataobj, np.float32), mask_img.affine, "hirescam")
    viewers = []

    def new_viewer():
        viewers.append(make_napari_viewer())
        return viewers[-1]

    monkeypatch.setattr(napari, "Viewer", new_viewer)
    monkeypatch.setattr(napari, "run", lambda: None)
    app = typer.Typer()
    app.command()(view)
    args = [str(sample["scan"]), "--explanation", str(heat), "--organs", str(sample["organs"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    viewer = viewers[0]
    assert [ly.name for ly in viewer.layers] == [
        "sample_chest_ct", "sample_chest_organs", f"{FINDING} · hirescam"
    ]
    for layer in viewer.layers:
        np.testing.assert_allclose(layer.scale, (3.0, 2.5, 2.5))
        np.testing.assert_allclose(layer.translate, viewer.layers[0].translate)
    assert "heart" in set(viewer.layers["sample_chest_organs"].features["name"])
    assert type(viewer.window.dock_widgets["Explain"]).__name__ == "ExplainWidget"
    z = int(np.argmax(np.asarray(mask_img.dataobj).sum(axis=(1, 2))))
    ct = viewer.layers[0]
    assert viewer.dims.point[0] == pytest.approx(ct.translate[0] + z * ct.scale[0])
