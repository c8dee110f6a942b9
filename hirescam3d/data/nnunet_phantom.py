"""A small nnU-Net v2 model folder made with nnU-Net itself, from chest-CT phantoms.

``python -m hirescam3d.data.nnunet_phantom OUT [--folds 0 1]`` writes, under ``OUT``:

- ``nnUNet_raw/Dataset501_Phantom``: a few phantoms (:func:`hirescam3d.data.phantom.make_chest_ct`
  on a coarse grid) as an nnU-Net raw dataset, labels ``lungs`` (1) and ``heart`` (2);
- ``nnUNet_preprocessed/Dataset501_Phantom``: nnU-Net's fingerprint and plans
  (``extract_fingerprints`` + ``plan_experiments``, i.e. ``nnUNetv2_plan_and_preprocess``
  without the preprocessing of the training data, which nothing here needs);
- ``nnUNet_results/Dataset501_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres``: the
  trained-model folder, with the network built from the plans (by default narrowed to
  4 features in the first stage, so that tests run in seconds) by
  ``nnUNetTrainer.build_network_architecture`` and seeded random weights per fold, saved
  as ``fold_N/checkpoint_final.pth`` with the keys nnU-Net's trainer writes.

The weights are untrained: the folder exercises nnU-Net's code paths (plans,
preprocessing, tiling, export), not segmentation quality. Needs ``hirescam3d[nnunet]``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATASET_ID = 501
DATASET = "Dataset501_Phantom"
LABELS = {"background": 0, "lungs": 1, "heart": 2}
SHAPE = (24, 40, 40)  # voxels (S, H, W), the coarse training grid
SPACING = (6.0, 5.0, 5.0)  # mm


def _label_map(phantom: object) -> np.ndarray:
    """lungs = 1, heart = 2 from a phantom's organ map."""
    names = phantom.organ_names  # type: ignore[attr-defined]
    organs = phantom.organs  # type: ignore[attr-defined]
    out = np.zeros(organs.shape, np.uint8)
    out[np.isin(organs, [k for k, v in names.items() if "lung" in v])] = 1
    out[np.isin(organs, [k for k, v in names.items() if "heart" in v])] = 2
    return out


def write_phantom_ct(
    path: Path, seed: int, shape: Sequence[int] = SHAPE, spacing: Sequence[float] = SPACING
) -> Path:
    """One phantom CT (int16 HU) as NIfTI at ``path``; returns ``path``."""
    import nibabel as nib

    from hirescam3d.data.phantom import make_chest_ct

    p = make_chest_ct(seed=seed, findings=[], shape=tuple(shape), spacing=tuple(spacing))
    nib.save(nib.Nifti1Image(p.ct.astype(np.int16), p.affine), str(path))
    return path


def write_raw_dataset(raw: Path, cases: int = 3) -> Path:
    """The raw dataset folder ``raw/Dataset501_Phantom`` with ``cases`` phantoms."""
    import nibabel as nib

    from hirescam3d.data.phantom import make_chest_ct

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    for i in range(cases):
        p = make_chest_ct(seed=i, findings=[], shape=SHAPE, spacing=SPACING)
        nib.save(nib.Nifti1Image(p.ct.astype(np.int16), p.affine),
                 str(folder / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz"))  # fmt: skip
        nib.save(nib.Nifti1Image(_label_map(p), p.affine),
                 str(folder / "labelsTr" / f"phantom_{i:03d}.nii.gz"))  # fmt: skip
    meta = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases,
            "file_ending": ".nii.gz"}  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def _checkpoint(network: object, plans: dict, dataset_json: dict, fold: int) -> dict:
    """What nnU-Net's ``nnUNetTrainer.save_checkpoint`` writes, for untrained weights."""
    import torch

    return {
        "network_weights": network.state_dict(),  # type: ignore[attr-defined]
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                    "train_losses": [np.float32(-0.1)], "epoch_start_timestamps": [0.0]},
        "_best_ema": np.float64(0.5),
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }  # fmt: skip


def write_model_folder(
    results: Path, preprocessed: Path, folds: Sequence[int], width: int | None = 4
) -> Path:
    """The trained-model folder, network built from the plans, seeded weights per fold;
    ``width``: features of the first stage (doubling per stage; None: nnU-Net's plan)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((preprocessed / DATASET / "nnUNetPlans.json").read_text())
    if width is not None:  # the planned U-Net, narrower: same stages, kernels and strides
        for config in plans["configurations"].values():
            kwargs = config.get("architecture", {}).get("arch_kwargs", {})
            if "features_per_stage" in kwargs:
                n = len(kwargs["features_per_stage"])
                kwargs["features_per_stage"] = [width * 2**i for i in range(n)]
    dataset_json = json.loads((preprocessed / DATASET / "dataset.json").read_text())
    folder = results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    for fold in folds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fold)
            net = nnUNetTrainer.build_network_architecture(
                manager, config, 1, len(LABELS), enable_deep_supervision=False
            )
            with torch.no_grad():  # nnU-Net initialises biases to 0; trained ones are not
                for name, param in net.named_parameters():
                    if name.endswith("bias"):
                        param.normal_(0.0, 0.2)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(_checkpoint(net, plans, dataset_json, fold),
                   folder / f"fold_{fold}" / "checkpoint_final.pth")  # fmt: skip
    return folder


def build_phantom_model(
    root: Path, folds: Sequence[int] = (0, 1), cases: int = 2, width: int | None = 4
) -> Path:
    """Raw dataset, plans and model folder under ``root``; returns the model folder.

    Sets ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` in ``os.environ``
    to folders under ``root`` (nnU-Net reads them when planning).
    """
    root = Path(root)
    paths = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for key, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(path)
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api

    shutil.rmtree(paths["nnUNet_preprocessed"] / DATASET, ignore_errors=True)
    write_raw_dataset(paths["nnUNet_raw"], cases)
    api.extract_fingerprints([DATASET_ID], num_processes=1, verbose=False)
    api.plan_experiments([DATASET_ID])
    return write_model_folder(
        paths["nnUNet_results"], paths["nnUNet_preprocessed"], folds, width
    )


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--width", type=int, default=4, help="0: the planned width")
    args = parser.parse_args(argv)
    print(build_phantom_model(args.out, args.folds, width=args.width or None))


if __name__ == "__main__":
    main()
