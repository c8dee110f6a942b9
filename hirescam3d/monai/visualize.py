"""Drop-in replacements for ``monai.visualize`` CAM classes, backed by :class:`Explainer`.

Switch with an import change::

    # from monai.visualize import GradCAM
    from hirescam3d.monai.visualize import GradCAM, HiResCAM

Signatures follow ``monai.visualize`` (``nn_module``, ``target_layers``,
``upsampler``, ``postprocessing``; ``__call__(x, class_idx, layer_idx,
retain_graph)`` returning ``(B, 1, *spatial)``). Two differences on purpose:
MONAI's ``default_normalizer`` maps the maximum to 0 (an inverted heatmap), the default
here maps the minimum to 0 and the maximum to 1; and the default upsampling places each
cell on the input voxel its receptive field is centred on (the layer's traced geometry,
see :mod:`hirescam3d.core.postprocess`) instead of stretching the grid over the input, which
is only right where the grid tiles the input exactly. A custom ``upsampler`` is used as
MONAI uses it.

As in MONAI, extra keyword arguments of a call go to the model's forward
(``cam(x, class_idx=1, adjoint_info=42)`` runs ``model(x, adjoint_info=42)``), and
``cam.nn_module.class_idx`` holds the classes last explained (a ``(B,)`` tensor).
``cam.nn_module`` is a thin view of the model (:class:`ModelView`), not a copy and not a
hooked wrapper: the user's ``nn.Module`` is never modified. Unlike MONAI's classes, ours
take gradients with respect to the layer's output, so they also work when the
parameters before the layer have ``requires_grad=False`` (MONAI's raise ``IndexError``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hirescam3d.core import postprocess
from hirescam3d.core.explainer import Explainer


def default_upsampler(
    spatial_size: Sequence[int], align_corners: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``f(maps)`` stretching ``(B, 1, *S)`` evenly over ``spatial_size``.

    Used as is only when called directly: the CAM classes recognise this default and
    place maps by the explained layer's geometry instead.
    """
    if align_corners:
        raise ValueError("hirescam3d upsamples with align_corners=False only")

    def stretch(maps: torch.Tensor) -> torch.Tensor:
        grid = maps.shape[2:]
        return postprocess.place(maps, postprocess.stretch_geometry(grid, spatial_size))

    return stretch


def default_normalizer(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] with the maximum at 1 (NOT inverted, unlike MONAI)."""
    return postprocess.normalize(maps, spatial_dims=maps.ndim - 2)


class ModelView:
    """``cam.nn_module``: the explained model, plus what MONAI's ``ModelWithHooks`` records.

    ``model`` is the user's ``nn.Module`` itself (unchanged, no hooks left on it); any
    other attribute is looked up on it (``cam.nn_module.layer4``, ``.eval()``), and
    calling the view calls the model. After each explanation ``class_idx`` holds the
    explained class of every item, a ``(B,)`` long tensor (the argmax when none was
    given), and ``score`` the logits of those classes ``(B,)``; both are None before.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.class_idx: torch.Tensor | None = None
        self.score: torch.Tensor | None = None

    def __getattr__(self, name: str) -> object:
        if name == "model":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.model(*args, **kwargs)

    def get_layer(self, layer_id: str | Callable[[nn.Module], nn.Module]) -> nn.Module:
        """The submodule named ``layer_id`` (or ``layer_id(model)`` for a callable)."""
        if callable(layer_id):
            return layer_id(self.model)
        return dict(self.model.named_modules())[layer_id]

    def get_wrapped_net(self) -> nn.Module:
        """The user's model."""
        return self.model


