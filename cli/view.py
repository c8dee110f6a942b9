"""``hirescam3d view SCAN [--explanation FILE ...] [--organs FILE]``: open napari.

The scan, its explanation maps and organ masks open as aligned layers (world = mm along
superior, posterior, patient left; see :mod:`hirescam3d.napari`), with the "Explain" dock
widget. Needs the optional napari dependencies: ``pip install 'hirescam3d[napari]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hirescam3d.errors import HiResCAMError

from .errors import CLIUsageError, reported_errors, warnings_to_stderr
from .startup import startup_done


def view(
    scan: Annotated[
        Path,
        typer.Argument(help="CT scan: .nii/.nii.gz, .nrrd, .mha/.mhd or a DICOM series folder"),
    ],
    explanation: Annotated[
        list[Path] | None,
        typer.Option(
            "--explanation",
            "-e",
            help="Explanation map written by 'hirescam3d explain' (repeat for several)",
        ),
    ] = None,
    organs: Annotated[
        Path | None,
        typer.Option(
            "--organs",
            help="Organ label map; organ names from its <stem>.json sidecar if present",
        ),
    ] = None,
) -> None:
    """Open napari with the scan, explanations and organ masks loaded and aligned."""
    with reported_errors(), warnings_to_stderr():
        layers = load_layers(scan, explanation or [], organs)
        napari = _import_napari()
        startup_done()  # a viewer session may last hours
        open_viewer(layers, napari.Viewer())
        napari.run()


def _import_napari() -> Any:
    try:
        import napari
    except ImportError as err:
        raise HiResCAMError(
            f"napari is not installed ({err}); install the viewer with "
            "pip install 'hirescam3d[napari]'"
        ) from err
    return napari


def load_layers(
    scan: Path, explanations: list[Path], organs: Path | None = None
) -> list[tuple[Any, dict, str]]:
    """Layer data tuples, bottom to top: the scan, the organ map, the explanations.

    Raises CLIUsageError (exit 2) for missing paths, HiResCAMError for unreadable files.
    """
    for path, what in [(scan, "SCAN"), *((p, "--explanation") for p in explanations)] + (
        [(organs, "--organs")] if organs is not None else []
    ):
        if not Path(path).exists():
            raise CLIUsageError(f"{what} {path}: no such file or folder; check the path")
    from hirescam3d.napari._reader import read_path

    layers = read_path(scan, kind="scan")
    if organs is not None:
        layers += read_path(organs, kind="labels")
    for path in explanations:
        layers += read_path(path, kind="explanation")
    return layers


def open_viewer(layers: list[tuple[Any, dict, str]], viewer: Any) -> Any:
    """Add ``layers`` to ``viewer``, dock the Explain widget, show the most attended slice."""
    import numpy as np

    from hirescam3d.napari._layers import layer_source
    from hirescam3d.napari._widget import ExplainWidget

    added = []
    for data, kwargs, kind in layers:
        added.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain", area="right")
    maps = [ly for ly in added if (layer_source(ly.metadata) or {}).get("kind") == "explanation"]
    if maps:
        volume = np.asarray(maps[0].data)
        index = int(np.argmax(volume.reshape(volume.shape[0], -1).sum(axis=1)))
        viewer.dims.set_point(0, float(maps[0].data_to_world([index, 0, 0])[0]))
    return viewer
