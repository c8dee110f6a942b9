"""The model zoo: named models as data, listed without importing any architecture.

Each entry is what a bundle folder also records: a :class:`~hirescam3d.models.bundle.ModelInfo`
card (classes, input, preprocessing, default layer, the cached HiResCAM verdict) and an
allow-listed network definition (``_target_`` and keyword arguments). ``demo`` also
names the bundle that holds its trained weights.

Resolve, load, check findings and layers through :class:`hirescam3d.models.handle.ModelHandle`;
``load()`` here is a shortcut: ``load()`` returns the shipped demo model (AxialNet-tiny
trained on synthetic chest CT phantoms), ``load("resnet34v")`` an untrained, seeded
network, ``load("path/to/bundle")`` any bundle saved with
:func:`hirescam3d.models.bundle.save_bundle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hirescam3d.models.handle import ModelHandle
from hirescam3d.models.model_info import InputSpec, ModelInfo, preprocessing_transforms
from hirescam3d.models.zoo_entries import (
    AXIALNET,
    CAMNET,
    CHEST_FINDINGS,
    CT_FULL,
    CT_TINY,
    DEMO_BUNDLE,
    ENTRIES,
    PHOTO,
    SEG_BUNDLE,
    SEG_CHANNELS,
    SEG_UNET,
    SHORTCUT_BUNDLE,
    TINY_KWARGS,
    TRAINING_COMMANDS,
    UNET,
    VOC_CLASSES,
    VOCNET,
    ZooEntry,
    entry,
    names,
    shortcut_description,
    unknown_model_message,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

__all__ = [
    "AXIALNET",
    "CAMNET",
    "CHEST_FINDINGS",
    "CT_FULL",
    "CT_TINY",
    "DEMO_BUNDLE",
    "ENTRIES",
    "InputSpec",
    "ModelInfo",
    "PHOTO",
    "SEG_BUNDLE",
    "SEG_CHANNELS",
    "SEG_UNET",
    "SHORTCUT_BUNDLE",
    "TINY_KWARGS",
    "TRAINING_COMMANDS",
    "UNET",
    "VOCNET",
    "VOC_CLASSES",
    "ZooEntry",
    "entry",
    "load",
    "names",
    "preprocessing_transforms",
    "shortcut_description",
    "unknown_model_message",
]


def load(name_or_path: str | Path | None = None, seed: int = 0) -> tuple[nn.Module, ModelInfo]:
    """``(network in eval mode, info)`` for a zoo name or a bundle folder.

    A shortcut for ``ModelHandle.resolve(name_or_path, seed=seed).load()``: ``None`` or
    ``"demo"`` -> the shipped demo bundle; zoo names without weights give a randomly
    initialised network (seeded by ``seed``) with ``info.trained == False``.
    """
    return ModelHandle.resolve(name_or_path, seed=seed).load()
