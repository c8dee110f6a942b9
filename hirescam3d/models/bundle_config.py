"""Read a MONAI bundle config as MONAI writes it, without running its code.

A bundle config (``configs/inference.json``, ``.yaml`` or ``.yml``) is a tree of
literals, ``@id`` references (nested ids joined by ``::`` or the older ``#``),
``%file#id`` macros (raw config text from another file of the bundle, or ``%#id`` from
the same one) and ``$`` Python expressions. :class:`BundleConfig` resolves only the
entries it is asked for (:meth:`BundleConfig.get`), so entries that explaining does
not need (datalist, dataset, dataloader, handlers, evaluator...) are never looked at.

``$`` expressions are evaluated by walking Python's ``ast`` (:func:`evaluate`), never
with ``eval``: literals, arithmetic, comparisons, ``x if c else y``, subscripts,
references, attribute access inside the modules ``monai``, ``numpy`` (``np``) and
``torch``, and calls of :data:`SAFE_CALLS`. No imports, no ``__`` or ``_private`` names,
no lambdas or comprehensions. Anything else raises one :class:`~hirescam3d.errors.ModelError`
line naming the config entry and the expression, and saying ``--trust-bundle``.

Components (objects with ``_target_``) are returned as plain dicts with resolved
arguments (``{"_target_": "Spacingd", "keys": "image", ...}``): building them is the
caller's job, from allow-lists. ``"_disabled_": true`` components are left out of lists.

With ``trust=True`` the config goes to MONAI's own :class:`monai.bundle.ConfigParser`
(:func:`trusted_parser`), which runs any expression: the same trust as
``python -m monai.bundle run``.

Files: every config and macro file must lie inside the bundle folder (symlinks are
followed and the target checked) unless trusted.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hirescam3d.errors import ModelError

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
TRUST_WARNING = (
    "--trust-bundle: the bundle's config is run by MONAI's ConfigParser, which executes its "
    "'$' expressions and imports its _target_ classes: the same trust as "
    "`python -m monai.bundle run` (weights still load as tensors only)"
)
SAFE_MODULES = ("monai", "numpy", "torch")
_REF = re.compile(r"@([\w:#]+)")
_MAX_SIZE = 1_000_000  # longest string / list an expression may build


class _Disabled:
    """Marker for a ``"_disabled_": true`` component (dropped from lists)."""


DISABLED = _Disabled()


def _module_names() -> dict[str, Any]:
    import monai
    import numpy
    import torch

    return {"monai": monai, "numpy": numpy, "np": numpy, "torch": torch}


def _safe_calls() -> set[Any]:
    import torch

    return {
        len, list, tuple, dict, int, float, str, bool, min, max, abs, round, sum, sorted, range,
        torch.device, torch.cuda.is_available,
    }  # fmt: skip


SAFE_BUILTINS = {
    f.__name__: f
    for f in (
        len,
        list,
        tuple,
        dict,
        int,
        float,
        str,
        bool,
        min,
        max,
        abs,
        round,
        sum,
        sorted,
        range,
    )  # fmt: skip
}
SAFE_CALLS = "len, list, tuple, dict, int, float, str, bool, min, max, abs, round, sum, " \
    "sorted, range, torch.device, torch.cuda.is_available"  # fmt: skip

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}  # fmt: skip


class Unsafe(Exception):
    """An expression outside the evaluated subset (the message says why)."""


def _in_safe_module(value: Any) -> bool:
    name = value.__name__ if isinstance(value, types.ModuleType) else None
    return name is not None and name.split(".")[0] in SAFE_MODULES


def evaluate(text: str, refs: dict[str, Any]) -> Any:
    """Evaluate the Python expression ``text`` (``$`` stripped; references already
    replaced by the names of ``refs``) over the safe subset; :class:`Unsafe` otherwise."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise Unsafe(f"not a Python expression ({err.msg})") from err
    evaluator = _Evaluator({**_module_names(), **SAFE_BUILTINS, **refs}, _safe_calls())
    try:
        return evaluator.ev(tree.body)
    except Unsafe:
        raise
    except Exception as err:  # e.g. 1 / 0, a bad subscript
        raise Unsafe(f"it fails: {type(err).__name__}: {err}") from err


