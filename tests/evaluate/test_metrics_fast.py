"""The fast mask metrics (issue 25: blocks' maxima, the IoU curve from the levels each value
reaches, the Grad-CAM box labelled band by band) against straightforward references
written here: one comparison per threshold, the positive mass summed directly, the
Grad-CAM box from ``scipy.ndimage`` labelling the whole volume. Random maps (ties, values
exactly on the levels, negative values, sign bits, float64), maps of a chest phantom's
findings, and selections made to test the box's groups and cc3d's thin crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from hirescam3d import InputError
from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.evaluate import metrics

UNEVEN = (0.013, 0.05, 0.1, 0.1, 0.33, 0.5, 0.77, 0.9, 0.999)
NOT_POSITIVE = (0.5, 0.0, -0.2)  # levels at or below zero select zeros and negatives too
CLOSE = (0.2, 0.3, 0.3001, 0.9)  # two levels under one key of the lookup: a binary search


def ref_metrics(m: np.ndarray, k: np.ndarray, thresholds, box_t: float = 0.15) -> dict:
    """Every mask metric of one map ``m`` and mask ``k``, the obvious way."""
    top = m.max()
    out = {"pointing": float(k.ravel()[int(np.argmax(m.ravel()))])}
    mask_box = None
    if k.any():
        idx = np.argwhere(k)
        mask_box = [[int(a), int(z)] for a, z in zip(idx.min(0), idx.max(0), strict=True)]
    out["mask_box"] = mask_box
    if not top > 0:
        out.update(mass=math.nan, curve=[math.nan] * len(thresholds), box=math.nan, map_box=None)
        return out
    pos = np.maximum(m.astype(np.float64), 0)
    out["mass"] = float(pos[k].sum() / pos.sum())
    curve = []
    for t in thresholds:
        pred = m >= m.dtype.type(t) * top
        union = np.logical_or(pred, k).sum()
        curve.append(float(np.logical_and(pred, k).sum() / union) if union else 0.0)
    out["curve"] = curve
    binary = m >= m.dtype.type(box_t) * top
    labels, n = ndimage.label(binary, structure=np.ones((3,) * m.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    biggest = int(np.argmax(sizes)) + 1  # labels in C order of first voxel: first on ties
    idx = np.argwhere(labels == biggest)
    box = [[int(a), int(z)] for a, z in zip(idx.min(0), idx.max(0), strict=True)]
    out["map_box"] = box
    if mask_box is None:
        out["box"] = 0.0
    else:
        lo = np.maximum([a for a, _ in box], [a for a, _ in mask_box])
        hi = np.minimum([z for _, z in box], [z for _, z in mask_box])
        inter = np.prod(np.clip(hi - lo + 1, 0, None).astype(float))
        vol = [np.prod([z - a + 1 for a, z in b_], dtype=float) for b_ in (box, mask_box)]
        out["box"] = float(inter / (vol[0] + vol[1] - inter))
    return out


def check(maps: torch.Tensor, masks: torch.Tensor, thresholds=metrics.DEFAULT_THRESHOLDS):
    got = metrics.localisation_metrics(maps, masks, thresholds=thresholds)
    order = np.argsort(np.asarray(thresholds, dtype=np.float64), kind="stable")
    curve = got.iou_curve.numpy()
    b, k = maps.shape[:2]
    for i in range(b):
        for j in range(k):
            m = maps[i, j].numpy()
            mk = masks[i, j if masks.shape[1] > 1 else 0].numpy()
            want = ref_metrics(m, mk, [thresholds[o] for o in order])
            assert got.pointing_game[i, j].item() == want["pointing"]
            np.testing.assert_allclose(got.relevance_mass[i, j].item(), want["mass"],
                                       rtol=1e-6, equal_nan=True)  # fmt: skip
            np.testing.assert_allclose(curve[i, j], want["curve"], rtol=1e-6, equal_nan=True)
            np.testing.assert_allclose(got.gradcam_box[i, j].item(), want["box"], rtol=1e-6,
                                       equal_nan=True)  # fmt: skip
            for boxes, key in ((got.map_boxes, "map_box"), (got.mask_boxes, "mask_box")):
                expect = want[key] if want[key] is not None else [[-1, -1]] * (m.ndim)
                assert boxes[i, j].tolist() == expect


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "thresholds", [metrics.DEFAULT_THRESHOLDS, UNEVEN, NOT_POSITIVE, CLOSE],
    ids=["even", "uneven", "not-positive", "close"],
)  # fmt: skip
def test_random_maps_equal_the_reference(dtype, thresholds):
    g = torch.Generator().manual_seed(11)
    shape = (2, 4, 24, 40, 36)
    maps = torch.rand(shape, generator=g, dtype=dtype)
    maps[0, 1] = torch.round(maps[0, 1] * 8) / 8  # ties and values exactly on levels
    maps[0, 2] -= 0.4  # negative values
    maps[1, 0] = -maps[1, 0]  # no positive value: NaN
    maps[1, 1] = torch.nn.functional.avg_pool3d(maps[1, 1][None], 5, 1, 2)[0]  # smooth
    top = maps[0, 3].max()
    levels = torch.tensor(thresholds, dtype=dtype) * top
    maps[0, 3].view(-1)[: levels.numel()] = levels  # exactly at t * max
    maps[1, 3] = torch.relu(maps[1, 3] - 0.5)  # mostly zeros, as explanation maps are
    maps[1, 3, 5, 6, 7] = math.nan  # a NaN among positive values: NaN metrics
    masks = torch.rand(shape, generator=g) > 0.7
    masks[1, 2] = False  # empty mask
    masks[0, 3] = masks[0, 1]  # one mask in two rows: its voxels found once
    masks[1, 1] = torch.roll(masks[0, 1], 5, dims=-1)  # as many voxels, elsewhere
    check(maps, masks, list(thresholds))


def test_maps_of_many_blocks_equal_the_reference():
    """Maps of many blocks of the compiled read (153,600 voxels: 37 blocks of 4,080 and a
    shorter last one): the first maximum when it is tied in two blocks far apart, a NaN
    only in the last block, positive voxels in one block only, negative values."""
    g = torch.Generator().manual_seed(5)
    shape = (1, 4, 40, 48, 80)
    maps = torch.relu(torch.rand(shape, generator=g) - 0.6)
    flat = maps.view(1, 4, -1)
    flat[0, 0, 70_000] = flat[0, 0, 140_000] = 2.0  # tied maximum, blocks 17 and 34
    flat[0, 1, :] = 0.0
    flat[0, 1, 100_000:100_050] = 0.5  # positive voxels in block 24 only
    flat[0, 2, 153_000] = math.nan  # NaN in the last block: NaN metrics, points at it
    maps[0, 3] -= 0.2  # negative values everywhere
    masks = torch.rand(shape, generator=g) > 0.5
    check(maps, masks)
    check(maps, masks, list(NOT_POSITIVE))


def test_shared_mask_broadcast_equals_the_reference():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand((1, 3, 30, 50), generator=g) ** 3
    masks = torch.zeros((1, 1, 30, 50), dtype=torch.bool)
    masks[0, 0, 5:20, 10:45] = True
    check(maps, masks)


@pytest.mark.slow
def test_phantom_maps_equal_the_reference():
    """Maps like explanations: each finding's mask blurred, plus a distractor blob and
    noise, on a 48 x 64 x 64 phantom; the masks are the phantom's findings."""
    p = make_chest_ct(5, findings=["atelectasis", "nodule", "pleural_effusion"],
                      shape=(48, 64, 64), spacing=(6.0, 5.0, 5.0))  # fmt: skip
    rng = np.random.default_rng(0)
    names = sorted(p.findings)
    maps, masks = [], []
    for name in names:
        mask = p.findings[name].astype(bool)
        m = ndimage.gaussian_filter(mask.astype(np.float32), 2.0)
        m[30:36, 5:12, 40:50] += 0.6  # a second component
        m += rng.normal(0, 0.01, m.shape).astype(np.float32)
        maps.append(m)
        masks.append(mask)
    check(torch.from_numpy(np.stack(maps))[None], torch.from_numpy(np.stack(masks))[None])


