"""Explanation methods as pure functions of tensors, and their registry.

Shapes: ``activations`` is ``(B, F, *S)`` with 1 to 3 spatial dims ``S``.
``gradients`` (the gradient of one class score with respect to the
activations) is ``(B, F, *S)`` or, for K targets at once, ``(K, B, F, *S)``.
Every method returns a raw map ``(B, *S)`` (or ``(K, B, *S)``) with no ReLU and
no normalisation: post-processing lives in :mod:`hirescam3d.core.postprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hirescam3d.errors import HiResCAMError


def _feature_dim(activations: torch.Tensor) -> int:
    """Index (negative) of the feature axis F, counted from the end."""
    n_spatial = activations.ndim - 2
    if n_spatial < 1:
        raise HiResCAMError(
            f"activations must be (B, F, *spatial) with at least one spatial dim; "
            f"got shape {tuple(activations.shape)}"
        )
    return -(n_spatial + 1)


def hirescam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM: ``sum_f G_f * A_f`` element-wise (Draelos & Carin, eq. 4).

    For a network whose only operation after the layer is one linear layer, the
    map's cells are the exact contributions of each location to the class score.
    """
    return (gradients * activations).sum(dim=_feature_dim(activations))


def gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: ``sum_f mean_S(G_f) * A_f`` (Selvaraju et al., eq. 1-2, before ReLU)."""
    fdim = _feature_dim(activations)
    spatial = tuple(range(fdim + 1, 0))
    alpha = gradients.mean(dim=spatial, keepdim=True)
    return (alpha * activations).sum(dim=fdim)


def cam(activations: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al.): ``sum_f w_f * A_f`` for a GAP + linear network.

    ``class_weights`` holds the linear layer's weight row of each explained
    class: ``(B, F)``, or ``(K, B, F)`` for K targets at once.
    """
    fdim = _feature_dim(activations)
    n_spatial = -fdim - 1
    w = class_weights.reshape(*class_weights.shape, *([1] * n_spatial))
    return (w * activations).sum(dim=fdim)


def _spatial_dims(activations: torch.Tensor) -> tuple[int, ...]:
    """The (negative) indices of the spatial axes S."""
    fdim = _feature_dim(activations)
    return tuple(range(fdim + 1, 0))


