"""Trace one forward pass: where each layer's cells lie in the input, and what follows it.

:func:`trace` runs the network once under a :class:`torch.overrides.TorchFunctionMode`
that sees every torch operation the forward pass executes, including functional calls
inside ``forward`` that no module hook would show. From those operations it derives:

- **geometry**: for every tensor, per axis, where its cells lie in the input. A cell
  index ``i`` along an axis maps to the input coordinate ``first + i * step`` (in input
  voxels; voxel ``j`` has its centre at ``j``). Convolutions, pooling, padding, slicing,
  interpolation and reshapes that split or merge axes (AxialNet's slice triplets) are
  followed; element-wise operations keep the geometry of their input;
- **linearity**: for every module, the first operation on the path from its output to
  the scores that is not affine in that output (a ReLU, a max-pool, a product of two
  terms that both depend on it, an operation hirescam3d does not recognise);
- **cuts**: whether the scores depend on the input only through the module's output
  (an inner convolution of a residual block is bypassed by the skip connection).

The network runs in eval mode without gradients; its modes, flags and hooks are
restored afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hirescam3d.core.capture import model_state_restored
from hirescam3d.errors import LayerError


# -- geometry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisGeometry:
    """Cell ``i`` of an axis is centred on input voxel ``first + i * step`` of input axis
    ``axis``; ``extent`` is the receptive field's length along it (input voxels)."""

    axis: int
    first: float
    step: float
    extent: float

    def centres(self, n: int) -> list[float]:
        return [self.first + i * self.step for i in range(n)]


