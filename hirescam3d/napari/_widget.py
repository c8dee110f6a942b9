"""The "Explain" dock widget: run HiResCAM / Grad-CAM on a CT layer without freezing napari.

The explanation runs in a napari ``thread_worker``; progress arrives through a Qt signal
(queued to the GUI thread) and Cancel stops it at the pipeline's next progress report.
Each (finding, method) becomes an Image layer ``"<finding> · <method>"`` on the CT's grid.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from hirescam3d.errors import HiResCAMError
from hirescam3d.napari import _layers

if TYPE_CHECKING:
    import napari

NO_ORGANS = "(none)"
PREDICTED = "predicted"  # the Region choice: each finding's predicted mask
#: nnU-Net mirroring choices -> NnunetHandle ``mirror`` (None: as the checkpoint allows)
NNUNET_MIRROR = {"mirror: as trained": None, "mirror on": True, "mirror off": False}
OUTSIDE = "(outside organs)"
METHOD_COLUMNS = 3
DEFAULT_METHODS = ("hirescam", "gradcam")
# Grid mode shows these methods side by side, left to right, when present.
GRID_ORDER = ("gradcam", "hirescam", "cam")


class Cancelled(Exception):
    """Raised inside the worker when the user pressed Cancel."""


@dataclass
class ExplainResult:
    """What the worker hands back to the GUI thread."""

    maps: dict[tuple[str, str], np.ndarray]
    probabilities: dict[str, float]
    fractions: dict[tuple[str, str], dict[str, float]]
    warnings: list[str]
    values: str = "unit"
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # predicted regions, CT grid


class _Emitter(QObject):
    """Lives in the GUI thread; signals emitted from the worker are queued to it."""

    progress = Signal(str, float)


class ExplainWidget(QWidget):
    """Dock widget: CT layer, model, findings, methods, organ layer -> explanation layers."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.result: ExplainResult | None = None
        self._cancel = threading.Event()
        self._models: dict[str, Any] = {}
        self._ct_layer: Any = None  # the CT layer of the running / last run
        self._grid_backdrops: list[Any] = []
        self._hidden_for_grid: list[Any] = []
        self._rerun = False  # a region was edited while a run was going
        self._emitter = _Emitter()
        self._emitter.progress.connect(self._on_progress)
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self._refresh_findings()

    # -- layout ---------------------------------------------------------------------------
    def _build(self) -> None:
        """Lay out the dock: the form, run controls and results, in a scroll area."""
        form = QFormLayout()
        self._build_model_rows(form)
        self._build_choice_rows(form)
        buttons = self._build_run_controls()
        self._build_result_views()

        # The controls scroll inside the dock, so a tall widget never squeezes the canvas.
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("Finding probabilities"))
        layout.addWidget(self.prob_table)
        layout.addWidget(QLabel("Share of attention per organ"))
        layout.addWidget(self.organ_table)
        layout.addWidget(self.grid_box)
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)

    def _build_model_rows(self, form: QFormLayout) -> None:
        """Form rows for the CT layer, the model (zoo name or bundle folder) and how to load it."""
        from hirescam3d.models import zoo
        from hirescam3d.models.handle import ModelHandle

        self.ct_combo = QComboBox()
        self.ct_combo.setToolTip("3D Image layer holding the CT in Hounsfield units")
        form.addRow("CT layer", self.ct_combo)

        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        # Only models that take a 3D volume can explain a CT.
        self.model_combo.addItems(
            [n for n in zoo.names() if ModelHandle.resolve(n).input.spatial_dims == 3]
        )
        self.model_combo.setToolTip("A model zoo name, or a bundle folder (Browse...)")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse_bundle)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(browse)
        form.addRow("Model", row)
        self.model_combo.currentTextChanged.connect(self._refresh_findings)
        self.trust_box = QCheckBox("Trust bundle")
        self.trust_box.setToolTip(
            "Let MONAI's ConfigParser run the bundle folder's config (its $ expressions and "
            "_target_ classes): the same trust as `python -m monai.bundle run`"
        )
        form.addRow("", self.trust_box)
        self._build_nnunet_row(form)

    def _build_choice_rows(self, form: QFormLayout) -> None:
        """Form rows for what to explain: findings, methods, values, organs and region."""
        from hirescam3d.core.methods import METHODS

        self.findings_list = QListWidget()
        self.findings_list.setMaximumHeight(110)
        form.addRow("Findings", self.findings_list)

        self.method_boxes: dict[str, QCheckBox] = {}
        # A grid, so that every registered method fits however many there are.
        methods_row = QGridLayout()
        for i, name in enumerate(METHODS):
            box = QCheckBox(name)
            box.setChecked(name in DEFAULT_METHODS)
            box.setToolTip(METHODS[name].description)
            self.method_boxes[name] = box
            methods_row.addWidget(box, i // METHOD_COLUMNS, i % METHOD_COLUMNS)
        form.addRow("Methods", methods_row)

        self.values_combo = QComboBox()
        self.values_combo.addItems(["unit", "logit"])
        self.values_combo.setToolTip(
            "unit: [0, 1] heat maps; logit: signed HiResCAM contributions in logits per voxel "
            "(blue against, red for the finding), where the audit proves the guarantee"
        )
        form.addRow("Values", self.values_combo)

        self.organs_combo = QComboBox()
        self.organs_combo.setToolTip("Optional Labels layer of organs: attention per organ")
        form.addRow("Organs", self.organs_combo)

        self.region_combo = QComboBox()
        self.region_combo.setToolTip(
            "Segmentation models: the voxels whose logits are summed into a finding's score: "
            "the model's predicted mask (shown as a Labels layer), or a Labels layer on the "
            "CT's grid (nonzero = region). Painting a region layer re-explains."
        )
        form.addRow("Region", self.region_combo)

    def _build_run_controls(self) -> QHBoxLayout:
        """The Explain / Cancel buttons (returned as a row), progress bar and status line."""
        self.run_button = QPushButton("Explain")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        return buttons

    def _build_result_views(self) -> None:
        """The probability and organ tables and the side-by-side grid switch."""
        self.prob_table = _table(["Finding", "Probability"])
        self.organ_table = _table(["Organ"])
        self.grid_box = QCheckBox("Side by side (grid): Grad-CAM | HiResCAM")
        self.grid_box.setEnabled(False)
        self.grid_box.toggled.connect(self.set_grid)

    def _build_nnunet_row(self, form: QFormLayout) -> None:
        """nnU-Net model folders: folds, checkpoint and mirroring (``explain``'s --folds,
        --checkpoint, --mirror/--no-mirror); blank means nnU-Net's default."""
        self.nnunet_folds = QLineEdit()
        self.nnunet_folds.setPlaceholderText("folds: all")
        self.nnunet_folds.setToolTip("nnU-Net: the folds to average, e.g. 0,1 (blank: all)")
        self.nnunet_checkpoint = QLineEdit()
        self.nnunet_checkpoint.setPlaceholderText("checkpoint_final.pth")
        self.nnunet_checkpoint.setToolTip("nnU-Net: each fold's checkpoint file")
        self.nnunet_mirror = QComboBox()
        self.nnunet_mirror.addItems(list(NNUNET_MIRROR))
        self.nnunet_mirror.setToolTip(
            "nnU-Net: average the mirrored passes (default: as the checkpoint allows)"
        )
        row = QHBoxLayout()
        for w in (self.nnunet_folds, self.nnunet_checkpoint, self.nnunet_mirror):
            row.addWidget(w)
        form.addRow("nnU-Net", row)

    def nnunet_options(self) -> dict[str, Any]:
        """The nnU-Net row's choices as :meth:`NnunetHandle.with_options` takes them."""
        folds = self.nnunet_folds.text().replace(",", " ").split()
        given = {"folds": folds or None, "checkpoint": self.nnunet_checkpoint.text().strip(),
                 "mirror": NNUNET_MIRROR[self.nnunet_mirror.currentText()]}  # fmt: skip
        return {k: v for k, v in given.items() if v not in (None, "")}

    # -- choices --------------------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        try:
            _fill(self.ct_combo, [ly.name for ly in self.viewer.layers if _is_ct(ly)])
            labels = [ly.name for ly in self.viewer.layers if _is_labels(ly)]
            organs = [n for n in labels if _kind(self.viewer.layers[n]) != "region"]
            _fill(self.organs_combo, [NO_ORGANS, *organs])
            _fill(self.region_combo, [PREDICTED, *labels])
        except RuntimeError:  # the Qt side of this widget is already deleted
            pass

    def _browse_bundle(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model bundle folder")
        if folder:
            self.model_combo.setCurrentText(folder)

    def _refresh_findings(self, *_: Any) -> None:
        from hirescam3d.napari._nnunet import is_nnunet_model

        text = self.model_combo.currentText().strip()
        names, _ = _model_classes(text)
        if text and is_nnunet_model(text):  # nnU-Net's path explains with HiResCAM only
            self.set_methods(["hirescam"])
        checked = set(self.findings()) if self.findings_list.count() else None
        self.findings_list.clear()
        for i, name in enumerate(names):
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = (name in checked) if checked else i == 0
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.findings_list.addItem(item)

    def findings(self) -> list[str]:
        """The checked findings."""
        items = (self.findings_list.item(i) for i in range(self.findings_list.count()))
        return [it.text() for it in items if it.checkState() == Qt.CheckState.Checked]

    def set_findings(self, names: list[str]) -> None:
        """Check exactly ``names`` in the findings list."""
        for i in range(self.findings_list.count()):
            item = self.findings_list.item(i)
            on = item.text() in names
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def methods(self) -> list[str]:
        """The checked methods."""
        return [name for name, box in self.method_boxes.items() if box.isChecked()]

    def set_methods(self, names: list[str]) -> None:
        """Check exactly ``names`` among the methods."""
        for name, box in self.method_boxes.items():
            box.setChecked(name in names)

    # -- running --------------------------------------------------------------------------
    def run(self) -> Any:
        """Start explaining in a worker thread; returns the worker (None if inputs are bad)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return self.worker
        try:
            job, self._ct_layer = self._job()
        except HiResCAMError as err:
            self._show_error(str(err))
            return None
        self.set_grid(False)
        self._cancel.clear()
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        self.status.setText("starting...")
        # Our own "errored" handler replaces superqt's default re-raise in the GUI thread;
        # napari still relays the error to its notification manager.
        worker = create_worker(
            job,
            _start_thread=False,
            _connect={
                "returned": self._on_returned,
                "errored": self._on_errored,
                "finished": self._on_finished,
            },
        )
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running explanation to stop at its next progress report."""
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("cancelling...")

    def _job(self) -> tuple[Any, Any]:
        """Collect the inputs in the GUI thread: ``(function the worker runs, CT layer)``."""
        from hirescam3d.errors import InputError

        ct = self._layer(self.ct_combo.currentText())
        if ct is None:
            raise InputError("choose a CT layer (open a scan first: File > Open or a sample)")
        model = self.model_combo.currentText().strip() or "demo"
        error = _model_classes(model)[1]
        if error is not None:
            raise error
        findings, methods = self.findings(), self.methods()
        if not findings:
            raise InputError("check at least one finding")
        if not methods:
            raise InputError("check at least one method")
        image = np.asarray(ct.data, dtype=np.float32)
        affine = layer_affine(ct)
        organ_layer = self._layer(self.organs_combo.currentText())
        organs = names = organs_affine = None
        if organ_layer is not None:
            organs = np.asarray(organ_layer.data)
            names = organ_names(organ_layer)
            organs_affine = layer_affine(organ_layer)
        region = None
        region_layer = self._layer(self.region_combo.currentText())
        if region_layer is not None:
            from hirescam3d.pipeline import check_region_grid

            region = np.asarray(region_layer.data) != 0
            check_region_grid(region.shape, layer_affine(region_layer), image.shape, affine,
                              f"region layer {region_layer.name!r}")  # fmt: skip
        cancel, emitter, models = self._cancel, self._emitter, self._models
        values = self.values_combo.currentText()
        trust = self.trust_box.isChecked()
        from hirescam3d.napari._nnunet import is_nnunet_model

        nnunet = self.nnunet_options() if is_nnunet_model(model) else None

        def progress(stage: str, fraction: float) -> None:
            if cancel.is_set():
                raise Cancelled()
            emitter.progress.emit(str(stage), float(fraction))

        def job() -> ExplainResult | None:
            try:
                return _explain(
                    image, affine, model, findings, methods, organs, organs_affine, names,
                    progress, models, values, region, trust, nnunet,
                )
            except Cancelled:
                return None  # not an error: no notification

        return job, ct

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress_bar.setValue(int(round(100 * min(max(fraction, 0.0), 1.0))))
        if not self._cancel.is_set():
            self.status.setText(stage)

    def _on_returned(self, result: ExplainResult | None) -> None:
        if result is None or self._cancel.is_set():
            self.status.setText("cancelled")
            self.progress_bar.setValue(0)
            return
        self.result = result
        self.show_result(result, self._ct_layer)
        self.progress_bar.setValue(100)
        note = "; ".join(result.warnings)
        self.status.setText("done" + (f" ({note})" if note else ""))

    def _on_errored(self, err: Exception) -> None:
        # napari has already shown the error as a notification.
        text = str(err) if isinstance(err, HiResCAMError) else f"{type(err).__name__}: {err}"
        self.status.setText(f"error: {text}")
        self.progress_bar.setValue(0)

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self._rerun:  # a region was painted during the run: explain it now
            self._rerun = False
            self.run()

    def _on_region_edited(self, layer: Any, *_: Any) -> None:
        """A region Labels layer was painted: explain that region (now, or after the run
        in progress)."""
        if layer not in self.viewer.layers:
            return
        self.region_combo.setCurrentText(layer.name)
        if self.worker is not None:
            self._rerun = True
        else:
            self.run()

    def _show_error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"error: {text}")
        show_error(text)

    # -- results --------------------------------------------------------------------------
    def show_result(self, result: ExplainResult, ct: Any) -> None:
        """Add/update one layer per map, fill the tables, jump to the most attended slice."""
        geometry = {"scale": tuple(ct.scale), "translate": tuple(ct.translate)}
        rotate = np.asarray(ct.rotate)
        if not np.allclose(rotate, np.eye(rotate.shape[0])):
            geometry["rotate"] = rotate
        source = _layers.layer_source(ct.metadata)
        for (finding, method), volume in result.maps.items():
            entry = dict(source) if source else _geometry_entry(ct)
            entry.update(kind="explanation", finding=finding, method=method)
            name = _layers.layer_name(finding, method)
            limit = float(np.abs(volume).max()) if result.values == "logit" else None
            kwargs = _layers.explanation_kwargs(name, geometry, {_layers.META: entry}, limit)
            if name in self.viewer.layers:
                self.viewer.layers.remove(self.viewer.layers[name])
            self.viewer.add_image(volume, **kwargs)
        for finding, mask in result.masks.items():
            self._show_region(finding, mask, ct, geometry)
        self._fill_tables(result)
        self.grid_box.setEnabled(self._grid_pair() is not None)
        self.jump_to_max(result, ct)

    def _show_region(self, finding: str, mask: np.ndarray, ct: Any, geometry: dict) -> Any:
        """The predicted region of ``finding`` as a Labels layer on the CT's grid (updated
        in place if it exists); painting it re-explains with the painted region."""
        name = f"{finding} region"
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = mask
            return layer
        source = _layers.layer_source(ct.metadata)
        entry = dict(source) if source else _geometry_entry(ct)
        entry.update(kind="region", finding=finding)
        layer = self.viewer.add_labels(
            mask, name=name, opacity=0.4, metadata={_layers.META: entry}, **geometry
        )
        # napari emits "paint" before it writes the stroke: read the layer once it has
        layer.events.paint.connect(
            lambda event, ly=layer: QTimer.singleShot(0, lambda: self._on_region_edited(ly))
        )
        return layer

    def _fill_tables(self, result: ExplainResult) -> None:
        explained = {finding for finding, _ in result.maps}
        rows = sorted(result.probabilities.items(), key=lambda kv: -kv[1])
        self.prob_table.setRowCount(len(rows))
        for r, (finding, p) in enumerate(rows):
            label = finding + (" *" if finding in explained else "")
            self.prob_table.setItem(r, 0, QTableWidgetItem(label))
            self.prob_table.setItem(r, 1, QTableWidgetItem(f"{p:.3f}"))
        keys = [k for k in result.maps if k in result.fractions]
        organs: list[str] = []
        for key in keys:
            organs += [o for o in result.fractions[key] if o not in organs]
        if keys and not organs:
            organs = [OUTSIDE]
        self.organ_table.clear()
        self.organ_table.setColumnCount(1 + len(keys))
        self.organ_table.setHorizontalHeaderLabels(
            ["Organ", *(_layers.layer_name(*k) for k in keys)]
        )
        self.organ_table.setRowCount(len(organs))
        for r, organ in enumerate(organs):
            self.organ_table.setItem(r, 0, QTableWidgetItem(organ))
            for c, key in enumerate(keys, start=1):
                shares = result.fractions[key]
                text = f"{100 * shares.get(organ, 0.0):.1f} %" if shares else "no positive evidence"
                self.organ_table.setItem(r, c, QTableWidgetItem(text))

    def jump_to_max(self, result: ExplainResult, ct: Any) -> int:
        """Move the slider to the axial slice with the most attention; returns its index."""
        keys = list(result.maps)
        key = next((k for k in keys if k[1] == "hirescam"), keys[0])
        volume = result.maps[key]
        index = int(np.argmax(volume.reshape(volume.shape[0], -1).sum(axis=1)))
        center = [index, (volume.shape[1] - 1) / 2, (volume.shape[2] - 1) / 2]
        world = np.asarray(ct.data_to_world(center))
        self.viewer.dims.set_point(0, float(world[0]))
        return index

    # -- grid mode ------------------------------------------------------------------------
    def _grid_pair(self) -> list[Any] | None:
        """The map layers of the first finding, in GRID_ORDER, if at least two exist."""
        if self.result is None or not self.result.maps:
            return None
        finding = next(iter(self.result.maps))[0]
        names = [_layers.layer_name(finding, m) for m in GRID_ORDER]
        layers = [self.viewer.layers[n] for n in names if n in self.viewer.layers]
        return layers if len(layers) >= 2 else None

    def set_grid(self, on: bool) -> None:
        """Grid mode: each map of the first finding over its own copy of the CT."""
        grid = _grid(self.viewer)
        if self.grid_box.isChecked() != on:
            self.grid_box.blockSignals(True)
            self.grid_box.setChecked(on)
            self.grid_box.blockSignals(False)
        if not on:
            was_on = grid.enabled
            for layer in self._grid_backdrops:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            for layer in self._hidden_for_grid:
                if layer in self.viewer.layers:
                    layer.visible = True
            self._grid_backdrops, self._hidden_for_grid = [], []
            grid.stride = 1
            grid.enabled = False
            if was_on:
                self.viewer.reset_view()
            return
        maps = self._grid_pair()
        ct = self._ct_layer
        if maps is None or ct is None or self._grid_backdrops:
            return
        self._hidden_for_grid = [ly for ly in self.viewer.layers if ly.visible]
        for layer in self._hidden_for_grid:
            layer.visible = False
        # Build pairs (CT copy, map) at the top of the layer list; the last pair added is
        # the top one, which a stride of -2 puts in the first (left) viewbox.
        for layer in reversed(maps):
            backdrop = self.viewer.add_image(
                ct.data,
                name=f"{ct.name} [{layer.name}]",
                scale=ct.scale,
                translate=ct.translate,
                rotate=ct.rotate,
                colormap="gray",
                contrast_limits=ct.contrast_limits,
                metadata={_layers.META: {"kind": "grid_backdrop"}},
            )
            self._grid_backdrops.append(backdrop)
            self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
            layer.visible = True
        grid.stride = -2
        grid.enabled = True
        self.viewer.reset_view()


# -- helpers (no widget state) ----------------------------------------------------------------
def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.setMaximumHeight(180)
    return table


def _fill(combo: QComboBox, names: list[str]) -> None:
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def _kind(layer: Any) -> str | None:
    entry = _layers.layer_source(getattr(layer, "metadata", None))
    return None if entry is None else entry.get("kind")


def _is_ct(layer: Any) -> bool:
    from napari.layers import Image

    return (
        isinstance(layer, Image)
        and layer.ndim == 3
        and not layer.rgb
        and _kind(layer) not in ("explanation", "grid_backdrop")
    )


def _is_labels(layer: Any) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels) and layer.ndim == 3


