"""HiResCAM of an nnU-Net prediction, on nnU-Net's own tiles, folds and mirrored passes.

nnU-Net predicts a preprocessed volume ``x`` ``(C_in, *S)`` as the average, over the
passes ``p`` (each fold, each allowed flip), of the Gaussian-blended tiles::

    L = (1 / P) sum_p sum_i g_i * flip_p(f_p(flip_p(x_i))) / sum_i g_i

with the tiles ``x_i`` of :func:`nnunetv2.inference.sliding_window_prediction.
compute_steps_for_sliding_window` (patch size from the plans, step 0.5, zero padding by
``pad_nd_image``) and the weights ``g`` of nnU-Net's ``compute_gaussian`` (sigma = patch /
8, the float16 map nnU-Net uses). The explained score of a target class ``c`` is its
region score ``sum_v R[v] * L_c[v]`` with ``R`` the class's mask in nnU-Net's own
prediction. ``L`` is linear in the per-pass tile logits, so its HiResCAM is the same
average of the per-pass tile maps (each flipped back and weighted by ``g``).

At a layer after which only the 1x1x1 segmentation convolution follows (the default: the
last decoder stage), each tile map is ``R * g * (l - b)`` per voxel, so the map sums to the
region score of ``L`` minus ``b_c * sum(R)`` (:attr:`NnunetExplanation.bias`), in logits.
The Gaussian map is nnU-Net's (not MONAI's ``gaussian`` mode, whose kernel and window
schedule differ; see docs/nnunet.md). Tiles that the region does not reach are skipped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hirescam3d.core import postprocess
from hirescam3d.errors import TargetError
from hirescam3d.models.nnunet import NnunetModel, Preprocessed, mirror_passes, predict_logits

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.core.explainer import Explainer


@dataclass
class NnunetExplanation:
    """One explanation on nnU-Net's preprocessed grid ``S``.

    ``raw`` ``(K, *S)``: the averaged HiResCAM maps, logits per voxel. ``logits`` ``(C,
    *S)``: nnU-Net's own prediction (its float16-accumulated blend). ``blended`` ``(C,
    *S)``: the same average from the explained passes in float32 (inside the regions only).
    ``region`` ``(K, *S)``: the explained masks. ``region_scores`` / ``bias`` ``(K,)``:
    ``sum R * blended`` and the segmentation bias of each target (its mean over the
    folds). ``passes``: one ``{"fold", "flip"}`` per averaged pass.
    """

    raw: torch.Tensor
    logits: torch.Tensor
    blended: torch.Tensor
    region: torch.Tensor
    targets: list[int]
    names: list[str]
    region_scores: torch.Tensor
    bias: torch.Tensor
    passes: list[dict[str, Any]]
    layer: str
    method: str


def target_indices(model: NnunetModel, targets: list[str] | None) -> list[int]:
    """Output channels of ``targets`` (names from dataset.json, case-insensitive);
    default: every foreground class (channel 0 is background for softmax trainings)."""
    from hirescam3d.models.handle import match_findings

    names = list(model.class_names)
    if not targets:
        start = 0 if model.task == "sigmoid" else 1
        return list(range(start, len(names)))
    return [names.index(n) for n in match_findings(targets, names)]


def predicted_regions(model: NnunetModel, logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``(K, *S)`` float masks of the targets in nnU-Net's prediction: the argmax for
    softmax trainings, ``logit > 0`` (sigmoid > 0.5, as nnU-Net's label manager) per
    region for region-based ones."""
    if model.task == "sigmoid":
        return torch.stack([(logits[c] > 0).float() for c in idx])
    winner = logits.argmax(0)
    return torch.stack([(winner == c).float() for c in idx])


def _tiles(shape: tuple[int, ...], patch: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """nnU-Net's tile slices of a (padded) volume, step 0.5 of the patch."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(shape, patch, 0.5)
    return [
        tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        for start in itertools.product(*steps)
    ]


def _gaussian(patch: tuple[int, ...]) -> torch.Tensor:
    """nnU-Net's importance map for ``patch`` (its float16 values, as float32)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    g = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10,
                         dtype=torch.float16, device=torch.device("cpu"))  # fmt: skip
    return g.float()