@dataclass(frozen=True)
class LayerGeometry:
    """Where a layer's explanation grid lies in the input, per spatial axis.

    ``grid_shape``: the layer's spatial shape; ``input_shape``: the input's spatial shape;
    ``axes[d]``: the geometry of grid axis ``d`` (its ``axis`` is input axis ``d``).
    Cell ``i`` along axis ``d`` covers the *tile* ``first + (i - 1/2) * step ..
    first + (i + 1/2) * step`` of the input: the tiles of neighbouring cells meet half
    way between their centres.
    """

    grid_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    axes: tuple[AxisGeometry, ...]
    source: str = "trace"  # or "probe": measured from input gradients (approximate)

    @property
    def firsts(self) -> tuple[float, ...]:
        return tuple(a.first for a in self.axes)

    @property
    def steps(self) -> tuple[float, ...]:
        return tuple(a.step for a in self.axes)

    def centres(self) -> list[list[float]]:
        """Per axis, the input coordinate of every cell centre (input voxels)."""
        return [a.centres(n) for a, n in zip(self.axes, self.grid_shape, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid_shape": list(self.grid_shape),
            "input_shape": list(self.input_shape),
            "first_centre": [a.first for a in self.axes],
            "step": [a.step for a in self.axes],
            "receptive_field": [a.extent for a in self.axes],
            "source": self.source,
        }


# A tensor axis is a product of factors (size, geometry or None), outermost first:
# AxialNet's (B * T) batch axis is [(B, None), (T, slice-triplet geometry)].
Factor = tuple[int, AxisGeometry | None]
Dims = tuple[tuple[Factor, ...], ...]


def _axis_geo(dim: tuple[Factor, ...]) -> AxisGeometry | None:
    """The geometry of a tensor axis made of one spatial factor (size-1 factors aside)."""
    real = [f for f in dim if f[0] != 1]
    if len(real) == 1 and real[0][1] is not None:
        return real[0][1]
    if not real:
        geos = [f[1] for f in dim if f[1] is not None]
        return geos[0] if len(geos) == 1 else None
    return None


def _window(geo: AxisGeometry | None, k: float, s: float, p: float, d: float = 1.0):
    """Geometry after a sliding window: kernel ``k``, stride ``s``, left padding ``p``,
    dilation ``d``. Output ``j`` reads inputs ``j*s - p .. j*s - p + d*(k-1)``."""
    if geo is None:
        return None
    return AxisGeometry(
        geo.axis,
        geo.first + geo.step * (d * (k - 1) / 2 - p),
        geo.step * s,
        geo.extent + geo.step * d * (k - 1),
    )


def _resize(geo: AxisGeometry | None, n_in: int, n_out: int, align_corners: bool | None):
    """Geometry after resampling an axis from ``n_in`` to ``n_out`` cells."""
    if geo is None:
        return None
    if align_corners and n_out > 1:
        scale = (n_in - 1) / (n_out - 1)
        return AxisGeometry(geo.axis, geo.first, geo.step * scale, geo.extent)
    scale = n_in / n_out
    return AxisGeometry(
        geo.axis, geo.first + geo.step * (scale - 1) / 2, geo.step * scale, geo.extent
    )


def _split(factor: Factor, outer: int) -> tuple[Factor, Factor]:
    """Split a factor of size ``n`` into ``(outer, n / outer)``; the outer part keeps a
    coarser geometry (groups of ``inner`` cells), the inner part has none."""
    n, geo = factor
    inner = n // outer
    if geo is None:
        return (outer, None), (inner, None)
    grouped = AxisGeometry(
        geo.axis,
        geo.first + geo.step * (inner - 1) / 2,
        geo.step * inner,
        geo.extent + geo.step * (inner - 1),
    )
    return (outer, grouped), (inner, None)


def _regroup(dims: Dims, shape: Sequence[int]) -> Dims | None:
    """The factors of ``dims`` re-cut into axes of ``shape`` (reshape/view), or None."""
    queue = [f for dim in dims for f in dim]
    out: list[tuple[Factor, ...]] = []
    for size in shape:
        taken: list[Factor] = []
        need = size
        while need > 1:
            if not queue:
                return None
            n = queue[0][0]
            if n == 1 or need % n == 0:
                taken.append(queue.pop(0))
                need //= n
            elif n % need == 0:  # row-major: this axis takes the outer, slower part
                outer, inner = _split(queue[0], need)
                taken.append(outer)
                queue[0] = inner
                need = 1
            else:
                return None
        out.append(tuple(taken) or ((1, None),))
    if any(f[0] != 1 for f in queue):
        return None
    return tuple(out)


def _plain_dims(shape: Sequence[int]) -> Dims:
    return tuple(((int(n), None),) for n in shape)


# -- which operations are affine in their tensor arguments ---------------------------------
_SAME = "same"  # affine in every tensor argument together (sums, reshapes, pooling by mean)
_PRODUCT = "product"  # affine in each argument separately: nonlinear if two depend on L
_DIVIDE = "divide"  # affine in the numerator only
_EVAL = "eval"  # affine unless running in training mode (dropout, batch norm)

_AFFINE: dict[str, str] = {}
for _name in (
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear "
    "add sub add_ sub_ __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ neg __neg__ "
    "mean sum nansum avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
    "adaptive_avg_pool2d adaptive_avg_pool3d reshape view flatten unflatten permute "
    "transpose swapaxes movedim squeeze unsqueeze contiguous clone __getitem__ "
    "__setitem__ cat concat concatenate stack split chunk unbind narrow select expand "
    "expand_as repeat tile pad flip roll to float double half type type_as view_as reshape_as "
    "interpolate upsample upsample_nearest upsample_bilinear identity cpu cuda __get__"
).split():
    _AFFINE[_name] = _SAME
for _name in (
    "mul mul_ __mul__ __rmul__ __imul__ matmul __matmul__ __rmatmul__ mm bmm einsum"
).split():
    _AFFINE[_name] = _PRODUCT
for _name in "div div_ __truediv__ __itruediv__ true_divide".split():
    _AFFINE[_name] = _DIVIDE
for _name in (
    "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout batch_norm"
).split():
    _AFFINE[_name] = _EVAL


def _training_flag(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """The ``training`` argument of F.dropout / F.batch_norm (default: training)."""
    if "training" in kwargs:
        return bool(kwargs["training"])
    position = 5 if name == "batch_norm" else 2
    return bool(args[position]) if len(args) > position else name != "batch_norm"


def _name_of(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.lstrip("_") if name in ("_max_pool1d", "_max_pool2d", "_max_pool3d") else name


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _tuple(value: Any, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value) if len(value) == n else tuple(value) * n if len(value) == 1 else None
    return (value,) * n


# -- the tracer -----------------------------------------------------------------------------
@dataclass
class ModuleRecord:
    """What the trace saw of one module's output.

    ``shape``: the output's shape (None: not a tensor); ``geometry``: per-axis geometry
    of its spatial axes (None where it could not be followed); ``batch_ok``: the output
    is ``(B, F, *S)`` with the input's batch B on axis 0 alone; ``first_nonlinear`` and
    ``nonlinear_module``: the first non-affine operation on the path to the scores;
    ``cut``: the scores depend on the input only through this output; ``reaches``: the
    scores depend on it at all.
    """

    name: str
    type_name: str
    index: int
    shape: tuple[int, ...] | None = None
    geometry: tuple[AxisGeometry | None, ...] | None = None
    batch_ok: bool = False
    first_nonlinear: str | None = None
    nonlinear_module: str | None = None
    cut: bool = False
    reaches: bool = False
    serial: int | None = None  # the output tensor's identity within the trace
    version: int = 0  # its in-place version counter then: an in-place op makes a new value


@dataclass
class _Op:
    name: str
    module: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    in_masks: tuple[int, ...]  # taint of each input when the op ran
    out_mask: int  # taint of its outputs when it ran
    nonlinear: int  # bit mask of the layers this op is not affine in


@dataclass
class TraceResult:
    """The records of every module (in the order their outputs appeared) and the input."""

    modules: dict[str, ModuleRecord]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None = None

    def layer_geometry(self, layer: str) -> LayerGeometry:
        """The :class:`LayerGeometry` of ``layer``; LayerError if it cannot be placed."""
        rec = self.modules.get(layer)
        if rec is None or rec.shape is None:
            raise LayerError(f"layer {layer!r} produced no tensor output during the trace")
        spatial = rec.shape[2:]
        geos = rec.geometry or ()
        if len(spatial) != len(self.input_shape) or len(geos) != len(spatial):
            raise LayerError(
                f"layer {layer!r} outputs shape {rec.shape}; its spatial axes do not "
                f"correspond one-to-one to the input's {len(self.input_shape)} spatial axes"
            )
        for d, geo in enumerate(geos):
            if geo is None or geo.axis != d:
                raise LayerError(
                    f"cannot place layer {layer!r}: the trace could not follow its spatial "
                    f"axis {d} back to input axis {d}"
                )
        return LayerGeometry(tuple(spatial), tuple(self.input_shape), tuple(geos))


class _Tracer(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[int, int] = {}  # id(tensor) -> serial
        self.refs: dict[int, weakref.ref] = {}
        self.dims: dict[int, Dims] = {}  # serial -> factor dims
        self.taint: dict[int, int] = {}  # serial -> bit mask of layers (bit 0: the input)
        self.ops: list[_Op] = []
        self.module_stack: list[str] = [""]
        self.next_serial = 0

    # tensors get serial numbers that outlive Python's reuse of ids
    def serial(self, t: torch.Tensor, create: bool = True) -> int | None:
        key = id(t)
        ref = self.refs.get(key)
        if ref is not None and ref() is t:
            return self.ids[key]
        if not create:
            return None
        self.next_serial += 1
        self.ids[key] = self.next_serial
        try:
            self.refs[key] = weakref.ref(t)
        except TypeError:  # pragma: no cover - every torch.Tensor is weak-referenceable
            pass
        return self.next_serial

    def mark(self, t: torch.Tensor, dims: Dims | None, taint: int) -> int:
        s = self.serial(t)
        if dims is not None:
            self.dims[s] = dims
        self.taint[s] = self.taint.get(s, 0) | taint
        return s

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name_of(func)
        ins = list(_tensors((args, kwargs)))
        outs = list(_tensors(out))
        if not outs:
            return out
        in_serials = [self.serial(t, create=False) for t in ins]
        masks = [self.taint.get(s, 0) if s is not None else 0 for s in in_serials]
        union = 0
        for m in masks:
            union |= m
        nonlinear = self._nonlinear(name, args, kwargs, ins, masks, union)
        dims = self._dims(name, args, kwargs, ins, outs, in_serials)
        out_serials = []
        for i, t in enumerate(outs):
            d = dims[i] if dims is not None and i < len(dims) else None
            if d is None and t.ndim > 0:
                d = _plain_dims(t.shape)
            out_serials.append(self.mark(t, d, union))
        if union:
            pairs = [(s, m) for s, m in zip(in_serials, masks, strict=True) if s and m]
            self.ops.append(
                _Op(
                    name,
                    self.module_stack[-1],
                    tuple(s for s, _ in pairs),
                    tuple(out_serials),
                    tuple(m for _, m in pairs),
                    union,
                    nonlinear,
                )
            )
        return out

    @staticmethod
    def _nonlinear(name, args, kwargs, ins, masks, union) -> int:  # noqa: ANN001
        kind = _AFFINE.get(name)
        if kind == _SAME:
            return 0
        if kind == _EVAL:
            return union if _training_flag(name, args, kwargs) else 0
        if kind == _DIVIDE:
            return masks[1] if len(masks) > 1 else 0
        if kind == _PRODUCT:
            both = 0
            for i in range(len(masks)):
                for j in range(i + 1, len(masks)):
                    both |= masks[i] & masks[j]
            return both
        return union

    # -- geometry rules -------------------------------------------------------------------
    def _dims(self, name, args, kwargs, ins, outs, in_serials) -> list[Dims | None] | None:  # noqa: ANN001
        if not ins or in_serials[0] is None:
            return None
        src = self.dims.get(in_serials[0])
        x = ins[0]
        if src is None or len(src) != x.ndim:
            return None
        out = outs[0]
        rule = _RULES.get(name)
        if rule is not None:
            try:
                result = rule(src, x, out, args, kwargs)
            except Exception:  # an unforeseen call form: this axis is simply not followed
                return None
            return None if result is None else [result]
        # Element-wise and other shape-preserving operations keep the geometry of the
        # first argument of the same shape that has one.
        for t, s in zip(ins, in_serials, strict=True):
            if s is not None and tuple(t.shape) == tuple(out.shape) and s in self.dims:
                return [self.dims[s]] * len(outs) if all(
                    tuple(o.shape) == tuple(out.shape) for o in outs
                ) else [self.dims[s]]
        return None


def _conv_rule(transposed: bool):
    def rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
        weight = _arg(args, kwargs, 1, "weight", None)
        n = weight.ndim - 2
        kernel = tuple(weight.shape[2:])
        stride = _tuple(_arg(args, kwargs, 3, "stride", 1), n)
        padding = _arg(args, kwargs, 4, "padding", 0)
        if transposed:
            dilation = _tuple(_arg(args, kwargs, 7, "dilation", 1), n)
        else:
            dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), n)
        if padding == "valid":
            padding = (0,) * n
        elif padding == "same":
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        padding = _tuple(padding, n)
        dims = list(src[:-n])
        dims[1] = ((out.shape[1], None),) if len(dims) > 1 else dims[1]
        for a in range(n):
            geo = _axis_geo(src[x.ndim - n + a])
            k, s, p, d = kernel[a], stride[a], padding[a], dilation[a]
            if transposed and geo is not None:
                new = AxisGeometry(
                    geo.axis,
                    geo.first - (d * (k - 1) / 2 - p) * geo.step / s,
                    geo.step / s,
                    geo.extent + geo.step * d * (k - 1) / s,
                )
            else:
                new = _window(geo, k, s, p, d)
            dims.append(((out.shape[x.ndim - n + a], new),))
        return tuple(dims)

    return rule


def _pool_rule(has_dilation: bool):
    def rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
        n = out.ndim - 2 if out.ndim >= 3 else 1
        kernel = _tuple(_arg(args, kwargs, 1, "kernel_size", None), n)
        stride = _arg(args, kwargs, 2, "stride", None)
        stride = kernel if stride in (None, [], ()) else _tuple(stride, n)
        padding = _tuple(_arg(args, kwargs, 3, "padding", 0), n)
        dilation = _tuple(_arg(args, kwargs, 4, "dilation", 1), n) if has_dilation else (1,) * n
        dims = list(src[:-n])
        for a in range(n):
            geo = _axis_geo(src[x.ndim - n + a])
            new = _window(geo, kernel[a], stride[a], padding[a], dilation[a])
            dims.append(((out.shape[x.ndim - n + a], new),))
        return tuple(dims)

    return rule


def _resize_rule(src, x, out, align_corners):  # noqa: ANN001, ANN202
    """Every spatial axis resampled from its input length to its output length."""
    n = out.ndim - 2
    dims = list(src[:-n])
    for a in range(n):
        n_in, n_out = x.shape[x.ndim - n + a], out.shape[out.ndim - n + a]
        geo = _resize(_axis_geo(src[x.ndim - n + a]), n_in, n_out, align_corners)
        dims.append(((n_out, geo),))
    return tuple(dims)


def _adaptive_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    return _resize_rule(src, x, out, False)


def _interpolate_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    return _resize_rule(src, x, out, _arg(args, kwargs, 4, "align_corners", None))


def _pad_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    pad = list(_arg(args, kwargs, 1, "pad", ()))
    dims = list(src)
    for j in range(len(pad) // 2):
        axis = x.ndim - 1 - j
        left = pad[2 * j]
        geo = _axis_geo(src[axis])
        new = None if geo is None else AxisGeometry(
            geo.axis, geo.first - left * geo.step, geo.step, geo.extent
        )
        dims[axis] = ((out.shape[axis], new),)
    return tuple(dims)


def _reshape_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    return _regroup(src, tuple(out.shape))


def _permute_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    order = _arg(args, kwargs, 1, "dims", None)
    if isinstance(order, int):
        order = args[1:]
    order = [o % x.ndim for o in order]
    return tuple(src[o] for o in order)


def _transpose_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    a = _arg(args, kwargs, 1, "dim0", None) % x.ndim
    b = _arg(args, kwargs, 2, "dim1", None) % x.ndim
    dims = list(src)
    dims[a], dims[b] = dims[b], dims[a]
    return tuple(dims)


def _getitem_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    index = args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) or isinstance(i, (list, bool)) for i in index):
        return None
    n_real = sum(1 for i in index if i is not Ellipsis and i is not None)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (x.ndim - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (x.ndim - sum(1 for i in expanded if i is not None))
    dims: list[tuple[Factor, ...]] = []
    axis = 0
    for i in expanded:
        if i is None:
            dims.append(((1, None),))
            continue
        if isinstance(i, int):
            axis += 1
            continue
        start, _, step = i.indices(x.shape[axis])
        geo = _axis_geo(src[axis])
        size = len(range(*i.indices(x.shape[axis])))
        if start == 0 and step == 1 and size == x.shape[axis]:
            dims.append(src[axis])
        else:
            new = None if geo is None else AxisGeometry(
                geo.axis, geo.first + start * geo.step, geo.step * step, geo.extent
            )
            dims.append(((size, new),))
        axis += 1
    return tuple(dims) if len(dims) == out.ndim else None


def _cat_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    dim = _arg(args, kwargs, 1, "dim", 0) % x.ndim
    if _axis_geo(src[dim]) is not None and src[dim][0][0] != 1:
        return None  # concatenating along a spatial axis: no single grid
    dims = list(src)
    dims[dim] = ((out.shape[dim], None),)
    return tuple(dims)


def _reduce_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    dim = _arg(args, kwargs, 1, "dim", None)
    keep = bool(_arg(args, kwargs, 2, "keepdim", False))
    if dim is None:
        return tuple() if out.ndim == 0 else None
    axes = {d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
    dims = []
    for a in range(x.ndim):
        if a in axes:
            if keep:
                dims.append(((1, None),))
        else:
            dims.append(src[a])
    return tuple(dims)


def _unsqueeze_rule(src, x, out, args, kwargs):  # noqa: ANN001, ANN202
    dim = _arg(args, kwargs, 1, "dim", 0) % out.ndim
    dims = list(src)
    dims.insert(dim, ((1, None),))
    return tuple(dims)


_RULES: dict[str, Callable] = {
    "reshape": _reshape_rule, "view": _reshape_rule, "flatten": _reshape_rule,
    "unflatten": _reshape_rule, "squeeze": _reshape_rule, "view_as": _reshape_rule,
    "reshape_as": _reshape_rule, "unsqueeze": _unsqueeze_rule, "permute": _permute_rule,
    "transpose": _transpose_rule, "swapaxes": _transpose_rule, "__getitem__": _getitem_rule,
    "cat": _cat_rule, "concat": _cat_rule, "concatenate": _cat_rule, "pad": _pad_rule,
    "mean": _reduce_rule, "sum": _reduce_rule, "amax": _reduce_rule, "amin": _reduce_rule,
    "interpolate": _interpolate_rule,
    "conv1d": _conv_rule(False), "conv2d": _conv_rule(False), "conv3d": _conv_rule(False),
    "conv_transpose1d": _conv_rule(True), "conv_transpose2d": _conv_rule(True),
    "conv_transpose3d": _conv_rule(True),
    "max_pool1d": _pool_rule(True), "max_pool2d": _pool_rule(True),
    "max_pool3d": _pool_rule(True), "max_pool1d_with_indices": _pool_rule(True),
    "max_pool2d_with_indices": _pool_rule(True), "max_pool3d_with_indices": _pool_rule(True),
    "avg_pool1d": _pool_rule(False), "avg_pool2d": _pool_rule(False),
    "avg_pool3d": _pool_rule(False),
    "adaptive_avg_pool1d": _adaptive_rule, "adaptive_avg_pool2d": _adaptive_rule,
    "adaptive_avg_pool3d": _adaptive_rule, "adaptive_max_pool1d": _adaptive_rule,
    "adaptive_max_pool2d": _adaptive_rule, "adaptive_max_pool3d": _adaptive_rule,
    "adaptive_max_pool1d_with_indices": _adaptive_rule,
    "adaptive_max_pool2d_with_indices": _adaptive_rule,
    "adaptive_max_pool3d_with_indices": _adaptive_rule,
}  # fmt: skip
class _StopTrace(Exception):
    pass


def trace(
    network: nn.Module,
    x: torch.Tensor,
    output_selector: Callable[[object], torch.Tensor] | None = None,
    stop_at: str | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> TraceResult:
    """Run ``network`` on ``x`` ``(B, C, *spatial)`` once and record every module's output.

    ``stop_at``: stop right after this module's output (geometry only, faster).
    ``forward``: how to call the network (default ``network(x)``), e.g. through
    ``torch.func.functional_call`` with parameter-free meta tensors. The network's
    modes, ``requires_grad`` flags and hooks are as before afterwards.
    """
    tracer = _Tracer()
    names = {m: n for n, m in network.named_modules()}
    records: dict[str, ModuleRecord] = {}
    bits: dict[str, int] = {}
    handles = []
    n_spatial = x.ndim - 2

    def pre_hook(module: nn.Module, _inputs: Any) -> None:
        tracer.module_stack.append(names.get(module, "?"))

    def post_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        name = tracer.module_stack.pop() if len(tracer.module_stack) > 1 else names[module]
        if name == "" or name in records:
            return
        rec = ModuleRecord(name, type(module).__name__, len(records))
        records[name] = rec
        if isinstance(output, torch.Tensor):
            rec.shape = tuple(output.shape)
            s = tracer.serial(output)
            dims = tracer.dims.get(s)
            if dims is not None and output.ndim >= 3:
                rec.geometry = tuple(_axis_geo(d) for d in dims[2:])
                batch = [f for f in dims[0] if f[0] != 1]
                rec.batch_ok = output.shape[0] == x.shape[0] and all(
                    f[1] is None for f in batch
                ) and output.ndim - 2 == n_spatial
            bit = 1 << (len(bits) + 1)
            bits[name] = bit
            tracer.taint[s] = tracer.taint.get(s, 0) | bit
            rec.serial = s
            rec.version = output._version
        if name == stop_at:
            raise _StopTrace

    for module in network.modules():
        if module is network:
            continue
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    scores = None
    try:
        with model_state_restored(network), torch.no_grad(), tracer:
            x = x.detach().clone()
            spatial = tuple(
                ((x.shape[2 + a], AxisGeometry(a, 0.0, 1.0, 1.0)),) for a in range(n_spatial)
            )
            tracer.mark(x, _plain_dims(x.shape[:2]) + spatial, 1)
            try:
                out = forward(x) if forward is not None else network(x)
                scores = output_selector(out) if output_selector is not None else out
            except _StopTrace:
                pass
    finally:
        for h in handles:
            h.remove()
    result = TraceResult(records, tuple(x.shape[2:]))
    if isinstance(scores, torch.Tensor):
        result.output_shape = tuple(scores.shape)
        _analyse_paths(tracer, records, bits, tracer.serial(scores, create=False))
    return result


def _analyse_paths(
    tracer: _Tracer, records: dict[str, ModuleRecord], bits: dict[str, int], out: int | None
) -> None:
    """Fill ``reaches``, ``cut`` and ``first_nonlinear`` from the recorded operations."""
    if out is None:
        return
    needed = {out}
    contributing: list[_Op] = []
    for op in reversed(tracer.ops):
        if any(s in needed for s in op.outputs):
            contributing.append(op)
            needed.update(op.inputs)
    contributing.reverse()
    out_mask = tracer.taint.get(out, 0)
    for name, bit in bits.items():
        rec = records[name]
        rec.reaches = bool(out_mask & bit)
        if not rec.reaches:
            continue
        rec.cut = True
        for op in contributing:
            if op.out_mask & bit and any((m & 1) and not (m & bit) for m in op.in_masks):
                rec.cut = False  # the input reaches this op by a path around the layer
            if rec.first_nonlinear is None and op.nonlinear & bit:
                rec.first_nonlinear = op.name
                rec.nonlinear_module = op.module  # "" : the network's own forward


def probe_geometry(network: nn.Module, layer: nn.Module, x: torch.Tensor) -> LayerGeometry:
    """Measure a layer's geometry where the trace cannot follow it (approximate).

    For two neighbouring cells in the middle of each axis, the input voxels whose
    gradient is non-zero (summed over the layer's features) form the cell's receptive
    field; its midpoint is taken as the cell's centre. Nonlinearities that block
    gradients (dead ReLUs, max-pooling) can shift the estimate by a few voxels.
    """
    x = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(x)
    x.requires_grad_(True)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with model_state_restored(network), torch.enable_grad():
            network(x)
    finally:
        handle.remove()
    if not captured or captured[-1].ndim != x.ndim or captured[-1].shape[0] != x.shape[0]:
        raise LayerError("cannot place the layer's maps: its output is not (B, F, *spatial)")
    acts = captured[-1]
    grid = tuple(acts.shape[2:])
    axes = []
    for d, n in enumerate(grid):
        centres = []
        cells = [max(n // 2 - 1, 0), min(n // 2, n - 1)] if n > 1 else [0]
        for i in cells:
            index = [0, slice(None)] + [s // 2 for s in grid]
            index[2 + d] = i
            (g,) = torch.autograd.grad(acts[tuple(index)].sum(), x, retain_graph=True)
            support = g.abs().sum(dim=[k for k in range(g.ndim) if k != 2 + d]).nonzero()
            if len(support) == 0:
                raise LayerError("cannot place the layer's maps: no input gradient reaches it")
            centres.append((float(support.min()) + float(support.max())) / 2)
        step = centres[1] - centres[0] if len(centres) == 2 and cells[1] > cells[0] else 1.0
        step = step if step > 0 else float(x.shape[2 + d]) / n
        axes.append(AxisGeometry(d, centres[0] - cells[0] * step, step, step))
    return LayerGeometry(grid, tuple(x.shape[2:]), tuple(axes), source="probe")
