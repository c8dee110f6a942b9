"""napari sample data: the demo chest CT, its organs, and HiResCAM / Grad-CAM maps.

Nothing is shipped besides the model: the CT is the fixed-seed phantom of
:mod:`hirescam3d.data.sample`, and the maps of atelectasis are computed with the demo model on
first use (a few seconds on a CPU) and cached. Cache folder: ``$HIRESCAM3D_CACHE`` or
``$XDG_CACHE_HOME/hirescam3d`` (default ``~/.cache/hirescam3d``), sub-folder
``napari-sample``; explanation files are keyed by the model's weights checksum, so new
weights never show stale maps. The files are exactly what ``hirescam3d sample`` and
``hirescam3d explain`` write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hirescam3d.data.sample import SAMPLE_STEM, sample_paths, write_sample
from hirescam3d.napari import _layers
from hirescam3d.napari._reader import read_path

SAMPLE_FINDING = "atelectasis"
SAMPLE_METHODS = ("gradcam", "hirescam")  # bottom to top; Grad-CAM starts hidden
SAMPLE_VERSION = "1"


def cache_dir() -> Path:
    """Folder holding the sample files (created on demand)."""
    root = os.environ.get("HIRESCAM3D_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "hirescam3d"
    return base / "napari-sample"


def sample_files() -> dict[str, Path]:
    """The demo scan files (written once into the cache): keys as in ``write_sample``."""
    folder = cache_dir() / f"scan-v{SAMPLE_VERSION}"
    paths = sample_paths(folder)
    if not all(p.exists() for p in paths.values()):
        write_sample(folder, force=True)
    return paths


def explanation_files(model: str = "demo") -> dict[str, Path]:
    """``{method: NIfTI}`` of the sample's atelectasis maps, computed once per weights."""
    from hirescam3d.models.handle import ModelHandle
    from hirescam3d.pipeline import explain_scan

    network, info = ModelHandle.resolve(model).load()
    key = info.weights_sha256[:16] if info.weights_sha256 else f"{info.name}-untrained"
    folder = cache_dir() / f"maps-v{SAMPLE_VERSION}-{key}"
    paths = {m: folder / f"{SAMPLE_STEM}_ct_{SAMPLE_FINDING}_{m}.nii.gz" for m in SAMPLE_METHODS}
    if all(p.exists() for p in paths.values()):
        return paths
    files = sample_files()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".maps-", dir=folder.parent))
    try:
        _, written = explain_scan(
            files["scan"], tmp, model=(network, info), findings=[SAMPLE_FINDING],
            methods=SAMPLE_METHODS, organs_path=files["organs"],
            organ_names_path=files["organ_names"], device="cpu", force=True,
        )
        folder.mkdir(exist_ok=True)
        for method, target in paths.items():
            os.replace(written[f"{SAMPLE_FINDING}/{method}"], target)
        os.replace(written["report"], folder / "report.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def chest_ct() -> list[_layers.LayerData]:
    """Layers: the demo CT and its organ labels."""
    files = sample_files()
    layers = read_path(files["scan"], kind="scan")
    layers += read_path(files["organs"], kind="labels", names_path=files["organ_names"])
    return layers


def chest_ct_explained() -> list[_layers.LayerData]:
    """Layers: the demo CT, organ labels, and Grad-CAM and HiResCAM maps of atelectasis."""
    layers = chest_ct()
    for method, path in explanation_files().items():
        layers += read_path(path, kind="explanation")
        layers[-1][1]["visible"] = method == "hirescam"
    return layers