class _Evaluator:
    """Evaluates expression nodes over the safe subset: reading only ``names``, calling only
    ``calls``; :class:`Unsafe` for anything else."""

    def __init__(self, names: dict[str, Any], calls: set[Any]) -> None:
        self.names = names
        self.calls = calls

    def ev(self, node: ast.AST) -> Any:
        """The value of ``node``. Sub-expressions are evaluated here and only checked in the
        helpers, so that each level of nesting costs one frame of Python's recursion limit."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise Unsafe(f"the name {node.id!r} is not allowed")
            return self.names[node.id]
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise Unsafe(f"the attribute {node.attr!r} is private")
            return _attribute(self.ev(node.value), node.attr)
        if isinstance(node, ast.Call):
            func = self.ev(node.func)
            self._check_call(func, node)
            args = [self.ev(a) for a in node.args]
            kwargs = {k.arg: self.ev(k.value) for k in node.keywords}
            return _call(func, args, kwargs)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _binop(node.op, self.ev(node.left), self.ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.ev(node.operand))
        if isinstance(node, ast.BoolOp):
            value = self.ev(node.values[0])
            for item in node.values[1:]:
                if isinstance(node.op, ast.And) and not value:
                    return value
                if isinstance(node.op, ast.Or) and value:
                    return value
                value = self.ev(item)
            return value
        if isinstance(node, ast.Compare):
            left = self.ev(node.left)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = self.ev(comp)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.ev(node.body) if self.ev(node.test) else self.ev(node.orelse)
        if isinstance(node, ast.Subscript):
            return self.ev(node.value)[self.ev(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(
                *(None if p is None else self.ev(p) for p in (node.lower, node.upper, node.step))
            )
        if isinstance(node, ast.List):
            return [self.ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self.ev(e) for e in node.elts)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise Unsafe("** in a dict is not allowed")
            return {self.ev(k): self.ev(v) for k, v in zip(node.keys, node.values, strict=True)}
        kind = type(node).__name__
        raise Unsafe(f"{kind} expressions are not evaluated")

    def _check_call(self, func: Any, node: ast.Call) -> None:
        """:class:`Unsafe` unless ``func`` is one of ``calls`` and ``node`` passes no ``*`` or
        ``**`` arguments (checked before the arguments are evaluated)."""
        if func not in self.calls:
            raise Unsafe(f"calling {getattr(func, '__name__', func)!r} is not allowed")
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            raise Unsafe("* and ** arguments are not allowed")


def _attribute(base: Any, attr: str) -> Any:
    """``base.attr`` for a module or class of monai, numpy or torch; :class:`Unsafe` else."""
    if not _in_safe_module(base) and not (
        isinstance(base, type) and base.__module__.split(".")[0] in SAFE_MODULES
    ):
        raise Unsafe(f"attribute access .{attr} outside monai, numpy and torch")
    try:
        return getattr(base, attr)
    except AttributeError as err:
        raise Unsafe(f"{err}") from err


def _call(func: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` unless a function is passed on or the result is too large."""
    # a function passed on (sorted(..., key=torch.load)) would be called by the callee
    if any(callable(v) and not _is_dtype(v) for v in (*args, *kwargs.values())):
        raise Unsafe("functions may not be passed as arguments")
    if func is range and len(range(*args)) > _MAX_SIZE:
        raise Unsafe("the range is too long")
    return _sized(func(*args, **kwargs))


def _binop(op: ast.operator, left: Any, right: Any) -> Any:
    """``left op right`` unless the exponent or the repeated sequence is too large."""
    if isinstance(op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 64:
        raise Unsafe("the exponent is too large")
    if isinstance(op, ast.Mult) and any(isinstance(v, (str, list, tuple)) for v in (left, right)):
        n = right if isinstance(left, (str, list, tuple)) else left
        seq = left if isinstance(left, (str, list, tuple)) else right
        if isinstance(n, int) and n * len(seq) > _MAX_SIZE:
            raise Unsafe("the result is too long")
    return _sized(_BINOPS[type(op)](left, right))


def _is_dtype(value: Any) -> bool:
    """True for a numpy scalar type such as ``numpy.float32`` (a dtype, not code)."""
    import numpy

    return isinstance(value, type) and issubclass(value, numpy.generic)


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > _MAX_SIZE:
        raise Unsafe("the result is too long")
    if isinstance(value, int) and value.bit_length() > 4096:  # (10**64)**64**... grows fast
        raise Unsafe("the number is too large")
    return value


# -- files --------------------------------------------------------------------------------
def inside(path: Path, root: Path, what: str, trust: bool = False) -> Path:
    """``path`` resolved (symlinks followed); ModelError (one line) if it leaves ``root``
    and ``trust`` is False."""
    real, base = path.resolve(), root.resolve()
    if not trust and real != base and base not in real.parents:
        link = " (a symbolic link)" if path.is_symlink() or real != path.absolute() else ""
        raise ModelError(
            f"{path}: refused: the {what}{link} points outside the bundle folder {root} (to "
            f"{real}); a bundle holds its own files (pass --trust-bundle to allow it)"
        )
    return real


def load_file(path: Path, root: Path, trust: bool = False) -> dict[str, Any]:
    """A config file (JSON or YAML) as a dict; ModelError naming the file otherwise."""
    if not path.exists() and not path.is_symlink():
        raise ModelError(f"bundle file {path} is missing")
    real = inside(path, root, "config file", trust)
    if not real.is_file():
        raise ModelError(f"{path}: not a regular file (a config must be a JSON or YAML file)")
    try:
        text = real.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot be read: {err}") from err
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ModelError(
                f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}"
            ) from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelError(
                f"{path}: invalid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a mapping of config ids, got {type(data).__name__}")
    return data


