"""nnU-Net v2 trained-model folders: opened, loaded safely, predicted with nnU-Net's code.

A trained-model folder (``Dataset501_X/nnUNetTrainer__nnUNetPlans__3d_fullres``) holds
``dataset.json``, ``plans.json`` and ``fold_N/checkpoint_final.pth``. Everything that
nnU-Net itself defines is done by nnU-Net's code, not a copy of it:

- the network: ``nnUNetTrainer.build_network_architecture`` (the trainer class the
  checkpoint names) from the plans, deep supervision off;
- the preprocessing: the plans' reader/writer and ``DefaultPreprocessor.run_case_npy``
  (transpose, crop to non-zero, resampling, CT / z-score normalisation);
- the prediction: ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (tiles of the
  plans' patch size, step 0.5, Gaussian weights, mirroring, fold averaging);
- the export: ``convert_predicted_logits_to_segmentation_with_correct_shape``; maps go
  back to the scan with the same resampling function, crop insertion and transpose.

Checkpoints are pickles: they are read with ``torch.load(weights_only=True)`` and an
allow-list of the plain numpy types nnU-Net's trainer stores (:func:`load_checkpoint`),
scoped to that one call. Needs the optional extra ``hirescam3d[nnunet]``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hirescam3d.errors import InputError, ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

INSTALL = 'pip install "hirescam3d[nnunet]"'
CHECKPOINT = "checkpoint_final.pth"


def require_nnunetv2() -> None:
    """ModelError with the install line when nnunetv2 cannot be imported."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:
        raise ModelError(
            f"nnU-Net model folders need nnunetv2, which is not installed: {INSTALL}"
        ) from err


def is_nnunet_folder(folder: Path) -> bool:
    """True for a folder that looks like an nnU-Net trained-model folder (plans.json,
    dataset.json or a ``fold_*`` folder, and no MONAI/hirescam3d bundle configs)."""
    if not folder.is_dir() or (folder / "configs").is_dir():
        return False
    return (
        (folder / "plans.json").is_file()
        or (folder / "dataset.json").is_file()
        or any(p.is_dir() for p in folder.glob("fold_*"))
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"{path.parent}: not an nnU-Net model folder: no {path.name}; pass nnU-Net's "
            "trained-model folder (Dataset.../Trainer__Plans__configuration) holding "
            "dataset.json, plans.json and fold_N/checkpoint_final.pth"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot be read as JSON ({err}); restore nnU-Net's file") \
            from None


def folds_present(folder: Path, checkpoint: str = CHECKPOINT) -> list[int | str]:
    """The folds with ``fold_N/<checkpoint>``, numbers first, then ``all``."""
    found: list[int | str] = []
    for path in sorted(folder.glob("fold_*")):
        name = path.name[len("fold_"):]
        if (path / checkpoint).is_file() and (name.isdigit() or name == "all"):
            found.append(int(name) if name.isdigit() else name)
    return sorted(found, key=lambda f: (isinstance(f, str), f))


def check_folds(
    folder: Path, folds: Any = None, checkpoint: str = CHECKPOINT
) -> list[int | str]:
    """The folds to use (default: every fold present); ModelError for a missing one."""
    present = folds_present(folder, checkpoint)
    if folds is None or len(folds) == 0:
        if not present:
            raise ModelError(
                f"{folder}: no fold_N/{checkpoint} in it; pass a trained nnU-Net model "
                "folder, or --checkpoint with the checkpoint file name the folds hold"
            )
        return present
    wanted = [int(f) if str(f).isdigit() else str(f) for f in folds]
    for fold in wanted:
        if fold not in present:
            have = ", ".join(map(str, present)) or "none"
            raise ModelError(
                f"{folder}: fold {fold} has no fold_{fold}/{checkpoint}; folds present: {have}"
            )
    return wanted


# -- safe loading -------------------------------------------------------------------------
def _safe_types() -> list[Any]:
    """The plain non-torch types nnU-Net checkpoints hold: numpy scalars and arrays."""
    import numpy.dtypes as dtypes

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    kinds = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return [scalar, _reconstruct, np.ndarray, np.dtype, *kinds]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, read with ``weights_only=True`` and the allow-list of
    :func:`_safe_types` (scoped to this call). ModelError naming the first global the
    pickle needs beyond it: nothing in the file is run."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_types()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such checkpoint; see --folds and --checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as err:
        needed = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(err))
        what = f"needs {needed.group(1)}, " if needed else f"cannot be read ({_first(err)}); "
        raise ModelError(
            f"{path}: refused: this checkpoint {what}which is not a plain type nnU-Net "
            "checkpoints hold (nothing in it was run); use a checkpoint nnU-Net wrote"
        ) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' in it)")
    return checkpoint