def scipy_largest_box(binary: np.ndarray, connectivity: int) -> list[list[int]]:
    """The box of the largest component (first in C order on ties), labelled by SciPy."""
    structure = ndimage.generate_binary_structure(binary.ndim, connectivity)
    labels, n = ndimage.label(binary, structure=structure)
    biggest = int(np.argmax(np.bincount(labels.ravel(), minlength=n + 1)[1:])) + 1
    idx = np.argwhere(labels == biggest)
    return [[int(a), int(z)] for a, z in zip(idx.min(0), idx.max(0), strict=True)]


def assert_boxes_like_scipy(maps: torch.Tensor, masks: torch.Tensor) -> None:
    """The Grad-CAM box of each map ``(1, K, *S)`` at 15 % is SciPy's, for every
    connectivity."""
    for connectivity in range(1, maps.ndim - 1):
        _, boxes, _ = metrics.gradcam_box(maps, masks, connectivity=connectivity,
                                          return_boxes=True)  # fmt: skip
        for j in range(maps.shape[1]):
            binary = maps[0, j].numpy() >= np.float32(0.15) * maps[0, j].numpy().max()
            assert boxes[0, j].tolist() == scipy_largest_box(binary, connectivity)


@pytest.mark.parametrize("shape", [(300, 300), (40, 48, 48)], ids=["2d", "3d"])
def test_every_connectivity_boxes_like_scipy(shape):
    """Speckled maps (many components that touch by faces, edges or corners only), large
    enough to be scored on threads: the Grad-CAM box for each connectivity is SciPy's."""
    g = torch.Generator().manual_seed(7)
    maps = (torch.rand((1, 6, *shape), generator=g) > 0.75).float()
    maps *= torch.rand(maps.shape, generator=g) * 0.1 + 0.9  # all selected at 15 %
    masks = torch.rand(maps.shape, generator=g) > 0.5
    assert_boxes_like_scipy(maps, masks)


