"""Explain one scan with an nnU-Net model folder and write the results.

:func:`explain_nnunet_scan` runs nnU-Net's preprocessing, its prediction and the
explanation on its tiles (:mod:`hirescam3d.pipeline.nnunet_explain`), takes the maps back to the
scan's grid with nnU-Net's export steps (:func:`hirescam3d.models.nnunet.to_scan`), and writes,
all checked before the first file exists:

- ``<stem>_<class>_hirescam.nii.gz`` per explained class, on the scan's grid:
  ``values="unit"``: ReLU of the map over its maximum (one scale per volume);
  ``"logit"``: logits per scan voxel (the preprocessed-grid density times the voxel
  volume ratio; its sum on the preprocessed grid is exact, see ``report.json``);
- ``<stem>_nnunet_segmentation.nii.gz``: nnU-Net's segmentation of the scan;
- ``report.json``: per class the region score (nnU-Net's logits summed over its mask),
  the map's sum, the segmentation bias, the region size and mean probability; the folds,
  flips and passes averaged; the layer and its audit verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hirescam3d.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.models.nnunet_handle import NnunetHandle
    from hirescam3d.pipeline.nnunet_explain import NnunetExplanation


def _scan_grid(scan: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The NIfTI affine of ``scan``; InputError unless nnU-Net read it as SimpleITK does
    (array axes reversed from NIfTI's)."""
    import nibabel as nib

    try:
        img = nib.load(str(scan))
    except Exception as err:  # nibabel raises several kinds
        raise InputError(f"{scan}: explanation maps are written as NIfTI on a NIfTI "
                         f"scan's grid; nibabel cannot read it ({err})") from None  # fmt: skip
    if tuple(img.shape[:3])[::-1] != tuple(shape):
        raise InputError(
            f"{scan}: nnU-Net's reader returned axes {tuple(shape)}, not the NIfTI axes "
            f"{tuple(img.shape[:3])} reversed; use a model whose plans read with SimpleITKIO"
        )
    return np.asarray(img.affine, dtype=np.float64)


def _report(
    e: NnunetExplanation, probabilities: np.ndarray, sums: np.ndarray, handle: NnunetHandle,
    mirror: bool,
) -> dict[str, Any]:  # fmt: skip
    findings = {}
    for k, (name, c) in enumerate(zip(e.names, e.targets, strict=True)):
        region = e.region[k]
        voxels = float(region.sum())
        findings[name] = {
            "region_score": float((region * e.logits[c].float()).sum()),
            "region_score_explained": float(e.region_scores[k]),
            "bias": float(e.bias[k]),
            "map_sum": float(e.raw[k].sum()),
            "map_sum_scan_grid": float(sums[k]),
            "region_voxels": voxels,
            "mean_probability": float(probabilities[c][probabilities.argmax(0) == c].mean())
            if (probabilities.argmax(0) == c).any() else None,
        }  # fmt: skip
    verdict = handle.audit(e.layer)
    return {
        "model": str(handle.bundle_path), "kind": "nnunet", "method": e.method,
        "layer": e.layer, "guaranteed": verdict.guaranteed, "audit": verdict.text(),
        "folds": [p for p in dict.fromkeys(str(p["fold"]) for p in e.passes)],
        "mirror": mirror, "passes": e.passes,
        "units": "map_sum = region_score_explained - bias * region_voxels (logits, "
                 "preprocessed grid); region_score: nnU-Net's float16-blended logits",
        "region": "predicted", "findings": findings,
    }  # fmt: skip


def explain_nnunet_scan(
    scan: str | Path,
    out: str | Path,
    handle: NnunetHandle,
    findings: list[str] | None = None,
    layer: str | None = None,
    values: str = "unit",
    force: bool = False,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Explain nnU-Net's prediction of ``scan`` for ``findings`` (default: every
    foreground class) and write the files of the module docstring into ``out``.

    Returns ``(report, {key: path})``; keys ``"<class>/hirescam"``, ``"segmentation"``,
    ``"report"``."""
    from hirescam3d.io.outputs import check_writable, write_json, write_labels, write_map
    from hirescam3d.io.scans import scan_stem
    from hirescam3d.models.nnunet import preprocess, segmentation, to_scan
    from hirescam3d.pipeline.nnunet_explain import explain_preprocessed

    scan, out = Path(scan), Path(out)
    model = handle.model
    layer = handle.check_layer(layer)
    pre = preprocess(model, scan)
    before = pre.properties["shape_before_cropping"]  # after nnU-Net's transpose
    affine = _scan_grid(scan, tuple(before[i] for i in model.plans_manager.transpose_backward))
    stem = scan_stem(scan)
    e = explain_preprocessed(model, pre, layer, findings, handle.mirror)
    paths = {f"{n}/hirescam": out / f"{stem}_{n}_hirescam.nii.gz" for n in e.names}
    paths |= {"segmentation": out / f"{stem}_nnunet_segmentation.nii.gz",
              "report": out / "report.json"}  # fmt: skip
    check_writable(paths.values(), force)
    seg, prob = segmentation(model, e.logits, pre.properties)
    ratio = float(np.prod(pre.properties["spacing"]) / np.prod(model.configuration_manager.spacing))
    maps = to_scan(model, e.raw.numpy(), pre.properties) * ratio
    report = _report(e, np.asarray(prob), maps.reshape(len(maps), -1).sum(1), handle,
                     handle.mirror)  # fmt: skip
    for k, name in enumerate(e.names):
        volume = maps[k].transpose(2, 1, 0)
        if values == "unit":
            volume = np.maximum(volume, 0) / max(float(volume.max()), 1e-30)
        write_map(paths[f"{name}/hirescam"], volume, affine, "hirescam", values, force=force)
    write_labels(paths["segmentation"], np.asarray(seg).transpose(2, 1, 0), affine, force,
                 name="nnunet")  # fmt: skip
    write_json(paths["report"], report, force=True)
    return report, paths
