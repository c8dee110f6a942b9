"""What every model handle knows and does, whatever made it: the card, loading, the checks
of findings and layers, and the audit (see :mod:`hirescam3d.models.handle`).

:class:`HandleBase` is the common base of :class:`hirescam3d.models.handle.ModelHandle`
(zoo names, bundle folders, given networks) and
:class:`hirescam3d.models.nnunet_handle.NnunetHandle` (nnU-Net folders); which one a
model gets is decided by :meth:`hirescam3d.models.handle.ModelHandle.resolve`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hirescam3d.errors import LayerError, ModelError, ModelOutputError, TargetError
from hirescam3d.models.bundle_read import (
    load_bundle,
    read_class_names,
    read_info,
    read_network_def,
)
from hirescam3d.models.model_info import InputSpec, ModelInfo
from hirescam3d.models.zoo_entries import TRAINING_COMMANDS, ZooEntry

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

    from hirescam3d.core.audit import Verdict

# Architectures whose HiResCAM verdict does not depend on the length of the first spatial
# axis, and the length the audit uses instead of the model's full input. AxialNet runs its
# trunk on each triplet of slices separately and its head is a per-triplet linear layer
# averaged over triplets, so 6 slices (2 triplets, so that the average is exercised) give
# the verdict of 405: the audit of the full ``axialnet`` then costs two triplets of
# 420 x 420 instead of 135.
AUDIT_AXIS0 = {"hirescam3d.models.nets.axialnet.AxialNet": 6}


# -- finding names ------------------------------------------------------------------------
def finding_key(name: str) -> str:
    """How finding names compare: case-insensitive, runs of spaces read as one underscore.

    ``"Pleural Effusion"`` -> ``"pleural_effusion"``.
    """
    return re.sub(r"\s+", "_", str(name).strip()).lower()


def match_findings(findings: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """``findings`` as the model spells them, in order, duplicates removed.

    Names match case-insensitively with spaces read as underscores (an exact match wins
    where two class names differ only in case). TargetError names every unknown finding,
    close matches and the valid findings.
    """
    names = [str(c) for c in class_names]
    by_key: dict[str, str] = {}
    for name in names:
        by_key.setdefault(finding_key(name), name)
    matched: list[str] = []
    unknown: list[str] = []
    for finding in findings:
        text = str(finding)
        canonical = text if text in names else by_key.get(finding_key(text))
        if canonical is None:
            unknown.append(text)
        else:
            matched.append(canonical)
    if unknown:
        unknown = list(dict.fromkeys(unknown))
        hints = []
        for text in unknown:
            close = difflib.get_close_matches(finding_key(text), list(by_key), n=3, cutoff=0.6)
            close = [by_key[c] for c in close]
            if close and len(unknown) == 1:
                hints.append(", ".join(map(repr, close)))
            elif close:
                hints.append(f"{close[0]!r} for {text!r}")
        hint = f" Did you mean {', '.join(hints)}?" if hints else ""
        plural = "s" if len(unknown) > 1 else ""
        raise TargetError(
            f"unknown finding{plural} {', '.join(map(repr, unknown))}.{hint} "
            f"Valid findings: {', '.join(names)}"
        )
    return list(dict.fromkeys(matched))


# Handles of loaded networks, so that (network, info) pairs find the handle they came from.
_BY_NETWORK: weakref.WeakKeyDictionary[Any, HandleBase] = weakref.WeakKeyDictionary()


class HandleBase:
    """A model's card, network and verdicts; create handles with
    :meth:`hirescam3d.models.handle.ModelHandle.resolve` (see its class)."""

    def __init__(
        self,
        *,
        source: str,
        name: str,
        entry: ZooEntry | None = None,
        bundle: Path | None = None,
        network: nn.Module | None = None,
        info: ModelInfo | None = None,
        output_selector: Callable[[object], torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        self.source = source  # "zoo", "bundle" or "network"
        self._name = name
        self._entry = entry
        self._bundle = bundle
        self._card = info  # the record: zoo card, bundle metadata (read lazily) or given
        self._network = network
        self._loaded: ModelInfo | None = None  # what load() returned
        self.output_selector = output_selector
        self.seed = seed
        self._verdicts: dict[str, Verdict] = {}
        self._layers: list[Verdict] | None = None
        self._lock = threading.RLock()
        self.bundle_options: dict[str, Any] = {}  # MONAI bundles: config, trust, overrides
        if network is not None:
            _BY_NETWORK[network] = self

    def __repr__(self) -> str:
        where = f", bundle={str(self._bundle)!r}" if self._bundle is not None else ""
        return f"ModelHandle({self._name!r}, source={self.source!r}{where})"

    # -- what is known without weights ----------------------------------------------------
    @property
    def name(self) -> str:
        """The zoo name, the name a bundle records, or the given network's name."""
        if self.source == "zoo":
            return self._name
        return self.info.name

    @property
    def info(self) -> ModelInfo:
        """The model's card (zoo entry or bundle metadata), without loading weights.

        A copy: changing it changes nothing here. After :meth:`load`, prefer the loaded
        ``ModelInfo`` (actual weights checksum, computed guarantee).
        """
        with self._lock:
            if self._card is None:
                if self._entry is not None:
                    self._card = self._entry.info
                else:
                    self._card = read_info(self._bundle, **self.bundle_options)
            card = self._card
        card = dataclasses.replace(card, preprocessing=list(card.preprocessing))
        if self.source == "zoo":
            card.name = self._name
        return card

    @property
    def description(self) -> str:
        return self.info.description

    @property
    def class_names(self) -> tuple[str, ...]:
        """The findings / classes, one logit each (a bundle's metadata only: a bundle whose
        other configs are broken still lists them)."""
        if self.source == "bundle" and self._card is None:
            return read_class_names(self._bundle)
        return tuple(self.info.class_names)

    @property
    def input(self) -> InputSpec:
        """What the network expects after preprocessing (:class:`InputSpec`)."""
        spec = self.info.input
        if spec is None:
            raise ModelError(
                f"{self.name}: the input shape is unknown; pass input_shape=(C, *spatial) "
                "to ModelHandle.from_network"
            )
        return spec

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of one input, as the model's preprocessing produces it."""
        spec = self.input
        return (spec.in_channels, *spec.spatial_size)

    @property
    def audit_input_shape(self) -> tuple[int, ...]:
        """The ``(C, *spatial)`` input the audit runs on.

        The model's :attr:`input_shape`, except for architectures whose verdict does not
        depend on the length of the first spatial axis (:data:`AUDIT_AXIS0`: AxialNet,
        whose trunk runs per slice triplet): there the axis is cut to a few slices, so
        auditing the full ``axialnet`` (405 x 420 x 420) runs 6 x 420 x 420.
        """
        shape = self.input_shape
        short = AUDIT_AXIS0.get(self.architecture or "")
        if short is not None and len(shape) > 1 and shape[1] > short:
            return (shape[0], short, *shape[2:])
        return shape

    @property
    def preprocessing(self) -> list[dict[str, Any]]:
        """MONAI dictionary-transform specs that produce the input."""
        return list(self.info.preprocessing)

    @property
    def task(self) -> str:
        """``multilabel`` (sigmoid per class) or ``multiclass`` (softmax)."""
        return self.info.task

    @property
    def activation(self) -> str:
        """``"sigmoid"`` or ``"softmax"``: what to pass as ``Explainer(task=...)``."""
        return self.info.activation

    @property
    def kind(self) -> str:
        """``"classification"`` (logits ``(B, C)``) or ``"segmentation"`` (``(B, C, *S)``)."""
        return self.info.kind

    @property
    def notes(self) -> tuple[str, ...]:
        """Things a front end should tell the user about this model (after :meth:`load`,
        also how its default layer was chosen when no layer has a guarantee)."""
        card = self._loaded if self._loaded is not None else self.info
        return tuple(card.notes)

    @property
    def default_layer(self) -> str:
        """The layer explained when none is chosen.

        A MONAI bundle (or a given network) that records none has it chosen by the audit
        (:func:`choose_default_layer`), which loads the network on first use.
        """
        layer = self.info.target_layer
        if not layer and (self._bundle is not None or self._network is not None):
            layer = self.load()[1].target_layer
        return layer

    @property
    def trained(self) -> bool | None:
        """Whether the model has trained weights: for zoo entries, whether measured trained
        weights ship; None for a user's bundle or network (its training cannot be known)."""
        if self.source != "zoo":
            return None
        return bool(self.info.trained)

    @property
    def installed(self) -> bool:
        """False for a zoo entry whose bundle folder is missing (it cannot be loaded)."""
        return self._bundle is None or self._bundle.is_dir()

    @property
    def bundle_path(self) -> Path | None:
        """The bundle folder weights are read from (None: built, or a given network)."""
        return self._bundle

    @property
    def declared_guaranteed(self) -> bool | None:
        """The cached HiResCAM verdict at the default layer, as the zoo or bundle records it
        (not computed; None for a given network). :meth:`load` checks a bundle's."""
        if self.source == "network":
            return None
        return bool(self.info.guaranteed)

    @property
    def architecture(self) -> str | None:
        """The network's allow-listed ``_target_`` (read from configs, nothing built)."""
        if self._entry is not None:
            return self._entry.architecture
        if self._network is not None:
            from hirescam3d.models.nets import target_string

            return target_string(type(self._network))
        if self._bundle is not None:
            try:
                return read_network_def(self._bundle, **self.bundle_options)[0]
            except ModelError:
                return None
        return None

    # -- loading --------------------------------------------------------------------------
    def build(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised network of this model's architecture (no weights read;
        seeded, the global RNG state is left as it was), in training mode."""
        import torch

        from hirescam3d.models.nets import build_network

        if self._entry is not None:
            target, kwargs, source = (
                self._entry.architecture,
                self._entry.kwargs,
                f"zoo entry {self._name}",
            )
        elif self._bundle is not None:
            target, kwargs = read_network_def(self._bundle, **self.bundle_options)
            source = f"{self._bundle / 'configs'} network_def"
        else:
            raise ModelError(f"{self.name}: a given network cannot be rebuilt")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed if seed is None else seed)
            return build_network(target, dict(kwargs), source)

    def load(self) -> tuple[nn.Module, ModelInfo]:
        """``(network in eval mode, ModelInfo)``, loaded once and cached.

        Zoo entries without weights are built (seeded by the handle's ``seed``);
        bundle folders and ``demo`` read their weights (``weights_only=True``). A bundle
        whose metadata declares a HiResCAM guarantee the audit does not confirm at its
        default layer (or denies one the audit finds) is refused with ModelError naming
        the bundle. For a given network, ``info.guaranteed`` is computed.
        """
        with self._lock:
            if self._network is not None and self._loaded is not None:
                return self._network, self._loaded
            if self.source == "network":
                info = self.info
                if not info.target_layer and info.input is not None:
                    self._adopt_default_layer(self._network, info)
                    self._card = dataclasses.replace(info)
                else:
                    info.guaranteed = self._computed_default_guarantee()
                self._loaded = info
                return self._network, info
            if self._bundle is None:
                network = self.build()
                network.eval()
                info = self.info
                info.trained = False
                info.bundle_path = None
                self._remember(network, info)
                return network, info
            if not self._bundle.is_dir():
                raise ModelError(
                    f"the {self._name} bundle is not installed at {self._bundle}; build it "
                    f"with `{TRAINING_COMMANDS.get(self._name, 'its training script')}`"
                )
            network, info = load_bundle(self._bundle, **self.bundle_options)
            if self.source != "zoo":
                info.trained = None  # a user's bundle: its training cannot be known
            if self.source == "zoo":
                expected = self.info
                if info.class_names != expected.class_names:
                    raise ModelError(
                        f"{self._bundle}: class names {', '.join(info.class_names)} differ from "
                        f"the zoo entry {self._name!r}: {', '.join(expected.class_names)}"
                    )
                info.name = self._name
            chosen = not info.target_layer  # a MONAI bundle: the audit chooses the layer
            self._network, self._loaded = network, info
            try:
                if chosen:
                    self._adopt_default_layer(network, info)
                else:
                    self._check_declared(info)
            except BaseException:
                self._network = self._loaded = None
                self._verdicts.clear()
                raise
            if self.source != "zoo" or chosen:
                self._card = dataclasses.replace(info)
            self._remember(network, info)
            return network, info

    def _adopt_default_layer(self, network: nn.Module, info: ModelInfo) -> None:
        """Choose ``info``'s default layer with the audit and record it in ``info``
        (``target_layer``, ``guaranteed``, ``kind``, ``notes``); the verdict is cached."""
        where = self._bundle if self._bundle is not None else self.name
        choice = choose_default_layer(
            network, self.audit_input_shape, self.output_selector, source=str(where)
        )
        _check_output(choice.output_shape, info, where)
        verdict = choice.verdict
        self._verdicts[verdict.layer] = verdict
        info.target_layer = verdict.layer
        info.guaranteed = verdict.guaranteed
        info.kind = "segmentation" if len(choice.output_shape) > 2 else "classification"
        if choice.note:
            info.notes = (*info.notes, choice.note)

    def _remember(self, network: nn.Module, info: ModelInfo) -> None:
        self._network, self._loaded = network, info
        _BY_NETWORK[network] = self

    def _check_declared(self, info: ModelInfo) -> None:
        """ModelError naming the bundle if its cached ``guaranteed`` flag is not the audit's."""
        layer = info.target_layer
        try:
            verdict = self.audit(layer)
        except LayerError as err:
            raise ModelError(
                f"{self._bundle}: its default layer {layer!r} cannot be explained: {err}"
            ) from err
        if verdict.guaranteed != bool(info.guaranteed):
            declared = "guaranteed faithful" if info.guaranteed else "not guaranteed"
            raise ModelError(
                f"{self._bundle}: refused: its metadata declares HiResCAM {declared} at "
                f"{layer!r}, but the audit finds otherwise ({verdict.text()}; {verdict.reason}); "
                "the bundle's 'guaranteed' flag is wrong"
            )

    def _computed_default_guarantee(self) -> bool:
        layer = self.info.target_layer
        if not layer or self.info.input is None:
            return False
        try:
            return self.audit(layer).guaranteed
        except LayerError:
            return False

    @property
    def network(self) -> nn.Module:
        """The loaded network (loads on first use)."""
        return self.load()[0]

    @property
    def loaded(self) -> bool:
        """Whether a network is at hand (loaded, or given)."""
        return self._network is not None

    # -- checks ---------------------------------------------------------------------------
    def check_findings(self, findings: Sequence[str]) -> list[str]:
        """The findings as the model spells them (see :func:`match_findings`); no weights
        read. TargetError for unknown names, listing the valid ones and close matches."""
        return match_findings(findings, self.class_names)

    def check_layer(self, layer: str | None = None) -> str:
        """The layer to explain: ``layer`` or the default one, checked against the network.

        LayerError (listing the candidate layers) for a name that is not a layer of the
        network, or one that explain cannot use for this model's input. Loads the network
        and computes the layer's verdict (cached, so the explanation reuses it).
        """
        if layer is None:
            return self.default_layer
        network = self.network
        modules = dict(network.named_modules())
        if layer not in modules:
            verdicts = self.layers()
            # the audit's certified layers (and their aliases) first, then the others
            certified = [n for v in verdicts if v.guaranteed for n in (v.layer, *v.aliases)]
            others = [v.layer for v in verdicts if not v.guaranteed]
            close = difflib.get_close_matches(layer, certified, n=3, cutoff=0.4)
            rest = [m for m in (others if verdicts else list(modules)) if m not in close]
            close += difflib.get_close_matches(layer, rest, n=3 - len(close))
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            shown = [*certified, *others][: max(10, len(certified))]
            more = len(certified) + len(others) - len(shown)
            listed = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
            good = (
                f"; HiResCAM is guaranteed at {', '.join(certified)}" if certified else ""
            )
            raise LayerError(
                f"unknown layer {layer!r}.{hint} Candidate layers of {self.name}: {listed}"
                f"{good} (see 'hirescam3d layers --model ...')"
            )
        self.audit(layer)
        return layer

    # -- the audit ------------------------------------------------------------------------
    def audit(self, layer: str | None = None) -> Verdict:
        """Whether HiResCAM is guaranteed faithful at ``layer`` (default: the model's
        default layer), computed by :func:`hirescam3d.core.audit.audit_layer` on
        :attr:`audit_input_shape` and cached. LayerError if explain cannot use the layer."""
        from hirescam3d.core.audit import audit_layer

        layer = layer or self.default_layer
        with self._lock:
            if layer in self._verdicts:
                return self._verdicts[layer]
            network = self._network if self._network is not None else self.network
            verdict = audit_layer(
                network, layer, self.audit_input_shape, self.output_selector, seed=0
            )
            verdict = dataclasses.replace(verdict, default=layer == self.default_layer)
            self._verdicts[layer] = verdict
            return verdict

    def layers(self) -> list[Verdict]:
        """Every layer explain accepts for this model's input, in execution order, each with
        its verdict; the default layer has ``default=True``. Computed once per handle by
        :func:`hirescam3d.core.audit.audit_model`."""
        from hirescam3d.core.audit import audit_model

        with self._lock:
            if self._layers is None:
                network = self.network
                verdicts = audit_model(
                    network, self.audit_input_shape, default_layer=self.default_layer,
                    output_selector=self.output_selector, seed=0,
                )  # fmt: skip
                self._layers = list(verdicts)
                for verdict in verdicts:
                    self._verdicts.setdefault(verdict.layer, verdict)
            return list(self._layers)

    def guaranteed(self, layer: str | None = None) -> bool | None:
        """The computed verdict at ``layer`` as a bool; None if explain cannot use it."""
        try:
            return self.audit(layer).guaranteed
        except LayerError:
            return None


def output_selector_of(network: nn.Module) -> Callable[[object], torch.Tensor] | None:
    """The ``output_selector`` of the handle ``network`` was loaded through (None if none):
    how the pipeline picks the logits of a tuple- or dict-output network."""
    known = _BY_NETWORK.get(network)
    return None if known is None else known.output_selector


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """What :func:`choose_default_layer` chose: the layer's ``verdict`` (``default=True``),
    a ``note`` when no layer has a guarantee, and the network's ``output_shape`` for the
    probe input."""

    verdict: Verdict
    note: str | None
    output_shape: tuple[int, ...]


def _output_modules(
    network: nn.Module,
    x: torch.Tensor,
    output_shape: tuple[int, ...],
    output_selector: Callable[[object], torch.Tensor] | None,
) -> set[str]:
    """Names of the modules whose output is the network's output itself."""
    import torch

    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and tuple(output.shape) == output_shape:
                outputs[name] = output

        return hook

    from hirescam3d.core.capture import model_state_restored

    handles = [m.register_forward_hook(keep(n)) for n, m in network.named_modules() if n]
    try:
        with model_state_restored(network), torch.no_grad():
            out = network(x)
    finally:
        for handle in handles:
            handle.remove()
    final = output_selector(out) if output_selector is not None else out
    return {name for name, t in outputs.items() if t is final}


def _refuse_several_outputs(network: nn.Module, x: torch.Tensor, source: str) -> None:
    """ModelOutputError saying what ``network`` returns when it is not one tensor."""
    import torch

    from hirescam3d.core.capture import model_state_restored

    with model_state_restored(network), torch.no_grad():
        out = network(x)
    if isinstance(out, dict):
        what, pick = f"a dict with keys {', '.join(map(repr, out))}", "KEY"
    else:
        what, pick = f"a {type(out).__name__} of {len(out)}", "INDEX"  # type: ignore[arg-type]
    raise ModelOutputError(
        f"{source}: the network returns {what}, not one tensor of logits; pick the logits "
        f"with --output {pick} (output_selector= in Python)"
    )


def _has_conv(module: nn.Module) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def choose_default_layer(
    network: nn.Module,
    input_shape: Sequence[int],
    output_selector: Callable[[object], torch.Tensor] | None = None,
    source: str = "model",
) -> LayerChoice:
    """The default layer of a network that records none, chosen with the audit.

    Candidates are the layers explain accepts for ``input_shape`` ``(C, *spatial)`` and
    all of the input's influence passes through, with a map of more than one cell, other
    than the output module (e.g. a UNet's last convolution). Modules sharing one output
    tensor count once, under the outermost one after which no nonlinear operation runs
    (so an in-place activation is not named by the module it overwrites). The choice is
    the deepest candidate where HiResCAM is guaranteed faithful (structurally and
    numerically, :mod:`hirescam3d.core.audit`); if none is, the deepest candidate that is or
    holds a convolution, with a note saying that HiResCAM is not guaranteed there.
    One trace of the network. ModelError naming ``source`` if there is no candidate.
    """
    from hirescam3d.core.audit import _candidates, _verdict, probe_input
    from hirescam3d.core.trace import trace

    x = probe_input(network, input_shape, 0)
    tr = trace(network, x, output_selector)
    if tr.output_shape is None:
        _refuse_several_outputs(network, x, source)
    output_shape = tuple(tr.output_shape)
    final = _output_modules(network, x, output_shape, output_selector)
    modules = dict(network.named_modules())
    groups = []
    for group in _candidates(tr).values():
        cells = 1
        for n in (group[0].shape or ())[2:]:
            cells *= int(n)
        if cells > 1 and not final & {r.name for r in group}:
            groups.append(group)
    if not groups:
        raise ModelError(
            f"{source}: no layer of the network can be explained for an input of shape "
            f"{tuple(input_shape)}: none outputs a (F, *spatial) map of more than one cell "
            "that all of the input passes through"
        )

    def pick(group: list, prefer: Callable[[Any], bool]) -> Any:
        preferred = [r for r in group if prefer(r)] or group
        return min(preferred, key=lambda r: (r.name.count("."), r.index))

    def verdict_of(rec: Any, group: list) -> Verdict:
        aliases = [r.name for r in group if r.name != rec.name]
        return _verdict(network, rec, tr, x, output_selector, 0, aliases=aliases, default=True)

    for group in reversed(groups):
        linear = [r for r in group if r.first_nonlinear is None]
        if not linear:
            continue
        verdict = verdict_of(pick(linear, lambda r: True), group)
        if verdict.guaranteed:
            return LayerChoice(verdict, None, output_shape)
    convs = [g for g in groups if any(_has_conv(modules[r.name]) for r in g)]
    group = (convs or groups)[-1]
    rec = pick(group, lambda r: isinstance(modules[r.name], _conv_types()))
    verdict = verdict_of(rec, group)
    what = "the last convolutional layer" if convs else "the deepest layer explain can use"
    note = (
        f"no layer of this network has a HiResCAM guarantee; the default layer is {what}, "
        f"{verdict.layer!r}, where HiResCAM is not guaranteed faithful ({verdict.reason})"
    )
    return LayerChoice(verdict, note, output_shape)


def _conv_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.modules.conv._ConvNd,)


def _check_output(output_shape: tuple[int, ...], info: ModelInfo, where: Any) -> None:
    """ModelError if the network's output does not match the recorded classes or kind."""
    segmentation = len(output_shape) > 2
    channels = output_shape[1] if len(output_shape) > 1 else 1
    if channels != len(info.class_names):
        raise ModelError(
            f"{where}: the metadata names {len(info.class_names)} classes "
            f"({', '.join(info.class_names)}) but the network outputs {channels} channels "
            f"(output shape {output_shape})"
        )
    if info.bundle_format == "monai" and segmentation != info.segmentation:
        actual = "segmentation" if segmentation else "classification"
        raise ModelError(
            f"{where}: the metadata describes a {info.kind} output, but the network's output "
            f"{output_shape} is a {actual} output: fix network_data_format.outputs.pred "
            "('type': 'image' and 'format': 'segmentation' for segmentation)"
        )