def _first(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


# -- the model ----------------------------------------------------------------------------
@dataclass
class NnunetModel:
    """An opened nnU-Net model: nnU-Net's managers, one network, per-fold weights.

    ``parameters``: one state dict per fold (``folds``); ``network`` holds the first.
    ``mirror_axes``: the checkpoint's ``inference_allowed_mirroring_axes`` (None: none).
    """

    folder: Path
    folds: list[int | str]
    checkpoint: str
    plans_manager: Any
    configuration_manager: Any
    configuration: str
    dataset_json: dict[str, Any]
    label_manager: Any
    trainer_name: str
    network: nn.Module
    parameters: list[dict[str, torch.Tensor]]
    mirror_axes: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per output channel: ``dataset.json`` labels (regions: their names)."""
        return class_names(self.dataset_json, self.label_manager)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.configuration_manager.patch_size)

    @property
    def in_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    @property
    def task(self) -> str:
        """``"sigmoid"`` for region-based trainings, else ``"softmax"``."""
        return "sigmoid" if self.label_manager.has_regions else "softmax"

    def use_fold(self, index: int) -> None:
        """Load fold ``folds[index]``'s weights into :attr:`network`."""
        self.network.load_state_dict(self.parameters[index])


def class_names(dataset_json: dict[str, Any], label_manager: Any = None) -> tuple[str, ...]:
    """Output channel names from ``dataset.json``'s ``labels`` (ignore label left out;
    region-based: one name per region, in ``regions_class_order``)."""
    labels = dataset_json.get("labels", {})
    if label_manager is not None and label_manager.has_regions:
        names = {tuple(v) if isinstance(v, list) else (v,): k for k, v in labels.items()}
        return tuple(
            names.get(tuple(r) if isinstance(r, (list, tuple)) else (r,), str(r))
            for r in label_manager.foreground_regions
        )
    by_value = sorted(((int(v), str(k)) for k, v in labels.items() if not isinstance(v, list)))
    return tuple(k for v, k in by_value if k != "ignore")


def _build_network(plans_manager: Any, cm: Any, dataset_json: dict, trainer: str) -> nn.Module:
    """The network nnU-Net's trainer ``trainer`` builds from the plans, no deep supervision."""
    from nnunetv2.inference.predict_from_raw_data import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    trainer_class = recursive_find_trainer_class_by_name(trainer)
    if trainer_class is None:
        raise ModelError(f"the checkpoint's trainer {trainer!r} is not a class nnunetv2 knows")
    channels = determine_num_input_channels(plans_manager, cm, dataset_json)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return trainer_class.build_network_architecture(
        plans_manager, cm, channels, heads, enable_deep_supervision=False
    )


def _check_weights(network: nn.Module, weights: dict, path: Path, configuration: str) -> None:
    """ModelError if ``weights`` do not fit ``network`` exactly (another architecture)."""
    try:
        network.load_state_dict(weights, strict=True)
    except (RuntimeError, KeyError) as err:
        detail = _first(err).rstrip(":. ")
        raise ModelError(
            f"{path}: its weights do not fit the network that plans.json's configuration "
            f"{configuration!r} builds ({detail}); it was trained with another architecture "
            "or plans: use the checkpoint of this model folder"
        ) from None


def open_model(
    folder: Path | str, folds: Any = None, checkpoint: str = CHECKPOINT
) -> NnunetModel:
    """Open an nnU-Net trained-model folder: plans, dataset.json, the folds' weights
    (checked against the network built from the plans), the mirroring axes."""
    require_nnunetv2()
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder).expanduser()
    dataset_json = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    chosen = check_folds(folder, folds, checkpoint)
    first = load_checkpoint(folder / f"fold_{chosen[0]}" / checkpoint)
    trainer = str(first.get("trainer_name", "nnUNetTrainer"))
    configuration = str(first.get("init_args", {}).get("configuration", "3d_fullres"))
    plans_manager = PlansManager(plans)
    try:
        cm = plans_manager.get_configuration(configuration)
    except (KeyError, RuntimeError, AssertionError):
        raise ModelError(
            f"{folder}: the checkpoint's configuration {configuration!r} is not in plans.json"
        ) from None
    with torch.random.fork_rng(devices=[]):
        network = _build_network(plans_manager, cm, dataset_json, trainer)
    weights = [first["network_weights"]]
    for fold in chosen[1:]:
        weights.append(load_checkpoint(folder / f"fold_{fold}" / checkpoint)["network_weights"])
    for fold, w in zip(chosen, weights, strict=True):
        _check_weights(network, w, folder / f"fold_{fold}" / checkpoint, configuration)
    network.load_state_dict(weights[0])
    network.eval()
    axes = first.get("inference_allowed_mirroring_axes")
    return NnunetModel(
        folder=folder, folds=chosen, checkpoint=checkpoint, plans_manager=plans_manager,
        configuration_manager=cm, configuration=configuration, dataset_json=dataset_json,
        label_manager=plans_manager.get_label_manager(dataset_json), trainer_name=trainer,
        network=network, parameters=weights,
        mirror_axes=None if axes is None else tuple(int(a) for a in axes),
    )  # fmt: skip


