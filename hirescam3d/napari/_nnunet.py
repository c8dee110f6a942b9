"""The napari worker's job for an nnU-Net v2 model folder (no Qt).

The CT layer is written, with its voxel -> RAS affine, to a NIfTI file in a temporary
folder, and explained there by :func:`hirescam3d.pipeline.nnunet_scan.explain_nnunet_scan`, the
code ``hirescam3d explain`` runs (nnU-Net's reader, preprocessing, tiles and export);
the maps and nnU-Net's segmentation are read back on the layer's grid.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hirescam3d.errors import InputError


def is_nnunet_model(model: str) -> bool:
    """Whether ``model`` names an nnU-Net trained-model folder (no weights read)."""
    from hirescam3d.models.nnunet import is_nnunet_folder

    return is_nnunet_folder(Path(model).expanduser())


def _region_labels(handle: Any, name: str) -> list[int]:
    """The segmentation labels that make up class ``name`` in nnU-Net's export."""
    model = handle.model
    c = list(model.class_names).index(name)
    if model.label_manager.has_regions:
        region = model.label_manager.foreground_regions[c]
        return [int(v) for v in (region if isinstance(region, (list, tuple)) else [region])]
    return [int(model.dataset_json["labels"][name])]


def explain_nnunet_image(
    image: np.ndarray,
    affine: np.ndarray,
    handle: Any,
    findings: list[str],
    methods: list[str],
    values: str = "unit",
    region: np.ndarray | None = None,
    organs: np.ndarray | None = None,
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, float], dict[str, np.ndarray]]:
    """Explain nnU-Net's prediction of ``image`` ``(I, J, K)`` (voxel -> RAS ``affine``)
    with the opened :class:`~hirescam3d.models.nnunet_handle.NnunetHandle` ``handle``.

    Returns ``(maps, probabilities, masks)`` on the image's grid: float32 maps keyed
    ``(finding, "hirescam")``, each finding's mean probability over its predicted region
    (nnU-Net's preprocessed grid), and uint8 masks of nnU-Net's segmentation per finding.
    InputError for what this path does not do (other methods, a painted region, organ
    fractions)."""
    import nibabel as nib

    from hirescam3d.pipeline.nnunet_scan import explain_nnunet_scan

    other = [m for m in methods if m != "hirescam"]
    if other or region is not None or organs is not None:
        what = (f"method {', '.join(other)}" if other else
                "a painted region" if region is not None else "organ fractions")  # fmt: skip
        raise InputError(
            f"{handle.bundle_path}: nnU-Net model folders are explained with hirescam on "
            f"nnU-Net's predicted regions; {what} is not supported for them: choose "
            "hirescam, Region 'predicted' and no organ layer"
        )
    with tempfile.TemporaryDirectory(prefix="hirescam3d-nnunet-") as tmp:
        scan = Path(tmp) / "layer.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(image, np.float32), np.asarray(affine)), scan)
        report, paths = explain_nnunet_scan(
            scan, Path(tmp) / "out", handle, findings or None, None, values, force=True
        )
        seg = np.asanyarray(nib.load(str(paths["segmentation"])).dataobj)
        maps, masks, probabilities = {}, {}, {}
        for name, entry in report["findings"].items():
            img = nib.load(str(paths[f"{name}/hirescam"]))
            maps[(name, "hirescam")] = np.asarray(img.get_fdata(dtype=np.float32))
            masks[name] = np.isin(seg, _region_labels(handle, name)).astype(np.uint8)
            p = entry["mean_probability"]
            probabilities[name] = float("nan") if p is None else float(p)
    return maps, probabilities, masks
