"""What a published MONAI bundle says about explaining: its network, preprocessing,
inferer and postprocessing, resolved from its config (:mod:`hirescam3d.models.bundle_config`).

Only four entries are read: ``network_def``, ``preprocessing``, ``inferer`` and
``postprocessing`` (of which only ``Activationsd``/``AsDiscreted`` are resolved; e.g.
``SaveImaged``'s paths are never evaluated). Transforms are specs (plain dicts) until the
pipeline builds them with :func:`build_transform`: any MONAI dictionary transform
(a ``monai.transforms`` ``MapTransform``), or with trust any importable class.

Inferers: ``SimpleInferer`` (one pass) and ``SlidingWindowInferer`` (its ``roi_size``,
``overlap``, ``mode``, ``sw_batch_size``, ``sigma_scale``, ``padding_mode`` and ``cval``
become the sliding-window explanation). ``SliceInferer`` (a 2D network over a 3D volume)
is checked by :func:`hirescam3d.core.slices.check_slice_inferer` and explained slice by slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hirescam3d.errors import ModelError
from hirescam3d.models.bundle_config import (
    BundleConfig,
    config_path,
    load_file,
    trusted_get,
    trusted_parser,
)

SLIDING_KEYS = ("roi_size", "overlap", "mode", "sw_batch_size", "sigma_scale", "padding_mode",
                "cval")  # fmt: skip
POSTPROCESSING_READ = ("Activationsd", "AsDiscreted", "Activations", "AsDiscrete")
_WHOLE_REF = re.compile(r"^\$?\s*@([\w:#]+)\s*$")


@dataclass
class ResolvedConfig:
    """The entries of a bundle config that explaining uses, resolved.

    ``network_def``: ``{"_target_": ..., **kwargs}``; ``preprocessing`` and
    ``postprocessing``: lists of transform specs; ``inferer``: a spec or None.
    """

    source: Path
    network_def: dict[str, Any]
    preprocessing: list[dict[str, Any]]
    inferer: dict[str, Any] | None
    postprocessing: list[dict[str, Any]]
    trusted: bool = False

    def as_inference(self) -> dict[str, Any]:
        """The resolved entries in ``inference.json``'s shape."""
        return {
            "network_def": self.network_def,
            "preprocessing": self.preprocessing,
            "inferer": self.inferer,
            "postprocessing": self.postprocessing,
        }


def short_name(target: Any) -> str:
    """``"monai.transforms.Spacingd"`` -> ``"Spacingd"``."""
    return str(target).rpartition(".")[2]


def _transforms_of(node: Any, where: str) -> Any:
    if isinstance(node, dict) and short_name(node.get("_target_")) == "Compose":
        return node.get("transforms", []), f"{where}::transforms"
    return node, where


def _raw_list(cfg: BundleConfig, node: Any, where: str) -> tuple[list[Any], str]:
    """The raw transform list of a Compose or list entry (following whole references)."""
    for _ in range(20):
        if isinstance(node, str) and _WHOLE_REF.match(node):
            ref = _WHOLE_REF.match(node).group(1)
            node, where = cfg.raw(ref), ref
            continue
        new, new_where = _transforms_of(node, where)
        if new is node:
            break
        node, where = new, new_where
    if not isinstance(node, list):
        raise ModelError(f"{cfg.source}: {where} must be a Compose of transforms or a list")
    return node, where