class _CAMBase:
    method = "hirescam"
    apply_relu = True  # as monai.visualize: Grad-CAM maps are ReLU'd, CAM maps are not

    def __init__(
        self,
        nn_module: nn.Module,
        target_layers: str | Sequence[str],
        upsampler: Callable = default_upsampler,
        postprocessing: Callable = default_normalizer,
        register_backward: bool = True,
    ) -> None:
        """``register_backward`` is accepted for MONAI compatibility; no hooks outlive a call."""
        if isinstance(nn_module, ModelView):
            nn_module = nn_module.model
        self.nn_module = ModelView(nn_module)
        self.target_layers = [target_layers] if isinstance(target_layers, str) else target_layers
        self.upsampler = upsampler
        self.postprocessing = postprocessing
        self._explainers = [self._explainer(layer) for layer in self.target_layers]

    def _explainer(self, layer: str) -> Explainer:
        return Explainer(self.nn_module.model, layer, method=self.method)

    def compute_map(
        self,
        x: torch.Tensor,
        class_idx: int | Sequence[int] | torch.Tensor | None = None,
        layer_idx: int = -1,
        retain_graph: bool = False,
        **kwargs: object,
    ) -> torch.Tensor:
        """Raw map ``(B, 1, *feature_spatial)`` before upsampling (ReLU'd except for CAM).

        ``class_idx``: one class for the whole batch, one per item, or None (argmax).
        ``kwargs`` go to the model's forward. Sets ``nn_module.class_idx`` and ``.score``.
        """
        if isinstance(class_idx, torch.Tensor) and class_idx.ndim == 0:
            class_idx = int(class_idx)
        if class_idx is not None and not isinstance(class_idx, int):
            class_idx = [[int(c)] for c in class_idx]
        explainer = self._explainers[layer_idx]
        result = explainer.explain(x, targets=class_idx, maps=False, forward_kwargs=kwargs)[
            explainer.method
        ]
        self.nn_module.class_idx = result.targets[:, 0]
        self.nn_module.score = result.scores.gather(1, result.targets)[:, 0]
        return postprocess.relu(result.raw) if self.apply_relu else result.raw

    def feature_map_size(
        self,
        input_size: Sequence[int],
        device: str | torch.device = "cpu",
        layer_idx: int = -1,
        **kwargs: object,
    ) -> torch.Size:
        """Shape of the raw map for an input of ``input_size`` (``kwargs`` go to the model)."""
        x = torch.zeros(*input_size, device=device)
        return self.compute_map(x, layer_idx=layer_idx, **kwargs).shape

    def __call__(
        self,
        x: torch.Tensor,
        class_idx: int | Sequence[int] | torch.Tensor | None = None,
        layer_idx: int = -1,
        retain_graph: bool = False,
        **kwargs: object,
    ) -> torch.Tensor:
        """Upsampled, post-processed map ``(B, 1, *input_spatial)``.

        ``kwargs`` go to the model's forward, as in MONAI. ``retain_graph`` is accepted for
        signature compatibility; no graph outlives the call.
        """
        acti_map = self.compute_map(x, class_idx=class_idx, layer_idx=layer_idx, **kwargs)
        if self.upsampler is default_upsampler:
            geometry = self._explainers[layer_idx].geometry(x, forward_kwargs=kwargs)
            placed = postprocess.place(acti_map, geometry, x.shape[2:])
        else:
            placed = self.upsampler(x.shape[2:])(acti_map)
        return self.postprocessing(placed)


class HiResCAM(_CAMBase):
    """HiResCAM (element-wise gradient x activation, summed over features)."""

    method = "hirescam"


class GradCAM(_CAMBase):
    """Grad-CAM (spatially averaged gradients as feature weights)."""

    method = "gradcam"


class GradCAMpp(_CAMBase):
    """Grad-CAM++ (:func:`hirescam3d.core.methods.gradcampp`), in place of MONAI's ``GradCAMpp``.

    The raw map leaves out the paper's positive per-map factor ``exp(score)`` that
    MONAI's keeps (it overflows for logits above ~88 and cancels in any per-map
    normalisation), and has no ``1e-7`` in the alpha denominator: multiplied by
    ``exp(score)`` it is MONAI's map for one item. (For a batch, MONAI multiplies by the
    ``(B,)`` scores broadcast along the last spatial axis, not per item.)
    """

    method = "gradcampp"


class CAM(_CAMBase):
    """CAM for global-average-pooling + linear networks; ``fc_layers`` names the linear layer
    (or, as in MONAI, is a callable returning it from the model)."""

    method = "cam"
    apply_relu = False

    def __init__(
        self,
        nn_module: nn.Module,
        target_layers: str | Sequence[str],
        fc_layers: str | Callable[[nn.Module], nn.Module] = "fc",
        upsampler: Callable = default_upsampler,
        postprocessing: Callable = default_normalizer,
    ) -> None:
        self.fc_layers = fc_layers
        super().__init__(nn_module, target_layers, upsampler, postprocessing)

    def _explainer(self, layer: str) -> Explainer:
        fc = self.fc_layers
        if callable(fc) and not isinstance(fc, nn.Module):  # MONAI's ``lambda m: m.fc`` form
            fc = fc(self.nn_module.model)
        return Explainer(self.nn_module.model, layer, method=self.method, fc_layer=fc)
