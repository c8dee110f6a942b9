"""MkDocs hook: the CLI reference (``docs/cli.md``) is rendered from the Typer app at
build time, so it cannot drift from the code.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with
one section per command of ``hirescam3d.cli.main.app``: usage line, help text, arguments
and options (names, value, default, help), walked from the app's command tree.
"""

from __future__ import annotations

import html
import inspect
from typing import Any

MARKER = "<!-- cli-reference -->"
PROG = "hirescam3d"


def _root_command() -> Any:
    import typer.main
    from hirescam3d.cli.main import app

    return typer.main.get_command(app)


def _context(command: Any, name: str, parent: Any = None) -> Any:
    import typer

    return typer.Context(command, info_name=name, parent=parent)


def walk(command: Any, ctx: Any) -> list[tuple[Any, Any]]:
    """``(command, context)`` for ``command`` and every subcommand, depth first."""
    found = [(command, ctx)]
    list_commands = getattr(command, "list_commands", None)
    if list_commands is None:
        return found
    for name in list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        found += walk(sub, _context(sub, name, ctx))
    return found


def _text(value: str) -> str:
    """Help text as Markdown, shown literally: HTML-escaped (``<stem>`` is not a tag),
    Markdown's emphasis and link characters escaped, paragraphs kept."""
    paragraphs = inspect.cleandoc(value).split("\n\n")
    return "\n\n".join(_literal(" ".join(p.split())) for p in paragraphs)


def _literal(text: str) -> str:
    text = html.escape(text, quote=False)
    for char in "\\`*_[]":
        text = text.replace(char, "\\" + char)
    return text


def _code(value: str) -> str:
    """An inline code span that survives any backticks in ``value``."""
    return f"`` {value} ``" if "`" in value else f"`{value}`"


def _value(param: Any, ctx: Any) -> str | None:
    """What the parameter takes: its metavar or type (``unit|logit``, ``path``, ...)."""
    if getattr(param, "is_flag", False):
        return None
    if param.metavar:
        return param.metavar
    shown = param.display_type(ctx) if callable(param.display_type) else param.display_type
    shown = str(shown or "").strip("<>")
    if getattr(param, "multiple", False) and shown.startswith("list[") and shown.endswith("]"):
        shown = shown[5:-1]  # "(repeatable)" says it
    return shown or None


def _default(param: Any) -> str | None:
    if param.required or getattr(param, "is_flag", False) or not param.show_default:
        return None
    default = param.default
    if default is None or default == ():
        return None
    return str(getattr(default, "value", default))


def _param_line(param: Any, ctx: Any) -> str:
    if param.param_type_name == "argument":
        names = _code(param.name.upper() + ("..." if param.nargs == -1 else ""))
    else:
        names = ", ".join(_code(o) for o in [*param.opts, *param.secondary_opts])
    parts = [f"- {names}"]
    value = _value(param, ctx)
    if value and param.param_type_name != "argument":
        parts.append(_code(value))
    notes = []
    if param.required:
        notes.append("required")
    if getattr(param, "multiple", False):
        notes.append("repeatable")
    default = _default(param)
    if default is not None:
        notes.append(f"default {_code(default)}")
    if notes:
        parts.append(f"({', '.join(notes)})")
    line = " ".join(parts)
    if param.help:
        line += ": " + _text(param.help).replace("\n\n", " ")
    return line


def render_command(command: Any, ctx: Any) -> str:
    """Markdown for one command: heading, usage, help, arguments, options."""
    path = ctx.command_path
    out = [f"## `{path}`", ""]
    out += ["```text", command.get_usage(ctx).strip(), "```", ""]
    if command.help:
        out += [_text(command.help), ""]
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    arguments = [p for p in params if p.param_type_name == "argument"]
    options = [p for p in params if p.param_type_name != "argument"]
    if arguments:
        out += ["**Arguments**", ""] + [_param_line(p, ctx) for p in arguments] + [""]
    if options:
        out += ["**Options**", ""] + [_param_line(p, ctx) for p in options] + [""]
    if command.epilog:
        out += [_text(command.epilog), ""]
    return "\n".join(out)


def render_reference() -> str:
    """The whole CLI reference, root command first."""
    root = _root_command()
    return "\n".join(render_command(c, ctx) for c, ctx in walk(root, _context(root, PROG)))


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the marker in ``cli.md`` with the reference rendered from the app."""
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/cli.md lost its {MARKER} marker")
    return markdown.replace(MARKER, render_reference())