def resolve(
    root: Path,
    config: str | None = None,
    trust: bool = False,
    overrides: dict[str, Any] | None = None,
) -> ResolvedConfig:
    """Resolve a bundle's explaining entries (see the module docstring); ModelError naming
    the config file for a missing ``network_def``, a bad reference or expression."""
    if trust:
        path = config_path(root, config)
        load_file(path, root, trust=True)  # one-line errors for missing or malformed files
        parser = trusted_parser(path, root, overrides)
        if "network_def" not in parser:
            raise _no_network(path)

        def get(key: str) -> Any:
            return trusted_get(parser, key, path) if key in parser else None

        pre = get("preprocessing")
        post = get("postprocessing")
        return ResolvedConfig(
            path, get("network_def"), _specs(pre, path, "preprocessing"), get("inferer"),
            _specs(post, path, "postprocessing"), trusted=True,
        )  # fmt: skip
    cfg = BundleConfig.read(root, config, overrides)
    if not cfg.has("network_def"):
        raise _no_network(cfg.source)
    network_def = cfg.get("network_def")
    pre: list[dict[str, Any]] = []
    if cfg.has("preprocessing"):
        items, where = _raw_list(cfg, cfg.raw("preprocessing"), "preprocessing")
        pre = [cfg._resolve(t, f"{where}::{i}") for i, t in enumerate(items)]
        pre = [t for t in pre if isinstance(t, dict)]
    post: list[dict[str, Any]] = []
    if cfg.has("postprocessing"):
        items, where = _raw_list(cfg, cfg.raw("postprocessing"), "postprocessing")
        for i, item in enumerate(items):
            if isinstance(item, str) and _WHOLE_REF.match(item):
                item = cfg.raw(_WHOLE_REF.match(item).group(1))
            if isinstance(item, dict) and short_name(item.get("_target_")) in POSTPROCESSING_READ:
                spec = cfg._resolve(item, f"{where}::{i}")
                if isinstance(spec, dict):
                    post.append(spec)
            elif isinstance(item, dict) and short_name(item.get("_target_")) == "Invertd":
                post.append(_invertd_spec(cfg, item, f"{where}::{i}"))
            elif isinstance(item, dict):
                post.append({"_target_": item.get("_target_")})  # named, never evaluated
    inferer = cfg.get("inferer") if cfg.has("inferer") else None
    return ResolvedConfig(cfg.source, network_def, pre, inferer, post)


def _invertd_spec(cfg: BundleConfig, item: dict[str, Any], where: str) -> dict[str, Any]:
    """An ``Invertd`` entry with only ``nearest_interp`` resolved (what putting the
    prediction back on the scan's grid needs; its ``transform`` and keys are not read)."""
    spec = {"_target_": item.get("_target_")}
    if "nearest_interp" in item:
        spec["nearest_interp"] = cfg._resolve(item["nearest_interp"], f"{where}::nearest_interp")
    return spec


