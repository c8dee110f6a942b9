"""Synthetic chest-CT phantom with organ labels and finding masks.

The phantom is a non-contrast chest CT in Hounsfield units, built from simple
analytic shapes (ellipses, ellipsoids, swept tubes) defined in millimetres, so a
coarser ``shape``/``spacing`` samples the same chest. Every random choice comes
from ``numpy.random.default_rng`` streams derived from the seed: anatomy,
texture, noise and each finding have their own stream, so the same seed gives
the same anatomy and noise whatever findings are requested.

Array layout (all volumes have shape ``(S, H, W)``):

* axis 0: axial slice, index increases toward patient superior;
* axis 1: row, index increases toward patient posterior (row 0 is anterior);
* axis 2: column, index increases toward patient left (radiological display:
  the right lung sits at small column indices).

The matching affine maps voxel indices to RAS world millimetres with axis codes
``("S", "P", "L")`` and the volume centred on the world origin.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from hirescam3d.errors import InputError

FINDINGS: tuple[str, ...] = (
    "atelectasis",
    "pleural_effusion",
    "cardiomegaly",
    "nodule",
    "pericardial_effusion",
)

ORGAN_NAMES: dict[int, str] = {
    1: "right_lung",
    2: "heart",
    3: "left_lung",
    4: "airway",
    5: "spine",
    6: "ribs",
    7: "aorta",
    8: "liver",
}

FINDING_ORGANS: dict[str, tuple[str, ...]] = {
    "atelectasis": ("right_lung", "left_lung"),
    "pleural_effusion": ("right_lung", "left_lung"),
    "cardiomegaly": ("heart",),
    "nodule": ("right_lung", "left_lung"),
    "pericardial_effusion": ("heart",),
}

PRESENCE_PROBABILITY = 0.4
# Real nodules start at ~4 mm, but below ~6 mm a nodule covers about one 2.5 x 2.5 x 3 mm
# voxel and the blur drowns it, so the phantom draws 6-15 mm.
NODULE_DIAMETER_MM = (6.0, 15.0)
MARKER_HU = 1500.0
MARKER_RADIUS_MM = 6.0

_RIGHT, _HEART, _LEFT, _AIRWAY, _SPINE, _RIBS, _AORTA, _LIVER = range(1, 9)
_STREAM_ANATOMY, _STREAM_PRESENCE, _STREAM_TEXTURE, _STREAM_NOISE = 0, 1, 2, 3
_STREAM_FINDING = {name: 10 + i for i, name in enumerate(FINDINGS)}


@dataclass(eq=False)
class ChestPhantom:
    """One synthetic chest CT with its ground truth.

    ``ct`` is int16 HU, ``organs`` a uint8 label map (keys of ``organ_names``,
    0 = no organ), ``findings`` maps each *present* finding to a bool mask; all
    have shape ``(S, H, W)``. ``affine`` maps voxel indices to RAS mm and
    ``spacing`` is in mm along (axis0, axis1, axis2). ``marker`` is the bool
    mask of the shortcut marker (``None`` when no marker was drawn), ``body``
    the bool mask of the patient's body, ``details`` JSON-friendly parameters
    of the drawn findings (sizes in mm, sides).
    """

    ct: np.ndarray
    organs: np.ndarray
    organ_names: dict[int, str]
    findings: dict[str, np.ndarray]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    seed: int
    shortcut: str | None = None
    marker: np.ndarray | None = None
    body: np.ndarray | None = None
    details: dict[str, dict] = field(default_factory=dict)

    @property
    def present(self) -> tuple[str, ...]:
        """Present findings, in ``FINDINGS`` order."""
        return tuple(name for name in FINDINGS if name in self.findings)

    @property
    def labels(self) -> np.ndarray:
        """Float32 vector of shape (len(FINDINGS),): 1.0 where the finding is present."""
        return np.array([name in self.findings for name in FINDINGS], dtype=np.float32)

    def save(self, directory: str | Path, stem: str = "chest") -> dict[str, Path]:
        """Write the phantom as NIfTI files plus JSON sidecars into ``directory``.

        Files: ``<stem>_ct.nii.gz`` (int16 HU), ``<stem>_organs.nii.gz`` (uint8),
        ``<stem>_organs.json`` (``{"1": "right_lung", ...}``), one
        ``<stem>_<finding>.nii.gz`` (uint8 0/1) per present finding and
        ``<stem>_findings.json`` (list of present findings). Returns name -> path
        with keys ``ct``, ``organs``, ``organs_json``, ``findings_json`` and the
        finding names.
        """
        if not stem or "/" in stem or "\\" in stem:
            raise InputError(f"stem {stem!r} must be a non-empty file name prefix without '/'")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "ct": out / f"{stem}_ct.nii.gz",
            "organs": out / f"{stem}_organs.nii.gz",
            "organs_json": out / f"{stem}_organs.json",
            "findings_json": out / f"{stem}_findings.json",
        }
        _write_nifti(self.ct.astype(np.int16, copy=False), self.affine, paths["ct"])
        _write_nifti(self.organs.astype(np.uint8, copy=False), self.affine, paths["organs"])
        names = {str(k): v for k, v in sorted(self.organ_names.items())}
        paths["organs_json"].write_text(json.dumps(names, indent=2) + "\n")
        for name in self.present:
            paths[name] = out / f"{stem}_{name}.nii.gz"
            _write_nifti(self.findings[name].astype(np.uint8), self.affine, paths[name])
        paths["findings_json"].write_text(json.dumps(list(self.present)) + "\n")
        return paths

    @classmethod
    def load(cls, directory: str | Path, stem: str = "chest", seed: int = -1) -> ChestPhantom:
        """Read a phantom written by :meth:`save` (``seed`` is not stored; pass it if known)."""
        import nibabel as nib

        root = Path(directory)
        ct_path = root / f"{stem}_ct.nii.gz"
        if not ct_path.exists():
            raise InputError(f"{ct_path} not found; expected files written by ChestPhantom.save")
        ct_img = nib.load(ct_path)
        ct = np.asarray(ct_img.dataobj, dtype=np.int16)
        organs = np.asarray(nib.load(root / f"{stem}_organs.nii.gz").dataobj, dtype=np.uint8)
        names_raw = json.loads((root / f"{stem}_organs.json").read_text())
        present = json.loads((root / f"{stem}_findings.json").read_text())
        findings = {
            name: np.asarray(nib.load(root / f"{stem}_{name}.nii.gz").dataobj) > 0
            for name in present
        }
        zooms = tuple(float(v) for v in ct_img.header.get_zooms()[:3])
        return cls(
            ct=ct,
            organs=organs,
            organ_names={int(k): v for k, v in names_raw.items()},
            findings=findings,
            affine=np.asarray(ct_img.affine, dtype=np.float64),
            spacing=zooms,  # type: ignore[arg-type]
            seed=seed,
        )


def make_chest_ct(
    seed: int,
    findings: Iterable[str] | None = None,
    shape: tuple[int, int, int] = (96, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 2.5, 2.5),
    shortcut: str | None = None,
    marker: bool | None = None,
) -> ChestPhantom:
    """Build a synthetic chest CT of ``shape`` voxels at ``spacing`` mm.

    ``findings=None`` draws each finding independently with probability 0.4
    from the seed; otherwise exactly the named findings are drawn. With
    ``shortcut`` set to a finding name, a bright marker (1500 HU ball, 12 mm)
    is drawn in the air at the anterior-right corner whenever that finding is
    present. ``marker=True`` / ``False`` draws the marker always / never, whatever the
    findings (test sets that decouple the marker from the finding). Raises
    :class:`InputError` for unknown names or bad geometry.
    """
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    present = _resolve_findings(seed, findings)
    if shortcut is not None and shortcut not in FINDINGS:
        raise InputError(
            f"unknown shortcut finding {shortcut!r}; valid names are: {', '.join(FINDINGS)}"
        )

    grid = _Grid(shape, spacing)
    anat = _draw_anatomy(np.random.default_rng([seed, _STREAM_ANATOMY]))
    frng = {name: np.random.default_rng([seed, _STREAM_FINDING[name]]) for name in present}
    details: dict[str, dict] = {}
    cardio_scale, peri_mm = _draw_heart_findings(frng, details)

    scene = _build_anatomy(grid, anat, cardio_scale, peri_mm)
    ct, organs = scene.ct, scene.organs
    ct += (
        np.float32(anat["tex_amp"])
        * _smooth_field(np.random.default_rng([seed, _STREAM_TEXTURE]), grid, 10.0)
        * scene.lung_any
    )
    masks = _paint_findings(frng, grid, anat, scene, details)
    _check_findings_visible(masks, present, grid)

    if marker is None:
        marker = shortcut is not None and shortcut in present
    if marker:
        marker_mask = _marker(grid, scene.body2d)
        ct[marker_mask] = MARKER_HU
        details["shortcut"] = {"finding": shortcut}
    else:
        marker_mask = None

    return ChestPhantom(
        ct=_scan(ct, anat, grid, seed),
        organs=organs,
        organ_names=dict(ORGAN_NAMES),
        findings={name: masks[name] for name in FINDINGS if name in masks},
        affine=grid.affine(),
        spacing=spacing,
        seed=seed,
        shortcut=shortcut,
        marker=marker_mask,
        body=np.broadcast_to(scene.body2d, shape).copy(),
        details=details,
    )


# --------------------------------------------------------------------------- inputs


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_shape(shape: Iterable[int]) -> tuple[int, int, int]:
    dims = tuple(shape)
    if len(dims) != 3 or not all(isinstance(d, numbers.Integral) and d >= 8 for d in dims):
        raise InputError(f"shape must be 3 integers >= 8 (slices, rows, columns), got {shape!r}")
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


def _check_spacing(spacing: Iterable[float]) -> tuple[float, float, float]:
    vals = tuple(spacing)
    ok = len(vals) == 3 and all(
        isinstance(v, numbers.Real) and np.isfinite(v) and 0.2 <= v <= 20.0 for v in vals
    )
    if not ok:
        raise InputError(f"spacing must be 3 numbers in [0.2, 20] mm, got {spacing!r}")
    return tuple(float(v) for v in vals)  # type: ignore[return-value]


def _resolve_findings(seed: int, findings: Iterable[str] | None) -> tuple[str, ...]:
    if findings is None:
        draws = np.random.default_rng([seed, _STREAM_PRESENCE]).random(len(FINDINGS))
        hits = draws < PRESENCE_PROBABILITY
        return tuple(name for name, hit in zip(FINDINGS, hits, strict=True) if hit)
    names = [findings] if isinstance(findings, str) else list(findings)
    unknown = [name for name in names if name not in FINDINGS]
    if unknown:
        raise InputError(
            f"unknown finding name(s) {unknown}; valid names are: {', '.join(FINDINGS)}"
        )
    return tuple(name for name in FINDINGS if name in names)


# --------------------------------------------------------------------------- geometry


class _Grid:
    """Voxel-centre coordinates in mm: z superior+, y posterior+, x left+, centred on 0."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        self.z, self.y, self.x = (
            (np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)
        )
        self.axes = (self.z, self.y, self.x)
        self.Y = self.y[:, None]
        self.X = self.x[None, :]

    def affine(self) -> np.ndarray:
        """4x4 voxel -> RAS mm: axis0 -> +S, axis1 -> -A, axis2 -> -R, centred on 0."""
        s_s, s_h, s_w = self.spacing
        n_s, n_h, n_w = self.shape
        aff = np.zeros((4, 4))
        aff[0, 2] = -s_w
        aff[1, 1] = -s_h
        aff[2, 0] = s_s
        aff[:3, 3] = (s_w * (n_w - 1) / 2, s_h * (n_h - 1) / 2, -s_s * (n_s - 1) / 2)
        aff[3, 3] = 1.0
        return aff

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Index slices covering the mm box [lo, hi] given as (z, y, x)."""
        return tuple(  # type: ignore[return-value]
            slice(int(np.searchsorted(c, a, "left")), int(np.searchsorted(c, b, "right")))
            for c, a, b in zip(self.axes, lo, hi, strict=True)
        )


def _ellipse(grid: _Grid, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Bool (H, W): inside the axis-aligned ellipse centred (cx, cy) mm."""
    return ((grid.X - cx) / ax) ** 2 + ((grid.Y - cy) / ay) ** 2 <= 1.0