def not_nnunet(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    """``pair`` ``(network, info)`` as given; ModelError for an nnU-Net model, whose
    preprocessing, tiles and export only :mod:`hirescam3d.pipeline.nnunet_scan` reproduces (the
    generic pipeline would explain another prediction than nnU-Net's)."""
    info = pair[1]
    if getattr(info, "bundle_format", None) == "nnunet":
        raise ModelError(
            f"{info.bundle_path}: nnU-Net model folders are explained by `hirescam3d "
            "explain` (or hirescam3d.pipeline.nnunet_scan.explain_nnunet_scan), with nnU-Net's own "
            "preprocessing and tiles; this front end does not support them yet"
        )
    return pair


# -- preprocessing, prediction, export ----------------------------------------------------
@dataclass
class Preprocessed:
    """A scan as nnU-Net's preprocessing returns it: ``data`` ``(C, *S)`` float32 on the
    plans' grid, nnU-Net's ``properties`` (spacing, crop box, shapes, reader's geometry)."""

    data: torch.Tensor
    properties: dict[str, Any]
    path: Path


def preprocess(model: NnunetModel, image: Path | str) -> Preprocessed:
    """Read ``image`` with the plans' reader and preprocess it with nnU-Net's preprocessor.

    InputError for a scan whose number of spatial axes is not the configuration's (a 2D
    configuration given a 3D scan: nnU-Net would run it slice by slice, which explaining
    does not support)."""
    import torch

    path = Path(image)
    reader = model.plans_manager.image_reader_writer_class()
    try:
        images, props = reader.read_images([str(path)])
    except Exception as err:  # nnU-Net's readers raise many kinds
        raise InputError(f"{path}: nnU-Net's reader cannot read it ({_first(err)})") from None
    patch = model.patch_size
    spatial = images.shape[1:]
    if len(patch) != len(spatial):  # nnU-Net runs 2D configurations slice by slice
        raise InputError(
            f"{path}: a {len(spatial)}D scan {tuple(spatial)} for the {len(patch)}D "
            f"configuration {model.configuration!r} (patch {patch}); explain it with the "
            f"model folder of a {len(spatial)}D configuration (e.g. 3d_fullres)"
        )
    if images.shape[0] != model.in_channels:
        raise InputError(
            f"{path}: {images.shape[0]} channel(s), but the model takes {model.in_channels}"
        )
    pre = model.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = pre.run_case_npy(
        images, None, props, model.plans_manager, model.configuration_manager, model.dataset_json
    )
    return Preprocessed(torch.from_numpy(np.ascontiguousarray(data, np.float32)), props, path)


def predictor(model: NnunetModel, mirror: bool) -> Any:
    """nnU-Net's own ``nnUNetPredictor`` on CPU for ``model`` (step 0.5, Gaussian)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(sys.stderr):  # it prints a CPU notice
        p = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
            allow_tqdm=False,
        )  # fmt: skip
    p.manual_initialization(
        model.network, model.plans_manager, model.configuration_manager, model.parameters,
        model.dataset_json, model.trainer_name, model.mirror_axes,
    )  # fmt: skip
    return p


def predict_logits(model: NnunetModel, data: torch.Tensor, mirror: bool) -> torch.Tensor:
    """nnU-Net's fold- and mirror-averaged logits ``(C, *S)`` on the preprocessed grid
    (its own ``predict_logits_from_preprocessed_data``); the network is left in eval
    mode with the first fold's weights."""
    from hirescam3d.core.capture import model_state_restored

    with model_state_restored(model.network):
        logits = predictor(model, mirror).predict_logits_from_preprocessed_data(data)
    model.use_fold(0)
    return logits


def segmentation(model: NnunetModel, logits: torch.Tensor, props: dict) -> tuple[Any, Any]:
    """``(segmentation, probabilities)`` on the scan's grid from preprocessed-grid logits,
    by nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``."""
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, model.plans_manager, model.configuration_manager, model.label_manager, props,
        return_probabilities=True, num_threads_torch=1,
    )  # fmt: skip


def to_scan(model: NnunetModel, volume: np.ndarray, props: dict) -> np.ndarray:
    """Per-channel volumes ``(K, *S)`` on the preprocessed grid back on the scan's array
    grid: the plans' probability resampling, the crop box (zeros outside), the transpose,
    in the order nnU-Net's export undoes its preprocessing."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    pm, cm = model.plans_manager, model.configuration_manager
    target = [props["spacing"][i] for i in pm.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    current = cm.spacing if len(cm.spacing) == len(shape) else [target[0], *cm.spacing]
    resampled = np.asarray(cm.resampling_fn_probabilities(volume, shape, current, target))
    full = np.zeros((volume.shape[0], *props["shape_before_cropping"]), np.float32)
    box = props["bbox_used_for_cropping"]
    full = insert_crop_into_image(full, resampled.astype(np.float32), box)
    return np.ascontiguousarray(full.transpose([0, *[i + 1 for i in pm.transpose_backward]]))


def mirror_passes(model: NnunetModel, mirror: bool) -> list[tuple[int, ...]]:
    """The flips nnU-Net averages: ``()`` then every combination of the allowed mirroring
    axes (spatial axis numbers, in nnU-Net's order)."""
    axes = list(model.mirror_axes or ()) if mirror else []
    combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    return [(), *combos]
