"""``hirescam3d models``, ``findings`` and ``layers``: what the zoo and a model offer."""

from __future__ import annotations

import json
import sys
from typing import Any

from .console import out_console
from .models import DEFAULT_MODEL, bundle_metadata, check_model, is_zoo_name, load_model


def _input_text(spec: Any) -> str:
    size = " x ".join(str(n) for n in spec.spatial_size)
    return f"{spec.spatial_dims}D {spec.modality} {size}"


def _trained(entry: Any) -> str:
    """``yes``, ``no`` or ``not installed`` (a bundled model whose folder is missing)."""
    if entry.bundle is None:
        return "no"
    section = bundle_metadata(entry.bundle)
    if section is None:
        return "not installed"
    return "yes" if section.get("trained", True) else "no"


def model_rows() -> list[dict[str, Any]]:
    """One dict per zoo model: name, description, trained, input, layer, guarantee."""
    from hirescam3d import zoo

    rows = []
    for name in zoo.names():
        entry = zoo.entry(name)
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "trained": _trained(entry),
                "input": _input_text(entry.input),
                "findings": list(entry.class_names),
                "default_layer": entry.target_layer,
                "guaranteed": entry.guaranteed,
                "default": name == DEFAULT_MODEL,
            }
        )
    return rows


def models_command(json_out: bool = False) -> None:
    rows = model_rows()
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title="Model zoo (default: demo)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("trained")
    table.add_column("input")
    table.add_column("classes", justify="right")
    table.add_column("description", overflow="fold")
    for row in rows:
        name = row["name"] + (" *" if row["default"] else "")
        table.add_row(
            name, row["trained"], row["input"], str(len(row["findings"])), row["description"]
        )
    console = out_console()
    console.print(table)
    console.print(
        "Untrained models give explanations of random weights (for testing pipelines); "
        "pass a bundle folder to --model to use your own."
    )


def findings_of(model: str) -> tuple[str, ...]:
    """Class names of a zoo model (no weights loaded) or of a bundle folder (loaded)."""
    from hirescam3d import zoo

    if is_zoo_name(model):
        return zoo.entry(model).class_names
    return tuple(load_model(model)[1].class_names)


def findings_command(model: str | None, json_out: bool = False) -> None:
    model = check_model(model)
    names = findings_of(model)
    if json_out:
        sys.stdout.write(json.dumps(list(names)) + "\n")
    else:
        sys.stdout.write("".join(f"{n}\n" for n in names))


def layer_rows(model: str) -> tuple[list[dict[str, Any]], str]:
    """Candidate explanation layers of ``model`` and its default layer.

    Zoo models are built without weights (the guarantee is structural); bundle folders
    are loaded, so a corrupt bundle fails here.
    """
    from hirescam3d import zoo
    from hirescam3d.models import explanation_layers

    if is_zoo_name(model):
        entry = zoo.entry(model)
        network, default = entry.build(), entry.target_layer
    else:
        network, info = load_model(model)
        default = info.target_layer
    rows = []
    for layer in explanation_layers(network):
        rows.append(
            {
                "name": layer.name,
                "module": layer.module,
                "guaranteed": layer.guaranteed,
                "default": layer.name == default,
                "note": layer.note,
            }
        )
    if default not in {r["name"] for r in rows}:
        rows.append(
            {"name": default, "module": "", "guaranteed": None, "default": True, "note": ""}
        )
    return rows, default


def layers_command(model: str | None, json_out: bool = False) -> None:
    model = check_model(model)
    rows, default = layer_rows(model)
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    faithful = {True: "yes", False: "no", None: "unknown"}
    table = Table(title=f"Explanation layers of {model} (default: {default})", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("module")
    table.add_column("HiResCAM faithful", justify="center")
    table.add_column("note", overflow="fold")
    for row in rows:
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(name, row["module"], faithful[row["guaranteed"]], row["note"])
    console = out_console()
    console.print(table)
    console.print(
        "faithful = only linear operations follow the layer, so HiResCAM shows exactly the "
        "locations the score is made of; choose a layer with --layer."
    )
