"""The :class:`~hirescam3d.models.handle.ModelHandle` of an nnU-Net v2 trained-model folder.

:meth:`NnunetHandle.open` reads only ``dataset.json`` and ``plans.json`` (class names,
patch size, spacing); :meth:`~NnunetHandle.load` opens the folds with
:func:`hirescam3d.models.nnunet.open_model` and chooses the default layer with the audit on one
patch (the deepest certified layer: the last decoder stage before the 1x1x1
segmentation convolution), so ``audit``, ``layers`` and ``findings`` work as for any
model. ``folds`` (default: every fold present), ``checkpoint`` and ``mirror`` (default:
what the checkpoint allows) choose the passes the explanation averages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hirescam3d.errors import ModelError
from hirescam3d.models.handle_base import HandleBase
from hirescam3d.models.model_info import InputSpec, ModelInfo
from hirescam3d.models.nnunet import CHECKPOINT, NnunetModel, _read_json, check_folds, open_model

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn


def _configuration_of(folder: Path) -> str:
    """The configuration a ``Trainer__Plans__configuration`` folder name ends with."""
    parts = folder.name.split("__")
    return parts[-1] if len(parts) >= 3 else "3d_fullres"


class NnunetHandle(HandleBase):
    """A handle for an nnU-Net trained-model folder (``source == "nnunet"``)."""

    def __init__(
        self, folder: Path, folds: Any = None, checkpoint: str = CHECKPOINT,
        mirror: bool | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(source="nnunet", name=folder.name, bundle=folder, seed=seed)
        self.fold_choice = None if not folds else list(folds)
        self.checkpoint = checkpoint
        self.mirror_choice = mirror
        self._model: NnunetModel | None = None

    @classmethod
    def open(
        cls, folder: str | Path, folds: Any = None, checkpoint: str | None = None,
        mirror: bool | None = None, seed: int = 0,
    ) -> NnunetHandle:  # fmt: skip
        """A handle for ``folder``; reads the JSON files and checks the folds (no weights)."""
        from hirescam3d.models.nnunet import require_nnunetv2

        path = Path(folder).expanduser().resolve()
        _read_json(path / "plans.json")
        _read_json(path / "dataset.json")
        require_nnunetv2()
        checkpoint = checkpoint or CHECKPOINT
        check_folds(path, folds, checkpoint)
        return cls(path, folds, checkpoint, mirror, seed)

    def with_options(
        self, folds: Any = None, checkpoint: str | None = None, mirror: bool | None = None
    ) -> NnunetHandle:
        """A new handle for the same folder with other folds / checkpoint / mirroring."""
        return NnunetHandle.open(
            self._bundle, folds or self.fold_choice, checkpoint or self.checkpoint,
            self.mirror_choice if mirror is None else mirror, self.seed,
        )  # fmt: skip

    # -- the card -------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        with self._lock:
            if self._card is None:
                self._card = self._read_card()
            card = self._card
        return dataclasses.replace(card, preprocessing=[])

    def _read_card(self) -> ModelInfo:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from hirescam3d.models.nnunet import class_names

        folder = self._bundle
        dataset_json = _read_json(folder / "dataset.json")
        pm = PlansManager(_read_json(folder / "plans.json"))
        configuration = _configuration_of(folder)
        try:
            cm = pm.get_configuration(configuration)
        except Exception:  # nnU-Net raises RuntimeError / KeyError
            raise ModelError(
                f"{folder}: plans.json has no configuration {configuration!r}"
            ) from None
        lm = pm.get_label_manager(dataset_json)
        patch = tuple(int(n) for n in cm.patch_size)
        channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
        spec = InputSpec(len(patch), channels, patch, spacing=tuple(cm.spacing), modality="CT")
        return ModelInfo(
            name=f"{folder.parent.name}/{folder.name}",
            description=f"nnU-Net v2 model {pm.plans_name}, configuration {configuration}",
            class_names=class_names(dataset_json, lm), target_layer="", input=spec,
            preprocessing=[], task="multilabel" if lm.has_regions else "multiclass",
            guaranteed=False, trained=True, bundle_path=folder, kind="segmentation",
            patch=True, bundle_format="nnunet",
        )  # fmt: skip

    @property
    def architecture(self) -> str | None:
        plans = _read_json(self._bundle / "plans.json")
        config = plans.get("configurations", {}).get(_configuration_of(self._bundle), {})
        return config.get("architecture", {}).get("network_class_name")

    @property
    def folds(self) -> list[int | str]:
        """The folds averaged (every fold present unless chosen)."""
        return check_folds(self._bundle, self.fold_choice, self.checkpoint)

    @property
    def mirror(self) -> bool:
        """Whether mirrored passes are averaged: the choice, else whether the checkpoint
        allows any mirroring axis (as nnU-Net decides)."""
        if self.mirror_choice is not None:
            return bool(self.mirror_choice)
        return bool(self.model.mirror_axes)

    # -- loading --------------------------------------------------------------------------
    def build(self, seed: int | None = None) -> nn.Module:
        raise ModelError(f"{self._bundle}: an nnU-Net model is loaded from its folds, not built")

    @property
    def model(self) -> NnunetModel:
        """The opened nnU-Net model (folds' weights, nnU-Net's managers), cached."""
        with self._lock:
            if self._model is None:
                self._model = open_model(self._bundle, self.fold_choice, self.checkpoint)
            return self._model

    def load(self) -> tuple[nn.Module, ModelInfo]:
        """``(network with the first fold's weights, in eval mode, ModelInfo)``; the
        default layer is chosen by the audit on one patch."""
        with self._lock:
            if self._network is not None and self._loaded is not None:
                return self._network, self._loaded
            model = self.model
            info = self.info
            info.class_names = model.class_names
            try:
                self._adopt_default_layer(model.network, info)
            except BaseException:
                self._verdicts.clear()
                raise
            self._card = dataclasses.replace(info)
            self._remember(model.network, info)
            return model.network, info
