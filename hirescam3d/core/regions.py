"""Region targets for segmentation outputs: the explained score of a class is the sum of
its logits over a region of the output grid.

A segmentation model returns logits ``(B, C, *spatial)``. For target class ``c`` and a
region ``R`` (a mask, or non-negative or signed weights) on the output grid, the explained
score is ``s = sum_v R[v] * logits[c, v]``, in logits (a sum over voxels). HiResCAM
decomposes exactly this number; at a layer after which only linear operations follow,
its cells sum to ``s - sum_v R[v] * bias_c[v]`` (``bias_c`` the output at zero
activations: for a last 1x1 convolution the constant ``b_c``, so ``s - b_c * |R|``).

``region="predicted"`` takes the model's own mask of each target class, chosen by the
output's activation (``task``): ``"softmax"`` (one class per voxel: the argmax) or
``"sigmoid"`` / ``"multilabel"`` (each class independently where ``sigmoid(logit) >=
0.5``, i.e. ``logit >= 0``).

Everything here is a pure function of tensors; :class:`hirescam3d.Explainer` calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hirescam3d.errors import InputError

#: Accepted ``task`` names and the activation each one means.
TASKS: dict[str, str] = {
    "softmax": "softmax", "multiclass": "softmax", "sigmoid": "sigmoid", "multilabel": "sigmoid"
}


def resolve_task(task: str | None, n_classes: int) -> str:
    """The activation (``"softmax"`` or ``"sigmoid"``) of a segmentation head.

    ``task``: ``"softmax"`` / ``"multiclass"``, or ``"sigmoid"`` / ``"multilabel"``; None is only
    accepted for a single-channel output (which can only be a sigmoid head).
    """
    if task is None:
        if n_classes == 1:
            return "sigmoid"
        raise InputError(
            "region='predicted' needs to know how the model's output becomes a mask: pass "
            "task='softmax' (one class per voxel, the argmax) or task='sigmoid' / "
            "'multilabel' (each class where its logit >= 0), to the Explainer or the call"
        )
    key = str(task).lower()
    if key not in TASKS:
        raise InputError(
            f"unknown task {task!r}; choose one of: {', '.join(map(repr, TASKS))}"
        )
    return TASKS[key]


def predicted_masks(output: torch.Tensor, task: str) -> torch.Tensor:
    """The model's own masks ``(B, C, *spatial)`` bool of every class.

    ``output``: logits ``(B, C, *spatial)``. Softmax: each voxel belongs to its argmax
    class (ties: the lowest index); sigmoid: class ``c`` where ``logit_c >= 0``.
    """
    if TASKS.get(task, task) == "softmax":
        top = output.argmax(dim=1, keepdim=True)
        classes = torch.arange(output.shape[1], device=output.device)
        return top == classes.view(1, -1, *([1] * (output.ndim - 2)))
    return output >= 0


def target_masks(output: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """The predicted masks ``(B, K, *spatial)`` bool of the target classes ``(B, K)``.

    One target at a time: besides the result, only ``(B, 1, *spatial)`` is allocated
    (plus the argmax for softmax).
    """
    b, k = targets.shape
    out = torch.empty((b, k, *output.shape[2:]), dtype=torch.bool, device=output.device)
    top = output.argmax(dim=1, keepdim=True) if TASKS.get(task, task) == "softmax" else None
    for j in range(k):
        idx = targets[:, j].view(b, 1, *([1] * (output.ndim - 2)))
        if top is not None:
            torch.eq(top, idx, out=out[:, j : j + 1])
        else:
            out[:, j : j + 1] = output.gather(1, idx.expand(b, 1, *output.shape[2:])) >= 0
    return out


def as_region(region: object) -> torch.Tensor:
    """A region given as a tensor or array, as a tensor (no copy where possible)."""
    if isinstance(region, torch.Tensor):
        return region
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None
    if np is not None and isinstance(region, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(region))
    raise InputError(
        f"region must be a torch.Tensor or numpy array (B, 1 or K, *spatial) on the "
        f"output grid, or 'predicted'; got {type(region).__name__}"
    )


def check_region(
    region: object, output_shape: Sequence[int], n_targets: int, input_shape: Sequence[int]
) -> torch.Tensor:
    """Validate a region for outputs ``(B, C, *spatial)`` and K targets.

    Accepted: ``(B or 1, 1 or K, *spatial)``, or ``(*spatial)`` alone (one region for
    every item and target); bool, 0/1 integer or floating (weights) values, finite.
    Returns the region as given (its dtype kept), with the leading axes added.
    ``input_shape``: the input's spatial shape, only for the error message.
    """
    r = as_region(region)
    b, _c, *spatial = (int(s) for s in output_shape)
    spatial = tuple(spatial)
    if r.ndim == len(spatial):
        r = r.reshape(1, 1, *r.shape)
    expected = f"(B={b} or 1, 1 or K={n_targets}, {', '.join(map(str, spatial))})"
    if r.ndim != len(spatial) + 2:
        raise InputError(
            f"region has shape {tuple(r.shape)}; it must be {expected}: one mask or weight "
            "map per item (and per target) on the model's output grid"
        )
    if tuple(r.shape[2:]) != spatial:
        raise InputError(
            f"region is on a grid of {tuple(r.shape[2:])} voxels but the model's output grid "
            f"is {spatial} (input {tuple(input_shape)}): resample the region onto the output "
            "grid"
        )
    if r.shape[0] not in (1, b):
        raise InputError(f"region has {r.shape[0]} items for a batch of {b}; expected {expected}")
    if r.shape[1] not in (1, n_targets):
        raise InputError(
            f"region has {r.shape[1]} channels for {n_targets} targets; give one region "
            f"(1 channel) for all targets or one per target, {expected}"
        )
    if r.dtype == torch.bool:
        return r
    if r.is_complex():
        raise InputError("region must be real-valued (a mask or weights), not complex")
    if not r.is_floating_point():
        values = torch.unique(r)
        if values.numel() > 2 or not set(values.tolist()) <= {0, 1}:
            shown = ", ".join(str(v) for v in values[:6].tolist())
            raise InputError(
                f"region is an integer array with values {shown}{'...' if len(values) > 6 else ''}"
                ": pass a 0/1 mask (e.g. labels == k) or floating-point weights"
            )
        return r.bool()
    if not torch.isfinite(r).all():
        raise InputError("region has non-finite values (NaN or Inf); pass a mask or finite weights")
    return r


def check_not_empty(region: torch.Tensor, what: str = "region") -> None:
    """InputError if any ``(item, channel)`` of ``region`` ``(B, K, *spatial)`` is all zero."""
    nonzero = (region != 0).flatten(2).any(dim=2)  # (B, K)
    if not bool(nonzero.all()):
        b, k = (int(i) for i in (~nonzero).nonzero()[0])
        where = f"item {b}" + (f", channel {k}" if region.shape[1] > 1 else "")
        raise InputError(
            f"{what} is empty (all zero) for {where}: there is nothing to explain there; "
            "pass a region that covers at least one voxel of the output grid"
        )


def region_scores(
    output: torch.Tensor, targets: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """``(B, K)``: ``sum_v region[b, k, v] * output[b, targets[b, k], v]``.

    ``output``: logits ``(B, C, *spatial)``; ``targets``: ``(B, K)`` class indices;
    ``region``: ``(B or 1, 1 or K, *spatial)``, bool or float (cast to the output's dtype).
    Differentiable in ``output``. One target at a time (a ``(B, 1, N)`` by ``(B, N, 1)``
    product), so only ``(B, *spatial)``-sized temporaries are allocated.
    """
    b, k = targets.shape
    spatial = output.shape[2:]
    scores = []
    weights = None
    for j in range(k):
        if weights is None or region.shape[1] > 1:
            w = region[:, j if region.shape[1] > 1 else 0]
            weights = w.to(device=output.device, dtype=output.dtype).reshape(w.shape[0], -1, 1)
        idx = targets[:, j].view(b, 1, *([1] * len(spatial))).expand(b, 1, *spatial)
        picked = output.gather(1, idx).reshape(b, 1, -1)  # (B, 1, N)
        scores.append(torch.matmul(picked, weights).reshape(b))
    return torch.stack(scores, dim=1)


def region_cotangents(
    output: torch.Tensor, targets: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """``(K, B, C, *spatial)``: the gradient of each target's region score with respect to
    the output, ``region[b, k]`` in channel ``targets[b, k]`` and 0 elsewhere.

    ``region``: ``(B or 1, 1 or K, *spatial)``. The vector of a vector-Jacobian product
    (cheaper than differentiating :func:`region_scores` through a gather).
    """
    b, k = targets.shape
    out = torch.zeros((k, *output.shape), dtype=output.dtype, device=output.device)
    for j in range(k):
        for i in range(b):
            w = region[i if region.shape[0] > 1 else 0, j if region.shape[1] > 1 else 0]
            out[j, i, int(targets[i, j])] = w
    return out


def class_scores(
    output: torch.Tensor,
    targets: torch.Tensor,
    region: torch.Tensor | None,
    explained: torch.Tensor,
    task: str | None = None,
) -> torch.Tensor:
    """``(B, C)`` region score of every class, for ``ExplanationResult.scores``.

    With ``task`` (``region="predicted"``): class ``c`` summed over its own predicted
    mask. With a one-channel region: every class over that region. With one region per
    target: each targeted class over its target's region (the first, if a class is
    targeted twice); classes no target names have no region and are NaN.
    ``explained``: the ``(B, K)`` region scores of the targets.
    """
    b, c = output.shape[:2]
    flat = output.detach().flatten(2)  # (B, C, N)
    if task is not None:
        if TASKS.get(task, task) == "softmax":
            top = flat.argmax(dim=1, keepdim=True)  # (B, 1, N)
            out = torch.zeros(b, c, dtype=flat.dtype, device=flat.device)
            return out.scatter_add_(1, top.squeeze(1), flat.gather(1, top).squeeze(1))
        # logits >= 0 summed: the sigmoid mask's score (one class at a time: no full copy)
        return torch.stack([flat[:, j].clamp_min(0).sum(dim=1) for j in range(c)], dim=1)
    if region is not None and region.shape[1] == 1:
        w = region.to(device=flat.device, dtype=flat.dtype).flatten(2)  # (B or 1, 1, N)
        return (flat @ w.transpose(1, 2)).squeeze(2)
    out = torch.full((b, c), float("nan"), dtype=flat.dtype, device=flat.device)
    for j in reversed(range(targets.shape[1])):  # the first target of a class wins
        out.scatter_(1, targets[:, j : j + 1], explained[:, j : j + 1].detach().to(flat.dtype))
    return out
