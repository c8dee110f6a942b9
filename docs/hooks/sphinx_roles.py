"""MkDocs hook: the library's docstrings cross-reference in Sphinx style
(``:func:`hirescam3d.core.postprocess.density```); mkdocstrings shows the role's name in front
of the code span. This drops the role and, as Sphinx does for ``~name``, shortens a name
with a leading ``~`` to its last component."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj|const):(<code>)(~?)([^<]*)(</code>)")


def _replace(match: re.Match) -> str:
    opening, tilde, name, closing = match.groups()
    if tilde:
        name = name.rsplit(".", 1)[-1]
    return f"{opening}{name}{closing}"


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub(_replace, html)
