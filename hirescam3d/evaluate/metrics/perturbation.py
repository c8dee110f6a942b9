"""Perturbation: deletion and insertion curves (:func:`deletion_insertion`), which remove
or restore the input in the order a map ranks it and follow the model's output."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from hirescam3d.core.capture import model_state_restored
from hirescam3d.core.trace import LayerGeometry
from hirescam3d.errors import InputError
from hirescam3d.evaluate.metrics._common import TargetsArg, as_float, model_device, spatial_dims

__all__ = ["DeletionInsertion", "deletion_insertion"]

Baseline = float | str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DeletionInsertion:
    """Deletion and insertion curves of K targets for B inputs.

    ``deletion[b, k, s]``: the target's probability after the ``floor(s * U / steps)``
    most attended of the item's U units were replaced by the baseline (``s = 0``: the
    input itself; ``s = steps``: the baseline);
    ``insertion[b, k, s]``: after that share was put back into the baseline (``s = 0``:
    the baseline alone). Both ``(B, K, steps + 1)``. ``fractions``: ``(steps + 1,)`` the
    share of units, ``0 .. 1``. ``deletion_auc`` / ``insertion_auc``: ``(B, K)`` trapezoid
    areas under the curves over ``fractions`` (low deletion and high insertion AUC =
    the map ranks the evidence the model uses first). ``n_units``: ``(B,)`` units per
    input; ``evaluations``: perturbed inputs that went through the model.
    """

    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    fractions: torch.Tensor
    n_units: torch.Tensor
    evaluations: int


def _gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *S)`` over the spatial axes (edges replicated)."""
    nd = x.ndim - 2
    sigmas = [float(sigma)] * nd if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != nd:
        raise InputError(f"blur_sigma needs one value or {nd}; got {len(sigmas)}")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    c = x.shape[1]
    out = x
    for d, s in enumerate(sigmas):
        if s <= 0:
            continue
        radius = max(1, int(math.ceil(3 * s)))
        r = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
        kern = torch.exp(-0.5 * (r / s) ** 2)
        kern = (kern / kern.sum()).to(x.dtype)
        shape = [1, 1] + [1] * nd
        shape[2 + d] = kern.numel()
        weight = kern.reshape(shape).expand(c, *shape[1:])  # one kernel per channel
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - d)] = radius  # F.pad lists the last axis first
        pad[2 * (nd - 1 - d) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out


def _baseline(x: torch.Tensor, baseline: Baseline, blur_sigma: float | Sequence[float]):
    if isinstance(baseline, str):
        if baseline != "blur":
            raise InputError(f"baseline {baseline!r}: give a number, 'blur', a tensor or callable")
        return _gaussian_blur(x, blur_sigma)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError as err:
            raise InputError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input "
                f"{tuple(x.shape)}"
            ) from err
    if callable(baseline):
        out = baseline(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"baseline(x) returned {got}; it must return x's shape {x.shape}")
        return out.to(device=x.device, dtype=x.dtype)
    raise InputError(f"baseline must be a number, 'blur', a tensor or a callable, not {baseline!r}")


def _target_matrix(targets: TargetsArg, b: int, device: torch.device) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        t = targets.to(device=device, dtype=torch.long)
    elif isinstance(targets, int):
        t = torch.tensor([[targets]], device=device)
    else:
        rows = list(targets)
        if rows and isinstance(rows[0], (list, tuple)):
            t = torch.tensor(rows, dtype=torch.long, device=device)
        else:
            t = torch.tensor([rows], dtype=torch.long, device=device)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] not in (1, b):
        raise InputError(f"targets must be (B, K) class indices; got shape {tuple(t.shape)}")
    return t.expand(b, t.shape[1])


def _as_sizes(size: int | Sequence[int], nd: int) -> list[int]:
    sizes = [int(size)] * nd if isinstance(size, int) else [int(s) for s in size]
    if len(sizes) != nd or min(sizes) < 1:
        raise InputError(f"unit_size must be a positive int or {nd} positive ints; got {size}")
    return sizes


