"""What an explanation is asked for and what it returns: class targets, segmentation
regions and :class:`ExplanationResult`, shared by :mod:`hirescam3d.core.explainer` and the
window-by-window explanations (:mod:`hirescam3d.core.sliding`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hirescam3d.core.trace import LayerGeometry

Targets = int | str | Sequence[int | str] | Sequence[Sequence[int | str]] | torch.Tensor | None

#: A region target: a ``(B or 1, 1 or K, *spatial)`` mask or weight map on the output
#: grid (tensor or array), or ``"predicted"``; see :mod:`hirescam3d.core.regions`.
Region = torch.Tensor | str | object | None


@dataclass
class ExplanationResult:
    """Explanations of K targets for a batch of B inputs.

    ``raw``: ``(B, K, *feature_spatial)`` float32, straight from the method (for
    HiResCAM at a guaranteed layer: each cell's contribution to the logit, or to the
    region score for a segmentation model).
    ``maps``: ``(B, K, *input_spatial)`` from the explainer's post-processing, by default
    float32 in [0, 1] placed by ``geometry`` (:func:`hirescam3d.core.postprocess.unit_maps`);
    None when maps were not requested. ``targets``: ``(B, K)`` class indices.
    ``geometry``: where the raw cells lie in the input.

    ``scores``: ``(B, C)``. For a classifier, its logits. For a segmentation model
    (output ``(B, C, *spatial)``), the *region scores*: class ``c``'s logits summed over
    its region (``region="predicted"``: each class over its own predicted mask; a
    one-channel region: every class over it; one region per target: each targeted class
    over its target's region, NaN for classes without a region).
    :meth:`target_scores` gives the ``(B, K)`` scores the maps explain, in either case.

    Segmentation models only (None otherwise): ``region``: ``(B, K, *output_spatial)``
    the region each target explains (bool masks for ``region="predicted"``: the model's
    own mask of the class, to write as a label map; the given mask or weights otherwise,
    possibly an expanded view); ``region_scores``: ``(B, K)`` the explained scores;
    ``output``: the model's logits ``(B, C, *output_spatial)`` (detached); ``task``:
    ``"softmax"`` or ``"sigmoid"`` when ``region="predicted"`` chose the masks.
    """

    raw: torch.Tensor
    maps: torch.Tensor | None
    scores: torch.Tensor
    targets: torch.Tensor
    method: str
    layer: str
    class_names: tuple[str, ...] | None = None
    activation_shape: tuple[int, ...] = field(default=())
    geometry: LayerGeometry | None = None
    region: torch.Tensor | None = None
    region_scores: torch.Tensor | None = None
    output: torch.Tensor | None = None
    task: str | None = None

    def target_names(self) -> list[list[str]]:
        """Class names of ``targets`` (indices as strings when the model has no names)."""
        names = self.class_names
        return [[names[t] if names else str(t) for t in row] for row in self.targets.tolist()]

    def target_scores(self) -> torch.Tensor:
        """``(B, K)`` the score each map explains: the target's logit (classifier) or its
        region score (segmentation model)."""
        if self.region_scores is not None:
            return self.region_scores
        return self.scores.gather(1, self.targets.to(self.scores.device))