def _tubes(
    grid: _Grid, pieces: list[tuple[np.ndarray, float]], margin: float
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Distance (mm) outside a union of tubes, over their bounding box (+ ``margin``).

    Each piece is ``(nodes, radius)``: a (N, 3) polyline of (z, y, x) mm points
    (N = 1 gives a ball). Returns the box slices and a float32 array over the box
    that is <= 0 inside a tube.
    """
    allpts = np.concatenate([np.atleast_2d(np.asarray(n, float)) for n, _ in pieces])
    reach = max(r for _, r in pieces) + margin
    box = grid.box(allpts.min(0) - reach, allpts.max(0) + reach)
    sub = [c[s] for c, s in zip(grid.axes, box, strict=True)]
    out = np.full(tuple(len(c) for c in sub), np.inf, dtype=np.float32)
    if out.size == 0:
        return box, out
    for nodes, radius in pieces:
        nodes = np.atleast_2d(np.asarray(nodes, float))
        segs = zip(nodes[:-1], nodes[1:], strict=True) if len(nodes) > 1 else [(nodes[0], nodes[0])]
        for a, b in segs:
            rr = radius + margin
            lo, hi = np.minimum(a, b) - rr, np.maximum(a, b) + rr
            idx = tuple(
                slice(int(np.searchsorted(c, lo_, "left")), int(np.searchsorted(c, hi_, "right")))
                for c, lo_, hi_ in zip(sub, lo, hi, strict=True)
            )
            shapes = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
            rel = [(c[i] - v).reshape(sh) for c, i, v, sh in zip(sub, idx, a, shapes, strict=True)]
            ab = b - a
            den = float(ab @ ab)
            t = 0.0
            if den > 0:
                t = np.clip((rel[0] * ab[0] + rel[1] * ab[1] + rel[2] * ab[2]) / den, 0.0, 1.0)
            dist = np.sqrt(sum((r - t * d) ** 2 for r, d in zip(rel, ab, strict=True))) - radius
            view = out[idx]
            np.minimum(view, dist.astype(np.float32), out=view)
    return box, out


def _smooth_field(rng: np.random.Generator, grid: _Grid, corr_mm: float) -> np.ndarray:
    """Float32 (S, H, W) smooth random field, roughly unit variance, ~``corr_mm`` grain.

    Smoothed white noise on a lattice fixed in mm (pitch ``corr_mm``), linearly
    interpolated to the voxel centres, so phantoms with the same field of view
    get the same texture at any spacing. Avoids BLAS, whose threads stall when
    the CPU is shared.
    """
    lattice = []
    for c in grid.axes:
        lo = np.floor(c[0] / corr_mm) - 2
        pos = c / corr_mm - lo
        i0 = np.floor(pos).astype(np.intp)
        lattice.append((int(np.ceil(c[-1] / corr_mm) + 2 - lo) + 1, i0, (pos - i0)))
    coef = rng.standard_normal(tuple(n for n, _, _ in lattice), dtype=np.float32)
    coef = ndimage.gaussian_filter(coef, 1.0)
    coef /= coef.std()
    out = coef
    for axis in (2, 1, 0):
        _, i0, frac = lattice[axis]
        shape = [1, 1, 1]
        shape[axis] = len(i0)
        f = frac.astype(np.float32).reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - f) + np.take(out, i0 + 1, axis=axis) * f
    return out


# --------------------------------------------------------------------------- anatomy


def _draw_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-seed anatomical parameters (mm, degrees, HU). Draw order is fixed."""
    u = rng.uniform
    p: dict[str, float] = {}
    p["cav_ax"], p["cav_ay"] = u(100, 115), u(70, 85)
    p["wall"], p["fat"], p["post_extra"] = u(11, 15), u(5, 20), u(12, 18)
    p["bx"], p["by"] = rng.normal(0.0, 3.0, 2)
    p["dome_r"] = u(-58, -40)
    p["dome_l"] = p["dome_r"] - u(8, 18)
    p["dome_depth"] = u(35, 50)
    p["apex_r"] = u(100, 122)
    p["apex_l"] = p["apex_r"] + u(-6, 6)
    p["taper_len"] = u(80, 100)
    p["med_half"] = u(12, 18)
    p["lung_cx"], p["lung_ax"], p["lung_ay"] = u(55, 65), u(70, 80), u(95, 110)
    p["heart_dx"], p["heart_front"] = u(15, 28), u(0.35, 0.5)
    p["heart_a"], p["heart_b"], p["heart_c"] = u(54, 64), u(40, 48), u(50, 60)
    p["heart_angle"] = u(20, 40)
    p["fat_out"], p["fat_epi"] = u(3.5, 5.0), u(2.5, 3.5)
    p["r_vb"], p["r_canal"] = u(14, 18), u(6, 8)
    p["vert_period"], p["vert_phase"], p["disc"] = u(24, 30), u(0, 1), u(4, 6)
    p["r_trachea"], p["carina_above"] = u(8, 10.5), u(10, 25)
    p["r_aorta"], p["asc_dx"] = u(11, 13.5), u(-15, -5)
    p["arch_gap"], p["arch_rise"], p["arch_bulge"] = u(5, 15), u(15, 25), u(10, 20)
    p["rib_period"], p["rib_slope"], p["rib_phase"] = u(24, 30), u(100, 140), u(0, 1)
    p["rib_thick"], p["rib_height"] = u(6, 8), u(8, 10)
    p["fat_hu"], p["muscle_hu"], p["lung_hu"] = u(-110, -90), u(35, 50), u(-870, -835)
    p["blood_hu"], p["liver_hu"], p["abdomen_hu"] = u(35, 45), u(50, 65), u(30, 45)
    p["medfat_hu"], p["cancellous_hu"], p["cortex_hu"] = u(-90, -65), u(380, 460), u(850, 1000)
    p["rib_hu"], p["disc_hu"], p["fluid_hu"] = u(600, 800), u(60, 90), u(2, 18)
    p["tex_amp"], p["noise_hu"], p["psf_mm"] = u(12, 20), u(15, 25), u(0.8, 1.2)
    return p


@dataclass
class _Scene:
    ct: np.ndarray  # float32 HU before blur and noise
    organs: np.ndarray  # uint8 labels
    body2d: np.ndarray  # bool (H, W)
    lung_any: np.ndarray  # bool (S, H, W)
    heart_inner: np.ndarray  # bool (S, H, W): myocardium + epicardial fat (inside the sac)
    centre: tuple[float, float]  # (x, y) of the thoracic cavity, mm
    med_half: float


def _build_anatomy(grid: _Grid, p: dict[str, float], cardio: float, peri_mm: float) -> _Scene:
    """Paint all organs (labels and HU) for one parameter set."""
    lay = _body_layout(grid, p)
    ct, organs = _paint_trunk(grid, p, lay)
    spine = _spine_geometry(grid, p, lay)
    heart = _heart_pose(p, lay, cardio)
    z_car = heart.top_normal + p["carina_above"]
    airway = _airway(grid, p, lay, spine, z_car)
    aorta = _aorta(grid, p, lay, spine, heart, z_car)

    # Lungs stay clear of the airway, aorta, vertebral body and heart fat (with margins).
    exclude = np.zeros(grid.shape, dtype=bool)
    exclude[airway.box] |= airway.dist <= 3.0
    exclude[aorta.box] |= aorta.dist <= 3.0
    exclude |= (spine.d_vb <= p["r_vb"] + 3.0)[None]
    lung_any = _paint_lungs(grid, p, lay, organs)
    heart_masks = _heart_masks(grid, p, lay, heart, peri_mm)
    exclude[heart_masks.box] |= heart_masks.fat_shell
    organs[exclude & (organs != _LIVER)] = 0
    lung_any &= ~exclude
    ct[lung_any] = p["lung_hu"]

    heart_inner = _paint_heart(ct, organs, p, heart_masks)
    _paint_aorta_and_airway(ct, organs, p, aorta, airway)
    _paint_spine(ct, organs, p, spine)
    _paint_ribs(grid, p, lay, ct, organs)
    lung_any = (organs == _RIGHT) | (organs == _LEFT)
    return _Scene(ct, organs, lay.body2d, lung_any, heart_inner, (lay.cx, lay.cy), p["med_half"])


@dataclass
class _Layout:
    """In-plane body outlines (constant along z) and the voxels above the diaphragm."""

    cx: float  # thoracic cavity centre, mm
    cy: float
    body2d: np.ndarray  # bool (H, W): inside the skin
    muscle2d: np.ndarray  # bool (H, W): inside the subcutaneous fat
    cavity2d: np.ndarray  # bool (H, W): thoracic cavity
    above: np.ndarray  # bool (S, H, W): above the diaphragm


def _diaphragm_z(
    p: dict[str, float], cx: float, cy: float, xx: np.ndarray | float, yy: np.ndarray | float
) -> np.ndarray:
    """Diaphragm height (mm) at (xx, yy) mm: upper envelope of two domes, the right one higher."""
    r2 = [((xx - (cx + s * 55.0)) / 70.0) ** 2 + ((yy - (cy - 10.0)) / 85.0) ** 2 for s in (-1, 1)]
    zd = np.maximum(p["dome_r"] - p["dome_depth"] * r2[0], p["dome_l"] - p["dome_depth"] * r2[1])
    return np.maximum(zd, p["dome_l"] - 60.0)


def _body_layout(grid: _Grid, p: dict[str, float]) -> _Layout:
    """Skin, muscle and cavity ellipses; the cavity sits forward of the body centre."""
    half_extra = p["post_extra"] / 2
    ccx, ccy = p["bx"], p["by"] - half_extra
    bax = p["cav_ax"] + p["wall"] + p["fat"]
    bay = p["cav_ay"] + p["wall"] + p["fat"] + half_extra
    return _Layout(
        cx=ccx,
        cy=ccy,
        body2d=_ellipse(grid, p["bx"], p["by"], bax, bay),
        muscle2d=_ellipse(grid, p["bx"], p["by"], bax - p["fat"], bay - p["fat"]),
        cavity2d=_ellipse(grid, ccx, ccy, p["cav_ax"], p["cav_ay"]),
        above=grid.z[:, None, None] > _diaphragm_z(p, ccx, ccy, grid.X, grid.Y)[None],
    )


def _paint_trunk(grid: _Grid, p: dict[str, float], lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Float32 HU and uint8 labels (S, H, W): body wall, abdomen, liver, mediastinal fat."""
    base = np.full(lay.body2d.shape, -1000.0, dtype=np.float32)
    base[lay.body2d] = p["fat_hu"]
    base[lay.muscle2d] = p["muscle_hu"]
    base[lay.cavity2d] = p["muscle_hu"]
    ct = np.empty(grid.shape, dtype=np.float32)
    ct[:] = base
    organs = np.zeros(grid.shape, dtype=np.uint8)

    abdomen = lay.cavity2d & ~lay.above
    ct[abdomen] = p["abdomen_hu"]
    liver = abdomen & (grid.X < lay.cx + 20.0)
    ct[liver] = p["liver_hu"]
    organs[liver] = _LIVER
    mediastinum2d = lay.cavity2d & (np.abs(grid.X - lay.cx) < 45.0)
    ct[mediastinum2d & lay.above] = p["medfat_hu"]
    return ct, organs


@dataclass
class _Spine:
    """Spine cross-section (constant along z) and the disc slices."""

    y_vb: float  # vertebral body centre row, mm
    d_vb: np.ndarray  # (H, W) distance from the vertebral body centre, mm
    vb2d: np.ndarray  # bool (H, W): vertebral body
    cortex2d: np.ndarray  # bool (H, W): its cortical rim
    canal2d: np.ndarray  # bool (H, W): spinal canal
    post2d: np.ndarray  # bool (H, W): posterior elements (arch, spinous and transverse processes)
    disc: np.ndarray  # bool (S,): slices through an intervertebral disc


def _spine_geometry(grid: _Grid, p: dict[str, float], lay: _Layout) -> _Spine:
    """Vertebral body, canal and posterior elements behind the cavity; discs repeat along z."""
    ccx = lay.cx
    r_vb, r_c = p["r_vb"], p["r_canal"]
    y_vb = lay.cy + p["cav_ay"] - 0.9 * r_vb
    y_canal = y_vb + r_vb + 1.5 + r_c
    d_vb = np.hypot(grid.X - ccx, grid.Y - y_vb)
    d_c = np.hypot(grid.X - ccx, grid.Y - y_canal)
    vb2d = d_vb <= r_vb
    canal2d = d_c <= r_c
    post2d = (
        (
            ((d_c > r_c) & (d_c <= r_c + 5.0))
            | ((np.abs(grid.X - ccx) <= 4.0) & (grid.Y >= y_canal) & (grid.Y <= y_canal + r_c + 15))
            | ((np.abs(grid.Y - y_canal) <= 4.0) & (np.abs(grid.X - ccx) <= r_c + 22.0))
        )
        & ~canal2d
        & ~vb2d
        & lay.muscle2d
    )
    disc = ((grid.z - p["vert_phase"] * p["vert_period"]) % p["vert_period"]) < p["disc"]
    return _Spine(y_vb, d_vb, vb2d, vb2d & (d_vb >= r_vb - 2.5), canal2d, post2d, disc)


@dataclass
class _HeartPose:
    """Pericardial sac ellipsoid: centre (x, y, z) and semi-axes (a, b, c), all mm."""

    x: float
    y: float
    z: float
    a: float
    b: float
    c: float
    floor: float  # diaphragm height under the heart, mm
    top_normal: float  # top of the heart before any cardiomegaly, mm


def _heart_pose(p: dict[str, float], lay: _Layout, cardio: float) -> _HeartPose:
    """Sac on the diaphragm, left of midline, enlarged by the cardiomegaly scale ``cardio``."""
    a0, b0, c0 = p["heart_a"], p["heart_b"], p["heart_c"]
    hx0, hy = lay.cx + p["heart_dx"], lay.cy - p["heart_front"] * p["cav_ay"]
    floor = float(_diaphragm_z(p, lay.cx, lay.cy, hx0, hy))
    ha, hb, hc = a0 * cardio, b0 * (1 + 0.75 * (cardio - 1)), c0 * (1 + 0.25 * (cardio - 1))
    return _HeartPose(
        x=hx0 + 0.35 * (ha - a0),
        y=hy,
        z=floor + 0.5 * hc,
        a=ha,
        b=hb,
        c=hc,
        floor=floor,
        top_normal=floor + 1.5 * c0,
    )


class _Tube(NamedTuple):
    """A union of tubes from :func:`_tubes`: box slices and the distance (mm) over the box."""

    box: tuple[slice, slice, slice]
    dist: np.ndarray


def _airway(grid: _Grid, p: dict[str, float], lay: _Layout, spine: _Spine, z_car: float) -> _Tube:
    """Trachea down the midline in front of the spine, main bronchi from the carina at z_car mm."""
    ccx = lay.cx
    r_tr = p["r_trachea"]
    y_tr = spine.y_vb - p["r_vb"] - 8.0 - r_tr
    top = grid.z[-1] + 10.0
    return _Tube(
        *_tubes(
            grid,
            [
                (np.array([(top, y_tr, ccx), (z_car, y_tr, ccx)]), r_tr),
                (np.array([(z_car, y_tr, ccx), (z_car - 22, y_tr + 6, ccx - 35)]), 0.7 * r_tr),
                (np.array([(z_car, y_tr, ccx), (z_car - 30, y_tr - 5, ccx + 40)]), 0.65 * r_tr),
            ],
            3.0,
        )
    )


def _aorta(
    grid: _Grid,
    p: dict[str, float],
    lay: _Layout,
    spine: _Spine,
    heart: _HeartPose,
    z_car: float,
) -> _Tube:
    """Ascending from the heart, arch over the left main bronchus, descending beside the spine."""
    ccx, r_vb, r_ao = lay.cx, p["r_vb"], p["r_aorta"]
    xa, ya = ccx + p["asc_dx"], heart.y - 0.3 * p["heart_b"]
    xd, yd = ccx + r_vb + r_ao + 3.0, spine.y_vb - 0.4 * r_vb
    z_root, z_arch = heart.floor + 0.6 * p["heart_c"], z_car + p["arch_gap"]
    t = np.linspace(0.0, 1.0, 24)
    chord = np.array([xd - xa, yd - ya])
    normal = np.array([chord[1], -chord[0]]) / np.linalg.norm(chord)
    if normal[0] < 0:
        normal = -normal
    arch_nodes = [
        (
            z_arch + p["arch_rise"] * np.sin(np.pi * ti),
            ya + ti * chord[1] + p["arch_bulge"] * np.sin(np.pi * ti) * normal[1],
            xa + ti * chord[0] + p["arch_bulge"] * np.sin(np.pi * ti) * normal[0],
        )
        for ti in t
    ]
    return _Tube(
        *_tubes(
            grid,
            [
                (np.array([(z_root, ya, xa), (z_arch, ya, xa)]), 1.1 * r_ao),
                (np.array(arch_nodes), 1.05 * r_ao),
                (np.array([(z_arch, yd, xd), (grid.z[0] - 10.0, yd, xd)]), r_ao),
            ],
            3.0,
        )
    )


def _paint_lungs(grid: _Grid, p: dict[str, float], lay: _Layout, organs: np.ndarray) -> np.ndarray:
    """Label the lungs; returns their union, bool (S, H, W).

    Tapered ellipses per side, inside the cavity, above the diaphragm, lateral to
    the mediastinum.
    """
    ccx, ccy = lay.cx, lay.cy
    lung_any = np.zeros(grid.shape, dtype=bool)
    for label, side in ((_RIGHT, -1.0), (_LEFT, 1.0)):
        apex = p["apex_r"] if side < 0 else p["apex_l"]
        start = apex - p["taper_len"]
        frac = np.clip((grid.z - start) / p["taper_len"], 0.0, None)
        scale2 = np.where(frac >= 1.0, -1.0, 1.0 - np.minimum(frac, 1.0) ** 2)
        q = ((grid.X - (ccx + side * p["lung_cx"])) / p["lung_ax"]) ** 2 + (
            (grid.Y - (ccy + 5.0)) / p["lung_ay"]
        ) ** 2
        side2d = lay.cavity2d & (side * (grid.X - ccx) > p["med_half"])
        lung = (q[None] <= scale2[:, None, None]) & side2d[None] & lay.above
        organs[lung] = label
        lung_any |= lung
    return lung_any


class _HeartMasks(NamedTuple):
    """Nested heart ellipsoids, bool over ``box``."""

    box: tuple[slice, slice, slice]
    sac: np.ndarray  # pericardial sac
    fat_shell: np.ndarray  # sac plus the pericardial fat line
    inner: np.ndarray  # inside the fluid rim (shifted anteriorly by an effusion)
    myo: np.ndarray  # inside the epicardial fat line: myocardium and blood


def _heart_masks(
    grid: _Grid, p: dict[str, float], lay: _Layout, heart: _HeartPose, peri_mm: float
) -> _HeartMasks:
    """Heart masks over its bounding box, with a ``peri_mm`` pericardial fluid rim."""
    hx, hy, hz, ha, hb, hc = heart.x, heart.y, heart.z, heart.a, heart.b, heart.c
    fat_out, fat_epi = p["fat_out"], p["fat_epi"]
    reach = max(ha, hb) + fat_out + 2.0
    h_box = grid.box(
        np.array([hz - hc - fat_out - 2, hy - reach, hx - reach]),
        np.array([hz + hc + fat_out + 2, hy + reach, hx + reach]),
    )
    zz, yy, xx = (c[s] for c, s in zip(grid.axes, h_box, strict=True))
    cos_t, sin_t = np.cos(np.radians(p["heart_angle"])), np.sin(np.radians(p["heart_angle"]))

    def inside(a: float, b: float, c: float, shift_y: float = 0.0) -> np.ndarray:
        dx, dy = xx[None, :] - hx, yy[:, None] - hy + shift_y
        uu, vv = dx * cos_t - dy * sin_t, dx * sin_t + dy * cos_t
        q2 = (uu / a) ** 2 + (vv / b) ** 2
        return q2[None] + (((zz - hz) / c) ** 2)[:, None, None] <= 1.0

    h_ok = lay.above[h_box] & lay.cavity2d[h_box[1:]][None]
    # Pericardial fluid collects posteriorly: the inner heart floats anteriorly.
    return _HeartMasks(
        box=h_box,
        sac=inside(ha, hb, hc) & h_ok,
        fat_shell=inside(ha + fat_out, hb + fat_out, hc + fat_out) & h_ok,
        inner=inside(ha - peri_mm, hb - peri_mm, hc - peri_mm, 0.25 * peri_mm),
        myo=inside(
            ha - peri_mm - fat_epi, hb - peri_mm - fat_epi, hc - peri_mm - fat_epi, 0.25 * peri_mm
        ),
    )


def _paint_heart(
    ct: np.ndarray, organs: np.ndarray, p: dict[str, float], hm: _HeartMasks
) -> np.ndarray:
    """Paint the heart; returns its inner part (inside the fluid rim), bool (S, H, W).

    From outside in: pericardial fat line, fluid rim (empty without an effusion),
    epicardial fat line, myocardium and blood.
    """
    sub_ct, sub_org = ct[hm.box], organs[hm.box]
    sub_ct[hm.fat_shell & ~hm.sac] = p["fat_hu"]
    sub_ct[hm.sac] = p["fluid_hu"]
    sub_ct[hm.sac & hm.inner] = p["fat_hu"]
    sub_ct[hm.sac & hm.myo] = p["blood_hu"]
    sub_org[hm.sac] = _HEART
    heart_inner = np.zeros(ct.shape, dtype=bool)
    heart_inner[hm.box] = hm.inner & hm.sac
    return heart_inner


def _paint_aorta_and_airway(
    ct: np.ndarray, organs: np.ndarray, p: dict[str, float], aorta: _Tube, airway: _Tube
) -> None:
    """Aorta, then the airway wall and lumen, over the heart and mediastinal fat."""
    vessel = aorta.dist <= 0.0
    ct[aorta.box][vessel] = p["blood_hu"]
    organs[aorta.box][vessel] = _AORTA
    a_box = airway.box
    wall = airway.dist <= 2.0
    lumen = airway.dist <= 0.0
    ct[a_box][wall] = p["muscle_hu"]
    ct[a_box][lumen] = -1000.0
    organs[a_box][wall & ~lumen & (organs[a_box] == _HEART)] = 0
    organs[a_box][lumen] = _AIRWAY


def _paint_spine(ct: np.ndarray, organs: np.ndarray, p: dict[str, float], spine: _Spine) -> None:
    """Paint the spine over anything it touches; only bone is labelled."""
    spine2d = spine.vb2d | spine.post2d | spine.canal2d
    rows, cols = np.flatnonzero(spine2d.any(axis=1)), np.flatnonzero(spine2d.any(axis=0))
    sb = (slice(None), slice(0, 0), slice(0, 0))  # spine may lie outside a small field of view
    if rows.size:
        sb = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    s_ct, s_org = ct[sb], organs[sb]
    masks = (spine.vb2d, spine.cortex2d, spine.post2d, spine.canal2d)
    vb, cx2, pst, cn = (m[sb[1:]][None] for m in masks)
    dsc = spine.disc[:, None, None]
    s_ct[:] = np.where(vb & ~dsc, np.where(cx2, p["cortex_hu"], p["cancellous_hu"]), s_ct)
    s_ct[:] = np.where(vb & dsc, p["disc_hu"], s_ct)
    s_ct[:] = np.where(pst, p["cortex_hu"], s_ct)
    s_ct[:] = np.where(cn, 20.0, s_ct)
    s_org[:] = np.where((vb & ~dsc) | pst, _SPINE, np.where((vb & dsc) | cn, 0, s_org))


def _paint_ribs(
    grid: _Grid, p: dict[str, float], lay: _Layout, ct: np.ndarray, organs: np.ndarray
) -> None:
    """Ribs: oblique arcs in the chest wall, descending anteriorly."""
    ccx, ccy, z = lay.cx, lay.cy, grid.z
    t_r = p["rib_thick"]
    band2d = _ellipse(grid, ccx, ccy, p["cav_ax"] + 1 + t_r, p["cav_ay"] + 1 + t_r) & ~_ellipse(
        grid, ccx, ccy, p["cav_ax"] + 1, p["cav_ay"] + 1
    )
    around = np.abs(np.arctan2(grid.X - ccx, grid.Y - ccy)) / np.pi  # 0 posterior, 1 anterior
    band2d &= (around > 0.1) & (around < 0.83)
    idx = np.flatnonzero(band2d)
    ub = around.ravel()[idx]
    period = p["rib_period"]
    phase = (z[:, None] + p["rib_slope"] * ub[None, :] - p["rib_phase"] * period) % period
    z_ok = (z > min(p["dome_r"], p["dome_l"]) - 60.0) & (z < max(p["apex_r"], p["apex_l"]) + 5.0)
    rib = (phase < p["rib_height"]) & z_ok[:, None]
    shape = grid.shape
    ct2, org2 = ct.reshape(shape[0], -1), organs.reshape(shape[0], -1)
    ct2[:, idx] = np.where(rib, np.float32(p["rib_hu"]), ct2[:, idx])
    org2[:, idx] = np.where(rib, np.uint8(_RIBS), org2[:, idx])


# --------------------------------------------------------------------------- findings


def _draw_heart_findings(
    frng: dict[str, np.random.Generator], details: dict[str, dict]
) -> tuple[float, float]:
    """Cardiomegaly scale (1 when absent) and pericardial fluid thickness in mm (0 when absent).

    These change the anatomy itself, so they are drawn before it is built. ``frng`` holds
    one generator per present finding.
    """
    cardio_scale = 1.0
    if "cardiomegaly" in frng:
        cardio_scale = float(frng["cardiomegaly"].uniform(1.3, 1.55))
        details["cardiomegaly"] = {"scale": cardio_scale}
    peri_mm = 0.0
    if "pericardial_effusion" in frng:
        peri_mm = float(frng["pericardial_effusion"].uniform(6.0, 15.0))
        details["pericardial_effusion"] = {"thickness_mm": peri_mm}
    return cardio_scale, peri_mm


def _paint_findings(
    frng: dict[str, np.random.Generator],
    grid: _Grid,
    anat: dict[str, float],
    scene: _Scene,
    details: dict[str, dict],
) -> dict[str, np.ndarray]:
    """Paint the lung findings into ``scene.ct``; returns each present finding's mask (S, H, W).

    Effusion first (atelectasis sits above its level), then atelectasis, then the
    nodule away from both; the heart findings are already in the anatomy.
    """
    ct, organs = scene.ct, scene.organs
    masks: dict[str, np.ndarray] = {}
    lungs = {_RIGHT: organs == _RIGHT, _LEFT: organs == _LEFT}
    effusion_level: dict[int, np.ndarray] = {}
    if "pleural_effusion" in frng:
        masks["pleural_effusion"], effusion_level, details["pleural_effusion"] = _pleural_effusion(
            frng["pleural_effusion"], grid, lungs
        )
        ct[masks["pleural_effusion"]] = anat["fluid_hu"]
    if "atelectasis" in frng:
        mask, air, details["atelectasis"] = _atelectasis(
            frng["atelectasis"], grid, lungs, effusion_level, scene
        )
        masks["atelectasis"] = mask
        ct[mask] = frng["atelectasis"].uniform(-90.0, -20.0)
        ct[air] = anat["lung_hu"]
    if "nodule" in frng:
        blocked = masks.get("pleural_effusion")
        if "atelectasis" in masks:
            blocked = masks["atelectasis"] if blocked is None else blocked | masks["atelectasis"]
        masks["nodule"], details["nodule"] = _nodule(frng["nodule"], grid, organs, blocked)
        ct[masks["nodule"]] = frng["nodule"].uniform(20.0, 60.0)
    if "cardiomegaly" in frng:
        masks["cardiomegaly"] = organs == _HEART
    if "pericardial_effusion" in frng:
        masks["pericardial_effusion"] = (organs == _HEART) & ~scene.heart_inner
    return masks


def _check_findings_visible(
    masks: dict[str, np.ndarray], present: tuple[str, ...], grid: _Grid
) -> None:
    """Raise :class:`InputError` when a requested finding has no voxel in the field of view."""
    for name in present:
        if not masks[name].any():
            fov = ", ".join(f"{n * sp:.0f}" for n, sp in zip(grid.shape, grid.spacing, strict=True))
            raise InputError(
                f"the {fov} mm field of view is too small to show {name}; use shape x spacing "
                "of at least about 200 x 250 x 250 mm"
            )


def _pick_sides(rng: np.random.Generator) -> tuple[int, ...]:
    """One lung (60%) or both (40%)."""
    if rng.random() < 0.4:
        return (_RIGHT, _LEFT)
    return ((_RIGHT, _LEFT)[int(rng.integers(2))],)


def _posterior_edge(grid: _Grid, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: whether the lung is present, and its posterior-most y (mm, NaN if absent)."""
    rows = lung.any(axis=2)
    has = rows.any(axis=1)
    last = rows.shape[1] - 1 - np.argmax(rows[:, ::-1], axis=1)
    return has, np.where(has, grid.y[last], np.nan)


def _pleural_effusion(
    rng: np.random.Generator, grid: _Grid, lungs: dict[int, np.ndarray]
) -> tuple[np.ndarray, dict[int, np.ndarray], dict]:
    """Dependent fluid: lung voxels posterior to a level that rises toward the base."""
    sides = _pick_sides(rng)
    mask = np.zeros(lungs[_RIGHT].shape, dtype=bool)
    levels: dict[int, np.ndarray] = {}
    info: dict = {"sides": [], "max_thickness_mm": [], "height_mm": []}
    for side in sides:
        t_max, height, t_min = rng.uniform(30, 50), rng.uniform(100, 150), rng.uniform(6, 10)
        has, y_post = _posterior_edge(grid, lungs[side])
        if not has.any():
            continue
        u = (grid.z - grid.z[np.argmax(has)]) / height
        thick = np.where(
            (u >= 0) & (u <= 1), t_min + (t_max - t_min) * np.clip(1 - u, 0, 1) ** 0.6, 0.0
        )
        level = np.where(thick > 0, y_post - thick, np.inf)
        with np.errstate(invalid="ignore"):
            mask |= lungs[side] & (grid.y[None, :, None] > level[:, None, None])
        levels[side] = level
        info["sides"].append(ORGAN_NAMES[side])
        info["max_thickness_mm"].append(float(t_max))
        info["height_mm"].append(float(height))
    return mask, levels, info


def _atelectasis(
    rng: np.random.Generator,
    grid: _Grid,
    lungs: dict[int, np.ndarray],
    levels: dict[int, np.ndarray],
    scene: _Scene,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Posterior basal wedge of collapsed lung (above any effusion), with air bronchograms.

    Returns the finding mask, the bronchogram voxels (a subset) and details.
    """
    sides = _pick_sides(rng)
    shape = lungs[_RIGHT].shape
    mask = np.zeros(shape, dtype=bool)
    air = np.zeros(shape, dtype=bool)
    info: dict = {"sides": [], "depth_mm": [], "height_mm": []}
    ccx = scene.centre[0]
    for side in sides:
        depth, height, width = rng.uniform(35, 50), rng.uniform(60, 100), rng.uniform(80, 110)
        n_bronchi = int(rng.integers(2, 4))
        draws = rng.random((n_bronchi, 2))
        lung = lungs[side]
        has, y_post = _posterior_edge(grid, lung)
        if not has.any():
            continue
        present_z = grid.z[has]
        height = min(height, 0.4 * (present_z[-1] - present_z[0]))  # stay in the lower half
        u = (grid.z - present_z[0]) / height
        d = np.where(
            (u >= 0) & (u <= 1), 8.0 + (depth - 8.0) * np.sin(np.pi * np.clip(u, 0, 1)), 0.0
        )
        ks = np.flatnonzero(d > 0)
        slab = slice(int(ks[0]), int(ks[-1]) + 1)
        lung = lung[slab]
        if side in levels:  # compressed lung lies just above the fluid level
            lung = lung & (grid.y[None, :, None] <= levels[side][slab, None, None])
            _, y_post = _posterior_edge(grid, lung)
        else:
            y_post = y_post[slab]
        # Wedge: deepest beside the spine, thinning toward the lateral end.
        s = -1.0 if side == _RIGHT else 1.0
        lateral = np.clip(1.0 - (s * (grid.x - ccx) - scene.med_half) / width, 0.0, 1.0)
        front = y_post[:, None] - d[slab, None] * np.sqrt(lateral)[None, :]  # (slab, W)
        with np.errstate(invalid="ignore"):
            part = lung & (lateral > 0)[None, None, :] & (grid.y[None, :, None] > front[:, None, :])
        if not part.any():
            continue
        mask[slab] |= part
        info["sides"].append(ORGAN_NAMES[side])
        info["depth_mm"].append(float(depth))
        info["height_mm"].append(float(height))
        # Air bronchograms: thin air lines from the upper to the lower part of the wedge.
        vox = np.argwhere(part)
        vox[:, 0] += slab.start
        order = np.argsort(vox[:, 0], kind="stable")
        n = len(vox)
        radius = max(1.2, 0.7 * max(grid.spacing[1:]))
        for a, b in draws:
            p0 = vox[order[int(a * 0.4 * (n - 1)) + int(0.6 * (n - 1))]]
            p1 = vox[order[int(b * 0.4 * (n - 1))]]
            pts = np.array([[c[i] for c, i in zip(grid.axes, p, strict=True)] for p in (p0, p1)])
            box, dist = _tubes(grid, [(pts, radius)], 0.0)
            air[box] |= (dist <= 0.0) & mask[box]
    return mask, air, info


def _nodule(
    rng: np.random.Generator, grid: _Grid, organs: np.ndarray, blocked: np.ndarray | None
) -> tuple[np.ndarray, dict]:
    """A solid sphere well inside a lung, away from its borders and other lung findings."""
    diameter = float(rng.uniform(*NODULE_DIAMETER_MM))
    radius = diameter / 2
    allowed = (organs == _RIGHT) | (organs == _LEFT)
    if blocked is not None:
        allowed &= ~blocked
    cand = np.flatnonzero(allowed)
    if cand.size == 0:
        fov = ", ".join(f"{n * sp:.0f}" for n, sp in zip(grid.shape, grid.spacing, strict=True))
        raise InputError(
            f"the {fov} mm field of view holds no lung to place a nodule in; use shape x "
            "spacing of at least about 200 x 250 x 250 mm"
        )
    picks = np.unravel_index(rng.choice(cand, size=min(400, cand.size), replace=False), grid.shape)
    picks = np.stack(picks, axis=1)
    sp = np.asarray(grid.spacing)
    centre = None
    for margin in (max(6.0, 1.5 * sp.max()), 0.0):
        reach = radius + margin
        span = np.ceil(reach / sp).astype(int)
        offs = np.stack(
            np.meshgrid(*(np.arange(-n, n + 1) for n in span), indexing="ij"), axis=-1
        ).reshape(-1, 3)
        offs = offs[np.linalg.norm(offs * sp, axis=1) <= reach]
        pos = picks[:, None, :] + offs[None]
        inb = ((pos >= 0) & (pos < np.asarray(grid.shape))).all(axis=2)
        pos = np.clip(pos, 0, np.asarray(grid.shape) - 1)
        ok = (allowed[pos[..., 0], pos[..., 1], pos[..., 2]] & inb).all(axis=1)
        if ok.any():
            centre = picks[int(np.argmax(ok))]
            break
    if centre is None:
        centre = picks[0]
    c_mm = [c[i] for c, i in zip(grid.axes, centre, strict=True)]
    box, dist = _tubes(grid, [(np.array([c_mm]), radius)], 0.0)
    mask = np.zeros(grid.shape, dtype=bool)
    mask[box] = dist <= 0.0
    mask &= (organs == _RIGHT) | (organs == _LEFT)  # only matters for cramped lungs
    side = ORGAN_NAMES[int(organs[tuple(centre)])]
    return mask, {"diameter_mm": diameter, "centre_voxel": [int(v) for v in centre], "lung": side}


def _marker(grid: _Grid, body2d: np.ndarray) -> np.ndarray:
    """Bright ball in the air at the anterior-right corner, mid-volume, clipped to outside body."""
    inset = MARKER_RADIUS_MM + 9.0
    centre = np.array([[0.0, grid.y[0] + inset, grid.x[0] + inset]])
    box, dist = _tubes(grid, [(centre, MARKER_RADIUS_MM)], 0.0)
    mask = np.zeros(grid.shape, dtype=bool)
    mask[box] = dist <= 0.0
    return mask & ~body2d[None]


# --------------------------------------------------------------------------- scanner


def _scan(ct: np.ndarray, anat: dict[str, float], grid: _Grid, seed: int) -> np.ndarray:
    """Int16 HU (S, H, W) as scanned: blurred, with noise, clipped to [-1024, 3071]."""
    # Partial-volume blur: a ~1 mm scanner PSF plus the voxel's own extent.
    sigma = [float(np.hypot(0.4, anat["psf_mm"] / s)) for s in grid.spacing]
    ct = ndimage.gaussian_filter(ct, sigma, truncate=3.0)
    noise = np.random.default_rng([seed, _STREAM_NOISE]).standard_normal(grid.shape, np.float32)
    ct += np.float32(anat["noise_hu"]) * noise
    np.clip(ct, -1024.0, 3071.0, out=ct)
    return np.rint(ct).astype(np.int16)


# --------------------------------------------------------------------------- output


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
