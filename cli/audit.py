"""``hirescam3d audit``: is HiResCAM guaranteed faithful at a layer? Computed, not declared.

``--model`` is a zoo name, a bundle folder, or ``module:callable`` returning a user's
``nn.Module`` (give ``--input-shape C D H W`` for it). Exit code 0 when HiResCAM is
guaranteed at the audited layer (``--layer``, else the model's default layer; for a user
module without a default, any layer), :data:`EXIT_NOT_GUARANTEED` when it is not, 2 for
usage errors, 1 for runtime failures.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from .console import out_console
from .errors import CLIUsageError

EXIT_NOT_GUARANTEED = 3


def _user_network(spec: str) -> Any:
    """``package.module:callable`` -> the ``nn.Module`` the callable returns (in eval mode)."""
    from torch import nn

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CLIUsageError(f"--model {spec}: expected module:callable, e.g. mypkg.nets:build")
    if "" not in sys.path:
        sys.path.insert(0, "")  # let users name modules in the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CLIUsageError(f"--model {spec}: cannot import {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CLIUsageError(f"--model {spec}: {module_name} has no callable {attr!r}")
    network = factory()
    if not isinstance(network, nn.Module):
        raise CLIUsageError(
            f"--model {spec}: {attr}() returned {type(network).__name__}, not a torch nn.Module"
        )
    return network.eval()


def run_audit(
    model: str | None, layer: str | None, input_shape: Sequence[int] | None
) -> tuple[list[Any], str | None, str]:
    """``(verdicts, audited layer or None for "any", model label)``."""
    from hirescam3d.audit import audit_layer, audit_model

    from .models import resolve_handle

    if model is not None and ":" in model and not model.startswith((".", "/")):
        network = _user_network(model)
        if not input_shape:
            raise CLIUsageError(
                f"--model {model}: give --input-shape C D H W (one input, without batch)"
            )
        default = layer or getattr(network, "default_layer", None)
        if layer is not None:
            return [audit_layer(network, layer, input_shape)], layer, model
        return audit_model(network, input_shape, default_layer=default), default, model
    handle = resolve_handle(model)
    shape = tuple(input_shape) if input_shape else None
    if layer is not None:
        handle.check_layer(layer)
    if shape is not None:
        network = handle.load()[0]
        if layer is not None:
            return [audit_layer(network, layer, shape)], layer, handle.name
        return audit_model(network, shape, default_layer=handle.default_layer), (
            handle.default_layer
        ), handle.name
    if layer is not None:
        return [handle.audit(layer)], layer, handle.name
    return handle.layers(), handle.default_layer, handle.name


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1x96x128x128"`` (or commas, spaces) -> ``(1, 96, 128, 128)``."""
    if text is None:
        return None
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    if len(parts) < 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CLIUsageError(
            f"--input-shape {text!r}: expected positive integers C x spatial, e.g. 1x96x128x128"
        )
    return tuple(int(p) for p in parts)


def audit_command(
    model: str | None,
    layer: str | None,
    input_shape: str | None,
    json_out: bool = False,
) -> int:
    """Print the verdicts; return the exit code."""
    verdicts, audited, label = run_audit(model, layer, parse_shape(input_shape))
    names = {v.layer: v for v in verdicts}
    for v in verdicts:
        names.update({alias: v for alias in v.aliases})
    if audited is not None and audited in names:
        ok = names[audited].guaranteed
        summary = names[audited].text()
    else:
        ok = any(v.guaranteed for v in verdicts)
        good = [v.layer for v in verdicts if v.guaranteed]
        summary = (
            f"HiResCAM is guaranteed faithful at {', '.join(good)}"
            if good
            else "HiResCAM is not guaranteed at any layer of this model"
        )
    if json_out:
        payload = {
            "model": label,
            "layer": audited,
            "guaranteed": ok,
            "verdict": summary,
            "layers": [v.to_dict() for v in verdicts],
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        _print_table(verdicts, label)
        out_console().print(summary)
    return 0 if ok else EXIT_NOT_GUARANTEED


def _print_table(verdicts: Sequence[Any], label: str) -> None:
    from rich.table import Table

    table = Table(title=f"HiResCAM audit of {label}", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("guaranteed", justify="center")
    table.add_column("why", overflow="fold")
    for v in verdicts:
        name = v.layer + (" (default)" if v.default else "")
        if v.aliases:
            name += f"\n= {', '.join(v.aliases)}"
        table.add_row(name, "yes" if v.guaranteed else "no", v.reason)
    out_console().print(table)
