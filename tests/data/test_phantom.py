"""Tests for the synthetic chest-CT phantom (hirescam3d.data.phantom)."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hirescam3d.data.phantom import (
    FINDING_ORGANS,
    FINDINGS,
    ORGAN_NAMES,
    ChestPhantom,
    make_chest_ct,
)
from hirescam3d.errors import InputError

SMALL = {"shape": (48, 64, 64), "spacing": (6.0, 5.0, 5.0)}
LABEL = {name: key for key, name in ORGAN_NAMES.items()}
RIGHT, HEART, LEFT = LABEL["right_lung"], LABEL["heart"], LABEL["left_lung"]


@pytest.fixture(scope="module")
def normal() -> ChestPhantom:
    return make_chest_ct(3, findings=(), **SMALL)


@pytest.fixture(scope="module")
def sick() -> ChestPhantom:
    return make_chest_ct(3, findings=FINDINGS, **SMALL)


@pytest.fixture(scope="module")
def default_normal() -> tuple[ChestPhantom, float]:
    make_chest_ct(0, findings=(), **SMALL)  # warm imports and caches
    start = time.perf_counter()
    phantom = make_chest_ct(11, findings=())
    return phantom, time.perf_counter() - start


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def z_extent(mask: np.ndarray) -> tuple[int, int]:
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(ks[0]), int(ks[-1])


# --------------------------------------------------------------------------- basics


def test_default_phantom_shape_dtype_hu_and_speed(default_normal):
    ph, seconds = default_normal
    assert ph.ct.shape == ph.organs.shape == ph.body.shape == (96, 128, 128)
    assert ph.ct.dtype == np.int16 and ph.organs.dtype == np.uint8
    assert ph.spacing == (3.0, 2.5, 2.5)
    assert ph.findings == {} and ph.present == () and not ph.labels.any()
    assert seconds < 2.0, f"default phantom took {seconds:.2f} s (budget is well under 0.5 s)"
    ct, org = ph.ct.astype(np.float64), ph.organs
    assert -900 <= ct[(org == RIGHT) | (org == LEFT)].mean() <= -780
    assert 0 <= ct[org == HEART].mean() <= 80
    assert ct[org == LABEL["spine"]].mean() > 300
    assert ct[org == LABEL["ribs"]].mean() > 250
    assert ct[org == LABEL["airway"]].mean() < -800
    assert 20 <= ct[org == LABEL["aorta"]].mean() <= 60
    assert 30 <= ct[org == LABEL["liver"]].mean() <= 75
    assert -1010 <= ct[~ph.body].mean() <= -980
    # Subcutaneous fat: the band 2.5-5 mm inside the skin of the middle slice.
    skin = ph.body[48]
    band = ndimage.binary_erosion(skin, iterations=1) & ~ndimage.binary_erosion(skin, iterations=2)
    assert -140 <= ct[48][band].mean() <= -50
    # Noise: neighbouring voxels of the uniform air differ by about sqrt(2) sigma.
    air = ct[:, :12, :12]
    sigma = np.diff(air, axis=2).std() / np.sqrt(2)
    assert 8 <= sigma <= 30


def test_small_phantom_shapes_and_affine(normal):
    assert normal.ct.shape == normal.organs.shape == (48, 64, 64)
    assert normal.ct.dtype == np.int16 and normal.organs.dtype == np.uint8
    assert normal.ct.min() >= -1024 and normal.ct.max() <= 3071
    aff = normal.affine
    assert aff.shape == (4, 4) and aff.dtype == np.float64
    np.testing.assert_allclose(aff[:3, :3], [[0, 0, -5.0], [0, -5.0, 0], [6.0, 0, 0]])
    assert nib.aff2axcodes(aff) == ("S", "P", "L")
    centre = aff @ np.array([23.5, 31.5, 31.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    # Column increases toward patient left = decreasing R; row toward posterior.
    r0 = aff @ np.array([0, 0, 0, 1.0])
    r1 = aff @ np.array([1, 1, 1, 1.0])
    assert r1[0] < r0[0] and r1[1] < r0[1] and r1[2] > r0[2]
    assert set(normal.organ_names) >= {1, 2, 3, 4, 5, 6}
    assert set(np.unique(normal.organs)) <= {0, *normal.organ_names}


def test_same_seed_identical_and_different_seeds_differ():
    a = make_chest_ct(5, findings=("nodule", "pleural_effusion"), **SMALL)
    b = make_chest_ct(5, findings=("pleural_effusion", "nodule"), **SMALL)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.organs, b.organs)
    assert a.findings.keys() == b.findings.keys()
    for name in a.findings:
        np.testing.assert_array_equal(a.findings[name], b.findings[name])
    c = make_chest_ct(6, findings=("nodule", "pleural_effusion"), **SMALL)
    assert not np.array_equal(a.organs, c.organs)
    assert np.mean(a.ct != c.ct) > 0.5
    lung_a = np.isin(a.organs, (RIGHT, LEFT)).sum()
    lung_c = np.isin(c.organs, (RIGHT, LEFT)).sum()
    assert lung_a != lung_c


def test_anatomy_is_independent_of_findings(normal, sick):
    no_cardio = make_chest_ct(3, findings=[f for f in FINDINGS if f != "cardiomegaly"], **SMALL)
    np.testing.assert_array_equal(no_cardio.organs, normal.organs)
    # Cardiomegaly only trades lung (and mediastinal fat) for heart and its fat line.
    changed = sick.organs != normal.organs
    assert changed.any()
    assert np.isin(normal.organs[changed], (HEART, RIGHT, LEFT, 0)).all()
    assert np.isin(sick.organs[changed], (HEART, RIGHT, LEFT, 0)).all()
    for name in ("airway", "spine", "ribs", "aorta", "liver"):
        np.testing.assert_array_equal(sick.organs == LABEL[name], normal.organs == LABEL[name])


def test_organ_layout(normal):
    org = normal.organs
    right, left = centroid(org == RIGHT), centroid(org == LEFT)
    heart, spine = centroid(org == HEART), centroid(org == LABEL["spine"])
    airway = centroid(org == LABEL["airway"])
    assert right[2] < left[2]  # right lung at small column indices
    assert heart[1] < spine[1]  # heart anterior to spine
    assert heart[2] > spine[2]  # heart left of midline
    assert airway[1] < spine[1]  # trachea anterior to the spine
    # Airway in the upper slices, reaching the top slice; heart in the lower-middle ones.
    lung_lo, lung_hi = z_extent(np.isin(org, (RIGHT, LEFT)))
    assert airway[0] > heart[0]
    assert org[-1].__eq__(LABEL["airway"]).any()
    assert lung_lo <= heart[0] <= (lung_lo + lung_hi) / 2
    # Abdomen below the lungs, lungs taper toward the apex.
    assert not np.isin(org[0], (RIGHT, LEFT)).any()
    assert (org[0] == LABEL["liver"]).any()
    lung_area = np.isin(org, (RIGHT, LEFT)).sum(axis=(1, 2))
    mid = (lung_lo + lung_hi) // 2
    assert lung_area[lung_hi] < 0.5 * lung_area[mid]
    # Ribs sit outside the lungs, in the body wall.
    ribs = org == LABEL["ribs"]
    assert ribs.any()
    assert not ndimage.binary_dilation(np.isin(org, (RIGHT, LEFT)))[ribs].all()


def test_coarse_phantom_is_the_same_chest(default_normal):
    fine, _ = default_normal
    coarse = make_chest_ct(11, findings=(), **SMALL)
    for label in (RIGHT, LEFT, HEART, LABEL["spine"]):
        mm_fine = centroid(fine.organs == label) * np.array(fine.spacing)
        mm_coarse = centroid(coarse.organs == label) * np.array(coarse.spacing)
        # Voxel-centre grids differ by half a voxel; allow that plus shape sampling error.
        assert np.abs(mm_fine - mm_coarse).max() < 6.0, ORGAN_NAMES[label]
        if label == LABEL["spine"]:
            continue  # thin bone and 4-6 mm discs are not resolved by 6 mm slices
        vol_fine = (fine.organs == label).sum() * np.prod(fine.spacing)
        vol_coarse = (coarse.organs == label).sum() * np.prod(coarse.spacing)
        assert abs(vol_fine - vol_coarse) / vol_fine < 0.15, ORGAN_NAMES[label]


# --------------------------------------------------------------------------- findings


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_finding_mask_lies_in_its_organs(seed):
    ph = make_chest_ct(seed, findings=FINDINGS, **SMALL)
    assert ph.present == FINDINGS
    np.testing.assert_array_equal(ph.labels, np.ones(len(FINDINGS), dtype=np.float32))
    for name, mask in ph.findings.items():
        assert mask.dtype == bool and mask.shape == ph.ct.shape
        assert mask.any(), name
        allowed = np.isin(ph.organs, [LABEL[o] for o in FINDING_ORGANS[name]])
        assert (allowed & mask).sum() >= 0.95 * mask.sum(), name


def test_atelectasis_is_dense_posterior_and_basal(sick):
    ct, org = sick.ct.astype(np.float64), sick.organs
    mask = sick.findings["atelectasis"]
    assert ct[mask].mean() > -300
    for label in (RIGHT, LEFT):
        part = mask & (org == label)
        if not part.any():
            continue
        lung = org == label
        assert centroid(part)[1] > centroid(lung)[1]  # posterior to the lung's centre
        lo, hi = z_extent(lung)
        assert z_extent(part)[1] <= (lo + hi) / 2  # lower half of that lung


def test_atelectasis_default_resolution_changes_lung_hu():
    healthy = make_chest_ct(4, findings=())
    ph = make_chest_ct(4, findings=("atelectasis",))
    mask = ph.findings["atelectasis"]
    assert -120 <= ph.ct[mask].mean() <= 40
    assert healthy.ct[mask].mean() < -600
    assert ph.details["atelectasis"]["sides"]


def test_pleural_effusion_is_dependent_fluid(sick, normal):
    ct, org = sick.ct.astype(np.float64), sick.organs
    mask = sick.findings["pleural_effusion"]
    core = ndimage.binary_erosion(mask)
    assert core.any()
    assert -40 <= ct[core].mean() <= 50
    assert normal.ct[mask].mean() < -500  # it replaces aerated lung
    for label in (RIGHT, LEFT):
        part = mask & (org == label)
        if not part.any():
            continue
        lung = org == label
        assert centroid(part)[1] > centroid(lung)[1]
        # Thickest at the base: it fills the lowest slice of the lung (the posterior
        # recess), and its AP depth peaks in the lower half of its extent.
        lo, _ = z_extent(lung)
        np.testing.assert_array_equal(part[lo], lung[lo])
        depth = part.sum(axis=1).max(axis=1)  # deepest column of each slice, in rows
        ks = np.flatnonzero(depth)
        assert np.argmax(depth) - ks[0] < (ks[-1] - ks[0]) / 2
        # Fluid hugs the posterior chest wall: the posterior-most lung voxel of each
        # slice with fluid is fluid.
        for k in ks:
            rows = np.flatnonzero(lung[k].any(axis=1))
            assert part[k, rows[-1]].any()


@pytest.mark.parametrize("seed", [0, 7, 12, 19])
def test_nodule_size_position_and_contrast(seed):
    ph = make_chest_ct(seed, findings=("nodule",), **SMALL)
    mask = ph.findings["nodule"]
    assert ndimage.label(mask)[1] == 1
    assert np.isin(ph.organs[mask], (RIGHT, LEFT)).all()
    diameter = ph.details["nodule"]["diameter_mm"]
    assert 4.0 <= diameter <= 15.0
    # Equivalent-sphere diameter of the voxelised mask is close to the drawn one.
    volume = mask.sum() * np.prod(ph.spacing)
    d_eq = (6 * volume / np.pi) ** (1 / 3)
    assert 0.5 * diameter <= d_eq <= 1.9 * diameter
    # Stands out above lung texture even after blur.
    lung = np.isin(ph.organs, (RIGHT, LEFT)) & ~mask
    lung_core = ndimage.binary_erosion(lung, iterations=2)
    assert ph.ct[mask].max() > np.percentile(ph.ct[lung_core], 99.9) + 150
    assert ph.ct[mask].max() > -450


def test_nodule_diameters_span_the_range():
    sizes = [
        make_chest_ct(s, findings=("nodule",), **SMALL).details["nodule"]["diameter_mm"]
        for s in range(12)
    ]
    assert min(sizes) >= 6.0 and max(sizes) <= 15.0
    assert max(sizes) - min(sizes) > 4.0


def test_cardiomegaly_enlarges_heart_into_left_lung(normal, sick):
    heart_n, heart_c = normal.organs == HEART, sick.organs == HEART
    assert heart_c.sum() > 1.3 * heart_n.sum()
    np.testing.assert_array_equal(sick.findings["cardiomegaly"], heart_c)
    assert (sick.organs == LEFT).sum() < (normal.organs == LEFT).sum()
    assert centroid(heart_c)[2] > centroid(heart_n)[2]  # grows toward the left
    assert 1.3 <= sick.details["cardiomegaly"]["scale"] <= 1.6


def test_pericardial_effusion_is_a_fluid_rim_in_a_normal_sized_heart(normal):
    ph = make_chest_ct(3, findings=("pericardial_effusion",), **SMALL)
    heart = ph.organs == HEART
    np.testing.assert_array_equal(heart, normal.organs == HEART)  # heart size unchanged
    rim = ph.findings["pericardial_effusion"]
    assert (rim & heart).sum() >= 0.95 * rim.sum()
    thickness = ph.details["pericardial_effusion"]["thickness_mm"]
    assert 5.0 <= thickness <= 15.0
    # The rim is the outer shell of the sac: every rim voxel is near the sac surface.
    depth = ndimage.distance_transform_edt(heart, sampling=ph.spacing)
    assert depth[rim].max() <= 1.25 * thickness + max(ph.spacing)
    assert np.median(depth[heart & ~rim]) > np.median(depth[rim])
    # Fluid (0-20 HU) replaces the sac's normal content where the rim is.
    ct = ph.ct.astype(np.float64)
    assert -40 <= ct[rim].mean() <= 30
    default = make_chest_ct(8, findings=("pericardial_effusion",))
    rim_d = default.findings["pericardial_effusion"]
    core = ndimage.binary_erosion(rim_d)
    assert -15 <= default.ct[core].mean() <= 30


def test_shortcut_marker_only_with_its_finding():
    with_finding = make_chest_ct(2, findings=("nodule",), shortcut="nodule", **SMALL)
    marker = with_finding.marker
    assert marker is not None and marker.any()
    assert not (marker & with_finding.body).any()
    assert (with_finding.organs[marker] == 0).all()
    assert with_finding.ct[marker].max() > 1000
    for mask in with_finding.findings.values():
        assert not (mask & marker).any()
    # Surrounded by air: a shell around the marker reads as air.
    shell = ndimage.binary_dilation(marker, iterations=2) & ~ndimage.binary_dilation(marker)
    assert np.median(with_finding.ct[shell]) < -800

    without = make_chest_ct(2, findings=("atelectasis",), shortcut="nodule", **SMALL)
    assert without.marker is None
    assert without.ct[~without.body].max() < 0
    plain = make_chest_ct(2, findings=("nodule",), **SMALL)
    assert plain.marker is None and plain.ct[~plain.body].max() < 0
    with pytest.raises(InputError, match="valid names"):
        make_chest_ct(2, shortcut="fracture", **SMALL)


def test_marker_can_be_decoupled_from_its_finding():
    coupled = make_chest_ct(2, findings=("nodule",), shortcut="nodule", **SMALL)
    # The marker alone, without the nodule: same place, same brightness.
    alone = make_chest_ct(2, findings=("atelectasis",), marker=True, **SMALL)
    assert alone.marker is not None and np.array_equal(alone.marker, coupled.marker)
    assert "nodule" not in alone.findings
    assert alone.ct[alone.marker].max() > 1000
    # The nodule without its marker: exactly the plain phantom.
    hidden = make_chest_ct(2, findings=("nodule",), shortcut="nodule", marker=False, **SMALL)
    plain = make_chest_ct(2, findings=("nodule",), **SMALL)
    assert hidden.marker is None and np.array_equal(hidden.ct, plain.ct)


def test_random_findings_vary_over_seeds():
    drawn = [
        make_chest_ct(s, shape=(32, 48, 48), spacing=(9.0, 6.7, 6.7)).present for s in range(40)
    ]
    assert any(len(p) == 0 for p in drawn)
    assert any(len(p) >= 2 for p in drawn)
    counts = {name: sum(name in p for p in drawn) for name in FINDINGS}
    for name, count in counts.items():
        assert 6 <= count <= 28, (name, count)
    again = make_chest_ct(17, shape=(32, 48, 48), spacing=(9.0, 6.7, 6.7))
    assert again.present == drawn[17]


# --------------------------------------------------------------------------- inputs


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(InputError) as err:
        make_chest_ct(0, findings=("nodule", "pneumothorax"), **SMALL)
    message = str(err.value)
    assert "pneumothorax" in message
    for name in FINDINGS:
        assert name in message
    with pytest.raises(InputError, match="pneumothorax"):
        make_chest_ct(0, findings="pneumothorax", **SMALL)
    with pytest.raises(InputError, match="shape"):
        make_chest_ct(0, shape=(48, 64), spacing=(6.0, 5.0, 5.0))
    with pytest.raises(InputError, match="spacing"):
        make_chest_ct(0, shape=(48, 64, 64), spacing=(6.0, -5.0, 5.0))
    with pytest.raises(InputError, match="seed"):
        make_chest_ct(-1, **SMALL)
    with pytest.raises(InputError, match="too small to show"):
        make_chest_ct(0, findings=("atelectasis",), shape=(8, 8, 8), spacing=(3.0, 2.5, 2.5))
    # A single name given as a string is one finding, not its letters.
    assert make_chest_ct(0, findings="nodule", **SMALL).present == ("nodule",)


# --------------------------------------------------------------------------- files


def test_save_round_trips_through_nibabel(tmp_path, sick):
    paths = sick.save(tmp_path / "out", stem="case7")
    expected = {"ct", "organs", "organs_json", "findings_json", *FINDINGS}
    assert set(paths) == expected
    ct_img = nib.load(paths["ct"])
    assert ct_img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(ct_img.dataobj), sick.ct)
    np.testing.assert_allclose(ct_img.affine, sick.affine)
    assert int(ct_img.header["sform_code"]) == 1 and int(ct_img.header["qform_code"]) == 1
    np.testing.assert_allclose(ct_img.header.get_qform(), sick.affine, atol=1e-5)
    assert nib.aff2axcodes(ct_img.affine) == ("S", "P", "L")
    organs_img = nib.load(paths["organs"])
    assert organs_img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(organs_img.dataobj), sick.organs)
    np.testing.assert_allclose(organs_img.affine, sick.affine)
    names = json.loads(paths["organs_json"].read_text())
    assert names == {str(k): v for k, v in ORGAN_NAMES.items()}
    assert json.loads(paths["findings_json"].read_text()) == list(FINDINGS)
    for name in FINDINGS:
        assert paths[name].name == f"case7_{name}.nii.gz"
        img = nib.load(paths[name])
        assert img.get_data_dtype() == np.uint8
        data = np.asarray(img.dataobj)
        assert set(np.unique(data)) <= {0, 1}
        np.testing.assert_array_equal(data.astype(bool), sick.findings[name])
        np.testing.assert_allclose(img.affine, sick.affine)

    loaded = ChestPhantom.load(tmp_path / "out", stem="case7", seed=3)
    np.testing.assert_array_equal(loaded.ct, sick.ct)
    np.testing.assert_array_equal(loaded.organs, sick.organs)
    assert loaded.present == sick.present and loaded.spacing == sick.spacing
    with pytest.raises(InputError, match="not found"):
        ChestPhantom.load(tmp_path / "out", stem="missing")


def test_save_writes_only_present_findings(tmp_path, normal):
    paths = normal.save(tmp_path)
    assert set(paths) == {"ct", "organs", "organs_json", "findings_json"}
    assert json.loads(paths["findings_json"].read_text()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["chest_ct.nii.gz", "chest_organs.nii.gz", "chest_organs.json", "chest_findings.json"]
    )
    with pytest.raises(InputError, match="stem"):
        normal.save(tmp_path, stem="a/b")
