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
    from hirescam3d.io.organs import OrgansOnGrid
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


def _add_organs(
    report: dict[str, Any], name: str, density: np.ndarray, organs: OrgansOnGrid
) -> None:
    """Organ parts of one class's map (logits per scan voxel, ``(I, J, K)``) in ``report``:
    its sums per organ under ``contributions`` and its positive shares under ``organs``."""
    from hirescam3d.core.attribution import voxel_label_sums

    parts = voxel_label_sums(density, organs.labels, organs.names)
    report.setdefault("organs", {})[name] = {"hirescam": parts.pop("shares")}
    report.setdefault("contributions", {})[name] = {"hirescam": {
        **parts, "units": "logits summed on the scan's grid (map_sum_scan_grid in all)"}}


def _write_class(
    paths: dict[str, Path], name: str, density: np.ndarray, affine: np.ndarray, ct: Any,
    values: str, dtype: str, force: bool,
) -> None:  # fmt: skip
    """One class's map ``(I, J, K)`` (``density``: logits per scan voxel) as NIfTI, and its
    montage over ``ct`` (HU, same grid) when ``ct`` is given."""
    from hirescam3d.io.montage import save_montage
    from hirescam3d.io.outputs import write_map

    volume = density
    if values == "unit":
        volume = np.maximum(density, 0) / max(float(density.max()), 1e-30)
    key = f"{name}/hirescam"
    write_map(paths[key], volume, affine, "hirescam", values, dtype, force=force)
    if ct is not None:
        save_montage(ct, volume, paths[key + "/png"], affine=affine, force=force,
                     title=f"{name} (hirescam, nnU-Net)")


def explain_nnunet_scan(
    scan: str | Path,
    out: str | Path,
    handle: NnunetHandle,
    findings: list[str] | None = None,
    layer: str | None = None,
    values: str = "unit",
    force: bool = False,
    organs_path: str | Path | None = None,
    organ_names_path: str | Path | None = None,
    png: bool = False,
    dtype: str = "float32",
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Explain nnU-Net's prediction of ``scan`` for ``findings`` (default: every
    foreground class) and write the files of the module docstring into ``out``.

    ``organs_path`` (and ``organ_names_path``): an organ label map (or TotalSegmentator's
    output) as for :func:`hirescam3d.pipeline.explain_scan`; the report then gives each
    map's logits and positive shares per organ, on the scan's grid. ``png``: a montage
    per map over the CT. ``dtype``: the maps' storage type (``float32``; ``int16``
    or ``uint8`` for unit maps, as :func:`hirescam3d.io.outputs.write_map` stores them).
    Returns ``(report, {key: path})``; keys ``"<class>/hirescam"``
    (and ``"<class>/hirescam/png"``), ``"segmentation"``, ``"report"``."""
    from hirescam3d.io.organs import organs_on_grid
    from hirescam3d.io.outputs import check_writable, write_json, write_labels
    from hirescam3d.io.scans import read_scan, scan_stem
    from hirescam3d.io.staging import Staging
    from hirescam3d.models.nnunet import preprocess, segmentation, to_scan
    from hirescam3d.pipeline.nnunet_explain import explain_preprocessed
    from hirescam3d.pipeline.report import organ_map_entry

    scan, out = Path(scan), Path(out)
    model = handle.model
    layer = handle.check_layer(layer)
    pre = preprocess(model, scan)
    before = pre.properties["shape_before_cropping"]  # after nnU-Net's transpose
    zyx = tuple(before[i] for i in model.plans_manager.transpose_backward)
    affine = _scan_grid(scan, zyx)
    organs = None
    if organs_path is not None:
        organs = organs_on_grid(organs_path, organ_names_path, zyx[::-1], affine)
    stem = scan_stem(scan)
    e = explain_preprocessed(model, pre, layer, findings, handle.mirror)
    paths = {f"{n}/hirescam": out / f"{stem}_{n}_hirescam.nii.gz" for n in e.names}
    paths |= {f"{n}/hirescam/png": out / f"{stem}_{n}_hirescam.png" for n in e.names if png}
    paths |= {"segmentation": out / f"{stem}_nnunet_segmentation.nii.gz",
              "report": out / "report.json"}  # fmt: skip
    check_writable(paths.values(), force)
    seg, prob = segmentation(model, e.logits, pre.properties)
    ratio = float(np.prod(pre.properties["spacing"]) / np.prod(model.configuration_manager.spacing))
    maps = to_scan(model, e.raw.numpy(), pre.properties) * ratio
    report = _report(e, np.asarray(prob), maps.reshape(len(maps), -1).sum(1), handle,
                     handle.mirror)  # fmt: skip
    if organs is not None:
        report["organ_map"] = organ_map_entry(organs_path, organs.names)
        report["warnings"] = [organs.note] if organs.note else []
    ct = read_scan(scan).array if png else None
    stage = Staging(out)
    staged = stage.redirect(paths)
    try:  # into a temporary folder, moved into place whole: a failure leaves nothing
        for k, name in enumerate(e.names):
            density = maps[k].transpose(2, 1, 0)
            if organs is not None:
                _add_organs(report, name, density, organs)
            _write_class(staged, name, density, affine, ct, values, dtype, force)
        write_labels(staged["segmentation"], np.asarray(seg).transpose(2, 1, 0), affine,
                     force, name="nnunet")  # fmt: skip
        write_json(staged["report"], report, force=True)
        return report, stage.commit(staged)
    except BaseException:
        stage.discard()
        raise