@pytest.mark.parametrize("connectivity", [0, -1, 4])
def test_connectivity_out_of_range_is_refused(connectivity):
    maps = torch.rand(1, 1, 4, 5, 6)
    with pytest.raises(InputError, match="connectivity must be 1 to 3"):
        metrics.gradcam_box(maps, maps > 0.5, connectivity=connectivity)


@pytest.mark.parametrize("threshold", [1.01, math.inf, math.nan])
def test_box_threshold_above_one_is_refused(threshold):
    """Above 1 no voxel reaches ``threshold * max``: one clear error, not a box of
    nothing."""
    maps = torch.rand(1, 1, 4, 5, 6)
    with pytest.raises(InputError, match="threshold must be at most 1"):
        metrics.gradcam_box(maps, maps > 0.5, threshold=threshold)


@pytest.mark.parametrize("shape", [(1, 2, 0, 4, 4), (0, 2, 5, 5), (1, 0, 7)])
def test_maps_without_voxels_are_refused(shape):
    """Empty maps (a spatial axis, or the batch or target axis, of length 0): one clear
    error, not a reshape error from torch."""
    maps = torch.zeros(shape)
    with pytest.raises(InputError, match="no voxels"):
        metrics.localisation_metrics(maps, maps > 0)


def test_iou_thresholds_above_one_select_nothing():
    """Levels above the maximum select no voxel: IoU 0 there, whatever the mask (the
    reference: one comparison per threshold)."""
    g = torch.Generator().manual_seed(8)
    maps = torch.rand((1, 2, 10, 12, 14), generator=g)
    masks = torch.rand(maps.shape, generator=g) > 0.6
    check(maps, masks, [0.3, 1.0, 1.5, 2.0])
    assert metrics.iou_curve(maps, masks, thresholds=[1.5, 3.0]).eq(0).all()


def first_axis_groups(dims: int) -> torch.Tensor:
    """Maps ``(1, 4, *S)`` of ``dims`` spatial dims whose voxels at 15 % come in groups
    apart along the first axis: two equal blocks (a tie: the first wins), a small and a
    larger later one, two components in one group beside a larger one in another, and a
    speckle in every other index of the first axis."""
    shape = {1: (40,), 2: (24, 20), 3: (20, 12, 12)}[dims]
    maps = torch.zeros(1, 4, *shape)

    def put(j: int, first: int, last: int, width: int, start: int = 1) -> None:
        index = (0, j, slice(first, last + 1), *[slice(start, start + width)] * (dims - 1))
        maps[index] = 1.0

    put(0, 2, 4, 3), put(0, 10, 12, 3)
    put(1, 2, 3, 2), put(1, 10, 14, 3)
    put(2, 2, 3, 2, start=1), put(2, 2, 3, 2, start=6), put(2, 9, 11, 3)
    g = torch.Generator().manual_seed(2)
    speckle = (torch.rand(shape, generator=g) > 0.6).float()
    speckle[1::2] = 0
    maps[0, 3] = speckle
    return maps


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_groups_apart_on_the_first_axis_box_like_scipy(dims):
    """The voxels are labelled group by group between empty indices of the first axis:
    ties across groups and larger components in later groups give SciPy's box, for
    every connectivity."""
    maps = first_axis_groups(dims)
    masks = maps > 0
    assert_boxes_like_scipy(maps, masks)