def _grid_labels(index_per_axis: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Flat unit label of every voxel from per-axis unit indices (C order)."""
    nd = len(index_per_axis)
    label = torch.zeros((), dtype=torch.long, device=index_per_axis[0].device)
    for d, idx in enumerate(index_per_axis):
        shape = [1] * nd
        shape[d] = idx.numel()
        label = label * counts[d] + idx.reshape(shape)
    return label


def _unit_labels(
    unit: str | torch.Tensor,
    geometry: LayerGeometry | None,
    size: tuple[int, ...],
    unit_size: int | Sequence[int],
    batch: int,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """``(B or 1, N)`` long unit labels of the input voxels; and whether they are cells
    of ``geometry`` (labels = flat cell indices of its grid)."""
    nd = len(size)
    if isinstance(unit, torch.Tensor):
        lab = unit.to(device=device, dtype=torch.long)
        if tuple(lab.shape[-nd:]) != size or lab.ndim - nd not in (0, 1, 2):
            raise InputError(f"unit labels {tuple(lab.shape)} must be (*S), (B, *S) or (B, 1, *S)")
        lab = lab.reshape(-1, math.prod(size))
        if lab.shape[0] not in (1, batch):
            raise InputError(f"unit labels have {lab.shape[0]} items for a batch of {batch}")
        return lab, False
    if unit == "cell" and geometry is not None:
        if tuple(geometry.input_shape) != size:
            raise InputError(
                f"geometry is for inputs {tuple(geometry.input_shape)}, not {size}; "
                "take it from explainer.geometry(x)"
            )
        idx = []
        for geo, n, s in zip(geometry.axes, geometry.grid_shape, size, strict=True):
            o = torch.arange(s, dtype=torch.float64, device=device)
            # tile i = [first + (i - 1/2) step, first + (i + 1/2) step); voxels beyond the
            # outermost tiles join the nearest cell, so every voxel is in one unit
            i = torch.floor((o - geo.first) / geo.step + 0.5).long().clamp(0, n - 1)
            idx.append(i)
        return _grid_labels(idx, geometry.grid_shape).reshape(1, -1), True
    if unit not in ("cell", "supervoxel"):
        raise InputError(f"unit must be 'cell', 'supervoxel' or a label tensor, not {unit!r}")
    sizes = _as_sizes(unit_size, nd)
    idx = [torch.arange(s, device=device) // c for s, c in zip(size, sizes, strict=True)]
    counts = [math.ceil(s / c) for s, c in zip(size, sizes, strict=True)]
    return _grid_labels(idx, counts).reshape(1, -1), False


def _probabilities(scores: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """``(n, K)`` of ``scores (n, C)`` for ``targets (n, K)``."""
    if kind == "sigmoid":
        values = torch.sigmoid(scores)
    elif kind == "softmax":
        values = torch.softmax(scores, dim=-1)
    else:
        values = scores
    return values.gather(1, targets).double()


class _Checked(NamedTuple):
    """:func:`deletion_insertion`'s inputs, checked and on the model's device."""

    x: torch.Tensor  # (B, C_in, *S) floating
    base: torch.Tensor  # (B, C_in, *S): what removed input becomes
    targets: torch.Tensor  # (B, K) class indices
    labels: torch.Tensor  # (B or 1, N) the unit of each input voxel
    maps: torch.Tensor  # (B, K, N) float, or (B, K, cells) with on_grid
    on_grid: bool  # maps hold one value per cell of the explained layer's grid


def _maps_on_grid(
    maps: torch.Tensor, x_shape: torch.Size, cells: bool, geometry: LayerGeometry | None
) -> bool:
    """Whether ``maps`` are on the explained layer's grid (else at the resolution of the
    input ``(B, C_in, *S)``); InputError if neither, or if their rank differs from it."""
    size = tuple(int(s) for s in x_shape[2:])
    map_size = tuple(maps.shape[2:])
    on_grid = cells and geometry is not None and map_size == tuple(geometry.grid_shape)
    if not on_grid and map_size != size:
        raise InputError(
            f"maps {tuple(maps.shape)} are neither at the input's resolution {size} nor "
            "(with unit='cell' and geometry) on the explained layer's grid"
        )
    if maps.ndim - 2 != len(size):
        raise InputError(f"maps {tuple(maps.shape)} and input {tuple(x_shape)} differ in rank")
    return on_grid


def _checked_inputs(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: TargetsArg,
    steps: int,
    max_batch: int,
    probability: str,
    baseline: Baseline,
    blur_sigma: float | Sequence[float],
    unit: str | torch.Tensor,
    geometry: LayerGeometry | None,
    unit_size: int | Sequence[int],
) -> _Checked:
    """:func:`deletion_insertion`'s arguments checked (InputError) and moved to the model's
    device, with the baseline and the unit labels made."""
    spatial_dims(x, "x")
    size = tuple(int(s) for s in x.shape[2:])
    if steps < 1 or max_batch < 1:
        raise InputError("steps and max_batch must be at least 1")
    if probability not in ("sigmoid", "softmax", "logit"):
        raise InputError(
            f"probability must be 'sigmoid', 'softmax' or 'logit', not {probability!r}"
        )
    spatial_dims(maps)
    device = model_device(model)
    x = x.detach().to(device)
    if not x.is_floating_point():
        x = x.float()
    b = x.shape[0]
    if maps.shape[0] != b:
        raise InputError(f"maps have {maps.shape[0]} items for a batch of {b} inputs")
    tgt = _target_matrix(targets, b, device)
    if tgt.shape[1] != maps.shape[1]:
        raise InputError(f"{tgt.shape[1]} targets per item for {maps.shape[1]} maps per item")
    base = _baseline(x, baseline, blur_sigma)
    labels, cells = _unit_labels(unit, geometry, size, unit_size, b, device)
    on_grid = _maps_on_grid(maps, x.shape, cells, geometry)
    flat_maps = as_float(maps.detach()).to(device).flatten(2)
    return _Checked(x, base, tgt, labels, flat_maps, on_grid)


def _item_ranks(inputs: _Checked, i: int) -> tuple[torch.Tensor, int]:
    """Item ``i``'s ``(K, N)`` rank of each voxel's unit per target (units by score, the
    highest first, ties in unit order) and its number of units."""
    lab = inputs.labels[i if inputs.labels.shape[0] > 1 else 0]
    ids, inverse = torch.unique(lab, return_inverse=True)
    n_units = ids.numel()
    maps = inputs.maps[i]
    k, device = maps.shape[0], maps.device
    if inputs.on_grid:
        scores = maps[:, ids]
    else:  # the mean of the unit's voxels
        sums = torch.zeros(k, n_units, dtype=torch.float64, device=device)
        sums.index_add_(1, inverse, maps.double())
        counts = torch.bincount(inverse, minlength=n_units).clamp_min(1)
        scores = sums / counts
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_units, device=device).expand(k, n_units))
    return rank.gather(1, inverse.expand(k, -1)), n_units


class _UnitRanks:
    """The voxel ranks of :func:`_item_ranks`, kept for one item at a time; ``n_units``
    ``(B,)`` counts the units of the items seen."""

    def __init__(self, inputs: _Checked) -> None:
        self.inputs = inputs
        self.n_units = torch.zeros(inputs.x.shape[0], dtype=torch.long)
        self._kept: dict[int, tuple[torch.Tensor, int]] = {}

    def of_item(self, i: int) -> tuple[torch.Tensor, int]:
        """Item ``i``'s ``(K, N)`` voxel ranks and number of units."""
        if i not in self._kept:
            self._kept.clear()  # one item's ranks at a time
            self._kept[i] = _item_ranks(self.inputs, i)
            self.n_units[i] = self._kept[i][1]
        return self._kept[i]

    def counts(self) -> torch.Tensor:
        """``(B,)`` units per item, counting those of items no step needed ranks for."""
        for i in range(self.n_units.shape[0]):
            if self.n_units[i] == 0:
                self.n_units[i] = _item_ranks(self.inputs, i)[1]
        return self.n_units


