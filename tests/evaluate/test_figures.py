"""The documentation figures (docs/make_figures.py) and the "Why HiResCAM" page.

Fast tests check the committed figures and that every number the page quotes is the one in
``docs/images/figures.json`` (or ``docs/results/paper_tables.json``). The slow test
re-runs the script into a temporary folder, recomputes its measurements independently and
checks that the committed numbers are current. The napari screenshots need a display
(``gui``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
IMAGES = DOCS / "images"
PAGE = DOCS / "why_hirescam.md"
SPAN = re.compile(r'<span title="([a-z_]+\.json): ([^"]+)">([^<]+)</span>')
MAX_PNG_BYTES = 300_000


@pytest.fixture(scope="module")
def mf():
    """docs/make_figures.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_figures"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((IMAGES / "figures.json").read_text())


def _resolve(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def _check_png(path: Path) -> tuple[int, int]:
    """A real, non-blank PNG under the size limit; returns (width, height)."""
    from PIL import Image

    assert path.exists(), path
    assert 5_000 < path.stat().st_size < MAX_PNG_BYTES, (path, path.stat().st_size)
    with Image.open(path) as img:
        assert img.format == "PNG"
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert rgb.std() > 10, f"{path.name} is nearly uniform"
    return rgb.shape[1], rgb.shape[0]


# -- fast: the committed figures and the page ---------------------------------------------------
def test_committed_figures_exist_and_are_small(mf):
    for name in (*mf.PNG_NAMES, *mf.NAPARI_NAMES):
        width, height = _check_png(IMAGES / name)
        assert 300 <= width <= 2000 and 200 <= height <= 2000, (name, width, height)


def test_page_numbers_match_figures_json(mf, committed):
    text = PAGE.read_text()
    sources = {
        "figures.json": committed,
        "paper_tables.json": json.loads((DOCS / "results" / "paper_tables.json").read_text()),
    }
    spans = SPAN.findall(text)
    assert len(spans) > 40
    for source, key, shown in spans:
        value = _resolve(sources[source], key)
        if isinstance(value, str):
            assert shown == value, (key, shown, value)
        else:  # a number the page rounds: equal to the shown digits
            decimals = len(shown.split(".")[1]) if "." in shown else 0
            assert math.isclose(float(shown), value, abs_tol=0.5 * 10**-decimals + 1e-12), (
                key, shown, value)
    quoted = {key.removeprefix("quoted.") for src, key, _ in spans if src == "figures.json"}
    assert quoted == set(committed["quoted"]), set(committed["quoted"]) ^ quoted
    # the quoted strings are the formatting of the measured numbers
    assert mf.quoted_numbers(committed) == committed["quoted"]


def test_page_links_existing_images():
    text = PAGE.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "images/gradcam_vs_hirescam.png" in links and "results/shortcut.png" in links
    for link in links:
        assert (DOCS / link).exists(), link
    assert "python docs/make_figures.py --out docs/images" in text


def test_committed_numbers_say_what_the_page_says(committed):
    """The page's claims, as the committed measurements state them."""
    m = committed["measures"]["atelectasis"]
    assert m["gradcam"]["outside_body"] > 0.5 and not m["gradcam"]["peak_in_body"]
    assert m["hirescam"]["outside_body"] < 0.01 and m["hirescam"]["peak_in_finding"]
    assert m["gradcam"]["raw_positive_share"] < 0.01
    c = committed["contributions"]["atelectasis"]
    assert math.isclose(c["total"] + c["bias"], c["logit"], abs_tol=1e-4)
    assert math.isclose(sum(c["parts"].values()), c["total"], rel_tol=1e-6, abs_tol=1e-6)


# -- slow: run the script and check its numbers independently -------------------------------------
@pytest.fixture(scope="module")
def fresh(mf, tmp_path_factory):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("figures")
    run = mf.run_sample()
    numbers = mf.make_figures(out, run=run)
    return out, run, numbers


@pytest.mark.slow
def test_make_figures_writes_every_figure(mf, fresh, committed):
    out, _, numbers = fresh
    for name in mf.PNG_NAMES:
        _check_png(out / name)
    assert json.loads((out / "figures.json").read_text())["quoted"] == numbers["quoted"]
    # the committed figures.json is current: same model, same measurements
    stale = "docs/images/figures.json is stale: run `make figures` and update the page"
    assert numbers["model"]["weights_sha256"] == committed["model"]["weights_sha256"], stale
    assert numbers["quoted"] == committed["quoted"], stale
    for finding, methods in numbers["measures"].items():
        for method, entry in methods.items():
            for key, value in entry.items():
                old = committed["measures"][finding][method][key]
                if isinstance(value, float):
                    assert math.isclose(value, old, rel_tol=1e-3, abs_tol=1e-6), (
                        stale, finding, method, key)
                else:
                    assert value == old, (stale, finding, method, key)


@pytest.mark.slow
def test_outside_body_fraction_independently(fresh):
    """Recompute the outside-body shares with a body mask of our own (CT threshold, holes
    filled per slice) and on the cells from the raw maps."""
    from scipy import ndimage

    _, run, numbers = fresh
    body = np.stack([ndimage.binary_fill_holes(s > -500) for s in run.ct])
    body = np.stack([ndimage.binary_opening(s, iterations=2) for s in body])
    agree = (body == run.body).mean()
    assert agree > 0.99, agree
    for (finding, method), volume in run.maps.items():
        positive = np.clip(volume, 0, None).astype(np.float64)
        share = positive[~body].sum() / positive.sum()
        stated = numbers["measures"][finding][method]["outside_body"]
        assert abs(share - stated) < 0.02, (finding, method, share, stated)
    # on the explanation grid: each cell's positive value times its tile's share of air
    t, h, w = run.tile
    cells = run.raw[("atelectasis", "gradcam")]
    air = 1.0 - run.body.reshape(cells.shape[0], t, cells.shape[1], h, cells.shape[2], w).mean(
        axis=(1, 3, 5))
    positive = np.clip(cells, 0, None).astype(np.float64)
    share = (positive * air).sum() / positive.sum()
    stated = numbers["measures"]["atelectasis"]["gradcam"]["outside_body_cells"]
    assert math.isclose(share, stated, rel_tol=1e-5), (share, stated)


@pytest.mark.slow
def test_peaks_and_units_independently(fresh):
    import nibabel as nib

    from hirescam3d.core.methods import gradcam, hirescam

    _, run, numbers = fresh
    mask = np.asarray(nib.load(ROOT / "sample_data" / "sample_chest_atelectasis.nii.gz")
                      .dataobj) > 0
    for method in ("hirescam", "gradcam"):
        volume = run.maps[("atelectasis", method)]
        peak = np.unravel_index(np.argmax(volume), volume.shape)
        assert bool(mask[peak]) == numbers["measures"]["atelectasis"][method]["peak_in_finding"]
    assert numbers["measures"]["atelectasis"]["hirescam"]["peak_in_finding"] is True
    assert numbers["measures"]["atelectasis"]["gradcam"]["peak_in_body"] is False
    # the captured activations and gradients reproduce both raw maps
    import torch

    a = torch.from_numpy(run.acts)[None]
    g = torch.from_numpy(run.grads["atelectasis"])[None]
    np.testing.assert_allclose(hirescam(a, g)[0].numpy(), run.raw[("atelectasis", "hirescam")],
                               atol=1e-5)
    np.testing.assert_allclose(gradcam(a, g)[0].numpy(), run.raw[("atelectasis", "gradcam")],
                               atol=1e-6)
    # HiResCAM's cells add up to the logit minus the bias
    c = numbers["contributions"]["atelectasis"]
    assert math.isclose(float(run.raw[("atelectasis", "hirescam")].sum()), c["total"],
                        rel_tol=1e-4)
    assert math.isclose(c["total"] + c["bias"], c["logit"], abs_tol=1e-4)


# -- gui: the napari screenshots ----------------------------------------------------------------
@pytest.fixture
def napari_plugin(request):
    """This plugin registered from its manifest (as tests/napari/test_napari_gui.py does)."""
    pytest.importorskip("napari", reason="napari is not installed (pip install hirescam3d[napari])")
    pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
    if not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.skip("napari canvases need an X display with OpenGL: run under xvfb-run")
    npe2pm = request.getfixturevalue("npe2pm")
    manifest = ROOT / "hirescam3d" / "napari" / "napari.yaml"
    with npe2pm.tmp_plugin(manifest=str(manifest)):
        yield npe2pm


@pytest.mark.gui
@pytest.mark.slow
def test_napari_screenshots(mf, napari_plugin, request, tmp_path, monkeypatch):
    monkeypatch.setenv("HIRESCAM3D_CACHE", str(tmp_path / "cache"))
    viewer = request.getfixturevalue("make_napari_viewer")(show=True)
    info = mf.napari_screenshots(tmp_path, viewer=viewer)
    assert info["status"].startswith("done")
    for name in mf.NAPARI_NAMES:
        width, height = _check_png(tmp_path / name)
        assert width >= 800 and height >= 600
    assert [layer.name for layer in viewer.layers][-1] == "atelectasis · hirescam"
