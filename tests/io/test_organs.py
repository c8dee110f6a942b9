"""Organ label maps: names (TotalSegmentator too), grid alignment, attribution."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from hirescam3d.errors import InputError, ScanError
from hirescam3d.io.organs import (
    align_organs,
    group_fractions,
    load_organ_map,
    organ_fractions,
    organ_group,
)


@pytest.mark.parametrize(
    "name,group",
    [("lung_upper_lobe_left", "left_lung"), ("lung_lower_lobe_left", "left_lung"),
     ("lung_middle_lobe_right", "right_lung"), ("lung_upper_lobe_right", "right_lung"),
     ("heart", "heart"), ("heart_atrium_left", "heart"), ("trachea", "airway"),
     ("vertebrae_T7", "spine"), ("vertebrae_L1", "spine"), ("rib_left_3", "ribs"),
     ("rib_right_12", "ribs"), ("right_lung", "right_lung"), ("aorta", "aorta"),
     ("liver", "liver"), ("esophagus", "esophagus")],
)
def test_organ_groups(name, group):
    assert organ_group(name) == group


def labels_volume() -> np.ndarray:
    lab = np.zeros((20, 24, 16), np.uint8)
    lab[2:9, 3:20, 2:14] = 1
    lab[11:18, 3:20, 2:14] = 3
    lab[8:12, 8:14, 5:11] = 2
    return lab


def test_load_with_sidecar_and_explicit_names(tmp_path):
    lab = labels_volume()
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "seg.json").write_text(json.dumps({"1": "right_lung", "2": "heart",
                                                    "3": "left_lung"}))
    labels, aff, names = load_organ_map(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(labels, lab)
    np.testing.assert_array_equal(aff, affine)
    assert names == {1: "right_lung", 2: "heart", 3: "left_lung"}
    # explicit names win; {"name": label} is accepted; unnamed labels get a placeholder
    (tmp_path / "other.json").write_text(json.dumps({"lung_upper_lobe_right": 1,
                                                      "heart": 2}))
    _, _, names = load_organ_map(tmp_path / "seg.nii.gz", tmp_path / "other.json")
    assert names == {1: "lung_upper_lobe_right", 2: "heart", 3: "label_3"}


def test_load_errors(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)),
             str(tmp_path / "empty.nii.gz"))
    with pytest.raises(ScanError, match="empty"):
        load_organ_map(tmp_path / "empty.nii.gz")
    frac = np.full((5, 5, 5), 0.5, np.float32)
    nib.save(nib.Nifti1Image(frac, np.eye(4)), str(tmp_path / "prob.nii.gz"))
    with pytest.raises(ScanError, match="non-negative integers"):
        load_organ_map(tmp_path / "prob.nii.gz")
    nib.save(nib.Nifti1Image(labels_volume(), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        load_organ_map(tmp_path / "seg.nii.gz", tmp_path / "bad.json")
    (tmp_path / "keys.json").write_text(json.dumps({"lung": "heart"}))
    with pytest.raises(InputError, match="label numbers"):
        load_organ_map(tmp_path / "seg.nii.gz", tmp_path / "keys.json")


def test_totalsegmentator_mask_folder(tmp_path):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    shape = (10, 10, 10)
    masks = {"lung_upper_lobe_left": (slice(0, 5), slice(0, 5)),
             "lung_lower_lobe_left": (slice(5, 10), slice(0, 5)),
             "heart": (slice(0, 10), slice(6, 10))}
    for name, (a, b) in masks.items():
        m = np.zeros(shape, np.uint8)
        m[a, b, 2:8] = 1
        nib.save(nib.Nifti1Image(m, affine), str(tmp_path / f"{name}.nii.gz"))
    labels, aff, names = load_organ_map(tmp_path)
    assert names == {1: "heart", 2: "lung_lower_lobe_left", 3: "lung_upper_lobe_left"}
    np.testing.assert_array_equal(aff, affine)
    assert labels[1, 1, 3] == 3 and labels[7, 1, 3] == 2 and labels[4, 8, 3] == 1
    vol = np.zeros(shape)
    vol[:, :5, 2:8] = 1.0  # all mass in the left lung, split over two lobes
    fr = organ_fractions(vol, labels, names)
    assert fr["lung_upper_lobe_left"] == pytest.approx(0.5)
    assert group_fractions(fr) == pytest.approx({"heart": 0.0, "left_lung": 1.0})


def test_fractions_hand_example():
    labels = np.array([[[0, 1], [1, 2]], [[2, 2], [3, 0]]], np.uint8)
    vol = np.array([[[1.0, 2.0], [3.0, 1.0]], [[-5.0, 2.0], [1.0, 0.0]]])
    # positive mass: 1 (bg) + 2 + 3 (label 1) + 1 + 2 (label 2; -5 ignored) + 1 (label 3) = 10
    names = {1: "left_lung", 2: "heart", 3: "trachea"}
    fr = organ_fractions(vol, labels, names)
    assert fr == pytest.approx({"left_lung": 0.5, "heart": 0.3, "trachea": 0.1})
    assert sum(fr.values()) <= 1.0
    # two labels with one name are summed
    assert organ_fractions(vol, labels, {1: "lung", 3: "lung"}) == pytest.approx({"lung": 0.6})
    assert organ_fractions(np.zeros_like(vol), labels, names) == {
        "left_lung": 0.0, "heart": 0.0, "trachea": 0.0}
    with pytest.raises(InputError, match="differ in shape"):
        organ_fractions(vol[:1], labels, names)


def test_align_same_grid_is_identity():
    lab = labels_volume()
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    out, warning = align_organs(lab, affine, lab.shape, affine)
    assert out is lab and warning is None


def test_align_different_grid_resamples_nearest_with_warning():
    """A label map at half resolution lands on the scan grid where its world positions are."""
    scan_shape = (40, 48, 32)
    scan_affine = np.diag([1.0, 0.75, 1.5, 1.0])
    scan_affine[:3, 3] = [-20.0, 10.0, 5.0]
    lab = labels_volume()  # (20, 24, 16) at twice the spacing, same field of view
    lab_affine = np.diag([2.0, 1.5, 3.0, 1.0])
    lab_affine[:3, 3] = scan_affine[:3, 3] + 0.5 * np.diag(lab_affine)[:3] - 0.5 * np.diag(
        scan_affine)[:3]  # voxel centres of the coarse grid sit between fine voxels
    out, warning = align_organs(lab, lab_affine, scan_shape, scan_affine, "organ map x.nii")
    assert out.shape == scan_shape and out.dtype == lab.dtype
    assert "organ map x.nii is on a different grid" in warning and "nearest" in warning
    assert set(np.unique(out)) == {0, 1, 2, 3}
    inv = np.linalg.inv(lab_affine)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in scan_shape], indexing="ij"), -1)
    world = idx.reshape(-1, 3) @ scan_affine[:3, :3].T + scan_affine[:3, 3]
    src = np.floor(world @ inv[:3, :3].T + inv[:3, 3] + 0.5).astype(int)
    ok = np.all((src >= 0) & (src < lab.shape), axis=1)
    expected = lab[tuple(src[ok].T)]
    assert np.mean(out.reshape(-1)[ok] == expected) > 0.97


def test_align_partial_and_no_overlap():
    lab = labels_volume()
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    shifted = affine.copy()
    shifted[0, 3] = 26.0  # most of the labels lie beyond the scan's first axis (40 mm)
    out, warning = align_organs(lab, shifted, lab.shape, affine)
    assert "only about" in warning and out.any()
    far = affine.copy()
    far[:3, 3] = [500.0, 0.0, 0.0]
    with pytest.raises(ScanError, match="does not overlap the scan"):
        align_organs(lab, far, lab.shape, affine)


def test_explain_scan_with_organs_on_another_grid(tmp_path):
    from hirescam3d.io.outputs import write_labels
    from hirescam3d.pipeline import explain_scan
    from tests.pipeline.test_pipeline import blob_model, oblique_phantom

    ct, organs, names, affine, _ = oblique_phantom()
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(tmp_path / "chest.nii.gz"))
    coarse = affine.copy()
    coarse[:3, :3] *= 2.0
    write_labels(tmp_path / "organs.nii.gz", organs[::2, ::2, ::2], coarse)
    (tmp_path / "names.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    result, written = explain_scan(
        tmp_path / "chest.nii.gz", tmp_path / "out", model=blob_model(), findings=["blob"],
        organs_path=tmp_path / "organs.nii.gz", organ_names_path=tmp_path / "names.json",
        device="cpu",
    )
    report = json.loads(written["report"].read_text())
    assert any("different grid" in w for w in report["warnings"])
    by_label = report["organs"]["blob"]["hirescam"]["by_label"]
    assert max(by_label, key=by_label.get) == "right_lung"
    assert result.organs.shape == ct.shape


@pytest.mark.parametrize(
    ("stored", "slope", "want"),
    [
        (np.uint8, None, np.uint8),  # stored as integers: read as they are
        (np.int16, None, np.uint8),
        (np.uint16, None, np.uint16),  # label 300 needs 16 bits
        (np.int16, 2.0, np.uint8),  # scaled: read as floats, the labels are the scaled values
        (np.float32, None, np.uint8),
    ],
)
def test_label_storage_types_read_as_nibabel_scales_them(tmp_path, stored, slope, want):
    """The labels equal nibabel's own scaled reading of the file, whatever the stored type
    and scaling; negative stored integers are refused."""
    labels = np.zeros((6, 7, 8), stored)
    labels[1:3, 2:5, 3:6] = 1
    labels[4, 5, 6] = 300 if stored == np.uint16 else 3
    img = nib.Nifti1Image(labels, np.eye(4))
    if slope is not None:
        img.header.set_slope_inter(slope, 0)
    nib.save(img, str(tmp_path / "seg.nii.gz"))
    got, _, names = load_organ_map(tmp_path / "seg.nii.gz")
    expect = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).get_fdata())
    assert got.dtype == want and np.array_equal(got, expect)
    assert sorted(names) == sorted(int(v) for v in np.unique(expect) if v)
    if np.issubdtype(stored, np.signedinteger) and slope is None:
        labels[0, 0, 0] = -1
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "neg.nii.gz"))
        with pytest.raises(ScanError, match="non-negative integers"):
            load_organ_map(tmp_path / "neg.nii.gz")
