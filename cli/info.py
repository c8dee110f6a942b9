"""``hirescam3d models``, ``findings`` and ``layers``: what the zoo and a model offer.

``models`` and ``findings`` read the zoo's cards and bundle metadata only: no
architecture is imported, no network built, no weights read. ``layers`` loads the model
and runs the audit (:meth:`hirescam3d.models.handle.ModelHandle.layers`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from .console import out_console
from .models import DEFAULT_MODEL, resolve_handle


def _input_text(spec: Any) -> str:
    size = " x ".join(str(n) for n in spec.spatial_size)
    return f"{spec.spatial_dims}D {spec.modality} {size}"


def _trained(handle: Any) -> str:
    """``yes``, ``no`` or ``not installed`` (a bundled model whose folder is missing)."""
    if not handle.installed:
        return "not installed"
    return "yes" if handle.trained else "no"


def model_rows() -> list[dict[str, Any]]:
    """One dict per zoo model: name, description, trained, input, layer, cached guarantee."""
    from hirescam3d.models import zoo
    from hirescam3d.models.handle import ModelHandle

    rows = []
    for name in zoo.names():
        handle = ModelHandle.resolve(name)
        rows.append(
            {
                "name": name,
                "description": handle.description,
                "trained": _trained(handle),
                "input": _input_text(handle.input),
                "findings": list(handle.class_names),
                "default_layer": handle.default_layer,
                "guaranteed": handle.declared_guaranteed,
                "default": name == DEFAULT_MODEL,
            }
        )
    return rows


def models_command(json_out: bool = False) -> None:
    rows = model_rows()
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    # One line per model at 80 columns; the descriptions follow, wrapped at full width.
    table = Table(title="Model zoo (default: demo *)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    table.add_column("trained", no_wrap=True)
    table.add_column("input", no_wrap=True)
    table.add_column("classes", justify="right", no_wrap=True)
    for row in rows:
        name = row["name"] + (" *" if row["default"] else "")
        table.add_row(name, row["trained"], row["input"], str(len(row["findings"])))
    console = out_console()
    console.print(table)
    about = Table.grid(padding=(0, 2))
    about.add_column(no_wrap=True)
    about.add_column(overflow="fold")
    for row in rows:
        about.add_row(Text(row["name"], style="bold"), row["description"])
    console.print(about)
    console.print(
        "Untrained models give explanations of random weights (for testing pipelines); "
        "pass a bundle folder to --model to use your own.",
        soft_wrap=False,
    )


def findings_command(model: str | None, json_out: bool = False) -> None:
    handle = resolve_handle(model)
    names = handle.class_names
    if json_out:
        sys.stdout.write(json.dumps(list(names)) + "\n")
    else:
        if handle.source == "bundle":  # a MONAI bundle: its metadata's name and version
            from hirescam3d.models.bundle import monai_bundle_title

            title = monai_bundle_title(handle.bundle_path)
            sys.stdout.write(f"# {title}\n" if title else "")
        sys.stdout.write("".join(f"{n}\n" for n in names))


def layer_rows(
    model: str | None, input_shape: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The layers explain accepts for ``model``'s input, each with its computed verdict,
    and the default layer. ``model``: what ``audit`` takes (a zoo name, a bundle folder or
    ``module:callable`` with ``input_shape``, e.g. ``"1x64x64x64"``). Loads the model, so
    a corrupt bundle fails here (exit 1)."""
    from .audit import parse_shape, run_audit

    verdicts, default, _ = run_audit(model, None, parse_shape(input_shape))
    if default is None:  # a user's module without one: the deepest certified layer
        certified = [v for v in verdicts if v.guaranteed]
        if certified:
            default = certified[-1].layer
            verdicts = [dataclasses.replace(v, default=v.layer == default) for v in verdicts]
    rows = []
    for verdict in verdicts:
        rows.append(
            {
                "name": verdict.layer,
                "module": verdict.module,
                "guaranteed": verdict.guaranteed,
                "default": verdict.default,
                "reason": verdict.reason,
                "first_nonlinear": verdict.first_nonlinear,
                "nonlinear_module": verdict.nonlinear_module,
                "aliases": list(getattr(verdict, "aliases", ()) or ()),
            }
        )
    return rows, default


def _why(row: dict[str, Any]) -> str:
    """The verdict's reason, short (``--json`` has it in full)."""
    if row["guaranteed"]:
        return "only linear operations follow"
    if row["first_nonlinear"]:
        return f"then {row['first_nonlinear']} ({row['nonlinear_module']})"
    return row["reason"]


def layers_command(
    model: str | None, json_out: bool = False, input_shape: str | None = None
) -> None:
    rows, default = layer_rows(model, input_shape)
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    name = model or DEFAULT_MODEL
    table = Table(title=f"Explanation layers of {name} (default: {default})", title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("module")
    table.add_column("HiResCAM faithful", justify="center")
    table.add_column("why", overflow="fold")
    for row in rows:
        label = row["name"] + (" (default)" if row["default"] else "")
        if row["aliases"]:
            label += f"\n= {', '.join(row['aliases'])}"
        table.add_row(label, row["module"], "yes" if row["guaranteed"] else "no", _why(row))
    console = out_console()
    console.print(table)
    console.print(
        "faithful = the audit found only linear operations between the layer and the scores "
        "(traced, and checked numerically), so HiResCAM shows exactly the locations the "
        "score is made of; choose a layer with --layer."
    )
