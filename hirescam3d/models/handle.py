"""One model handle: the object every front end asks about a model.

:meth:`ModelHandle.resolve` turns a zoo name or a bundle folder into a handle without
loading weights or building a network; the handle then answers:

- what is recorded about the model (:attr:`~ModelHandle.name`,
  :attr:`~ModelHandle.class_names`, :attr:`~ModelHandle.input`,
  :attr:`~ModelHandle.preprocessing`, :attr:`~ModelHandle.task`,
  :attr:`~ModelHandle.default_layer`, :attr:`~ModelHandle.trained`,
  :attr:`~ModelHandle.bundle_path`, the cached :attr:`~ModelHandle.declared_guaranteed`),
  from the zoo's card or the bundle's metadata only;
- :meth:`~ModelHandle.load`: ``(network in eval mode, ModelInfo)``, cached. A bundle's
  declared ``guaranteed`` flag is checked against the computed audit here: a bundle
  whose flag disagrees is refused;
- :meth:`~ModelHandle.check_findings` and :meth:`~ModelHandle.check_layer`: user input
  checked against the model (findings match case-insensitively, spaces read as
  underscores);
- :meth:`~ModelHandle.audit` and :meth:`~ModelHandle.layers`: whether HiResCAM is
  guaranteed faithful at a layer, computed by :mod:`hirescam3d.core.audit` and cached.

A MONAI-format bundle (see :mod:`hirescam3d.models.bundle`) records no default layer: the
first :meth:`~ModelHandle.load` chooses it with the audit (:func:`choose_default_layer`):
the deepest layer where the HiResCAM guarantee holds, never the output module itself and
never a map of a single cell; if there is none, the last convolutional layer, with a note
in :attr:`~ModelHandle.notes` saying so. The same happens for a given network without a
default layer.

Networks built elsewhere join through :meth:`ModelHandle.from_network` (or
:meth:`ModelHandle.of` for a ``(network, info)`` pair), so code that passes
``(network, info)`` tuples around keeps working and shares one handle per network.

The one rule for ``--model`` text: a zoo name wins over a same-named folder; otherwise
text that looks like a path (has a slash, starts with ``.`` or ``~``, or exists) is a
bundle folder; anything else is an unknown zoo name.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hirescam3d.errors import ModelError
from hirescam3d.models import zoo_entries
from hirescam3d.models.bundle_read import (
    METADATA,
    load_bundle,
    read_class_names,
    read_info,
    read_network_def,
)
from hirescam3d.models.handle_base import (
    _BY_NETWORK,
    AUDIT_AXIS0,
    HandleBase,
    LayerChoice,
    choose_default_layer,
    finding_key,
    match_findings,
    output_selector_of,
)
from hirescam3d.models.model_info import InputSpec, ModelInfo
from hirescam3d.models.nnunet_handle import NnunetHandle

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

# Every name this module defined or imported before HandleBase moved to handle_base.
__all__ = [
    "AUDIT_AXIS0",
    "DEFAULT_MODEL",
    "METADATA",
    "InputSpec",
    "LayerChoice",
    "ModelHandle",
    "ModelInfo",
    "ModelNotFoundError",
    "choose_default_layer",
    "finding_key",
    "load_bundle",
    "looks_like_path",
    "match_findings",
    "output_selector_of",
    "read_class_names",
    "read_info",
    "read_network_def",
]

DEFAULT_MODEL = "demo"


class ModelNotFoundError(ModelError):
    """The model text names neither a zoo entry nor a bundle folder (a usage error)."""


# -- name vs path -------------------------------------------------------------------------
def looks_like_path(text: str) -> bool:
    """True when ``text`` (not a zoo name) names a folder rather than a zoo entry."""
    return (
        "/" in text
        or "\\" in text
        or text.startswith((".", "~"))
        or Path(text).expanduser().exists()
    )


def _zoo_names() -> str:
    return ", ".join(zoo_entries.names())


def _bundle_folder(path: str) -> Path:
    """The bundle folder ``path`` names, resolved; ModelNotFoundError (in the user's
    spelling of ``path``) saying what it is instead."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelNotFoundError(
            f"{path}: not a model bundle (no such bundle folder); pass an existing bundle "
            f"folder or one of the zoo names: {_zoo_names()}"
        )
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"{path}: is a file, not a model bundle; pass a bundle folder (holding configs/ "
            f"and models/model.pt) or one of the zoo names: {_zoo_names()}"
        )
    meta = folder / METADATA
    if not meta.exists() and not meta.is_symlink():  # a link or odd file: read_info says
        raise ModelNotFoundError(
            f"{path}: not a model bundle (no {METADATA.as_posix()} in it); pass a bundle "
            f"folder (hirescam3d or MONAI format) or one of the zoo names: {_zoo_names()}"
        )
    return folder.resolve()