def gradcampp(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++: ``sum_f w_f * A_f`` with second-order weights (Chattopadhay et al.).

    With ``g = d S / d A`` (S the class logit) and the paper's closed form for the
    exponential score ``Y = exp(S)`` (its higher derivatives are ``exp(S) g^2`` and
    ``exp(S) g^3`` when S is piecewise linear in A, so ``exp(S)`` cancels in alpha)::

        alpha_f[s] = g_f[s]^2 / (2 g_f[s]^2 + sum_S'(A_f * g_f^3))
        w_f        = sum_S(alpha_f * relu(g_f))
        map[s]     = sum_f w_f * A_f[s]

    A zero denominator gives ``alpha = 0`` there (its numerator is 0 as well unless
    ``sum_S(A_f g_f^3) = -2 g_f[s]^2`` exactly). The paper's weights carry one more
    factor ``exp(S)`` (``relu(exp(S) g)``), a positive constant per map that overflows for
    large logits and disappears in any per-map normalisation: it is left out, so this
    raw map is ``monai.visualize.GradCAMpp``'s divided by ``exp(S)``.
    """
    spatial = _spatial_dims(activations)
    g2 = gradients.pow(2)
    denom = 2 * g2 + (activations * gradients.pow(3)).sum(dim=spatial, keepdim=True)
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1), 0)
    weights = (alpha * gradients.clamp_min(0)).sum(dim=spatial, keepdim=True)
    return (weights * activations).sum(dim=_feature_dim(activations))


def xgradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM: ``sum_f w_f * A_f`` with ``w_f = sum_S(A_f * g_f) / sum_S(A_f)`` (Fu et al.).

    The gradient is averaged over space weighted by the feature map itself. A feature
    whose map sums to zero gets weight 0 (for non-negative activations it is all zero
    and contributes nothing anyway); with signed activations a small sum makes the
    weight large, as in the published formula.
    """
    spatial = _spatial_dims(activations)
    num = (activations * gradients).sum(dim=spatial, keepdim=True)
    den = activations.sum(dim=spatial, keepdim=True)
    weights = torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
    return (weights * activations).sum(dim=_feature_dim(activations))


def layercam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM: ``sum_f relu(g_f) * A_f`` element-wise (Jiang et al., eq. 4-5, before ReLU).

    HiResCAM with the negative gradients set to zero: evidence against the class is
    dropped location by location.
    """
    return (gradients.clamp_min(0) * activations).sum(dim=_feature_dim(activations))


def gradxinput(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Gradient x Input at the layer: ``sum_f g_f * A_f`` element-wise.

    At a layer (the "input" being the layer's activations) this is the same arithmetic
    as HiResCAM, so the two give identical maps; it is registered under its own name for
    users who look for it. (Gradient x Input at the network's input is HiResCAM with the
    input as the explained layer.)
    """
    return hirescam(activations, gradients)


def eigencam(activations: torch.Tensor, _unused: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM: the activations' first principal component over space (Muhammad & Yeasin).

    Per item, the activations as an ``(N = prod S, F)`` matrix ``M`` are centred over
    space (each feature's spatial mean subtracted, as in PCA); with the SVD
    ``M - mean = U Sigma V^T`` the map is the projection on the first right singular
    vector, ``(M - mean) v_1 = sigma_1 u_1``, reshaped to ``S``. Class-agnostic: it needs
    no gradients, and every target of an item gets the same map. The SVD fixes ``v_1``
    only up to sign: the sign is chosen so that the map correlates positively with the
    mean activation over features (``mean_f A_f``); a map uncorrelated with it keeps a
    positive sum. Returns ``(B, *S)``. Computed with :func:`torch.linalg.svd`.
    """
    _feature_dim(activations)  # checks the shape
    b, f, *spatial = activations.shape
    m = activations.reshape(b, f, -1).transpose(1, 2).double()  # (B, N, F)
    centred = m - m.mean(dim=1, keepdim=True)
    u, sigma, _ = torch.linalg.svd(centred, full_matrices=False)
    proj = u[..., 0] * sigma[..., :1]  # (B, N)
    mean_act = m.mean(dim=2)
    corr = (proj * (mean_act - mean_act.mean(1, keepdim=True))).sum(1)  # proj has mean 0
    sign = torch.where(corr != 0, corr.sign(), torch.where(proj.sum(1) < 0, -1.0, 1.0))
    out = (proj * sign.unsqueeze(1)).to(activations.dtype)
    return out.reshape(b, *spatial)


@dataclass
class ModelAccess:
    """What a ``needs="model"`` (perturbation) method gets instead of gradients.

    ``x``: the input ``(B, C_in, *spatial)``; ``scores``: its logits ``(B, C)``;
    ``targets``: ``(B, K)`` class indices; ``geometry``: the layer's cell geometry
    (:class:`hirescam3d.core.trace.LayerGeometry`). ``run_input(inputs)`` gives the logits
    ``(n, C)`` of ``n`` inputs; ``run_from_layer(acts, items)`` the logits when the
    layer's output is replaced by ``acts`` ``(n, F, *S)`` for the inputs ``x[items]``.
    Both run without gradients; call them through :meth:`batched`, which keeps every
    model call at most ``batch_size`` items and reports to ``progress(done, total)``.
    ``layer_gradients()``: the ``(K, B, F, *S)`` class-score gradients at the layer (from
    the explanation's own graph). ``input_gradients(guided)``: ``(K, B, C_in, *spatial)``
    gradients with respect to the input from one more forward pass, with guided
    backpropagation through every ``nn.ReLU`` module when ``guided`` (hooks removed after).
    """

    x: torch.Tensor
    scores: torch.Tensor
    targets: torch.Tensor
    geometry: Any
    run_input: Callable[[torch.Tensor], torch.Tensor]
    run_from_layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int = 32
    progress: Callable[[int, int], None] | None = None
    layer_gradients: Callable[[], torch.Tensor] | None = None
    input_gradients: Callable[[bool], torch.Tensor] | None = None

    def batched(self, n: int, make: Callable[[slice], Any], run: Callable[..., torch.Tensor]):
        """Logits ``(n, C)`` of ``n`` perturbed inputs, ``batch_size`` at a time.

        ``make(chunk)`` builds the arguments of ``run`` for the indices in ``chunk``.
        """
        out = []
        size = max(1, int(self.batch_size))
        for start in range(0, n, size):
            chunk = slice(start, min(start + size, n))
            out.append(run(*make(chunk)))
            if self.progress is not None:
                self.progress(chunk.stop, n)
        return torch.cat(out) if out else self.scores.new_zeros(0, self.scores.shape[1])

    def target_scores(self, logits: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``(n, K)``: the logits of each perturbed input's item's K targets."""
        return logits.gather(1, self.targets[items])


def _with_targets(values: torch.Tensor) -> torch.Tensor:
    """``(B, P, K)`` -> ``(K, B, P)``."""
    return values.permute(2, 0, 1)


def ablationcam(activations: torch.Tensor, access: ModelAccess) -> torch.Tensor:
    """Ablation-CAM: ``sum_f w_f A_f``, ``w_f = y - y(A_f = 0)`` (Desai & Ramaswamy).

    ``y`` is the target's logit and ``y(A_f = 0)`` the logit with feature map ``f`` of the
    layer set to zero (the rest of the network re-run). The paper divides ``w_f`` by
    ``y``: a constant per map that any per-map normalisation removes and that flips the
    map's sign for a negative logit, so it is left out. Cost: ``B * F`` forward passes
    (each runs the whole network, in batches of ``batch_size``).
    """
    b, f = activations.shape[:2]
    items = torch.arange(b, device=activations.device).repeat_interleave(f)
    feats = torch.arange(f, device=activations.device).repeat(b)

    def make(chunk: slice):
        acts = activations[items[chunk]].clone()
        acts[torch.arange(acts.shape[0]), feats[chunk]] = 0
        return acts, items[chunk]

    logits = access.batched(b * f, make, access.run_from_layer)
    drop = access.target_scores(access.scores[items], items) - access.target_scores(logits, items)
    weights = _with_targets(drop.reshape(b, f, -1))  # (K, B, F)
    return cam(activations, weights)


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map ``(n, *S)`` to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    return torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0).reshape(
        maps.shape
    )


def scorecam(activations: torch.Tensor, access: ModelAccess) -> torch.Tensor:
    """Score-CAM: ``sum_f w_f A_f``, ``w_f = y(x * H_f) - y(0)`` (Wang et al., eq. 5-6).

    ``H_f`` is feature map ``f`` placed on the input by the layer's geometry
    (:func:`hirescam3d.core.postprocess.place`) and min-max normalised to [0, 1]; ``x * H_f``
    masks every input channel with it; ``y`` is the target's logit and ``y(0)`` that of
    the all-zero input (the baseline ``X_b``). The paper takes class probabilities
    (softmax) for ``y``; logits are used here, as everywhere in hirescam3d (multi-label
    heads have no softmax). Cost: ``B * F + 1`` forward passes, in batches.
    """
    from hirescam3d.core.postprocess import place

    x = access.x
    b, f = activations.shape[:2]
    items = torch.arange(b, device=x.device).repeat_interleave(f)
    size = tuple(x.shape[2:])

    def make(chunk: slice):
        acts = activations.flatten(0, 1)[chunk]  # (n, *S): item-major, as ``items``
        masks = _unit(place(acts.float(), access.geometry, size)).to(x.dtype)
        return (x[items[chunk]] * masks.unsqueeze(1),)

    logits = access.batched(b * f, make, access.run_input)
    base = access.run_input(torch.zeros_like(x[:1])).expand(len(items), -1)
    gain = access.target_scores(logits, items) - access.target_scores(base, items)
    weights = _with_targets(gain.reshape(b, f, -1))
    return cam(activations, weights)


def occlusion(activations: torch.Tensor, access: ModelAccess) -> torch.Tensor:
    """Occlusion sensitivity per cell: ``y - y(x with the cell's tile set to 0)``.

    Each cell of the layer's grid covers a tile of the input (its centre ``first + i *
    step``, half a step either side: the layer's geometry); the tile is set to 0 in
    every channel and the drop of the target's logit is the cell's value (Zeiler &
    Fergus, with the patch and stride of the explained layer: pick an earlier layer
    for finer maps). Cost: ``B * prod(S)`` forward passes, in batches.
    """
    x = access.x
    b = x.shape[0]
    grid = tuple(activations.shape[2:])
    n_cells = math.prod(grid)
    # Per axis: the cell whose tile holds each input voxel (-1 outside every tile).
    owners = []
    for geo, n, s in zip(access.geometry.axes, grid, x.shape[2:], strict=True):
        o = torch.arange(s, dtype=torch.float64, device=x.device)
        i = torch.floor((o - geo.first) / geo.step + 0.5).long()
        owners.append(torch.where((i >= 0) & (i < n), i, -1))
    items = torch.arange(b, device=x.device).repeat_interleave(n_cells)
    cells = torch.arange(n_cells, device=x.device).repeat(b)

    def make(chunk: slice):
        idx = torch.unravel_index(cells[chunk], grid)
        inside = torch.ones(len(idx[0]), *x.shape[2:], dtype=torch.bool, device=x.device)
        for a, own in enumerate(owners):
            view = [1] * (len(grid) + 1)
            view[a + 1] = -1
            inside &= own.view(view) == idx[a].view(-1, *[1] * len(grid))
        return (x[items[chunk]] * (~inside).unsqueeze(1).to(x.dtype),)

    logits = access.batched(b * n_cells, make, access.run_input)
    drop = access.target_scores(access.scores[items], items) - access.target_scores(logits, items)
    return _with_targets(drop.reshape(b, n_cells, -1)).reshape(-1, b, *grid)


def guidedbackprop(activations: torch.Tensor, access: ModelAccess) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al.), summed over input channels.

    The gradient of the target's logit with respect to the input, where every ``nn.ReLU``
    module passes back only positive gradients (``relu'(x) * relu(g)``). At input
    resolution: ``(K, B, *input_spatial)``. Caveat: guided backpropagation fails the
    model-randomisation sanity check (Adebayo et al., "Sanity checks for saliency maps",
    2018): its maps barely change when the network's weights are randomised, i.e. they
    show edges of the input more than what the model learned. ReLUs called as functions
    (``F.relu``) are not guided. Cost: one more forward pass and K backward passes.
    """
    return access.input_gradients(True).sum(dim=2)


def _guided(activations: torch.Tensor, access: ModelAccess, layer_map: Callable) -> torch.Tensor:
    from hirescam3d.core.postprocess import place

    coarse = layer_map(activations, access.layer_gradients()).clamp_min(0)
    fine = place(coarse, access.geometry, tuple(access.x.shape[2:]))
    return guidedbackprop(activations, access) * fine


def guided_gradcam(activations: torch.Tensor, access: ModelAccess) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al.): guided backpropagation x relu(Grad-CAM) placed
    on the input by the layer's geometry. At input resolution; inherits guided
    backpropagation's failure of the randomisation sanity check (Adebayo et al.)."""
    return _guided(activations, access, gradcam)


def guided_hirescam(activations: torch.Tensor, access: ModelAccess) -> torch.Tensor:
    """Guided HiResCAM: guided backpropagation x relu(HiResCAM) placed on the input by
    the layer's geometry. At input resolution; inherits guided backpropagation's failure
    of the randomisation sanity check (Adebayo et al.)."""
    return _guided(activations, access, hirescam)


@dataclass(frozen=True)
class Method:
    """A registered method: ``fn(activations, x)`` where ``x`` is what ``needs`` names.

    ``needs``: ``"gradients"`` (``x``: ``(K, B, F, *S)`` class-score gradients),
    ``"class_weights"`` (``x``: ``(K, B, F)`` linear-layer rows), ``"activations"``
    (``x`` is None; the map depends on the activations alone, is ``(B, *S)`` and is
    shared by all K targets; no gradients are computed for it) or ``"model"``
    (``x`` is a :class:`ModelAccess` for perturbation methods that re-run the model).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    needs: str  # "gradients", "class_weights", "activations" or "model"
    description: str
    resolution: str = "layer"  # "input": the map is on the input grid, not the layer's


METHODS: dict[str, Method] = {}
NEEDS = ("gradients", "class_weights", "activations", "model")


def register_method(
    name: str,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    needs: str = "gradients",
    description: str = "",
    resolution: str = "layer",
) -> None:
    """Add a method to the registry under ``name`` (used by Explainer, CLI and plugin).

    ``resolution="input"``: ``fn`` returns maps on the input grid ``(K, B, *spatial)``.
    """
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {', '.join(map(repr, NEEDS))}, not {needs!r}")
    if resolution not in ("layer", "input"):
        raise ValueError(f"resolution must be 'layer' or 'input', not {resolution!r}")
    description = description or (fn.__doc__ or "").split("\n")[0]
    METHODS[name] = Method(name, fn, needs, description, resolution)


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (unknown names: KeyError)."""
    del METHODS[name]


def get_method(name: str) -> Method:
    """Look up a registered method; unknown names raise with the valid choices."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise HiResCAMError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}"
        ) from None


register_method("hirescam", hirescam)
register_method("gradcam", gradcam)
register_method("cam", cam, needs="class_weights")
register_method("gradcampp", gradcampp, description="Grad-CAM++: second-order gradient weights")
register_method("xgradcam", xgradcam, description="XGrad-CAM: activation-weighted mean gradient")
register_method("layercam", layercam, description="LayerCAM: relu(gradient) x activation")
register_method(
    "gradxinput", gradxinput, description="Gradient x Input at the layer (= HiResCAM there)"
)
register_method(
    "ablationcam", ablationcam, needs="model",
    description="Ablation-CAM: logit drop when each feature map is zeroed (B*F passes)",
)
register_method(
    "scorecam", scorecam, needs="model",
    description="Score-CAM: logit of the input masked by each feature map (B*F passes)",
)
register_method(
    "occlusion", occlusion, needs="model",
    description="Occlusion: logit drop when each cell's tile of the input is zeroed",
)
register_method(
    "eigencam",
    eigencam,
    needs="activations",
    description="Eigen-CAM: first principal component of the activations (class-agnostic)",
)


def register_guided_methods() -> None:
    """Register ``guidedbackprop``, ``guided-gradcam`` and ``guided-hirescam``.

    Their maps are at input resolution (``resolution="input"``); the scan pipeline then
    computes organ shares on the input grid instead of the layer's. Called on import;
    calling it again restores them after a user removed them. See the caveat in
    :func:`guidedbackprop`.
    """
    register_method(
        "guidedbackprop", guidedbackprop, needs="model", resolution="input",
        description="Guided backpropagation (input resolution; fails randomisation checks)",
    )
    register_method(
        "guided-gradcam", guided_gradcam, needs="model", resolution="input",
        description="Guided Grad-CAM (input resolution; fails randomisation checks)",
    )
    register_method(
        "guided-hirescam", guided_hirescam, needs="model", resolution="input",
        description="Guided HiResCAM (input resolution; fails randomisation checks)",
    )


register_guided_methods()
