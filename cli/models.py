"""Resolving ``--model``, ``--finding`` and ``--layer`` values: a thin shell over
:class:`hirescam3d.models.handle.ModelHandle`, which holds every rule (zoo name vs bundle folder,
finding names, layers).

Unknown names are usage errors (exit code 2) found before any work starts; a model that
exists but cannot be loaded (corrupt checkpoint, bad config, a bundle whose declared
HiResCAM guarantee the audit contradicts) is a runtime failure (1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import CLIUsageError
from .startup import startup_done

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hirescam3d.models.handle import ModelHandle

DEFAULT_MODEL = "demo"

# --config NAME / --trust-bundle of this run (one command per process), for bundle folders
BUNDLE_OPTIONS: dict[str, Any] = {}


def use_bundle_options(config: str | None, trust: bool) -> None:
    """Remember ``--config``/``--trust-bundle`` for :func:`resolve_handle`; with trust,
    say on stderr what it means (MONAI's ConfigParser runs the config)."""
    BUNDLE_OPTIONS.clear()
    BUNDLE_OPTIONS.update({k: v for k, v in (("config", config), ("trust", trust)) if v})
    if trust:
        import sys

        from hirescam3d.models.bundle_config import TRUST_WARNING

        print(f"warning: {TRUST_WARNING}", file=sys.stderr)


def resolve_handle(model: str | None) -> ModelHandle:
    """The handle ``--model`` names (default ``demo``); no weights read.

    CLIUsageError (exit 2) for an unknown zoo name (listing the valid ones and close
    matches), a missing path, a file or a folder that is not a bundle.
    """
    import warnings

    from hirescam3d.models.handle import ModelHandle, ModelNotFoundError

    try:
        with warnings.catch_warnings():  # the trust warning was printed once already
            warnings.simplefilter("ignore", UserWarning)
            handle = ModelHandle.resolve(
                DEFAULT_MODEL if model is None else str(model), **BUNDLE_OPTIONS
            )
        from .nnunet import with_nnunet_options

        return with_nnunet_options(handle)
    except ModelNotFoundError as err:
        text = str(err)
        raise CLIUsageError(
            text if text.startswith("unknown model") else f"--model {text}"
        ) from None


def model_text(handle: ModelHandle) -> str:
    """What ``--model`` stands for: the zoo name, or the bundle folder's absolute path."""
    return handle.name if handle.source == "zoo" else str(handle.bundle_path)


def check_model(model: str | None) -> str:
    """``model`` as a zoo name or an absolute bundle folder (CLIUsageError if neither)."""
    return model_text(resolve_handle(model))


def check_findings(handle: ModelHandle, findings: Sequence[str]) -> list[str]:
    """``findings`` as the model spells them (case-insensitive, spaces as underscores,
    duplicates removed); TargetError (exit 2) listing the valid ones. No weights read."""
    return handle.check_findings(findings) if findings else []


def load_checked(handle: ModelHandle, layer: str | None) -> tuple[Any, Any]:
    """``(network, ModelInfo)`` with ``layer`` checked (LayerError, exit 2, listing the
    candidate layers); ModelError (exit 1) if the model cannot be loaded."""
    loaded = handle.load()
    handle.check_layer(layer)
    startup_done()
    return loaded