def config_path(root: Path, name: str | None = None) -> Path:
    """The config file to read: ``configs/NAME`` (with or without its suffix), by default
    ``configs/inference.json``, ``.yaml`` or ``.yml``, whichever exists."""
    configs = root / "configs"
    if name is None:
        stems = ["inference"]
    else:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ModelError(f"--config {name!r}: give the name of a file in {configs}")
        if Path(name).suffix in CONFIG_SUFFIXES:
            return configs / name
        stems = [name]
    candidates = [configs / (s + x) for s in stems for x in CONFIG_SUFFIXES]
    for path in candidates:
        if path.exists() or path.is_symlink():
            return path
    if name is not None:
        found = sorted(p.name for p in configs.glob("*") if p.suffix in CONFIG_SUFFIXES)
        raise ModelError(
            f"{configs}: no config {name!r} (.json, .yaml or .yml); the bundle has: "
            f"{', '.join(found) or 'none'}"
        )
    return candidates[0]


# -- resolving ----------------------------------------------------------------------------
def split_id(config_id: str) -> list[str]:
    """``"a::b#0"`` -> ``["a", "b", "0"]`` (MONAI's ``::`` and its older ``#``)."""
    return [p for p in config_id.replace("#", "::").split("::")]


@dataclass
class BundleConfig:
    """One bundle config, resolved lazily and safely (see the module docstring).

    ``data``: the config's content; ``source``: its file (named in errors); ``root``: the
    bundle folder (``bundle_root`` is set to it, as ``monai.bundle run`` would);
    ``overrides``: ``{id: value}`` set before resolving (e.g. ``{"displayable_configs::highres":
    False}``).
    """

    data: dict[str, Any]
    source: Path
    root: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    _stack: list[str] = field(default_factory=list, repr=False)
    _files: dict[Path, dict[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def read(
        cls, root: Path, name: str | None = None, overrides: dict[str, Any] | None = None
    ) -> BundleConfig:
        path = config_path(root, name)
        return cls(load_file(path, root), path, root, dict(overrides or {}))

    def __post_init__(self) -> None:
        self.data = dict(self.data)
        self.data["bundle_root"] = str(self.root.resolve())
        for key, value in self.overrides.items():
            self._set(key, value)

    def _set(self, config_id: str, value: Any) -> None:
        parts = split_id(config_id)
        node = self.data
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value

    def has(self, config_id: str) -> bool:
        try:
            self.raw(config_id)
        except ModelError:
            return False
        return True

    def raw(self, config_id: str, data: Any = None, source: Path | None = None) -> Any:
        """The unresolved content at ``config_id``; ModelError if it is not there."""
        node = self.data if data is None else data
        for part in split_id(config_id):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.lstrip("-").isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ModelError(
                    f"{source or self.source}: the config does not define {config_id!r}"
                )
        return node

    def get(self, config_id: str) -> Any:
        """The resolved value of ``config_id`` (cached)."""
        if config_id in self._cache:
            return self._cache[config_id]
        if config_id in self._stack:
            chain = " -> ".join([*self._stack[self._stack.index(config_id) :], config_id])
            raise ModelError(f"{self.source}: circular reference: {chain}")
        self._stack.append(config_id)
        try:
            value = self._resolve(self.raw(config_id), config_id)
        finally:
            self._stack.pop()
        self._cache[config_id] = value
        return value

    def _ref(self, ref: str, where: str) -> Any:
        if not self.has(ref):
            raise ModelError(
                f"{self.source}: {where} refers to '@{ref}', which the config does not define"
            )
        return self.get(ref)

    def _macro(self, text: str, where: str) -> Any:
        file, _, config_id = text[1:].partition("#")
        if not file:
            return self.raw(config_id)
        path = Path(file) if Path(file).is_absolute() else self.root / file
        if not path.exists() and not path.is_symlink():
            raise ModelError(
                f"{self.source}: {where}: the macro {text!r} names {path}, which is missing"
            )
        real = inside(path, self.root, "macro file")
        if real not in self._files:
            self._files[real] = load_file(path, self.root)
        return self.raw(config_id, self._files[real], path)

    def _resolve(self, node: Any, where: str) -> Any:
        if isinstance(node, str):
            text = node.strip()
            if text.startswith("%"):
                return self._resolve(self._macro(text, where), where)
            if text.startswith("@") and _REF.fullmatch(text):
                return self._ref(text[1:], where)
            if text.startswith("$"):
                return self._expression(text[1:], where, node)
            return node
        if isinstance(node, list):
            items = [self._resolve(v, f"{where}::{i}") for i, v in enumerate(node)]
            return [v for v in items if v is not DISABLED]
        if isinstance(node, dict):
            if "_disabled_" in node and self._resolve(node["_disabled_"], f"{where}::_disabled_"):
                return DISABLED
            out = {}
            for key, value in node.items():
                if key in ("_desc_", "_disabled_", "_requires_"):
                    continue
                if key == "_mode_" and value != "default":
                    raise ModelError(
                        f"{self.source}: {where} has _mode_ {value!r}: only 'default' is "
                        "built without --trust-bundle"
                    )
                if key == "_target_":
                    out[key] = node[key]
                    continue
                out[key] = self._resolve(value, f"{where}::{key}")
            return out
        return node

    def _expression(self, text: str, where: str, original: str) -> Any:
        refs: dict[str, Any] = {}

        def swap(match: re.Match[str]) -> str:
            name = f"ref{len(refs)}_"
            refs[name] = match.group(1)
            return name

        if "__" in text:
            raise self._unsafe(where, original, "names with '__' are not allowed")
        code = _REF.sub(swap, text)
        values = {name: self._ref(ref, where) for name, ref in refs.items()}
        try:
            value = evaluate(code, values)
        except Unsafe as err:
            raise self._unsafe(where, original, str(err)) from None
        if callable(value) and not _is_dtype(value):
            # a function handed to a transform (e.g. Lambdad's func) would be code
            raise self._unsafe(where, original, "it evaluates to a function or class")
        return value

    def _unsafe(self, where: str, original: str, why: str) -> ModelError:
        return ModelError(
            f"{self.source}: {where} is the expression {original!r}, outside the subset "
            f"hirescam3d evaluates ({why}); pass --trust-bundle to have MONAI run it"
        )


# -- trusted: MONAI's own parser ----------------------------------------------------------
def trusted_parser(path: Path, root: Path, overrides: dict[str, Any] | None = None) -> Any:
    """MONAI's ``ConfigParser`` over ``path`` with ``bundle_root`` set to ``root``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(path))
    parser["bundle_root"] = str(root.resolve())
    for key, value in (overrides or {}).items():
        parser[key.replace("#", "::")] = value
    return parser


def plain(value: Any) -> Any:
    """A ``ConfigParser.get_parsed_content(..., instantiate=False)`` result as plain
    dicts and lists (disabled components left out)."""
    from monai.bundle.config_item import ConfigItem

    if isinstance(value, ConfigItem):
        value = value.get_config()
    if isinstance(value, dict):
        if value.get("_disabled_") in (True, "true", "True"):
            return DISABLED
        return {k: plain(v) for k, v in value.items()
                if k not in ("_desc_", "_disabled_", "_requires_")}  # fmt: skip
    if isinstance(value, list):
        return [v for v in (plain(v) for v in value) if v is not DISABLED]
    return value


def trusted_get(parser: Any, config_id: str, source: Path) -> Any:
    """``config_id`` resolved by MONAI (components left as dicts); ModelError on failure."""
    try:
        return plain(parser.get_parsed_content(config_id, instantiate=False))
    except Exception as err:  # MONAI raises KeyError, ValueError, RuntimeError...
        text = " ".join(str(err).split())[:300]
        raise ModelError(f"{source}: MONAI could not resolve {config_id!r}: {text}") from err
