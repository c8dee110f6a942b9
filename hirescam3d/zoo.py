"""The model zoo: named architectures with their input, preprocessing and explanation layer.

``load()`` returns the shipped demo model (AxialNet-tiny trained on synthetic chest CT
phantoms); ``load("resnet34v")`` an untrained, seeded network; ``load("path/to/bundle")``
any bundle saved with :func:`hirescam3d.bundle.save_bundle`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bundle import InputSpec, ModelInfo, load_bundle, preprocessing_transforms
from .errors import ModelError
from .models import VOC_CLASSES, build_network
from .models.axialnet import TINY_KWARGS

CHEST_FINDINGS = (
    "atelectasis",
    "pleural_effusion",
    "cardiomegaly",
    "nodule",
    "pericardial_effusion",
)
DEMO_BUNDLE = Path(__file__).resolve().parent / "bundles" / "demo"

AXIALNET = "hirescam3d.models.axialnet.AxialNet"
VOCNET = "hirescam3d.models.voc.VOCNet"
CAMNET = "hirescam3d.models.baselines.CAMNet"

# Synthetic phantoms: axis 0 -> superior, 1 -> posterior, 2 -> patient left.
CT_TINY = InputSpec(3, 1, (96, 128, 128), "SPL", (3.0, 2.5, 2.5), (-400.0, 200.0))
CT_FULL = InputSpec(3, 1, (405, 420, 420), "SPL", (0.8, 0.8, 0.8), (-1000.0, 800.0))
PHOTO = InputSpec(2, 3, (224, 224), None, None, (0.0, 255.0), "photograph", "resize")


@dataclass(frozen=True)
class ZooEntry:
    """One named model: architecture, classes, input, default layer and guarantee."""

    name: str
    description: str
    architecture: str
    kwargs: dict[str, Any]
    target_layer: str
    input: InputSpec
    task: str = "multilabel"
    guaranteed: bool = True
    bundle: Path | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.kwargs["class_names"])

    def preprocessing(self) -> list[dict[str, Any]]:
        """MONAI dictionary-transform specs, see :func:`preprocessing_transforms`."""
        return preprocessing_transforms(self.input)

    def build(self, seed: int = 0) -> nn.Module:
        """A freshly initialised network (seeded; the global RNG state is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = build_network(self.architecture, dict(self.kwargs), f"zoo entry {self.name}")
        return network

    def info(self, trained: bool = False) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            description=self.description,
            class_names=self.class_names,
            target_layer=self.target_layer,
            input=self.input,
            preprocessing=self.preprocessing(),
            task=self.task,
            guaranteed=self.guaranteed,
            trained=trained,
            training=dict(self.training),
        )


def _entries() -> dict[str, ZooEntry]:
    tiny = {
        "class_names": list(CHEST_FINDINGS),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_KWARGS.items()},
    }
    full = {"class_names": list(CHEST_FINDINGS)}
    voc = list(VOC_CLASSES)
    entries = [
        ZooEntry(
            "demo",
            "AxialNet-tiny trained on synthetic chest CT phantoms to detect 5 findings "
            "(shipped weights; research and teaching only)",
            AXIALNET,
            tiny,
            "to_volume",
            CT_TINY,
            bundle=DEMO_BUNDLE,
        ),
        ZooEntry(
            "axialnet_tiny",
            "AxialNet scaled for CPU (96 x 128 x 128 CT, explanation grid 32 x 8 x 8); untrained",
            AXIALNET,
            tiny,
            "to_volume",
            CT_TINY,
        ),
        ZooEntry(
            "axialnet",
            "AxialNet (Draelos & Carin, RAD-ChestCT): ResNet-18 trunk over slice triplets of a "
            "405 x 420 x 420 CT, explanation grid 135 x 6 x 6; untrained",
            AXIALNET,
            full,
            "to_volume",
            CT_FULL,
        ),
        ZooEntry(
            "resnet34v",
            "ResNet-34v (HiResCAM paper, PASCAL VOC): ResNet-34 features, 2x2 conv to 512, one "
            "linear layer; no global pooling; untrained",
            VOCNET,
            {"backbone": "resnet34", "class_names": voc},
            "head",
            PHOTO,
        ),
        ZooEntry(
            "densenet121v",
            "DenseNet-121v (HiResCAM paper, PASCAL VOC): DenseNet-121 features, 2x2 conv to "
            "512, one linear layer; no global pooling; untrained",
            VOCNET,
            {"backbone": "densenet121", "class_names": voc},
            "head",
            PHOTO,
        ),
    ]
    for backbone, layer in (("resnet18", "features.layer4"), ("densenet121", "features.relu5")):
        entries.append(
            ZooEntry(
                f"{backbone}_cam_3d",
                f"CAM architecture: 3D {backbone} features, global average pooling, one linear "
                "layer; chest CT findings; untrained",
                CAMNET,
                {
                    "class_names": list(CHEST_FINDINGS),
                    "backbone": backbone,
                    "spatial_dims": 3,
                    "in_channels": 1,
                },
                layer,
                CT_TINY,
            )
        )
        entries.append(
            ZooEntry(
                f"{backbone}_cam_2d",
                f"CAM architecture: 2D {backbone} features, global average pooling, one linear "
                "layer; PASCAL VOC classes; untrained",
                CAMNET,
                {"class_names": voc, "backbone": backbone, "spatial_dims": 2, "in_channels": 3},
                layer,
                PHOTO,
            )
        )
    return {e.name: e for e in entries}


ENTRIES: dict[str, ZooEntry] = _entries()


def names() -> list[str]:
    """All zoo names, in registry order."""
    return list(ENTRIES)


def entry(name: str) -> ZooEntry:
    """The zoo entry ``name``; ModelError listing valid names and close matches if unknown."""
    if name in ENTRIES:
        return ENTRIES[name]
    close = difflib.get_close_matches(name, ENTRIES, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ModelError(f"unknown model {name!r}.{hint} Valid names: {', '.join(ENTRIES)}")


def looks_like_path(text: str) -> bool:
    """True when ``text`` names a bundle folder rather than a zoo entry."""
    return "/" in text or "\\" in text or text.startswith(".") or Path(text).exists()


def load(name_or_path: str | Path | None = None, seed: int = 0) -> tuple[nn.Module, ModelInfo]:
    """``(network in eval mode, info)`` for a zoo name or a bundle folder.

    ``None`` or ``"demo"`` -> the shipped demo bundle. Zoo names without weights give a
    randomly initialised network (seeded by ``seed``) with ``info.trained == False``.
    """
    if name_or_path is None:
        name_or_path = "demo"
    text = str(name_or_path)
    # Zoo names win over same-named folders; anything path-like is a bundle folder.
    if isinstance(name_or_path, Path) or (text not in ENTRIES and looks_like_path(text)):
        return load_bundle(name_or_path)
    zoo_entry = entry(text)
    if zoo_entry.bundle is not None:
        if not zoo_entry.bundle.is_dir():
            raise ModelError(
                f"the {zoo_entry.name} bundle is not installed at {zoo_entry.bundle}; build it "
                "with `python -m hirescam3d.models.train_demo --out hirescam3d/bundles/demo`"
            )
        network, info = load_bundle(zoo_entry.bundle)
        info.name = zoo_entry.name
        return network, info
    network = zoo_entry.build(seed)
    network.eval()
    return network, zoo_entry.info(trained=False)
