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
