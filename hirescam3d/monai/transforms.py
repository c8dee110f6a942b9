"""MONAI dictionary transforms that add explanation maps to a data dict.

Place them after preprocessing and before ``Invertd``::

    Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd(...), ...,
             HiResCAMd("image", model=net, target_layer="to_volume", findings=["nodule"]),
             Invertd(["nodule_hirescam"], transform=pre, orig_keys="image",
                     nearest_interp=False),
             SaveImaged(["nodule_hirescam"], ...)])

Each map is a ``(1, *spatial)`` MetaTensor that carries a copy of the image's metadata
and applied operations, so ``Invertd`` maps it back to the scan's grid. Maps are placed
on the image by the explained layer's traced geometry: ``values="unit"`` (default) gives
[0, 1] display maps, ``values="density"`` each cell's raw value spread evenly over its
tile (for HiResCAM at a guaranteed layer: logit contributions per voxel, summing to the
logit minus the final bias over the image and its padding). The
transforms switch gradients on themselves, so they also work under ``torch.no_grad()``
or ``torch.inference_mode()`` (MONAI evaluators).

Segmentation networks (logits ``(C, *spatial)`` per item) explain a finding's logits
summed over a region: ``region="predicted"`` (each finding's own predicted mask, chosen by
``task``) or ``region=KEY``, the data-dict entry holding a channel-first ``(1 or K,
*spatial)`` mask or weight map on the network's output grid (e.g. a label taken through
the same preprocessing, nearest-neighbour)::

    HiResCAMd("image", model=unet, target_layer="model.2.0", findings=["tumour"],
              region="label", values="density")

``inferer=`` (a MONAI ``SimpleInferer`` or ``SlidingWindowInferer``; ``"@inferer"`` in a
bundle config) explains on the inferer's schedule: a sliding-window inferer's windows,
overlap and blending (:func:`hirescam3d.core.sliding.sliding_window_explain`), so the explained
prediction is the one the bundle makes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from hirescam3d.core import postprocess
from hirescam3d.core.explainer import Explainer
from hirescam3d.core.methods import get_method
from hirescam3d.core.sliding import sliding_window_explain
from hirescam3d.errors import HiResCAMError, InputError, LayerError


class Explaind(MapTransform):
    """Add explanation maps of ``findings`` by ``methods`` to the data dict.

    Args:
        keys: image keys; each value is a channel-first ``(C, *spatial)`` model input
            (one item, no batch axis).
        model: the network; put it on the device it should run on.
        target_layer: layer to explain; default ``info.target_layer`` or the network's
            ``default_layer`` attribute.
        findings: class names or indices to explain; None explains every named class.
        methods: registered method names; all come from one forward pass per item.
        output_key_template: key of each map, formatted with ``key``, ``finding``, ``method``.
        class_names: names of the model's classes (default ``info`` or ``model.class_names``).
        scores_key: if set (formatted with ``key``), the logits ``(C,)`` are stored there.
        info: a :class:`hirescam3d.models.bundle.ModelInfo` supplying layer and class names.
        values: ``"unit"`` ([0, 1] display maps) or ``"density"`` (raw units per voxel).
        region: segmentation networks: which voxels' logits are summed. ``"predicted"``
            (each finding's own predicted mask) or the key of a data-dict entry holding a
            mask or weight map ``(1 or K, *spatial)`` on the output grid (K: one per
            finding; a channel-less ``(*spatial)`` array also works), or holding the
            string ``"predicted"``. Required for a segmentation network.
        region_key: the older spelling of ``region``; give one of the two.
        task: how ``"predicted"`` masks are made: ``"softmax"`` (argmax) or ``"sigmoid"``
            (logit >= 0); default ``info.activation`` for a segmentation ``info``.
        inferer: how the bundle predicts: None or MONAI's ``SimpleInferer`` (the whole
            item at once) or ``SlidingWindowInferer`` (explained window by window on its
            schedule, with its ``roi_size``, ``overlap``, ``mode``, ``sigma_scale``,
            ``padding_mode``, ``cval`` and ``sw_batch_size``; segmentation networks only).
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "image",
        model: nn.Module | None = None,
        target_layer: str | None = None,
        findings: Sequence[str | int] | None = None,
        methods: Sequence[str] | None = None,
        output_key_template: str = "{finding}_{method}",
        class_names: Sequence[str] | None = None,
        scores_key: str | None = None,
        info: Any = None,
        allow_missing_keys: bool = False,
        values: str = "unit",
        region_key: str | None = None,
        task: str | None = None,
        region: str | None = None,
        inferer: Any = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        name = type(self).__name__
        if region is not None and region_key is not None:
            raise HiResCAMError(f"{name}: give region= or region_key=, not both")
        for arg, value in (("region", region), ("region_key", region_key)):
            if value is not None and not isinstance(value, str):
                raise HiResCAMError(
                    f"{name}: {arg}= takes 'predicted' or the key of a mask in the data, "
                    f"not a {type(value).__name__}"
                )
        self._sliding = sliding_options(inferer, name)
        if values not in ("unit", "density"):
            raise HiResCAMError(f"values must be 'unit' or 'density', not {values!r}")
        if not isinstance(model, nn.Module):
            raise HiResCAMError(f"{type(self).__name__} needs model=<torch.nn.Module>")
        if len(self.keys) > 1 and "{key}" not in output_key_template:
            raise HiResCAMError(
                "with several keys, output_key_template must contain '{key}' so maps of "
                "different images get different keys"
            )
        layer = target_layer or getattr(info, "target_layer", None)
        layer = layer or getattr(model, "default_layer", None)
        if layer is None:
            raise LayerError(
                f"{type(self).__name__}: give target_layer= (the model has no default layer)"
            )
        if class_names is None and info is not None:
            class_names = info.class_names
        self.methods = [get_method(m).name for m in (methods or ("hirescam",))]
        post = postprocess.density if values == "density" else postprocess.unit_maps
        if task is None and getattr(info, "segmentation", False):
            task = info.activation
        self.region_arg = "region_key" if region_key is not None else "region"
        self.region_key = region_key if region_key is not None else region
        self.explainer = Explainer(
            model, layer, method=self.methods[0], class_names=class_names, postprocessing=post,
            task=task,
        )  # fmt: skip
        self.findings = None if findings is None else list(findings)
        if self.findings is None and self.explainer.class_names is None:
            raise HiResCAMError(
                f"{type(self).__name__}: the model has no class names; pass findings= "
                "(class indices) or class_names="
            )
        self.output_key_template = output_key_template
        self.scores_key = scores_key

    def _targets(self) -> list[str | int]:
        return list(self.findings if self.findings is not None else self.explainer.class_names)

    def _name(self, target: str | int) -> str:
        names = self.explainer.class_names
        return names[target] if isinstance(target, int) and names else str(target)

    def output_keys(self, key: str = "image") -> list[str]:
        """The keys this transform writes for image ``key``, findings-major order."""
        return [
            self.output_key_template.format(key=key, finding=self._name(t), method=m)
            for t in self._targets()
            for m in self.methods
        ]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            region = self._region(d, plain.ndim - 1)
            # Inference tensors cannot enter autograd: copy the input outside inference mode.
            with torch.inference_mode(False), torch.enable_grad():
                x = plain.detach().clone().float().unsqueeze(0)
                results = self._explain(x, region)
            names = [self._name(t) for t in self._targets()]
            for method in self.methods:
                maps = results[method].maps[0].detach().to(plain.device)
                for k, finding in enumerate(names):
                    out_key = self.output_key_template.format(
                        key=key, finding=finding, method=method
                    )
                    d[out_key] = self._like(image, maps[k : k + 1])
            if self.scores_key is not None:
                scores = results[self.methods[0]].scores[0].detach().cpu()
                d[self.scores_key.format(key=key)] = scores
        return d

    def _explain(self, x: torch.Tensor, region: torch.Tensor | str | None) -> dict[str, Any]:
        """One item's results per method: whole, or on the inferer's sliding windows."""
        name = type(self).__name__
        try:
            if self._sliding is None:
                return self.explainer.explain(x, self._targets(), self.methods, region=region)
            if region is None:
                raise InputError(f"{name}: {_NEEDS_REGION}")
            return sliding_window_explain(
                self.explainer, x, self._targets(), region, methods=self.methods,
                **self._sliding,
            )  # fmt: skip
        except InputError as err:
            if region is None and "segmentation output" in str(err):
                raise InputError(
                    f"{name}: the model returns a segmentation output; {_NEEDS_REGION}"
                ) from None
            raise

    def _region(self, d: Mapping[Hashable, Any], dims: int) -> torch.Tensor | str | None:
        """The region ``region=`` / ``region_key=`` names, as the explainer takes it
        (``dims`` spatial axes): ``(1, 1 or K, *spatial)``, ``(*spatial)`` as given, or
        ``"predicted"``; None without one."""
        if self.region_key is None:
            return None
        if self.region_key not in d:
            if self.region_key == "predicted":
                return "predicted"
            raise HiResCAMError(
                f"{type(self).__name__}: {self.region_arg}={self.region_key!r} is not a key of "
                f"the data (keys: {', '.join(map(str, d))}); give {self.region_arg}="
                "'predicted' or the key of a mask"
            )
        value = d[self.region_key]
        if isinstance(value, str):
            return value
        region = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
        with torch.inference_mode(False):
            region = region.detach().clone()
        return region[None] if region.ndim == dims + 1 else region

    @staticmethod
    def _like(image: Any, values: torch.Tensor) -> torch.Tensor:
        """``values`` as a MetaTensor with a copy of ``image``'s meta and applied operations."""
        if not isinstance(image, MetaTensor):
            return values
        return MetaTensor(
            values,
            meta=deepcopy(image.meta),
            applied_operations=deepcopy(image.applied_operations),
        )


