"""``--output INDEX|KEY`` and the checks around a model's output for ``hirescam3d audit``:
a model that returns a tuple, list or dict is named as such in one line (with what it
holds) instead of auditing to an empty verdict; ``--input-shape`` is sized against free
memory before the probe input is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CLIUsageError

# Bytes of one float32 probe value; the audit also holds activations and gradients of at
# least the input's size, so the input alone must fit several times over.
_BYTES = 4
_COPIES = 4


def check_input_size(shape: Sequence[int], text: str) -> None:
    """CLIUsageError (exit 2) when a ``(1, *shape)`` float32 probe input (and the copies the
    audit makes of it) would not fit in the memory available now."""
    from hirescam3d.io.input_checks import available_memory, human_bytes

    needed = math.prod(shape) * _BYTES * _COPIES
    available = available_memory()
    if available is not None and needed > available:
        raise CLIUsageError(
            f"--input-shape {text}: auditing a {' x '.join(map(str, shape))} float32 input "
            f"needs at least {human_bytes(needed)} of memory (the input and its activations), "
            f"but only {human_bytes(available)} is available; give a smaller --input-shape "
            "(the audit's verdict does not depend on the size, only on the layers)"
        )


def output_selector(output: str | None) -> Callable[[object], Any] | None:
    """``--output`` as an ``output_selector``: an integer picks ``out[INDEX]`` of a tuple or
    list, anything else ``out[KEY]`` of a dict."""
    if output is None:
        return None
    key: int | str = int(output) if output.lstrip("-").isdigit() else output

    def select(out: object) -> Any:
        if isinstance(out, dict):
            return out[str(key)] if str(key) in out else out[key]
        return out[key]  # type: ignore[index]

    return select


def _describe(out: object) -> str:
    import torch

    def one(value: object) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {tuple(value.shape)}"
        return type(value).__name__

    if isinstance(out, dict):
        return "a dict with keys " + ", ".join(f"{k!r}: {one(v)}" for k, v in out.items())
    if isinstance(out, (tuple, list)):
        items = ", ".join(f"[{i}] {one(v)}" for i, v in enumerate(out))
        return f"a {type(out).__name__} of {len(out)}: {items}"
    return f"a {type(out).__name__}"


def check_model_output(network: Any, shape: Sequence[int], where: str, output: str | None) -> None:
    """One forward pass on a probe input: CLIUsageError (exit 2) naming what the model
    returns when it is not a tensor and no valid ``--output`` picks one; ModelError (exit
    1) naming ``where`` when the forward pass raises. The network is not changed."""
    import torch

    from hirescam3d.core.audit import probe_input
    from hirescam3d.errors import ModelError

    x = probe_input(network, shape)
    try:
        with torch.no_grad():
            out = network(x)
    except Exception as err:  # noqa: BLE001 - the user's model: name it and what it raised
        raise ModelError(
            f"{where}: the model's forward pass on a {tuple(x.shape)} input raised "
            f"{type(err).__name__}: {err}; check --input-shape and the model"
        ) from err
    if output is None:
        if isinstance(out, torch.Tensor):
            return
        hint = "KEY" if isinstance(out, dict) else "INDEX"
        raise CLIUsageError(
            f"{where} returns {_describe(out)}, not one tensor of logits; pass --output "
            f"{hint} to choose the logits to explain"
        )
    if isinstance(out, torch.Tensor):
        raise CLIUsageError(f"--output {output}: {where} returns one tensor; drop --output")
    try:
        picked = output_selector(output)(out)  # type: ignore[misc]
    except (KeyError, IndexError, TypeError):
        raise CLIUsageError(
            f"--output {output}: {where} returns {_describe(out)}; choose one of those"
        ) from None
    if not isinstance(picked, torch.Tensor):
        raise CLIUsageError(
            f"--output {output} picks a {type(picked).__name__}, not a tensor of logits"
        )


def no_layer_reason(label: str, shape: Sequence[int] | None) -> str:
    """Why an audit found no layer to explain (instead of an empty table)."""
    given = f" for an input of shape {tuple(shape)}" if shape else ""
    return (
        f"{label} has no layer HiResCAM can explain{given}: none outputs one (F, *spatial) "
        "feature map per input that the scores depend on (e.g. a model of only linear "
        "layers, or one that flattens before any convolution); nothing is guaranteed"
    )
