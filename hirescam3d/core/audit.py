"""The HiResCAM guarantee, computed: which layers only linear operations follow.

HiResCAM at layer L is exactly each location's additive contribution to the class score
when the score is an affine function of L's output: ``s(A) = sum W * A + b``. Then the
HiResCAM map ``sum_f G_f * A_f`` sums to ``s(A) - s(0)``. :func:`audit_model` decides
this for every candidate layer in two independent ways:

1. structurally, from the operations the forward pass actually executes after L
   (:mod:`hirescam3d.core.trace`): only linear ones (convolution and linear layers without a
   nonlinearity, average pooling, means, sums, reshapes, permutations, eval-mode
   dropout and batch norm) may lie between L and the scores;
2. numerically, on random activations: HiResCAM's sum against ``s(A) - s(0)``
   (completeness) and ``s(a + b) - s(0) = (s(a) - s(0)) + (s(b) - s(0))`` (linearity).

A layer is guaranteed only when both agree.

Segmentation models (logits ``(B, C, *spatial)``) are audited the same way: the score
of class c is then a region score ``s_R = sum_v R[v] * logits[c, v]``, affine in L's
output exactly when every output voxel is. The numerical completeness check uses a
seeded random region; the linearity check compares whole output maps. At a guaranteed
layer HiResCAM's cells sum to ``s_R - sum_v R[v] * bias_c[v]``, where ``bias_c`` is the
output at zero activations: for a last 1x1 convolution the constant ``b_c``, so
``s_R - b_c * |R|`` (:attr:`Verdict.bias`, with :attr:`Verdict.bias_uniform`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hirescam3d.core.trace import LayerGeometry, ModuleRecord, TraceResult, trace
from hirescam3d.errors import LayerError

# Relative tolerance of the numerical checks (float32 arithmetic).
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Verdict:
    """Whether HiResCAM is guaranteed faithful at one layer, and why.

    ``first_nonlinear`` / ``nonlinear_module``: the first nonlinear operation on the path
    from the layer to the scores and the module it runs in (None when there is none).
    ``completeness_error`` / ``linearity_error``: relative errors of the numerical checks
    (None when the structure already rules the guarantee out). ``bias``: the scores with
    the layer's output set to zero, ``s(0)``, one per class (logits); None when not
    guaranteed. For a segmentation model (``segmentation``), ``bias`` is the output at
    zero activations per class in logits per voxel: HiResCAM's cells sum to the region
    score minus ``bias * region size``. That holds when the zero-activation output is the
    same at every voxel (``bias_uniform``, e.g. a last 1x1 convolution's bias); when it
    varies (e.g. zero padding after the layer), ``bias`` holds its mean per class and the
    cells sum to the region score minus the region's sum of that map. ``geometry``:
    where the layer's cells lie in the input. ``aliases``: other modules with the same
    output tensor (a block and its last child).
    """

    layer: str
    module: str
    guaranteed: bool
    reason: str
    first_nonlinear: str | None = None
    nonlinear_module: str | None = None
    completeness_error: float | None = None
    linearity_error: float | None = None
    bias: tuple[float, ...] | None = None
    geometry: LayerGeometry | None = None
    default: bool = False
    aliases: tuple[str, ...] = ()
    segmentation: bool = False
    bias_uniform: bool | None = None

    def text(self) -> str:
        """One line: ``HiResCAM is guaranteed faithful at L`` or why not."""
        if self.guaranteed:
            return f"HiResCAM is guaranteed faithful at {self.layer}"
        return f"HiResCAM is not guaranteed at {self.layer}: {self.reason}"

    def to_dict(self) -> dict:
        """JSON-ready form (geometry as per-axis first centre, step and extent)."""
        out = {
            "layer": self.layer,
            "module": self.module,
            "guaranteed": self.guaranteed,
            "reason": self.reason,
            "first_nonlinear": self.first_nonlinear,
            "nonlinear_module": self.nonlinear_module,
            "completeness_error": self.completeness_error,
            "linearity_error": self.linearity_error,
            "bias": None if self.bias is None else list(self.bias),
            "default": self.default,
            "aliases": list(self.aliases),
            "segmentation": self.segmentation,
            "bias_uniform": self.bias_uniform,
        }
        out["geometry"] = None if self.geometry is None else self.geometry.to_dict()
        return out


def _device(network: nn.Module) -> torch.device:
    for p in network.parameters():
        return p.device
    return torch.device("cpu")


def probe_input(network: nn.Module, input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A seeded random input ``(1, *input_shape)`` in [0, 1] on the network's device."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, *input_shape), generator=g).to(_device(network))


def _scores_with(
    network: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    activations: torch.Tensor,
    output_selector: Callable[[object], torch.Tensor] | None,
) -> torch.Tensor:
    """The scores ``(1, C)`` when ``layer`` outputs ``activations`` ``(1, ...)`` instead."""

    def replace(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return activations.to(output.dtype)

    handle = layer.register_forward_hook(replace)
    try:
        with torch.no_grad():
            out = network(x)
    finally:
        handle.remove()
    return (output_selector(out) if output_selector is not None else out).float()


def probe_region(output_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A seeded random mask ``(1, 1, *spatial)`` covering about half of an output grid
    ``(B, C, *spatial)`` (never empty), for the completeness check of segmentation
    models."""
    g = torch.Generator().manual_seed(seed + 1)
    region = torch.rand((1, 1, *output_shape[2:]), generator=g) < 0.5
    region.view(-1)[0] = True
    return region


def _numerical_checks(
    network: nn.Module,
    layer: str,
    x: torch.Tensor,
    output_selector: Callable[[object], torch.Tensor] | None,
    output_shape: Sequence[int],
    seed: int,
) -> tuple[float, float, torch.Tensor]:
    """``(completeness error, linearity error, s(0))`` at ``layer`` for input ``x``.

    ``output_shape``: the scores' shape, ``(1, C)`` or ``(1, C, *spatial)``
    (segmentation: the completeness check explains region scores over
    :func:`probe_region`, and ``s(0)`` is the ``(C, *spatial)`` output map).
    """
    from hirescam3d.core.capture import model_state_restored, resolve_layer
    from hirescam3d.core.explainer import Explainer

    _, module = resolve_layer(network, layer)
    explainer = Explainer(network, layer, "hirescam", output_selector=output_selector)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with model_state_restored(network), torch.no_grad():
            network(x)
    finally:
        handle.remove()
    acts = captured[-1]
    n_classes = int(output_shape[1]) if len(output_shape) > 1 else 1
    region = probe_region(output_shape, seed) if len(output_shape) > 2 else None
    # completeness per class costs k x output in memory: many-class networks (e.g. the
    # 105 classes of MONAI's wholeBody_ct_segmentation) are checked on a spread of classes
    targets = sorted({*range(min(n_classes, 4)), n_classes // 2, n_classes - 1})
    with model_state_restored(network):
        result = explainer.explain(x, targets, ["hirescam"], maps=False, region=region)
        g = torch.Generator().manual_seed(seed)
        scale = float(acts.abs().mean()) or 1.0
        a = torch.randn(acts.shape, generator=g).to(acts) * scale
        b = torch.randn(acts.shape, generator=g).to(acts) * scale
        # One item at a time: a head that mixes the items of a batch must not pass.
        f0, fa, fb, fab = (
            _scores_with(network, module, x, sub, output_selector)[0]
            for sub in (torch.zeros_like(acts), a, b, a + b)
        )
        fx = result["hirescam"].target_scores()[0].float()
    if region is not None:  # region scores: s_R(0) = sum_v R[v] * s(0)[c, v]
        f0_total = (f0 * region[0].to(f0)).flatten(1).sum(1)
    else:
        f0_total = f0
    tiny = torch.finfo(torch.float32).tiny
    lin = (fab - fa - fb + f0).abs().max() / torch.maximum(
        (fa - f0).abs().max(), (fb - f0).abs().max()
    ).clamp_min(tiny)
    total = result["hirescam"].raw[0].flatten(1).double().sum(1).float()
    gain = fx - f0_total[targets]
    comp = (total - gain).abs().max() / gain.abs().max().clamp_min(tiny)
    return float(comp), float(lin), f0


def _candidates(tr: TraceResult) -> dict[tuple[int, int], list[ModuleRecord]]:
    """Layers explain accepts and all of the input's influence passes through, grouped by
    output value (a block and its last child share one output; an in-place module after
    them, such as ``ReLU(inplace=True)``, returns the same tensor with new values, so it
    gets a group of its own)."""
    groups: dict[tuple[int, int], list[ModuleRecord]] = {}
    for rec in tr.modules.values():
        if rec.batch_ok and rec.reaches and rec.cut and rec.serial is not None:
            groups.setdefault((rec.serial, rec.version), []).append(rec)
    return groups


def _verdict(
    network: nn.Module,
    rec: ModuleRecord,
    tr: TraceResult,
    x: torch.Tensor,
    output_selector: Callable[[object], torch.Tensor] | None,
    seed: int,
    aliases: Sequence[str] = (),
    default: bool = False,
) -> Verdict:
    try:
        geometry = tr.layer_geometry(rec.name)
    except LayerError:
        geometry = None
    common = {
        "layer": rec.name,
        "module": rec.type_name,
        "geometry": geometry,
        "default": default,
        "aliases": tuple(aliases),
    }
    if not rec.cut:
        return Verdict(
            guaranteed=False,
            reason="the scores also depend on the input through a path around this layer "
            "(a skip connection), so its map cannot account for the whole score",
            **common,
        )
    if rec.first_nonlinear is not None:
        return Verdict(
            guaranteed=False,
            reason=f"the first nonlinear operation after it is {rec.first_nonlinear} "
            f"({rec.nonlinear_module or type(network).__name__ + '.forward'})",
            first_nonlinear=rec.first_nonlinear,
            nonlinear_module=rec.nonlinear_module or f"{type(network).__name__}.forward",
            **common,
        )
    shape = tr.output_shape or (1, 1)
    comp, lin, f0 = _numerical_checks(network, rec.name, x, output_selector, shape, seed)
    segmentation = len(shape) > 2
    errors = {"completeness_error": comp, "linearity_error": lin}
    if comp > TOLERANCE or lin > TOLERANCE:
        return Verdict(
            guaranteed=False,
            reason="the traced operations after it are linear, but the numerical check "
            f"fails (completeness error {comp:.2g}, linearity error {lin:.2g}): an "
            "operation outside torch (e.g. through NumPy or .item()) may be nonlinear",
            **errors,
            **common,
        )
    if not segmentation:
        return Verdict(
            guaranteed=True,
            reason=f"only linear operations follow it (numerical check: completeness error "
            f"{comp:.1g}, linearity error {lin:.1g})",
            bias=tuple(float(v) for v in f0),
            **errors,
            **common,
        )
    flat = f0.flatten(1).double()
    spread = (flat.amax(1) - flat.amin(1)).max()
    uniform = bool(spread <= TOLERANCE * max(1.0, float(flat.abs().max())))
    size = "bias x region size" if uniform else (
        "the region's sum of the output at zero activations (it varies over the grid)"
    )
    return Verdict(
        guaranteed=True,
        reason=f"only linear operations follow it: for a region, HiResCAM's cells sum to "
        f"the region score minus {size} (numerical check: completeness error {comp:.1g}, "
        f"linearity error {lin:.1g})",
        bias=tuple(float(v) for v in flat.mean(1)),
        segmentation=True,
        bias_uniform=uniform,
        **errors,
        **common,
    )


def audit_model(
    network: nn.Module,
    input_shape: Sequence[int],
    layers: Sequence[str] | None = None,
    default_layer: str | None = None,
    output_selector: Callable[[object], torch.Tensor] | None = None,
    seed: int = 0,
) -> list[Verdict]:
    """Verdicts for the candidate layers of ``network`` (or only ``layers``).

    ``input_shape``: ``(C, *spatial)`` of one input, without batch. Candidate layers are
    the modules whose output explain accepts for that input (``(1, F, *S)`` tensors)
    and through which all of the input's influence on the scores passes, in execution
    order; modules sharing one output (a block and its last child) are listed once,
    under the default layer's name if it is one of them, with the others as
    ``aliases``. The network is left as it was (mode, ``requires_grad`` flags, hooks).
    """
    x = probe_input(network, input_shape, seed)
    tr = trace(network, x, output_selector)
    wanted = None if layers is None else set(layers)
    verdicts = []
    for group in _candidates(tr).values():
        names = [r.name for r in group]
        main = default_layer if default_layer in names else names[0]
        if wanted is not None and not wanted & set(names):
            continue
        rec = tr.modules[main]
        verdicts.append(
            _verdict(
                network, rec, tr, x, output_selector, seed,
                aliases=[n for n in names if n != main], default=main == default_layer,
            )
        )  # fmt: skip
    return verdicts


def audit_layer(
    network: nn.Module,
    layer: str,
    input_shape: Sequence[int],
    output_selector: Callable[[object], torch.Tensor] | None = None,
    seed: int = 0,
) -> Verdict:
    """The verdict for one layer; LayerError if explain cannot use it for this input."""
    from hirescam3d.core.capture import resolve_layer

    name, _ = resolve_layer(network, layer)
    x = probe_input(network, input_shape, seed)
    tr = trace(network, x, output_selector)
    rec = tr.modules.get(name)
    if rec is None or rec.shape is None:
        raise LayerError(f"layer {name!r} does not output a tensor during the forward pass")
    if not rec.batch_ok:
        raise LayerError(
            f"layer {name!r} outputs shape {rec.shape} for an input of shape "
            f"{tuple(x.shape)}: not one (F, *spatial) map per input (it runs on slices or "
            "patches, or has no spatial axes); choose a layer listed by `hirescam3d layers`"
        )
    if not rec.reaches:
        raise LayerError(f"the class scores do not depend on layer {name!r}")
    return _verdict(network, rec, tr, x, output_selector, seed)
