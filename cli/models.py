"""Resolving ``--model``, ``--finding`` and ``--layer`` values into library objects.

Unknown names are usage errors (exit code 2) found before any work starts; a model that
exists but cannot be loaded (corrupt checkpoint, bad config) is a runtime failure (1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CLIUsageError

DEFAULT_MODEL = "demo"


def _zoo():
    from hirescam3d import zoo

    return zoo


def check_model(model: str | None) -> str:
    """Return ``model`` (default ``demo``) if it is a zoo name or an existing bundle folder.

    Raises CLIUsageError naming the valid zoo names (and close matches) otherwise.
    """
    from hirescam3d.errors import ModelError

    zoo = _zoo()
    model = DEFAULT_MODEL if model is None else str(model)
    if model in zoo.names():
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise CLIUsageError(
            f"--model {model}: is a file; pass a bundle folder (holding configs/ and "
            f"models/model.pt) or one of the zoo names: {', '.join(zoo.names())}"
        )
    if any(c in model for c in "/\\") or model.startswith((".", "~")):
        raise CLIUsageError(
            f"--model {model}: no such bundle folder; pass an existing bundle folder or one "
            f"of the zoo names: {', '.join(zoo.names())}"
        )
    try:
        zoo.entry(model)
    except ModelError as err:
        raise CLIUsageError(f"{err}; or pass an existing bundle folder") from None
    return model  # pragma: no cover - entry() raised for every unknown name


def is_zoo_name(model: str) -> bool:
    return model in _zoo().names()


def bundle_metadata(folder: str | Path) -> dict[str, Any] | None:
    """The ``hirescam3d`` section of a bundle's metadata.json, or None if unreadable."""
    path = Path(folder) / "configs" / "metadata.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    section = data.get("hirescam3d") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else None


def class_names_of(model: str) -> tuple[str, ...] | None:
    """The model's class names without loading weights (None if they cannot be read)."""
    if is_zoo_name(model):
        return _zoo().entry(model).class_names
    section = bundle_metadata(model)
    names = section.get("class_names") if section else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def check_findings(findings: Sequence[str], class_names: Sequence[str] | None) -> list[str]:
    """``findings`` with duplicates removed; CLIUsageError listing the valid names if unknown."""
    unique = list(dict.fromkeys(findings))
    if class_names is None:
        return unique
    unknown = [f for f in unique if f not in class_names]
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, class_names, n=1, cutoff=0.6)
            if close:
                hints.append(f"{name!r} -> {close[0]!r}?")
        hint = f" (did you mean {', '.join(hints)})" if hints else ""
        plural = "s" if len(unknown) > 1 else ""
        raise CLIUsageError(
            f"unknown finding{plural} {', '.join(map(repr, unknown))}{hint}; valid findings "
            f"for this model: {', '.join(class_names)}"
        )
    return unique


def load_model(model: str) -> tuple[Any, Any]:
    """``(network, ModelInfo)`` via :func:`hirescam3d.zoo.load` (ModelError if it fails)."""
    return _zoo().load(model)


def check_layer(layer: str | None, network: Any) -> None:
    """CLIUsageError listing the candidate layers if ``layer`` is not one of the network's."""
    if layer is None:
        return
    modules = dict(network.named_modules())
    if layer in modules:
        return
    from hirescam3d.models import explanation_layers

    candidates = [info.name for info in explanation_layers(network)]
    raise CLIUsageError(
        f"unknown layer {layer!r}; candidate layers of this model: {', '.join(candidates)} "
        "(see 'hirescam3d layers --model ...')"
    )