def _grid(viewer: Any) -> Any:
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def _model_classes(model: str) -> tuple[list[str], Exception | None]:
    """``(class names, None)`` of a zoo model or bundle folder without loading weights, or
    ``([], error)`` saying why there are none (unknown name, not a bundle folder,
    unreadable metadata)."""
    from hirescam3d.errors import ModelError
    from hirescam3d.models.handle import ModelHandle

    try:
        names = list(ModelHandle.resolve(model).class_names)
    except ModelError as err:
        return [], err
    return names, None if names else ModelError(f"model {model!r} has no class names")


def layer_affine(layer: Any) -> np.ndarray:
    """Voxel -> RAS affine of a layer's (SPL display) data: from metadata, else its geometry."""
    entry = _layers.layer_source(layer.metadata)
    if entry is not None and "display_affine" in entry:
        return np.asarray(entry["display_affine"], dtype=np.float64)
    return _layers.affine_from_geometry(layer.scale, layer.translate, layer.rotate)


def _geometry_entry(layer: Any) -> dict[str, Any]:
    """Metadata entry for a layer opened without this plugin: its display grid is the source."""
    affine = layer_affine(layer)
    return {
        "affine": affine,
        "shape": tuple(layer.data.shape),
        "display_affine": affine,
        "header": None,
        "path": None,
    }


