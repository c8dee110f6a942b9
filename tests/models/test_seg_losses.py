"""The class-balanced loss terms of the demo_seg recipe, against hand computations."""

import math

import torch

from hirescam3d.models.training.train_seg import hard_negative_bce, positive_mean_bce


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_positive_mean_bce_averages_each_present_channel_over_its_positives():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]])  # (B=1, C=2, S=3)
    y = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # channel 1 has no positive
    expected = (_bce(2.0, 1) + _bce(-1.0, 1)) / 2  # channel 0 only
    assert math.isclose(positive_mean_bce(logits, y).item(), expected, rel_tol=1e-6)


def test_hard_negative_bce_takes_the_k_worst_negatives_of_each_channel():
    logits = torch.tensor([[[4.0, -3.0, 1.0, 9.0], [2.0, 0.0, -5.0, 1.0]]])
    y = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    # channel 0: negatives 4, -3, 1 (the positive 9 counts 0) -> worst two: 4 and 1
    # channel 1: negatives 2, 0, -5, 1 -> worst two: 2 and 1
    expected = (_bce(4.0, 0) + _bce(1.0, 0) + _bce(2.0, 0) + _bce(1.0, 0)) / 4
    assert math.isclose(hard_negative_bce(logits, y, 2).item(), expected, rel_tol=1e-6)


def test_exclusive_bce_averages_each_finding_over_the_other_findings_voxels():
    from hirescam3d.models.training.train_seg import EXCLUSIVE, exclusive_bce
    from hirescam3d.models.zoo import SEG_CHANNELS

    atel, fluid, nodule = (SEG_CHANNELS.index(c) for c in EXCLUSIVE)
    logits = torch.zeros(1, len(SEG_CHANNELS), 4)
    y = torch.zeros_like(logits)
    y[0, fluid, :2] = 1  # voxels 0-1: pleural fluid
    y[0, atel, 2] = 1  # voxel 2: atelectasis; voxel 3: none of the three
    y[0, 0, :] = 1  # an organ channel: not one of the exclusive findings
    logits[0, atel] = torch.tensor([3.0, -1.0, 5.0, 7.0])
    logits[0, fluid] = torch.tensor([9.0, 9.0, 2.0, 8.0])
    logits[0, nodule] = torch.tensor([0.5, -2.0, 1.0, 6.0])
    # atelectasis over the fluid voxels; fluid over the atelectasis voxel; the nodule over
    # all three. Voxel 3 belongs to no finding and counts nowhere.
    expected = (
        (_bce(3.0, 0) + _bce(-1.0, 0)) / 2
        + _bce(2.0, 0)
        + (_bce(0.5, 0) + _bce(-2.0, 0) + _bce(1.0, 0)) / 3
    ) / 3
    assert math.isclose(exclusive_bce(logits, y).item(), expected, rel_tol=1e-6)


def test_hard_negatives_apply_to_the_named_channels_only():
    from monai.losses import DiceLoss

    from hirescam3d.models.training.train_seg import SegLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 50, generator=g)
    y = (torch.rand(1, 3, 50, generator=g) > 0.8).float()
    dice = DiceLoss(sigmoid=True, batch=True)
    base = SegLoss(dice, None)(logits, y)
    only_2 = SegLoss(dice, None, hard_neg=1.0, hard_k=5, hard_channels=[2])(logits, y)
    worst = sorted((_bce(v, 0) for v, t in zip(logits[0, 2].tolist(), y[0, 2].tolist(), strict=True)
                    if t == 0), reverse=True)[:5]  # fmt: skip
    assert math.isclose((only_2 - base).item(), sum(worst) / 5, rel_tol=1e-5)
