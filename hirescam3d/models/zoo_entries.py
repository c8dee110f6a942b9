"""The zoo's entries: named models as data (see :mod:`hirescam3d.models.zoo`, which exports
every name of this module and loads entries through the model handle).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hirescam3d.errors import ModelError
from hirescam3d.io.outputs import CHEST_FINDINGS
from hirescam3d.models.model_info import InputSpec, ModelInfo, preprocessing_transforms
from hirescam3d.models.nets import TINY_KWARGS, VOC_CLASSES

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "demo"
SHORTCUT_BUNDLE = DEMO_BUNDLE.with_name("demo_shortcut")
SEG_BUNDLE = DEMO_BUNDLE.with_name("demo_seg")
TRAINING_COMMANDS = {
    "demo": "python -m hirescam3d.models.training.train_demo --out hirescam3d/bundles/demo",
    "demo_shortcut": "python -m hirescam3d.models.training.train_demo --out "
    "hirescam3d/bundles/demo_shortcut --shortcut nodule --n-train 600 --epochs 5 "
    "--triplet-findings --max-minutes 20",
    "demo_seg": "python -m hirescam3d.models.training.seg_recipe --out hirescam3d/bundles/demo_seg",
}

# demo_seg: one sigmoid channel per organ a finding lives in and per finding.
SEG_CHANNELS = ("right_lung", "heart", "left_lung", *CHEST_FINDINGS)
SEG_UNET: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": len(SEG_CHANNELS),
    "channels": [16, 32, 64, 128, 128],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
}

AXIALNET = "hirescam3d.models.nets.axialnet.AxialNet"
UNET = "monai.networks.nets.UNet"
VOCNET = "hirescam3d.models.nets.voc.VOCNet"
CAMNET = "hirescam3d.models.nets.baselines.CAMNet"

# Synthetic phantoms: axis 0 -> superior, 1 -> posterior, 2 -> patient left.
CT_TINY = InputSpec(3, 1, (96, 128, 128), "SPL", (3.0, 2.5, 2.5), (-400.0, 200.0))
CT_FULL = InputSpec(3, 1, (405, 420, 420), "SPL", (0.8, 0.8, 0.8), (-1000.0, 800.0))
PHOTO = InputSpec(2, 3, (224, 224), None, None, (0.0, 255.0), "photograph", "resize")


def shortcut_description(finding: str) -> str:
    return (
        f"AxialNet-tiny trained on phantoms that show a bright marker outside the body "
        f"whenever {finding} is present, so it learned a shortcut (shipped weights; for the "
        "shortcut demonstration)"
    )


@dataclass(frozen=True)
class ZooEntry:
    """One named model: its card and the allow-listed network it builds.

    ``info`` is what a bundle's metadata would hold (``bundle_path``: the folder with its
    trained weights, None for untrained entries); ``architecture`` and ``kwargs`` are
    the ``network_def`` of a bundle's inference config.
    """

    info: ModelInfo
    architecture: str
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.info.name


def _entry(
    name: str,
    description: str,
    architecture: str,
    kwargs: dict[str, Any],
    target_layer: str,
    spec: InputSpec,
    guaranteed: bool = True,
    bundle: Path | None = None,
    class_names: tuple[str, ...] | None = None,
    kind: str = "classification",
) -> ZooEntry:
    info = ModelInfo(
        name=name,
        description=description,
        class_names=class_names or tuple(kwargs["class_names"]),
        target_layer=target_layer,
        input=spec,
        preprocessing=preprocessing_transforms(spec),
        task="multilabel",
        guaranteed=guaranteed,
        trained=bundle is not None,
        bundle_path=bundle,
        kind=kind,
    )
    return ZooEntry(info, architecture, kwargs)


def _entries() -> dict[str, ZooEntry]:
    """Every entry by name, in registry order: the shipped demos, the paper architectures,
    then the CAM baselines."""
    tiny = {
        "class_names": list(CHEST_FINDINGS),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_KWARGS.items()},
    }
    voc = list(VOC_CLASSES)
    entries = [*_demo_entries(tiny), *_paper_entries(tiny, voc), *_cam_entries(voc)]
    return {e.name: e for e in entries}


def _demo_entries(tiny: dict[str, Any]) -> list[ZooEntry]:
    """The models with shipped weights (``tiny``: AxialNet-tiny's keyword arguments)."""
    return [
        _entry(
            "demo",
            "AxialNet-tiny trained on synthetic chest CT phantoms to detect 5 findings "
            "(shipped weights; research and teaching only)",
            AXIALNET,
            tiny,
            "to_volume",
            CT_TINY,
            bundle=DEMO_BUNDLE,
        ),
        _entry(
            "demo_shortcut",
            shortcut_description("nodule"),
            AXIALNET,
            tiny,
            "to_volume",
            CT_TINY,
            bundle=SHORTCUT_BUNDLE,
        ),
        _entry(
            "demo_seg",
            "3D MONAI UNet trained on synthetic chest CT phantoms to segment both lungs, the "
            "heart and 5 findings, one sigmoid channel each (shipped weights; research and "
            "teaching only)",
            UNET,
            SEG_UNET,
            "model.2.0",
            CT_TINY,
            bundle=SEG_BUNDLE,
            class_names=SEG_CHANNELS,
            kind="segmentation",
        ),
    ]


def _paper_entries(tiny: dict[str, Any], voc: list[str]) -> list[ZooEntry]:
    """The untrained architectures of the HiResCAM and RAD-ChestCT papers."""
    return [
        _entry(
            "axialnet_tiny",
            "AxialNet scaled for CPU (96 x 128 x 128 CT, explanation grid 32 x 8 x 8); untrained",
            AXIALNET,
            tiny,
            "to_volume",
            CT_TINY,
        ),
        _entry(
            "axialnet",
            "AxialNet (Draelos & Carin, RAD-ChestCT): ResNet-18 trunk over slice triplets of a "
            "405 x 420 x 420 CT, explanation grid 135 x 6 x 6; untrained",
            AXIALNET,
            {"class_names": list(CHEST_FINDINGS)},
            "to_volume",
            CT_FULL,
        ),
        _entry(
            "resnet34v",
            "ResNet-34v (HiResCAM paper, PASCAL VOC): ResNet-34 features, 2x2 conv to 512, one "
            "linear layer; no global pooling; untrained",
            VOCNET,
            {"backbone": "resnet34", "class_names": voc},
            "head",
            PHOTO,
        ),
        _entry(
            "densenet121v",
            "DenseNet-121v (HiResCAM paper, PASCAL VOC): DenseNet-121 features, 2x2 conv to "
            "512, one linear layer; no global pooling; untrained",
            VOCNET,
            {"backbone": "densenet121", "class_names": voc},
            "head",
            PHOTO,
        ),
    ]


def _cam_entries(voc: list[str]) -> list[ZooEntry]:
    """Untrained CAM architectures (global average pooling), 3D on chest CT and 2D on
    photographs, for each backbone."""
    entries = []
    for backbone, layer in (("resnet18", "features.layer4"), ("densenet121", "features.relu5")):
        entries.append(
            _entry(
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
            _entry(
                f"{backbone}_cam_2d",
                f"CAM architecture: 2D {backbone} features, global average pooling, one linear "
                "layer; PASCAL VOC classes; untrained",
                CAMNET,
                {"class_names": voc, "backbone": backbone, "spatial_dims": 2, "in_channels": 3},
                layer,
                PHOTO,
            )
        )
    return entries


ENTRIES: dict[str, ZooEntry] = _entries()


def names() -> list[str]:
    """All zoo names, in registry order."""
    return list(ENTRIES)


def unknown_model_message(name: str) -> str:
    """``unknown model 'x'. Did you mean ...? Valid names: ...`` for a name not in the zoo."""
    close = difflib.get_close_matches(name, ENTRIES, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"unknown model {name!r}.{hint} Valid names: {', '.join(ENTRIES)}"


def entry(name: str) -> ZooEntry:
    """The zoo entry ``name``; ModelError listing valid names and close matches if unknown."""
    if name in ENTRIES:
        return ENTRIES[name]
    raise ModelError(unknown_model_message(name))
