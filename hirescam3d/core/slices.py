"""Slice-by-slice explanations: a 2D segmentation network over a 3D volume, on MONAI's
:class:`monai.inferers.SliceInferer` schedule.

``SliceInferer(roi_size=(h, w), spatial_dim=d)`` is MONAI's sliding window with the
window ``(h, w)`` widened by a length-1 axis at ``d`` and the 2D network wrapped so each
window ``(N, C, ..1..)`` is squeezed to ``(N, C, h, w)`` and its output unsqueezed.
:func:`slice_inferer_explain` explains the very same prediction through the very same
function (:func:`hirescam3d.core.sliding.sliding_window_explain`, which calls
``sliding_window_inference``): each batch of windows is squeezed, explained by the 2D
:class:`~hirescam3d.core.explainer.Explainer` for the region cropped to it, its raw maps
placed on the window's pixels in score units per pixel
(:func:`hirescam3d.core.postprocess.density`), unsqueezed, and MONAI blends them with the
weights it blends the prediction with. The stacked maps and logits lie on the volume's
grid; the stacked logits equal ``SliceInferer``'s output.

For a bundle whose ``inferer`` is a ``SliceInferer``: :func:`check_slice_inferer` accepts
or refuses the entry when the bundle is read; :func:`slice_predict` is MONAI's own
prediction with it; ``slice_inferer_explain(explainer, x, targets, region,
**slice_options(entry))`` explains it (the maps, on the model's input grid, go back to
the scan's grid as sliding-window maps do).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hirescam3d.core import postprocess
from hirescam3d.core.sliding import is_identity, sliding_window_explain
from hirescam3d.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.core.explainer import Explainer, ExplanationResult, Region, Targets


class SliceNetwork(nn.Module):
    """A 2D network seen as a 3D one: ``(N, C, *3D)`` with length 1 along spatial axis
    ``spatial_dim`` -> squeezed -> ``network`` -> unsqueezed (MONAI ``SliceInferer``'s
    ``network_wrapper``). Holds ``network`` as a submodule; changes nothing in it."""

    def __init__(self, network: nn.Module, spatial_dim: int) -> None:
        super().__init__()
        self.network = network
        self.axis = int(spatial_dim) + 2

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network(x.squeeze(self.axis), *args, **kwargs).unsqueeze(self.axis)


class _SliceExplainer:
    """What :func:`~hirescam3d.core.sliding.sliding_window_explain` needs of an explainer, for
    a 2D :class:`~hirescam3d.core.explainer.Explainer` over 3D windows one voxel thick."""

    def __init__(self, explainer: Explainer, spatial_dim: int) -> None:
        self._inner = explainer
        self.axis = int(spatial_dim) + 2
        self.model = SliceNetwork(explainer.model, spatial_dim)

    def __getattr__(self, name: str) -> Any:  # layer_name, class_names, _output, ...
        return getattr(self._inner, name)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"slice-by-slice explanation needs a 3D volume (B, C, D, H, W); got {shape}"
            )
        return self._inner._check_input(x)

    def _explain(
        self,
        window: torch.Tensor,
        targets: Targets,
        methods: Sequence[str] | None,
        maps: bool,
        forward_kwargs: dict | None,
        region: Region,
        task: str | None,
        allow_empty: bool = False,
    ) -> dict[str, ExplanationResult]:
        flat = window.squeeze(self.axis)
        if isinstance(region, torch.Tensor):
            region = region.squeeze(self.axis)
        results = self._inner._explain(flat, targets, methods, False, forward_kwargs, region,
                                       task, allow_empty=allow_empty)  # fmt: skip
        size2d, size3d = tuple(flat.shape[2:]), tuple(window.shape[2:])
        out = {}
        for name, res in results.items():
            raw = res.raw
            geo = res.geometry or self._inner.geometry(flat, forward_kwargs=forward_kwargs)
            if not is_identity(geo, size2d):
                raw = postprocess.density(raw, geo, size2d)  # score units per pixel
            out[name] = dataclasses.replace(
                res,
                raw=raw.unsqueeze(self.axis),
                geometry=postprocess.stretch_geometry(size3d, size3d),
                output=None if res.output is None else res.output.unsqueeze(self.axis),
                region=None if res.region is None else res.region.unsqueeze(self.axis),
            )
        return out

    def geometry(self, x: torch.Tensor, forward_kwargs: dict | None = None) -> Any:
        size = tuple(x.shape[2:])
        return postprocess.stretch_geometry(size, size)


def slice_inferer_explain(
    explainer: Explainer,
    x: torch.Tensor,
    targets: Targets = None,
    region: Region = "predicted",
    spatial_dim: int = 0,
    roi_size: Sequence[int] | None = None,
    overlap: Sequence[float] | float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    methods: Sequence[str] | None = None,
    maps: bool = True,
    task: str | None = None,
) -> dict[str, ExplanationResult]:
    """Explain a 2D segmentation network's region scores on a volume ``x`` ``(B, C_in, D,
    H, W)`` slice by slice, as ``monai.inferers.SliceInferer(roi_size, spatial_dim=...)``
    predicts it (defaults as MONAI's: ``overlap`` 0.25, ``mode`` constant).

    ``explainer``: a :class:`~hirescam3d.core.explainer.Explainer` of the 2D network.
    ``roi_size``: the 2D window ``(h, w)`` in the slice plane (None: whole slices).
    ``region``: ``"predicted"`` (each target's mask in the stacked prediction) or a ``(B
    or 1, 1 or K, D, H, W)`` mask or weights on the volume's grid. Other arguments: as
    for :func:`~hirescam3d.core.sliding.sliding_window_explain`.

    Returns, per method, an :class:`~hirescam3d.ExplanationResult` on the volume's grid:
    ``raw`` ``(B, K, D, H, W)`` the stacked maps in score units per voxel (logits per
    voxel for HiResCAM); ``output`` the stacked logits, equal to ``SliceInferer``'s.
    The network is never changed.
    """
    if int(spatial_dim) not in (0, 1, 2):
        raise InputError(f"spatial_dim must be 0, 1 or 2 (the axis to slice); got {spatial_dim}")
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"slice-by-slice explanation needs a 3D volume (B, C, D, H, W); "
                         f"got {shape}")  # fmt: skip
    plane = [int(n) for i, n in enumerate(x.shape[2:]) if i != int(spatial_dim)]
    roi = list(plane if roi_size is None else roi_size)
    if len(roi) != 2:
        raise InputError(f"roi_size {tuple(roi)} must be the 2D window (h, w) in the slice plane")
    roi = [p if int(r) <= 0 else int(r) for r, p in zip(roi, plane, strict=True)]
    whole_slices = roi == plane
    roi.insert(int(spatial_dim), 1)
    proxy = _SliceExplainer(explainer, int(spatial_dim))
    with warnings.catch_warnings():
        if whole_slices:  # per-window norm statistics are per-slice ones: as the 2D model runs
            warnings.filterwarnings("ignore", message=".*each window's own statistics")
        return sliding_window_explain(
            proxy, x, targets=targets, region=region, roi_size=roi, overlap=overlap,  # type: ignore[arg-type]
            sw_batch_size=sw_batch_size, mode=mode, sigma_scale=sigma_scale,
            padding_mode=padding_mode, cval=cval, methods=methods, maps=maps, task=task,
        )  # fmt: skip


_OPTION_KEYS = ("spatial_dim", "roi_size", "overlap", "sw_batch_size", "mode", "sigma_scale",
                "padding_mode", "cval")  # fmt: skip


def is_slice_inferer(inferer: dict[str, Any] | None) -> bool:
    """True for a bundle's inferer entry naming MONAI's ``SliceInferer``: the resolved
    config entry (``{"_target_": "SliceInferer", ...}``) or hirescam3d's record of it
    (``ModelInfo.inferer``, ``{"kind": "slice", ...}``)."""
    if not inferer:
        return False
    if inferer.get("kind") == "slice":
        return True
    return str(inferer.get("_target_", "")).rsplit(".", 1)[-1] == "SliceInferer"


def slice_options(inferer: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`slice_inferer_explain` from a bundle's inferer
    entry (see :func:`is_slice_inferer`), checked by MONAI's own ``SliceInferer``
    (InputError, one line, for an entry it refuses or one that is not a SliceInferer)."""
    from monai.inferers import SliceInferer

    if not is_slice_inferer(inferer):
        raise InputError(f"the inferer {inferer!r} is not a SliceInferer")
    given = {k: inferer[k] for k in _OPTION_KEYS if k in inferer}
    try:
        inf = SliceInferer(**given)
    except Exception as err:  # MONAI's own argument checks
        raise InputError(f"inferer SliceInferer {given}: {err}") from err
    roi = inf.orig_roi_size
    if len(roi) != 2:
        raise InputError(f"inferer SliceInferer: roi_size {tuple(roi)} must have 2 numbers "
                         "(the window in the slice plane)")  # fmt: skip
    if int(inf.spatial_dim) not in (0, 1, 2):
        raise InputError(f"inferer SliceInferer: spatial_dim {inf.spatial_dim} is not 0, 1 or 2")
    return {
        "spatial_dim": int(inf.spatial_dim), "roi_size": [int(n) for n in roi],
        "overlap": inf.overlap, "sw_batch_size": int(inf.sw_batch_size),
        "mode": str(getattr(inf.mode, "value", inf.mode)), "sigma_scale": inf.sigma_scale,
        "padding_mode": str(getattr(inf.padding_mode, "value", inf.padding_mode)),
        "cval": float(inf.cval),
    }  # fmt: skip


def check_slice_inferer(inferer: dict[str, Any]) -> None:
    """Accept a bundle's SliceInferer entry, or raise :class:`ModelError` (one line) for
    one this module cannot follow; the hook :mod:`hirescam3d.models.bundle_monai` calls."""
    from hirescam3d.errors import ModelError

    try:
        slice_options(inferer)
    except InputError as err:
        raise ModelError(str(err)) from err


def slice_predict(network: nn.Module, x: torch.Tensor, inferer: dict[str, Any],
                  output: Any = None) -> torch.Tensor:  # fmt: skip
    """MONAI's own ``SliceInferer`` prediction of ``network`` (2D) on ``x`` ``(B, C, D, H,
    W)`` with a bundle's inferer entry; ``output`` picks the logits from the network's
    output (e.g. ``Explainer._output``). No gradients; the network's state is restored."""
    from monai.inferers import SliceInferer

    from hirescam3d.core.capture import model_state_restored

    opts = slice_options(inferer)
    spatial_dim, roi = opts.pop("spatial_dim"), opts.pop("roi_size")
    pick = output if output is not None else (lambda out: out)
    with torch.no_grad(), model_state_restored(network):
        network.eval()
        return SliceInferer(spatial_dim=spatial_dim, roi_size=roi, **opts)(
            x, lambda w: pick(network(w)))  # fmt: skip