class _Job(NamedTuple):
    """One perturbed input: ``target`` -1 for an item's end points (``curve`` 0: the
    input, 1: the baseline), shared by its K targets."""

    item: int
    target: int
    curve: int  # 0: deletion, 1: insertion
    step: int


def _jobs(b: int, k: int, steps: int) -> list[_Job]:
    """Every perturbed input of the curves, item by item."""
    jobs: list[_Job] = []
    for i in range(b):
        jobs += [_Job(i, -1, 0, 0), _Job(i, -1, 1, 0)]  # the input, the baseline
        for j in range(k):
            for curve in (0, 1):
                jobs += [_Job(i, j, curve, s) for s in range(1, steps)]
    return jobs


def _perturbed_input(inputs: _Checked, ranks: _UnitRanks, job: _Job, steps: int) -> torch.Tensor:
    """The input ``(C_in, *S)`` of ``job``: the first ``floor(step * U / steps)`` units
    deleted (baseline) or inserted (into the baseline)."""
    i, j, curve, s = job
    x, base = inputs.x[i], inputs.base[i]
    if j < 0:
        return x if curve == 0 else base
    vrank, u = ranks.of_item(i)
    chosen = (vrank[j] < (s * u) // steps).reshape(1, *inputs.x.shape[2:])
    if curve == 0:  # deletion: the chosen units become baseline
        return torch.where(chosen, base, x)
    return torch.where(chosen, x, base)  # insertion: the chosen units come back


def _target_probabilities(
    model: nn.Module,
    batch: torch.Tensor,
    targets: torch.Tensor,
    probability: str,
    output_selector: Callable[[object], torch.Tensor] | None,
) -> torch.Tensor:
    """``(n, K)`` float64 probabilities (or logits) of ``targets`` ``(n, K)`` for the
    inputs ``batch`` ``(n, C_in, *S)``."""
    out = model(batch)
    if output_selector is not None:
        out = output_selector(out)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise InputError("the model did not return (n, C) logits; pass output_selector=...")
    return _probabilities(out.float(), targets, probability)


def _store(
    deletion: torch.Tensor, insertion: torch.Tensor, chunk: Sequence[_Job], probs: torch.Tensor
) -> None:
    """Put the ``(n, K)`` ``probs`` of ``chunk`` in the curves ``(B, K, steps + 1)``."""
    steps = deletion.shape[-1] - 1
    for row, (i, j, curve, s) in enumerate(chunk):
        if j < 0 and curve == 0:
            deletion[i, :, 0] = probs[row]
            insertion[i, :, steps] = probs[row]
        elif j < 0:
            deletion[i, :, steps] = probs[row]
            insertion[i, :, 0] = probs[row]
        elif curve == 0:
            deletion[i, j, s] = probs[row, j]
        else:
            insertion[i, j, s] = probs[row, j]


class _Curves(NamedTuple):
    """Deletion and insertion ``(B, K, steps + 1)`` float64, units per item ``(B,)`` and
    the number of perturbed inputs."""

    deletion: torch.Tensor
    insertion: torch.Tensor
    n_units: torch.Tensor
    evaluations: int


def _run_curves(
    model: nn.Module,
    inputs: _Checked,
    steps: int,
    max_batch: int,
    probability: str,
    progress: Callable[[int, int], None] | None,
    output_selector: Callable[[object], torch.Tensor] | None,
) -> _Curves:
    """Put every perturbed input through the model, ``max_batch`` at a time (in eval mode,
    without gradients; the model's state restored), and record the curves."""
    b, k = inputs.targets.shape
    jobs = _jobs(b, k, steps)
    deletion = torch.empty(b, k, steps + 1, dtype=torch.float64, device=inputs.x.device)
    insertion = torch.empty_like(deletion)
    ranks = _UnitRanks(inputs)
    done = 0
    with model_state_restored(model), torch.no_grad():
        for start in range(0, len(jobs), max_batch):
            chunk = jobs[start : start + max_batch]
            batch = torch.stack([_perturbed_input(inputs, ranks, job, steps) for job in chunk])
            rows = torch.tensor([job.item for job in chunk], device=inputs.x.device)
            probs = _target_probabilities(
                model, batch, inputs.targets[rows], probability, output_selector
            )
            _store(deletion, insertion, chunk, probs)
            done += len(chunk)
            if progress is not None:
                progress(done, len(jobs))
    return _Curves(deletion, insertion, ranks.counts(), len(jobs))


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: TargetsArg,
    steps: int = 20,
    baseline: Baseline = 0.0,
    unit: Literal["cell", "supervoxel"] | torch.Tensor = "cell",
    max_batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
    geometry: LayerGeometry | None = None,
    unit_size: int | Sequence[int] = 8,
    probability: Literal["sigmoid", "softmax", "logit"] = "sigmoid",
    blur_sigma: float | Sequence[float] = 5.0,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> DeletionInsertion:
    """Deletion and insertion curves: perturb the input in order of attention.

    The input is cut into units; units are ranked by the map's value (mean over the
    unit's voxels; ties keep unit order). Deletion replaces the ``s / steps`` most
    attended share of the units by the baseline and records the target's probability,
    for ``s = 0 .. steps``; insertion starts from the baseline and puts the most
    attended units back. A faithful map makes deletion fall and insertion rise early.

    Args:
        model: maps ``(n, C_in, *S)`` to logits ``(n, C)`` (or use ``output_selector``).
            It runs in eval mode under ``torch.no_grad()``; its modes and flags are
            restored and its parameters are not touched.
        x: ``(B, C_in, *S)`` inputs, in the model's units (for CT typically HU windowed
            and scaled: convert the baseline the same way).
        maps: ``(B, K, *S)`` at input resolution (``ExplanationResult.maps``), or, with
            ``unit="cell"`` and ``geometry``, ``(B, K, *grid)`` on the explained layer's
            grid (``ExplanationResult.raw``; each cell's own value ranks it).
        targets: class index per explained map: ``(B, K)`` (``ExplanationResult.targets``),
            or K indices shared by all items, or one int.
        steps: points of each curve after the start (``steps + 1`` in all).
        baseline: what removed input becomes: a number (e.g. air, -1000 HU, put through
            the same scaling as ``x``), ``"blur"`` (a Gaussian-blurred copy of ``x``,
            ``blur_sigma`` voxels), a tensor broadcastable to ``x`` (e.g. each organ's
            mean intensity) or a callable ``x -> baseline``.
        unit: ``"cell"``: each unit is one explanation cell's tile on the input (cell
            ``i`` covers ``first + (i -/+ 1/2) * step`` per axis, from ``geometry``, e.g.
            ``explainer.geometry(x)``; voxels outside every tile join the nearest cell).
            Without ``geometry``, cubes of ``unit_size`` voxels. ``"supervoxel"``: a
            regular grid of cubes of ``unit_size`` voxels from voxel 0 (simple regular-grid
            supervoxels, not intensity-adaptive ones). Or an integer label tensor
            ``(*S)`` / ``(B, *S)``: your own supervoxels (e.g. SLIC), one unit per label.
        max_batch: perturbed inputs per forward pass.
        progress: called as ``progress(done, total)`` (perturbed inputs) after each pass.
        unit_size: cube edge in voxels (int or one per axis) for cubes and supervoxels.
        probability: ``"sigmoid"`` of the target's logit (multi-label, the default),
            ``"softmax"`` over the classes, or the ``"logit"`` itself.
        output_selector: maps the model's output to ``(n, C)`` logits.

    Cost: the start and end points are shared by the K targets of an item, so
    ``B * (2 + 2 * K * (steps - 1))`` perturbed inputs go through the model, in
    ``ceil(that / max_batch)`` forward passes of up to ``max_batch`` inputs: per map and
    curve about ``steps / max_batch`` batched passes. Memory: one batch of inputs, plus
    the unit ranks of one item (``K * N`` int64).
    """
    inputs = _checked_inputs(
        model, x, maps, targets, steps, max_batch, probability, baseline, blur_sigma, unit,
        geometry, unit_size,
    )
    curves = _run_curves(model, inputs, steps, max_batch, probability, progress, output_selector)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=inputs.x.device)
    return DeletionInsertion(
        deletion=curves.deletion.float(),
        insertion=curves.insertion.float(),
        deletion_auc=torch.trapezoid(curves.deletion, fractions, dim=-1).float(),
        insertion_auc=torch.trapezoid(curves.insertion, fractions, dim=-1).float(),
        fractions=fractions.float(),
        n_units=curves.n_units,
        evaluations=curves.evaluations,
    )