def scan_postprocessing(post: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps of a bundle's postprocessing that make its prediction on the scan's grid,
    in the bundle's order: ``{"step": "activation", "kind": "softmax" | "sigmoid"}``,
    ``{"step": "invert", "nearest_interp": bool}`` (``Invertd``; MONAI's default True) and
    ``{"step": "discrete", "argmax": bool, "threshold": float | None}``; [] when the
    bundle does not invert its prediction (it stays on the model's grid)."""
    steps: list[dict[str, Any]] = []
    for spec in post:
        name = short_name(spec.get("_target_"))
        if name in ("Activationsd", "Activations"):
            kind = ("softmax" if spec.get("softmax") is True
                    else "sigmoid" if spec.get("sigmoid") is True else None)  # fmt: skip
            if kind:
                steps.append({"step": "activation", "kind": kind})
        elif name == "Invertd":
            steps.append({"step": "invert", "nearest_interp": spec.get("nearest_interp", True)
                          is not False})  # fmt: skip
        elif name in ("AsDiscreted", "AsDiscrete"):
            cut = spec.get("threshold")
            steps.append({"step": "discrete", "argmax": spec.get("argmax") is True,
                          "threshold": None if cut is None else float(cut)})  # fmt: skip
    return steps if any(s["step"] == "invert" for s in steps) else []


def _no_network(path: Path) -> ModelError:
    return ModelError(
        f"{path}: no network_def: the config must define the network as network_def "
        '(e.g. {"_target_": "UNet", ...}); see docs "Model zoo and bundles"'
    )


def _specs(node: Any, path: Path, where: str) -> list[dict[str, Any]]:
    if node is None:
        return []
    node, where = _transforms_of(node, where)
    if not isinstance(node, list):
        raise ModelError(f"{path}: {where} must be a Compose of transforms or a list")
    return [t for t in node if isinstance(t, dict)]


# -- transforms ---------------------------------------------------------------------------
def dictionary_transform(name: Any) -> type | None:
    """The ``monai.transforms`` dictionary transform class ``name`` names (``"Spacingd"``
    or ``"monai.transforms.Spacingd"``), or None."""
    import monai.transforms as mt

    if not isinstance(name, str):
        return None
    short = name.removeprefix("monai.transforms.")
    if "." in short or short.startswith("_"):
        return None
    cls = getattr(mt, short, None)
    if isinstance(cls, type) and issubclass(cls, mt.MapTransform):
        return cls
    return None


def build_transform(name: str, kwargs: dict[str, Any], trusted: bool = False) -> Any:
    """A preprocessing transform from its spec: a MONAI dictionary transform, or (trusted)
    any class MONAI's own locator finds. ModelError for anything else."""
    cls = dictionary_transform(name)
    if cls is None and trusted:
        from monai.bundle.config_item import ConfigComponent

        return ConfigComponent({"_target_": name, **kwargs}).instantiate()
    if cls is None:
        raise ModelError(
            f"preprocessing transform {name!r} is not a MONAI dictionary transform; "
            "pass --trust-bundle to build it"
        )
    try:
        return cls(**kwargs)
    except Exception as err:  # constructors raise TypeError, ValueError...
        raise ModelError(
            f"preprocessing transform {name} cannot be built with {kwargs}: "
            f"{' '.join(str(err).split())[:200]}"
        ) from err


# -- inferer ------------------------------------------------------------------------------
def inferer_spec(spec: Any, source: Path) -> dict[str, Any] | None:
    """The bundle's inferer as ``{"kind": "simple"}``, ``{"kind": "sliding", roi_size,
    overlap, mode, sw_batch_size, ...}`` or ``{"kind": "slice", ...}``; None when the
    config has none. ModelError (one line) for any other inferer."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ModelError(f"{source}: inferer must be an object with a '_target_'")
    name = short_name(spec["_target_"])
    args = {k: v for k, v in spec.items() if k != "_target_"}
    if name == "SimpleInferer":
        return {"kind": "simple"}
    if name == "SlidingWindowInferer":
        from monai.inferers import SlidingWindowInferer

        try:  # MONAI's own defaults and checks
            inf = SlidingWindowInferer(**{k: v for k, v in args.items() if k in SLIDING_KEYS})
        except Exception as err:
            raise ModelError(f"{source}: inferer SlidingWindowInferer: {err}") from err
        roi = inf.roi_size if isinstance(inf.roi_size, (list, tuple)) else [inf.roi_size]
        return {
            "kind": "sliding",
            "roi_size": [int(n) for n in roi],
            "overlap": float(inf.overlap) if not isinstance(inf.overlap, (list, tuple))
            else [float(o) for o in inf.overlap],
            "mode": str(getattr(inf.mode, "value", inf.mode)),
            "sw_batch_size": int(inf.sw_batch_size),
            "sigma_scale": inf.sigma_scale,
            "padding_mode": str(getattr(inf.padding_mode, "value", inf.padding_mode)),
            "cval": float(inf.cval),
        }  # fmt: skip
    if name == "SliceInferer":
        from hirescam3d.core.slices import check_slice_inferer

        found = {"kind": "slice", **{k: v for k, v in args.items() if k != "device"}}
        try:
            check_slice_inferer(found)
        except ModelError as err:
            raise ModelError(f"{source}: {err}") from err
        return found
    raise ModelError(
        f"{source}: inferer {spec['_target_']!r} is not supported: hirescam3d explains "
        "bundles whose inferer is SimpleInferer, SlidingWindowInferer or SliceInferer"
    )


def activation_of(post: list[dict[str, Any]]) -> tuple[str | None, bool]:
    """``("softmax" | "sigmoid" | None, argmax)`` from ``Activationsd``/``AsDiscreted``."""
    act, argmax = None, False
    for spec in post:
        name = short_name(spec.get("_target_"))
        if name in ("Activationsd", "Activations"):
            if spec.get("softmax") is True:
                act = "softmax"
            elif spec.get("sigmoid") is True:
                act = "sigmoid"
        if name in ("AsDiscreted", "AsDiscrete") and spec.get("argmax") is True:
            argmax = True
    return act, argmax