def blobs_in_bands(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Maps ``(1, 4, *S)`` larger than one block of the metrics' read, whose voxels at 15 %
    lie in several groups along the first axis: two equal blocks far apart (a tie: the
    first wins), a small block then a larger one, a large block then small ones (these
    need not be labelled), and blurred noise (many components of every size)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(1, 4, *shape)
    n = shape[0]
    rest = [slice(1, 6)] * (len(shape) - 1)

    def put(j: int, first: int, last: int) -> None:
        maps[(0, j, slice(first, last + 1), *rest)] = 1.0

    put(0, 1, 3), put(0, n - 4, n - 2)
    put(1, 1, 2), put(1, n // 2, n // 2 + 4)
    put(2, 1, 6), put(2, n // 2, n // 2), put(2, n - 2, n - 2)
    noise = torch.rand(shape, generator=g).numpy()
    maps[0, 3] = torch.from_numpy(ndimage.gaussian_filter(noise, 1.5).astype(np.float32))
    maps[0, 3] -= maps[0, 3].min()
    maps[0, 3] = torch.relu(maps[0, 3] - 0.6 * maps[0, 3].max())
    return maps


@pytest.mark.parametrize(
    "shape", [(60, 40, 64), (30, 37, 53), (700, 53), (20000,)], ids=["3d", "odd", "2d", "1d"]
)  # fmt: skip
def test_components_in_several_bands_box_like_scipy(shape):
    """The box's voxels are compared and labelled band by band, from the blocks' maxima
    (blocks of whole lines, which may span several first-axis indices): ties between
    bands, larger components in later bands, bands skipped as too small, and many
    components give SciPy's box, for every connectivity."""
    maps = blobs_in_bands(shape, seed=len(shape))
    masks = maps > 0
    assert_boxes_like_scipy(maps, masks)


def test_more_than_255_levels_equal_the_reference():
    """300 thresholds, each 2 % above the last (one per key of the lookup), the highest
    above 1: the IoU curve is the reference's, one comparison per threshold."""
    g = torch.Generator().manual_seed(11)
    maps = torch.rand((1, 2, 12, 20, 24), generator=g) ** 2
    masks = torch.rand(maps.shape, generator=g) > 0.6
    check(maps, masks, [0.003 * 1.02**i for i in range(300)])


@pytest.mark.parametrize(
    "shape", [(5,), (1, 5), (3, 7), (1, 9, 1), (3, 3, 3), (5, 1, 5), (4, 4, 8)]
)  # fmt: skip
def test_thin_and_checkerboard_selections_box_like_scipy(shape):
    """Isolated voxels in thin or odd-sized boxes, which cc3d 4.1's binary 26-connected
    labelling refuses ("maximum length exception"): SciPy's box, every connectivity."""
    index = np.indices(shape).sum(axis=0)
    patterns = [index % 2 == 0, np.indices(shape)[-1] % 2 == 0]
    maps = torch.from_numpy(np.stack(patterns).astype(np.float32))[None]
    masks = torch.ones(maps.shape, dtype=torch.bool)
    for connectivity in range(1, len(shape) + 1):
        _, boxes, _ = metrics.gradcam_box(maps, masks, connectivity=connectivity,
                                          return_boxes=True)  # fmt: skip
        for j, binary in enumerate(patterns):
            assert boxes[0, j].tolist() == scipy_largest_box(binary, connectivity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_bits_and_infinities_equal_the_reference(dtype):
    """The read takes maxima over the values' bits: -0.0 and a NaN with its sign bit
    set (sign bits without a negative value), negative values beside them, infinities."""
    g = torch.Generator().manual_seed(4)
    maps = torch.relu(torch.rand((1, 5, 20, 30, 40), generator=g, dtype=dtype) - 0.5)
    flat = maps.view(1, 5, -1)
    flat[0, 0][flat[0, 0] == 0] = -0.0
    flat[0, 1][flat[0, 1] == 0] = -0.0
    flat[0, 1, 9000] = -0.25
    flat[0, 2, 15000] = -math.nan
    flat[0, 3, 7] = math.inf
    flat[0, 4, 100] = -math.inf
    masks = torch.rand(maps.shape, generator=g) > 0.5
    with np.errstate(invalid="ignore"):  # the reference's inf / inf: NaN, as it should
        check(maps, masks)
        check(maps, masks, list(UNEVEN))


def _metrics_in_child(maps, masks, out) -> None:
    out.put(metrics.localisation_metrics(maps, masks).iou_curve.numpy())


def test_a_forked_child_scores_after_its_parent():
    """The worker threads are kept between calls; a child forked after a call has none
    of them, and must make its own rather than wait forever on its parent's."""
    import multiprocessing

    g = torch.Generator().manual_seed(9)
    maps = torch.rand((1, 4, 24, 48, 64), generator=g)  # large enough for threads
    masks = torch.rand(maps.shape, generator=g) > 0.7
    want = metrics.localisation_metrics(maps, masks).iou_curve
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_metrics_in_child, args=(maps, masks, out))
    child.start()
    try:
        got = out.get(timeout=60)
    finally:
        child.join(timeout=10)
        child.kill()
    np.testing.assert_array_equal(got, want.numpy())
