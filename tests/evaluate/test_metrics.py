"""hirescam3d.evaluate.metrics: each metric against a direct NumPy implementation (2D and 3D, ties,
empty masks, all-zero maps) and against values computed by hand."""

from __future__ import annotations

import functools
import itertools
import math
from collections import deque

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from hirescam3d import Explainer, InputError
from hirescam3d.core.postprocess import stretch_geometry
from hirescam3d.evaluate import metrics
from tests.conftest import SPATIAL, ConvLinearNet, make_input

SHAPES = {2: (5, 6), 3: (3, 4, 5)}


# -- direct NumPy references -----------------------------------------------------------------
def np_pointing(m: np.ndarray, k: np.ndarray) -> float:
    return float(k.ravel()[int(np.argmax(m.ravel()))])


def np_relevance(m: np.ndarray, k: np.ndarray) -> float:
    pos = np.maximum(m.astype(np.float64), 0)
    total = pos.sum()
    return math.nan if total <= 0 else float(pos[k].sum() / total)


def np_iou_curve(m: np.ndarray, k: np.ndarray, thresholds) -> list[float]:
    top = m.max()
    if top <= 0:
        return [math.nan] * len(thresholds)
    out = []
    for t in thresholds:
        pred = m >= m.dtype.type(t) * top  # in the maps' dtype, as the library
        union = np.logical_or(pred, k).sum()
        out.append(float(np.logical_and(pred, k).sum() / union) if union else 0.0)
    return out