class ModelHandle(HandleBase, metaclass=abc.ABCMeta):  # noqa: B024 - ABCMeta: for register below
    """A model known by name, bundle folder or network; see the module docstring.

    Create one with :meth:`resolve`, :meth:`from_network` or :meth:`of`, not directly.
    Verdicts are cached per handle (they depend on the architecture and, through the
    numerical checks' tolerance, on the weights: a handle whose network is retrained in
    place should be recreated).
    """

    # -- creating -------------------------------------------------------------------------
    @classmethod
    def resolve(
        cls,
        model: Any = None,
        seed: int = 0,
        config: str | None = None,
        trust: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> ModelHandle:
        """A handle for a zoo name or bundle folder (default ``demo``); no weights read.

        For a MONAI bundle folder: ``config`` names another file of its ``configs/``
        (default ``inference.json``/``.yaml``/``.yml``); ``trust=True`` has MONAI's own
        ConfigParser resolve it (a warning says so: the same trust as ``python -m
        monai.bundle run``); ``overrides``: ``{config id: value}`` set first.

        Also accepts a handle (returned as is), a ``(network, info)`` pair (see
        :meth:`of`) or a network (see :meth:`from_network`). Zoo names win over
        same-named folders; text that looks like a path is a bundle folder.

        Raises:
            ModelNotFoundError: an unknown zoo name (the message lists the valid names and
                close matches), a path that does not exist, a file, or a folder without
                ``configs/metadata.json``.
        """
        if model is None:
            model = DEFAULT_MODEL
        if isinstance(model, ModelHandle):
            return model
        if isinstance(model, tuple):
            if len(model) != 2 or not _is_module(model[0]):
                raise ModelError("model must be a zoo name, a bundle folder or (network, info)")
            return cls.of(model[0], model[1])
        if _is_module(model):
            return cls.of(model)
        options = {"config": config, "trust": bool(trust), "overrides": overrides}
        if isinstance(model, Path):
            return cls._from_folder(str(model), seed, options)
        if not isinstance(model, str):
            raise ModelError(
                f"model must be a zoo name, a bundle folder or (network, info); got "
                f"{type(model).__name__}"
            )
        if model in zoo_entries.ENTRIES:
            entry = zoo_entries.ENTRIES[model]
            return cls(
                source="zoo", name=model, entry=entry, bundle=entry.info.bundle_path, seed=seed
            )
        if looks_like_path(model):
            return cls._from_folder(model, seed, options)
        unknown = zoo_entries.unknown_model_message(model)
        raise ModelNotFoundError(f"{unknown}; or pass a bundle folder")

    @classmethod
    def _from_folder(
        cls, text: str, seed: int, options: dict[str, Any] | None = None
    ) -> ModelHandle:
        from hirescam3d.models.nnunet import is_nnunet_folder

        if is_nnunet_folder(Path(text).expanduser()):  # an nnU-Net trained-model folder
            return NnunetHandle.open(text, seed=seed)
        folder = _bundle_folder(text)
        handle = cls(source="bundle", name=folder.name, bundle=folder, seed=seed)
        handle.bundle_options = {k: v for k, v in (options or {}).items() if v}
        if handle.bundle_options.get("trust"):
            import warnings

            from hirescam3d.models.bundle_config import TRUST_WARNING

            warnings.warn(TRUST_WARNING, UserWarning, stacklevel=3)
        return handle

    @classmethod
    def from_network(
        cls,
        network: nn.Module,
        class_names: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
        default_layer: str | None = None,
        *,
        name: str | None = None,
        task: str = "multilabel",
        info: ModelInfo | None = None,
        output_selector: Callable[[object], torch.Tensor] | None = None,
    ) -> ModelHandle:
        """A handle for a network built elsewhere (a user's ``nn.Module``).

        ``class_names`` (default: ``network.class_names``), ``input_shape`` ``(C,
        *spatial)`` of one input (default: ``info.input``, else ``network.input_size``
        with its ``in_channels``, else 1 channel) and ``default_layer`` (default:
        ``network.default_layer``) describe it; or pass the ``info`` it was loaded with.
        The handle's ``info.guaranteed`` is computed by the audit when :meth:`load` is
        first called.
        """
        if info is None:
            names = (
                class_names if class_names is not None else getattr(network, "class_names", None)
            )
            if names is None:
                raise ModelError(
                    f"{type(network).__name__}: pass class_names (the network has no "
                    "class_names attribute)"
                )
            info = ModelInfo(
                name=name or type(network).__name__,
                description="",
                class_names=tuple(str(n) for n in names),
                target_layer=str(default_layer or getattr(network, "default_layer", None) or ""),
                input=None,  # type: ignore[arg-type]  # unknown until given
                preprocessing=[],
                task=task,
                guaranteed=False,  # computed by load()
                trained=None,  # a user's network: its training cannot be known
            )
        changes: dict[str, Any] = {}
        if class_names is not None and tuple(class_names) != tuple(info.class_names):
            changes["class_names"] = tuple(str(n) for n in class_names)
        if default_layer is not None and default_layer != info.target_layer:
            changes["target_layer"] = default_layer
        if name is not None and name != info.name:
            changes["name"] = name
        shape = input_shape
        if shape is None and info.input is None and getattr(network, "input_size", None):
            config = getattr(network, "config", None) or {}
            channels = getattr(network, "in_channels", None) or config.get("in_channels", 1)
            shape = (int(channels), *network.input_size)
        if shape is not None:
            shape = tuple(int(n) for n in shape)
            changes["input"] = InputSpec(len(shape) - 1, shape[0], shape[1:], modality="image")
        if changes:
            info = dataclasses.replace(info, **changes)
        return cls(
            source="network", name=info.name, network=network, info=info,
            output_selector=output_selector,
        )  # fmt: skip

    @classmethod
    def of(cls, network: nn.Module, info: ModelInfo | None = None) -> ModelHandle:
        """The handle ``network`` was loaded through (so its cached verdicts are reused),
        or a new one from ``info`` / the network's attributes."""
        known = _BY_NETWORK.get(network)
        if known is not None and (info is None or info is known._loaded or info is known._card):
            return known
        return cls.from_network(network, info=info)


# An nnU-Net handle is a ModelHandle to its users (isinstance, and resolve returns it as is)
# without inheriting how ModelHandles are created: both derive from HandleBase.
ModelHandle.register(NnunetHandle)


def _is_module(obj: Any) -> bool:
    """True for a torch ``nn.Module``; never imports torch itself (a network can only
    exist once torch is loaded), so resolving names stays fast."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