def organ_names(layer: Any) -> dict[int, str]:
    """``{label: name}`` from a Labels layer's features (``index`` and ``name`` columns)."""
    features = layer.features
    if "name" not in features:
        entry = _layers.layer_source(layer.metadata) or {}
        return {int(k): str(v) for k, v in (entry.get("names") or {}).items()}
    index = features["index"] if "index" in features else range(len(features))
    return {
        int(i): str(n) for i, n in zip(index, features["name"], strict=False) if int(i) != 0
    }


def _explain(
    image: np.ndarray,
    affine: np.ndarray,
    model: str,
    findings: list[str],
    methods: list[str],
    organs: np.ndarray | None,
    organs_affine: np.ndarray | None,
    names: dict[int, str] | None,
    progress: Any,
    models: dict[str, Any],
    values: str = "unit",
    region: np.ndarray | None = None,
    trust: bool = False,
    nnunet: dict[str, Any] | None = None,
) -> ExplainResult:
    """The worker's job (no Qt): load the model (cached), align organs, explain.

    Segmentation models explain each finding's logits summed over ``region`` (a bool
    ``(I, J, K)`` mask on the CT's grid), or over its predicted mask without one; those
    masks come back in ``ExplainResult.masks`` (uint8 on the CT's grid). An nnU-Net model
    folder goes through ``explain``'s nnU-Net path (:mod:`hirescam3d.napari._nnunet`);
    ``nnunet``: its ``folds``/``checkpoint``/``mirror`` choices."""
    from hirescam3d.io.organs import align_organs
    from hirescam3d.models.handle import ModelHandle
    from hirescam3d.napari._nnunet import explain_nnunet_image, is_nnunet_model
    from hirescam3d.pipeline import explain_image

    progress("loading model", 0.0)
    if is_nnunet_model(model):
        key = f"nnunet:{model}:{sorted((nnunet or {}).items())}"
        if key not in models:
            handle = ModelHandle.resolve(model)
            models[key] = handle.with_options(**nnunet) if nnunet else handle
        progress("explaining", 0.1)
        maps, probabilities, masks = explain_nnunet_image(
            image, affine, models[key], findings, methods, values, region, organs
        )
        progress("done", 1.0)
        return ExplainResult(maps=maps, probabilities=probabilities, fractions={},
                             warnings=[], values=values, masks=masks)  # fmt: skip
    if model not in models or trust:  # trust: a bundle folder's config run by MONAI
        models[model] = ModelHandle.resolve(model, trust=trust).load()
    notes: list[str] = []
    if organs is not None:
        organs, note = align_organs(organs, organs_affine, image.shape, affine, "organ layer")
        if note:
            notes.append(note)
    segmentation = models[model][1].segmentation
    if region is not None and not segmentation:
        from hirescam3d.errors import InputError

        raise InputError(
            f"a region applies to segmentation models; {model} is a classifier: choose "
            f"Region '{PREDICTED}' (ignored for classifiers)"
        )
    result = explain_image(
        image, affine, model=models[model], findings=findings, methods=methods,
        organs=organs, organ_names=names, device="auto", progress=progress, values=values,
        region=region if segmentation else None,
    )
    fractions: dict[tuple[str, str], dict[str, float]] = {}
    for (finding, method) in result.maps:
        entry = result.report.get("organs", {}).get(finding, {}).get(method)
        if entry:  # an empty dict: the map has no positive evidence to share out
            fractions[(finding, method)] = (
                {} if entry["no_positive_evidence"]
                else {**entry["by_label"], OUTSIDE: entry["outside_labels"]}
            )
    progress("done", 1.0)
    return ExplainResult(
        maps=dict(result.maps),
        probabilities=dict(result.probabilities),
        fractions=fractions,
        warnings=notes + list(result.warnings),
        values=values,
        masks=dict(result.masks),
    )