def _flip(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``t`` ``(B, C, *S)`` flipped along spatial ``axes`` (nnU-Net's numbering)."""
    return torch.flip(t, [a + 2 for a in axes]) if axes else t


def _tile_pass(
    explainer: Explainer, window: torch.Tensor, region: torch.Tensor, idx: list[int],
    flip: tuple[int, ...], method: str, task: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass on one tile: ``(map (K, *P), logits (C, *P))``, flipped back."""  # fmt: skip
    res = explainer._explain(
        _flip(window, flip), [idx], [method], False, None, _flip(region, flip), task,
        allow_empty=True,
    )[method]  # fmt: skip
    raw = res.raw
    size = tuple(window.shape[2:])
    geo = res.geometry or explainer.geometry(_flip(window, flip))
    if tuple(raw.shape[2:]) != size:
        raw = postprocess.density(raw, geo, size)
    return _flip(raw, flip)[0].detach(), _flip(res.output, flip)[0].detach()


def explain_preprocessed(
    model: NnunetModel,
    pre: Preprocessed,
    layer: str,
    targets: list[str] | None = None,
    mirror: bool = True,
    method: str = "hirescam",
    logits: torch.Tensor | None = None,
) -> NnunetExplanation:
    """Explain nnU-Net's prediction of ``pre`` for ``targets`` at ``layer`` (see the
    module docstring); every fold of ``model`` and, with ``mirror``, every allowed flip.
    ``logits``: nnU-Net's prediction of ``pre`` with the same folds and mirroring, if
    already made (another method explaining the same prediction)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    from hirescam3d.core.explainer import Explainer

    idx = target_indices(model, targets)
    logits = predict_logits(model, pre.data, mirror) if logits is None else logits
    region = predicted_regions(model, logits, idx)
    names = [model.class_names[c] for c in idx]
    empty = [n for n, r in zip(names, region, strict=True) if not bool(r.any())]
    if empty:
        raise TargetError(
            f"{pre.path}: nnU-Net predicts no voxel of {', '.join(empty)}: nothing to explain"
        )
    patch = model.patch_size
    data, unpad = pad_nd_image(pre.data, patch, "constant", {"value": 0}, True, None)
    reg, _ = pad_nd_image(region, patch, "constant", {"value": 0}, True, None)
    g = _gaussian(patch)
    tiles = _tiles(tuple(data.shape[1:]), patch)
    weight = torch.zeros(data.shape[1:])
    for sl in tiles:
        weight[sl] += g
    raw = torch.zeros((len(idx), *data.shape[1:]))
    blended = torch.zeros((logits.shape[0], *data.shape[1:]))
    flips = mirror_passes(model, mirror)
    explainer = Explainer(model.network, layer, method=method, task=model.task)
    passes, bias = [], torch.zeros(len(idx))
    try:
        for f, fold in enumerate(model.folds):
            model.use_fold(f)
            bias += seg_bias(model, idx) / len(model.folds)
            for flip in flips:
                passes.append({"fold": fold, "flip": list(flip)})
                for sl in tiles:
                    crop = reg[(slice(None), *sl)][None]
                    if not bool(crop.any()):
                        continue
                    window = data[(slice(None), *sl)][None]
                    m, out = _tile_pass(explainer, window, crop, idx, flip, method, model.task)
                    raw[(slice(None), *sl)] += m * g
                    blended[(slice(None), *sl)] += out * g
    finally:
        model.use_fold(0)
    scale = weight * len(passes)
    raw = (raw / scale)[(slice(None), *unpad[1:])]
    blended = (blended / scale)[(slice(None), *unpad[1:])]
    scores = torch.stack([(region[k] * blended[c]).sum() for k, c in enumerate(idx)])
    return NnunetExplanation(
        raw=raw, logits=logits, blended=blended, region=region, targets=idx, names=names,
        region_scores=scores, bias=bias, passes=passes, layer=layer,
        method=method,
    )  # fmt: skip


def seg_bias(model: NnunetModel, idx: list[int]) -> torch.Tensor:
    """The bias of the final 1x1x1 segmentation convolution for each target ``(K,)`` with
    the weights loaded now (zeros if it has none). Averaged over folds, it is the bias
    term of the averaged passes."""
    seg_layers = getattr(getattr(model.network, "decoder", None), "seg_layers", None)
    conv = seg_layers[-1] if seg_layers is not None else None
    if conv is None:
        for module in model.network.modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                conv = module
    if conv is None or conv.bias is None:
        return torch.zeros(len(idx))
    return conv.bias.detach()[idx].clone()