def np_components(binary: np.ndarray) -> list[list[tuple[int, ...]]]:
    """Connected components (all 3^D - 1 neighbours), in C order of their first voxel."""
    seen = np.zeros(binary.shape, dtype=bool)
    steps = [d for d in itertools.product((-1, 0, 1), repeat=binary.ndim) if any(d)]
    comps = []
    for start in zip(*np.nonzero(binary), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            p = queue.popleft()
            comp.append(p)
            for d in steps:
                q = tuple(a + b for a, b in zip(p, d, strict=True))
                inside = all(0 <= c < s for c, s in zip(q, binary.shape, strict=True))
                if inside and binary[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
        comps.append(comp)
    return comps


def np_box(points) -> list[tuple[int, int]]:
    arr = np.array(points)
    return list(zip(arr.min(0).tolist(), arr.max(0).tolist(), strict=True))


def np_gradcam_box(m: np.ndarray, k: np.ndarray) -> float:
    top = m.max()
    if top <= 0:
        return math.nan
    if not k.any():
        return 0.0
    comps = np_components(m >= np.float32(0.15) * top)
    biggest = max(comps, key=len)  # max() keeps the first on ties
    a = np_box(biggest)
    b = np_box(list(zip(*np.nonzero(k), strict=True)))
    inter = np.prod(
        [max(0, min(a1, b1) - max(a0, b0) + 1) for (a0, a1), (b0, b1) in zip(a, b, strict=True)]
    )
    area = [np.prod([hi - lo + 1 for lo, hi in box]) for box in (a, b)]
    return float(inter / (area[0] + area[1] - inter))


def np_l2(raw: np.ndarray, exact: np.ndarray) -> float:
    def norm(v):
        v = np.maximum(v.astype(np.float64), 0)
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    return float(np.sqrt(((norm(raw) - norm(exact)) ** 2).sum()))


def reference(fn, maps: torch.Tensor, masks: torch.Tensor, *args) -> np.ndarray:
    m = maps.numpy()
    k = np.broadcast_to(masks.numpy(), m.shape)
    b, kk = m.shape[:2]
    return np.array([[fn(m[i, j], k[i, j], *args) for j in range(kk)] for i in range(b)])


def case(dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps with many ties (small integers), signed ones, an all-zero and an all-negative
    map; masks with an empty one. Maps (3, 4, *S), masks (3, 4, *S)."""
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[dims]
    maps = torch.randint(0, 4, (3, 4, *shape), generator=g).float()  # ties everywhere
    maps[1] = torch.randn(4, *shape, generator=g)  # signed
    maps[2, 0] = 0  # no evidence
    maps[2, 1] = -torch.rand(shape, generator=g)  # only negative values
    masks = torch.rand(3, 4, *shape, generator=g) > 0.6
    masks[0, 1] = False  # empty mask
    masks[2, 2] = False
    return maps, masks


# -- mask metrics against NumPy ---------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_metrics_match_numpy(dims, seed):
    maps, masks = case(dims, seed)
    for fn, ref in [
        (metrics.pointing_game, np_pointing),
        (metrics.relevance_mass, np_relevance),
        (metrics.gradcam_box, np_gradcam_box),
    ]:
        got = fn(maps, masks)
        assert got.shape == (3, 4) and got.dtype == torch.float32
        want = reference(ref, maps, masks)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7, err_msg=fn.__name__)
    curve = metrics.iou_curve(maps, masks)
    want = reference(np_iou_curve, maps, masks, metrics.DEFAULT_THRESHOLDS)
    np.testing.assert_allclose(curve.numpy(), want, rtol=1e-6)
    best = metrics.iou_at_best_threshold(maps, masks)
    filled = np.nan_to_num(want, nan=-1.0)
    first = np.argmax(filled, -1)  # first maximum = the lowest threshold on ties
    want_thr = np.array(metrics.DEFAULT_THRESHOLDS, dtype=np.float32)[first]
    nan = np.isnan(want[..., 0])
    np.testing.assert_allclose(best.iou.numpy(), np.where(nan, np.nan, filled.max(-1)), rtol=1e-6)
    np.testing.assert_allclose(best.threshold.numpy(), np.where(nan, np.nan, want_thr))


def test_localisation_metrics_equal_the_single_metrics(dims):
    maps, masks = case(dims, 4)
    together = metrics.localisation_metrics(maps, masks)
    best = metrics.iou_at_best_threshold(maps, masks)
    box, map_boxes, mask_boxes = metrics.gradcam_box(maps, masks, return_boxes=True)
    pairs = [
        (together.pointing_game, metrics.pointing_game(maps, masks)),
        (together.relevance_mass, metrics.relevance_mass(maps, masks)),
        (together.iou_curve, metrics.iou_curve(maps, masks)),
        (together.iou, best.iou),
        (together.iou_threshold, best.threshold),
        (together.gradcam_box, box),
        (together.map_boxes, map_boxes),
        (together.mask_boxes, mask_boxes),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b, equal_nan=True)


def test_float64_maps_and_small_chunks(dims, monkeypatch):
    maps, masks = case(dims, 6)
    maps = maps.double() * 0.37  # values that fall between float32 and float64 levels
    want = reference(np_iou_curve, maps, masks, metrics.DEFAULT_THRESHOLDS)
    np.testing.assert_allclose(metrics.iou_curve(maps, masks).numpy(), want, rtol=1e-6)
    whole = metrics.localisation_metrics(maps.float(), masks)
    for m in (maps, maps.float()):
        parts = metrics.localisation_metrics(m, masks)
        for name in ("pointing_game", "relevance_mass", "iou_curve", "gradcam_box"):
            a, b = getattr(parts, name), getattr(whole, name)
            torch.testing.assert_close(a, b, equal_nan=True, atol=1e-6, rtol=1e-6)


def test_shared_masks_broadcast(dims):
    maps, masks = case(dims, 5)
    shared = masks[:, :1]
    full = shared.expand_as(masks).clone()
    for fn in (metrics.pointing_game, metrics.relevance_mass, metrics.gradcam_box):
        torch.testing.assert_close(fn(maps, shared), fn(maps, full), equal_nan=True)
        one = fn(maps, masks[:1, :1])  # one mask for everything
        torch.testing.assert_close(one, fn(maps, masks[:1, :1].expand_as(masks)), equal_nan=True)
    torch.testing.assert_close(
        metrics.iou_curve(maps, shared), metrics.iou_curve(maps, full), equal_nan=True
    )


def test_conventions_for_empty_masks_and_maps_without_evidence(dims):
    shape = SHAPES[dims]
    maps = torch.zeros(1, 3, *shape)
    maps[0, 1] = -1.0
    maps[0, 2].view(-1)[3] = 2.0
    masks = torch.zeros(1, 3, *shape, dtype=torch.bool)
    masks[0, :2].view(2, -1)[:, 0] = True  # voxel 0: the "first maximum" of a flat map
    # all-zero and all-negative maps: NaN except the pointing game (first maximum)
    assert metrics.pointing_game(maps, masks)[0].tolist() == [1.0, 1.0, 0.0]
    rm = metrics.relevance_mass(maps, masks)[0]
    assert math.isnan(rm[0]) and math.isnan(rm[1]) and rm[2] == 0.0
    best = metrics.iou_at_best_threshold(maps, masks)
    assert torch.isnan(best.iou[0, :2]).all() and torch.isnan(best.threshold[0, :2]).all()
    assert best.iou[0, 2] == 0.0  # empty mask: 0, not NaN
    box = metrics.gradcam_box(maps, masks)[0]
    assert torch.isnan(box[:2]).all() and box[2] == 0.0


# -- values computed by hand -----------------------------------------------------------------
MAP_4X4 = torch.arange(16.0).reshape(1, 1, 4, 4)  # 0..15 in C order
MASK_4X4 = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
MASK_4X4[..., 2:, 2:] = True  # holds 10, 11, 14, 15


def test_hand_computed_4x4():
    assert metrics.pointing_game(MAP_4X4, MASK_4X4).item() == 1.0  # 15 is in the mask
    # positive mass 0 + ... + 15 = 120, inside 10 + 11 + 14 + 15 = 50
    assert metrics.relevance_mass(MAP_4X4, MASK_4X4).item() == pytest.approx(50 / 120)
    # {map >= 10}: 6 voxels, 4 in the mask -> 4/6; reached for 9 < 15 t <= 10: t = 0.62
    best = metrics.iou_at_best_threshold(MAP_4X4, MASK_4X4)
    assert best.iou.item() == pytest.approx(4 / 6)
    assert best.threshold.item() == pytest.approx(0.62)
    # 15 % of 15 = 2.25: all but 0, 1, 2, one component whose box is the whole 4x4 (16
    # voxels); the mask's box has 4 voxels -> 4 / 16
    iou, map_box, mask_box = metrics.gradcam_box(MAP_4X4, MASK_4X4, return_boxes=True)
    assert iou.item() == pytest.approx(0.25)
    assert map_box[0, 0].tolist() == [[0, 3], [0, 3]]
    assert mask_box[0, 0].tolist() == [[2, 3], [2, 3]]


def test_hand_computed_ties_and_3d():
    # 2x2x2 map with a tie for the maximum: voxel (0, 0, 1) comes first in C order
    m = torch.tensor([[[1.0, 3.0], [0.0, 3.0]], [[-2.0, 0.0], [1.0, 0.0]]])[None, None]
    k = torch.zeros_like(m, dtype=torch.bool)
    k[0, 0, 0, 0, 1] = True
    assert metrics.pointing_game(m, k).item() == 1.0
    k2 = torch.zeros_like(k)
    k2[0, 0, 0, 1, 1] = True  # the other maximum: not the first one
    assert metrics.pointing_game(m, k2).item() == 0.0
    # positive mass 1 + 3 + 3 + 1 = 8; inside k: 3
    assert metrics.relevance_mass(m, k).item() == pytest.approx(3 / 8)
    # threshold 0.02..0.32: {1, 3, 3, 1} (4 voxels) vs 1 -> 1/4; 0.34..1: {3, 3} -> 1/2
    curve = metrics.iou_curve(m, k, thresholds=[0.2, 0.5, 1.0])
    assert curve[0, 0].tolist() == pytest.approx([0.25, 0.5, 0.5])
    best = metrics.iou_at_best_threshold(m, k)
    assert best.iou.item() == pytest.approx(0.5) and best.threshold.item() == pytest.approx(0.34)
    # 15 % of 3: {1, 3, 3, 1} all 26-connected; box = the whole 2x2x2; mask box 1 voxel
    assert metrics.gradcam_box(m, k).item() == pytest.approx(1 / 8)
    # faces only: (1, 1, 0) touches none of the others, so the components are
    # {(0,0,0), (0,0,1), (0,1,1)} (box 1x2x2) and {(1,1,0)}
    iou, box, _ = metrics.gradcam_box(m, k, connectivity=1, return_boxes=True)
    assert box[0, 0].tolist() == [[0, 0], [0, 1], [0, 1]]
    assert iou.item() == pytest.approx(1 / 4)


def test_gradcam_box_ties_take_the_first_component():
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 0, 3:5] = 1.0  # two components of 2 voxels; this one comes first in C order
    m[0, 0, 3:5, 0] = 1.0
    k = torch.zeros_like(m, dtype=torch.bool)
    k[0, 0, 0, 3] = True
    iou, box, _ = metrics.gradcam_box(m, k, return_boxes=True)
    assert box[0, 0].tolist() == [[0, 0], [3, 4]]
    assert iou.item() == pytest.approx(0.5)


def test_thresholds_in_any_order_and_validation():
    curve = metrics.iou_curve(MAP_4X4, MASK_4X4, thresholds=[0.9, 0.1, 0.62])
    sorted_curve = metrics.iou_curve(MAP_4X4, MASK_4X4, thresholds=[0.1, 0.62, 0.9])
    assert curve[0, 0].tolist() == sorted_curve[0, 0, [2, 0, 1]].tolist()
    with pytest.raises(InputError):
        metrics.pointing_game(MAP_4X4, MASK_4X4[..., :3])
    with pytest.raises(InputError):
        metrics.relevance_mass(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(InputError):
        metrics.iou_curve(MAP_4X4, MASK_4X4, thresholds=[])


# -- Table 1 ---------------------------------------------------------------------------------
def test_l2_to_exact_hand_computed_and_numpy(dims):
    raw = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    exact = torch.tensor([[4.0, 3.0], [2.0, 1.0]])[None, None]
    # [0, 1/3, 2/3, 1] vs [1, 2/3, 1/3, 0]: sqrt(1 + 1/9 + 1/9 + 1)
    assert metrics.l2_to_exact(raw, exact).item() == pytest.approx(math.sqrt(20 / 9))
    assert metrics.l2_to_exact(raw, 5 * raw).item() == 0.0  # scale-free
    maps, _ = case(dims, 3)
    other = torch.randn(maps.shape, generator=torch.Generator().manual_seed(1))
    got = metrics.l2_to_exact(maps, other)
    want = np.array(
        [[np_l2(maps[i, j].numpy(), other[i, j].numpy()) for j in range(4)] for i in range(3)]
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert metrics.l2_to_exact(raw, exact, normalization="none").item() == pytest.approx(
        math.sqrt(9 + 1 + 1 + 9)
    )


def exact_contribution(net: ConvLinearNet, x: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        a = net.features(x)
        return (net.fc.weight[k].reshape(a.shape[1:]) * a).sum(1)


def test_l2_to_exact_is_zero_for_hirescam_not_gradcam(dims):
    torch.manual_seed(20 + dims)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    out = Explainer(net, "features").explain(x, [0, 1, 2], methods=["hirescam", "gradcam"])
    exact = torch.stack([exact_contribution(net, x, k) for k in range(3)], 1)
    assert metrics.l2_to_exact(out["hirescam"].raw, exact).max() <= 1e-5
    assert metrics.l2_to_exact(out["gradcam"].raw, exact).min() > 1e-2


# -- Spearman ------------------------------------------------------------------------------
def test_spearman_matches_scipy_with_ties(dims):
    g = torch.Generator().manual_seed(dims)
    a = torch.randint(0, 5, (2, 3, *SHAPES[dims]), generator=g).float()
    b = a + torch.randint(0, 3, a.shape, generator=g).float()
    got = metrics.spearman(a, b)
    for i, j in itertools.product(range(2), range(3)):
        want = stats.spearmanr(a[i, j].ravel().numpy(), b[i, j].ravel().numpy()).statistic
        assert got[i, j].item() == pytest.approx(want, abs=1e-6)
    assert metrics.spearman(a, a).eq(1).all() and metrics.spearman(a, -a).eq(-1).all()
    assert torch.isnan(metrics.spearman(torch.zeros_like(a[:1, :1]), a[:1, :1])).all()


# -- deletion / insertion ------------------------------------------------------------------
class RegionSum(nn.Module):
    """logit 0 = sum of the input inside ``region``, logit 1 = its negative."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("w", region.float())
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0] * self.w).flatten(1).sum(1) * self.scale
        return torch.stack([s, -s], 1)


def region_case(dims: int):
    """4^D input of ones, cubes of 2: the model reads two of the 2^D units (4 or 8 voxels
    each); the map ranks those two first (the first above the second), the rest after."""
    shape = (4,) * dims
    region = torch.zeros(shape)
    lead = (slice(0, 2),) * (dims - 1)
    region[(*lead, slice(0, 2))] = 1
    region[(*lead, slice(2, 4))] = 1
    attention = torch.zeros(shape)
    attention[(*lead, slice(0, 2))] = 3.0
    attention[(*lead, slice(2, 4))] = 2.0
    attention[(slice(2, 4), *(slice(None),) * (dims - 1))] = 1.0  # the far half, last
    x = torch.ones(1, 1, *shape)
    return RegionSum(region), x, attention[None, None], 2**dims


def test_deletion_insertion_hand_computed(dims):
    model, x, attention, per_unit = region_case(dims)
    n_units = 2**dims
    steps = n_units
    res = metrics.deletion_insertion(
        model, x, attention, [0], steps=steps, unit="supervoxel", unit_size=2, probability="logit"
    )
    full = 2 * per_unit  # two units of ones in the region
    del_want = [full, full / 2] + [0.0] * (steps - 1)
    ins_want = [0.0, full / 2] + [full] * (steps - 1)
    assert res.deletion[0, 0].tolist() == pytest.approx(del_want)
    assert res.insertion[0, 0].tolist() == pytest.approx(ins_want)
    h = 1 / steps  # trapezoids by hand
    assert res.deletion_auc.item() == pytest.approx(h * ((full + full / 2) / 2 + full / 4))
    assert res.insertion_auc.item() == pytest.approx(
        h * (full / 4 + (full / 2 + full) / 2 + full * (steps - 2))
    )
    assert res.fractions.tolist() == pytest.approx([s / steps for s in range(steps + 1)])
    assert res.n_units.tolist() == [n_units]
    # probabilities: the sigmoid of the same logits, trapezoid by hand
    prob = metrics.deletion_insertion(model, x, attention, [0], steps=steps, unit_size=2)
    sig = [1 / (1 + math.exp(-v)) for v in del_want]
    assert prob.deletion[0, 0].tolist() == pytest.approx(sig, rel=1e-6)
    auc = sum(h * (sig[s] + sig[s + 1]) / 2 for s in range(steps))
    assert prob.deletion_auc.item() == pytest.approx(auc, rel=1e-6)
    # the attention reversed deletes the region last: deletion falls later
    rev = metrics.deletion_insertion(model, x, -attention, [0], steps=steps, unit_size=2)
    assert rev.deletion_auc.item() > prob.deletion_auc.item() + 0.1
    assert rev.insertion_auc.item() < prob.insertion_auc.item() - 0.1


def test_deletion_insertion_cells_from_geometry_equal_cubes(dims):
    model, x, attention, _ = region_case(dims)
    geometry = stretch_geometry((2,) * dims, (4,) * dims)  # cells tile 2^D cubes
    grid_map = attention[(..., *(slice(None, None, 2),) * dims)]  # one value per cell
    kw = dict(steps=5, probability="logit", unit_size=2)
    cubes = metrics.deletion_insertion(model, x, attention, [0], unit="supervoxel", **kw)
    cells = metrics.deletion_insertion(model, x, grid_map, [0], geometry=geometry, **kw)
    placed = metrics.deletion_insertion(model, x, attention, [0], geometry=geometry, **kw)
    labels = torch.zeros((4,) * dims, dtype=torch.long)  # the cubes, as your own labels
    for d in range(dims):
        labels = labels * 2 + (torch.arange(4) // 2).reshape(
            [4 if a == d else 1 for a in range(dims)]
        )
    own = metrics.deletion_insertion(model, x, attention, [0], unit=labels, **kw)
    for r in (cells, placed, own):
        torch.testing.assert_close(r.deletion, cubes.deletion)
        torch.testing.assert_close(r.insertion, cubes.insertion)


def test_deletion_insertion_baselines_batches_and_model_unchanged():
    model, x, attention, _ = region_case(2)
    x = torch.cat([x, 2 * x])  # B = 2
    maps = torch.cat([attention, attention]).repeat(1, 2, 1, 1)  # K = 2
    targets = torch.tensor([[0, 1], [0, 1]])
    run = functools.partial(metrics.deletion_insertion, model, x, steps=4, unit_size=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    res = run(
        maps,
        targets,
        baseline=-1.0,
        max_batch=3,
        progress=lambda done, total: calls.append((done, total)),
        probability="logit",
    )
    total = 2 * (2 + 2 * 2 * (4 - 1))
    assert res.evaluations == total
    assert calls[-1] == (total, total) and len(calls) == math.ceil(total / 3)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # item 1 (x = 2): region of 8 voxels worth 16; deleting a unit -> 4 * (2 - (-1)) less
    assert res.deletion[1, 0].tolist() == pytest.approx([16, 4, -8, -8, -8])
    assert res.deletion[1, 1].tolist() == pytest.approx([-16, -4, 8, 8, 8])  # logit 1 = -logit 0
    assert res.insertion[1, 0].tolist() == pytest.approx([-8, 4, 16, 16, 16])
    assert model.training and model.scale.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a number, a tensor and a callable giving the same baseline give the same curves
    ref = run(maps, targets, baseline=-1.0)
    for b in (torch.tensor(-1.0), lambda t: torch.full_like(t, -1.0)):
        torch.testing.assert_close(run(maps, targets, baseline=b).deletion, ref.deletion)
    # the blur of a constant input is the input: flat curves
    blur = run(maps, targets, baseline="blur")
    torch.testing.assert_close(blur.deletion, blur.deletion[..., :1].expand_as(blur.deletion))
    with pytest.raises(InputError):
        run(maps[:, :1], targets)
    with pytest.raises(InputError):
        run(maps, targets, baseline="air")


def test_blur_baseline_spreads_and_keeps_the_mean(dims):
    x = torch.zeros(1, 2, *(9,) * dims)
    x[(0, 0, *(4,) * dims)] = 1.0
    out = metrics._gaussian_blur(x, 1.0)
    assert out.shape == x.shape and out[0, 1].abs().max() == 0
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 0 < out[(0, 0, *(4,) * dims)] < 0.5 and out[(0, 0, *(3,) * dims)] > 0


def test_deletion_insertion_with_an_explainer(dims):
    torch.manual_seed(dims)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    explainer = Explainer(net, "features")
    res = explainer(x, targets=[0, 1])
    out = metrics.deletion_insertion(
        net, x, res.raw, res.targets, steps=4, geometry=explainer.geometry(x), max_batch=16
    )
    assert out.deletion.shape == (2, 2, 5) and out.deletion_auc.shape == (2, 2)
    assert out.n_units.tolist() == [math.prod(SPATIAL[dims])] * 2
    with torch.no_grad():
        p = torch.sigmoid(net(x)).gather(1, res.targets)
    torch.testing.assert_close(out.deletion[..., 0], p)
    torch.testing.assert_close(out.insertion[..., -1], p)


# -- randomisation check ---------------------------------------------------------------------
def test_randomisation_check(dims):
    torch.manual_seed(30 + dims)
    net = ConvLinearNet(dims).eval()
    x = make_input(dims)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    res = metrics.randomisation_check(net, x, targets=[0, 1], layer="features")
    assert res.layers == ("fc", "features.2", "features.0")  # from the output down
    assert res.correlations.shape == (4, 2, 2)
    assert torch.all(res.correlations[0] == 1)
    assert res.correlations[-1].abs().mean() < 0.5  # nothing of the original map is left
    assert res.correlations[1:].mean() < 0.9
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = metrics.randomisation_check(net, x, targets=[0, 1], layer="features")
    torch.testing.assert_close(again.correlations, res.correlations, equal_nan=True)  # seeded
    ind = metrics.randomisation_check(net, x, targets=[0], layer="features", order="independent")
    assert ind.layers == res.layers and ind.correlations.shape == (4, 2, 1)
    up = metrics.randomisation_check(net, x, targets=[0], layer="features", order="bottom-up")
    assert up.layers == res.layers[::-1]


def test_randomisation_check_without_reset_parameters():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 2.0, 5).reshape(1, 5, 1, 1))

        def forward(self, x):
            return x * self.gain

    torch.manual_seed(0)
    net = ConvLinearNet(2, feat=5).eval()
    net.features.insert(2, Scale())  # conv -> relu -> Scale -> conv -> relu
    x = make_input(2)
    res = metrics.randomisation_check(net, x, targets=[1], layer="features.1", use="maps")
    assert "features.2" in res.layers and res.correlations.shape == (5, 2, 1)
    assert torch.all(res.correlations[0] == 1)
