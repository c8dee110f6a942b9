"""A MONAI bundle's own prediction on the scan's grid: its postprocessing steps
(:func:`hirescam3d.models.bundle_monai.scan_postprocessing`: ``Activationsd``, ``Invertd``,
``AsDiscreted``), in the bundle's order, run by MONAI on the model-grid logits.

``Invertd`` undoes the recorded preprocessing (orientation, resampling, padding) of the
preprocessed image, interpolating as the bundle says (``nearest_interp``); the masks are
then ``argmax`` (or ``>= threshold``) of what it gives back, exactly as the bundle's own
pipeline makes them. To bound memory, channels are inverted one at a time when the
activation comes before ``Invertd`` (each voxel's resampling is per channel), and the
argmax is kept as a running maximum (first index wins ties, as ``torch.argmax``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hirescam3d.errors import HiResCAMError


def _activate(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """MONAI ``Activations``: softmax over channels or sigmoid; ``x`` ``(C, *spatial)``."""
    if kind == "softmax":
        return torch.softmax(x, dim=0)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    return x


def _invert(values: torch.Tensor, grid: Any, nearest_interp: bool) -> torch.Tensor:
    """``values`` ``(C, *model grid)`` on the scan's grid ``(C, I, J, K)`` with MONAI's
    ``Invertd`` over the recorded preprocessing of ``grid.image``."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    stack = MetaTensor(values, meta=dict(grid.image.meta))
    inverter = Invertd("pred", transform=grid.pre, orig_keys="image",
                       nearest_interp=nearest_interp)  # fmt: skip
    back = inverter({"pred": stack, "image": grid.image})["pred"]
    back = back.as_tensor() if isinstance(back, MetaTensor) else torch.as_tensor(back)
    if tuple(back.shape[1:]) != tuple(grid.scan_shape):
        raise HiResCAMError(
            f"internal error: the inverted prediction (shape {tuple(back.shape[1:])}) is not "
            f"on the scan's grid (shape {tuple(grid.scan_shape)})"
        )
    return back.detach().cpu()


class ScanPrediction:
    """The bundle's discrete prediction on the scan's grid, computed on first use.

    ``logits``: ``(C, *model grid)`` the model's output on its input grid; ``grid``: the
    :class:`~hirescam3d.core.placement.ModelGrid` (its preprocessing and preprocessed image);
    ``steps``: :func:`~hirescam3d.models.bundle_monai.scan_postprocessing`; ``task``:
    ``"softmax"`` or ``"sigmoid"`` (the masks when the bundle has no ``AsDiscreted``:
    argmax, or probability >= 0.5).
    """

    def __init__(self, logits: torch.Tensor, grid: Any, steps: list[dict[str, Any]],
                 task: str) -> None:  # fmt: skip
        self.logits = logits
        self.grid = grid
        self.task = task
        names = [s["step"] for s in steps]
        invert = steps[names.index("invert")]
        self.nearest = bool(invert["nearest_interp"])
        acts = [s for s in steps if s["step"] == "activation"]
        self.activation = acts[0]["kind"] if acts else None
        self.activation_first = bool(acts) and names.index("activation") < names.index("invert")
        discrete = [s for s in steps if s["step"] == "discrete"]
        if discrete:
            self.argmax = discrete[0]["argmax"]
            self.threshold = discrete[0]["threshold"]
        else:
            self.argmax = task == "softmax"
            self.threshold = None if self.argmax else 0.5
        self._labels: np.ndarray | None = None

    def _channel(self, k: int, activated: torch.Tensor | None = None) -> torch.Tensor:
        """Channel ``k`` after the bundle's activation and ``Invertd``: ``(I, J, K)``;
        ``activated``: the activated model-grid logits, if already computed."""
        if self.activation_first:
            if activated is None:
                activated = _activate(self.logits.float(), self.activation)
            return _invert(activated[k : k + 1], self.grid, self.nearest)[0]
        back = _invert(self.logits.float(), self.grid, self.nearest)
        return _activate(back, self.activation)[k]

    def _all_labels(self) -> np.ndarray:
        """The argmax labels ``(I, J, K)`` (uint8, or uint16 beyond 255 classes)."""
        if self._labels is None:
            n = int(self.logits.shape[0])
            dtype = torch.uint8 if n <= 255 else torch.int16
            if not self.activation_first:
                back = _activate(_invert(self.logits.float(), self.grid, self.nearest),
                                 self.activation)  # fmt: skip
                labels = back.argmax(0).to(dtype)
            else:
                best = labels = None
                activated = _activate(self.logits.float(), self.activation)
                for k in range(n):
                    values = self._channel(k, activated)
                    if best is None:
                        best, labels = values, torch.zeros(values.shape, dtype=dtype)
                    else:
                        better = values > best  # strict: the first maximum wins, as argmax
                        labels[better] = k
                        torch.maximum(best, values, out=best)
                        del better
                del best, activated
            self._labels = np.asarray(labels.numpy())
        return self._labels

    def mask(self, k: int) -> np.ndarray:
        """Class ``k``'s mask on the scan's grid: uint8 ``(I, J, K)``, 1 inside."""
        if self.argmax:
            return (self._all_labels() == k).astype(np.uint8)
        return (self._channel(k) >= float(self.threshold)).numpy().astype(np.uint8)