_NEEDS_REGION = (
    "say which voxels' logits to explain with region='predicted' (each finding's own "
    "predicted mask) or region='<key>' (the key of a mask in the data)"
)
_WINDOW_OPTIONS = ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale",
                   "padding_mode", "cval")  # fmt: skip


def sliding_options(inferer: Any, owner: str = "Explaind") -> dict[str, Any] | None:
    """The :func:`~hirescam3d.core.sliding.sliding_window_explain` options of a MONAI inferer:
    None for no inferer or a ``SimpleInferer`` (the whole item at once), the window
    schedule of a ``SlidingWindowInferer``; HiResCAMError for any other inferer."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    if inferer is None or type(inferer) is SimpleInferer:
        return None
    if type(inferer) is SlidingWindowInferer:  # not SliceInferer: 2D windows of 3D data
        options = {k: getattr(inferer, k) for k in _WINDOW_OPTIONS}
        options["mode"] = str(getattr(options["mode"], "value", options["mode"]))
        options["padding_mode"] = str(
            getattr(options["padding_mode"], "value", options["padding_mode"])
        )
        return options
    raise HiResCAMError(
        f"{owner}: inferer= takes MONAI's SimpleInferer or SlidingWindowInferer, not "
        f"{type(inferer).__name__}"
    )


class HiResCAMd(Explaind):
    """HiResCAM maps (``sum_f G_f * A_f``, element-wise); see :class:`Explaind`."""

    def __init__(self, keys: str | Sequence[str] = "image", model: nn.Module | None = None,
                 target_layer: str | None = None, findings: Sequence[str | int] | None = None,
                 output_key_template: str = "{finding}_{method}", **kwargs: Any) -> None:
        super().__init__(keys, model, target_layer, findings, ("hirescam",),
                         output_key_template, **kwargs)


class GradCAMd(Explaind):
    """Grad-CAM maps (spatially averaged gradients as feature weights); see :class:`Explaind`."""

    def __init__(self, keys: str | Sequence[str] = "image", model: nn.Module | None = None,
                 target_layer: str | None = None, findings: Sequence[str | int] | None = None,
                 output_key_template: str = "{finding}_{method}", **kwargs: Any) -> None:
        super().__init__(keys, model, target_layer, findings, ("gradcam",),
                         output_key_template, **kwargs)


class CAMd(Explaind):
    """CAM maps (global-average-pooling + linear networks); see :class:`Explaind`."""

    def __init__(self, keys: str | Sequence[str] = "image", model: nn.Module | None = None,
                 target_layer: str | None = None, findings: Sequence[str | int] | None = None,
                 output_key_template: str = "{finding}_{method}", **kwargs: Any) -> None:
        super().__init__(keys, model, target_layer, findings, ("cam",),
                         output_key_template, **kwargs)
