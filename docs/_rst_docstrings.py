"""A griffe extension: render llmstream's reST-flavoured docstrings as Markdown.

The docstrings are written for ``help()`` and IDEs: ``Example::`` literal blocks,
``>>>`` doctests and ``:class:`...``` roles. Markdown would show the first as text,
the second as nested block quotes and the third verbatim; this rewrites them when
mkdocstrings loads the package (the source files are not touched).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`~?([^`]+)`")


def _role(match: re.Match[str]) -> str:
    return f"`{match.group(1).rsplit('.', 1)[-1]}`"


def _fence_doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_block = False
    for line in lines:
        starts = line.lstrip().startswith(">>>")
        if starts and not in_block:
            out.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            out.append("```")
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return out


def markdown_docstring(text: str) -> str:
    """Rewrite one docstring (used by the extension, and testable on its own)."""
    text = _ROLE.sub(_role, text)
    text = re.sub(r"^(\s*)(Example|Examples)::\s*$", r"\1**\2**", text, flags=re.MULTILINE)
    text = re.sub(r"::\s*$", ":", text, flags=re.MULTILINE)
    return "\n".join(_fence_doctests(text.split("\n")))


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
