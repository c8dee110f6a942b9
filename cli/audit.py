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
from .startup import startup_done

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
    try:
        network = factory()
    except Exception as err:  # noqa: BLE001 - the user's code: name it and what it raised
        from hirescam3d.errors import ModelError

        raise ModelError(
            f"--model {spec}: calling {attr}() raised {type(err).__name__}: {err}; fix "
            f"{module_name}.{attr} (rerun with --debug for the traceback)"
        ) from err
    if not isinstance(network, nn.Module):
        raise CLIUsageError(
            f"--model {spec}: {attr}() returned {type(network).__name__}, not a torch nn.Module"
        )
    return network.eval()


def run_audit(
    model: str | None,
    layer: str | None,
    input_shape: Sequence[int] | None,
    output: str | None = None,
) -> tuple[list[Any], str | None, str]:
    """``(verdicts, audited layer or None for "any", model label)``."""
    from hirescam3d.core.audit import audit_layer, audit_model

    from .model_outputs import check_model_output, output_selector
    from .models import resolve_handle

    selector = output_selector(output)
    if model is not None and ":" in model and not model.startswith((".", "/")):
        network = _user_network(model)
        if not input_shape:
            raise CLIUsageError(
                f"--model {model}: give --input-shape C D H W (one input, without batch)"
            )
        check_model_output(network, input_shape, f"--model {model}", output)
        default = layer or getattr(network, "default_layer", None)
        if layer is not None:
            return [audit_layer(network, layer, input_shape, selector)], layer, model
        verdicts = audit_model(network, input_shape, default_layer=default,
                               output_selector=selector)  # fmt: skip
        return verdicts, default, model
    handle = resolve_handle(model)
    shape = tuple(input_shape) if input_shape else None
    if layer is not None:
        handle.check_layer(layer)
    if shape is not None:
        network = handle.load()[0]
        startup_done()
        check_model_output(network, shape, f"--model {handle.name}", output)
        if layer is not None:
            return [audit_layer(network, layer, shape, selector)], layer, handle.name
        return audit_model(network, shape, default_layer=handle.default_layer,
                           output_selector=selector), handle.default_layer, handle.name
    if output is not None:
        raise CLIUsageError(
            f"--output applies to models that return several outputs, audited on "
            f"--input-shape; {handle.name} returns its logits: drop --output"
        )
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
    shape = tuple(int(p) for p in parts)
    from .model_outputs import check_input_size

    check_input_size(shape, text)
    return shape


def audit_command(
    model: str | None,
    layer: str | None,
    input_shape: str | None,
    json_out: bool = False,
    output: str | None = None,
    show_all: bool = False,
) -> int:
    """Print the verdicts (the certified layers, the default and the audited one; every
    layer with ``show_all``; ``--json`` always has every layer); return the exit code."""
    from .model_outputs import no_layer_reason

    shape = parse_shape(input_shape)
    verdicts, audited, label = run_audit(model, layer, shape, output)
    if not verdicts:  # a reason, not an empty table
        from .errors import print_error

        print_error(no_layer_reason(label, shape))
        return EXIT_NOT_GUARANTEED
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
        _print_table(verdicts, label, audited, show_all)
        out_console().print(summary)
    return 0 if ok else EXIT_NOT_GUARANTEED


def shown_verdicts(
    verdicts: Sequence[Any], audited: str | None = None, show_all: bool = False
) -> list[Any]:
    """The rows a table shows: every verdict with ``show_all``, else the certified
    layers, the default layer and the audited one, in execution order."""
    if show_all:
        return list(verdicts)
    return [
        v for v in verdicts
        if v.guaranteed or v.default or (audited is not None and audited in (v.layer, *v.aliases))
    ]  # fmt: skip


def _print_table(
    verdicts: Sequence[Any], label: str, audited: str | None = None, show_all: bool = False
) -> None:
    from rich.table import Table

    rows = shown_verdicts(verdicts, audited, show_all)
    table = Table(title=f"HiResCAM audit of {label}", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("guaranteed", justify="center")
    table.add_column("why", overflow="fold")
    for v in rows:
        name = v.layer + (" (default)" if v.default else "")
        if v.aliases:
            name += f"\n= {', '.join(v.aliases)}"
        table.add_row(name, "yes" if v.guaranteed else "no", v.reason)
    console = out_console()
    console.print(table)
    hidden = len(verdicts) - len(rows)
    if hidden:
        console.print(
            f"and {hidden} other layer(s) where HiResCAM is not guaranteed (--all lists "
            "every layer)"
        )
