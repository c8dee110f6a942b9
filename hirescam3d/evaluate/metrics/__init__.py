"""Measure explanations: localisation, perturbation and sanity-check metrics for 2D and 3D
maps.

Everything here is a function of torch tensors. Maps are ``(B, K, *S)`` with 1 to 3
spatial dims: B inputs, K explained targets. Every name is importable from here
(``from hirescam3d import metrics; metrics.pointing_game(...)``); by kind:

- :mod:`~hirescam3d.evaluate.metrics.localisation`: mask metrics, ``(B, K)`` float32 on
  the maps' device (:func:`pointing_game`, :func:`relevance_mass`, :func:`iou_curve` /
  :func:`iou_at_best_threshold`, :func:`gradcam_box`, all at once with
  :func:`localisation_metrics`), and their conventions for empty masks and maps with no
  positive value.
- :mod:`~hirescam3d.evaluate.metrics.similarity`: :func:`l2_to_exact`, the HiResCAM
  paper's Table 1 distance, and :func:`spearman` rank correlation.
- :mod:`~hirescam3d.evaluate.metrics.perturbation`: :func:`deletion_insertion`
  (perturbation curves and their AUC, batched).
- :mod:`~hirescam3d.evaluate.metrics.sanity`: :func:`randomisation_check` (Adebayo et
  al.'s cascading model-parameter randomisation).

See ``docs/metrics.md`` for a user guide.
"""

from __future__ import annotations

from hirescam3d.evaluate.metrics._common import TargetsArg  # noqa: F401 - a type, not in __all__
from hirescam3d.evaluate.metrics.localisation import (
    DEFAULT_THRESHOLDS,
    BestIoU,
    Localisation,
    gradcam_box,
    iou_at_best_threshold,
    iou_curve,
    localisation_metrics,
    pointing_game,
    relevance_mass,
)
from hirescam3d.evaluate.metrics.perturbation import (
    Baseline,  # noqa: F401 - a type, not in __all__
    DeletionInsertion,
    _gaussian_blur,  # noqa: F401 - tests reach it as metrics._gaussian_blur
    deletion_insertion,
)
from hirescam3d.evaluate.metrics.sanity import RandomisationResult, randomisation_check
from hirescam3d.evaluate.metrics.similarity import (
    Normalization,  # noqa: F401 - a type, not in __all__
    l2_to_exact,
    spearman,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BestIoU",
    "DeletionInsertion",
    "Localisation",
    "RandomisationResult",
    "deletion_insertion",
    "gradcam_box",
    "iou_at_best_threshold",
    "iou_curve",
    "l2_to_exact",
    "localisation_metrics",
    "pointing_game",
    "randomisation_check",
    "relevance_mass",
    "spearman",
]
