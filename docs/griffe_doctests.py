"""Griffe extension for the docs build: fence bare ``>>>`` doctests in docstrings as ``pycon`` code.

jaxbn's docstrings end with plain doctest paragraphs (run by ``pytest --doctest-modules``) rather than an
``Examples:`` section; Markdown would read them as nested block quotes and their ``['mean']`` as links.
Each run of lines from a ``>>>`` line to the next blank line becomes a fenced block, as written.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wraps every doctest paragraph of `text` (a cleaned docstring) in a ```pycon fence."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if stripped.startswith(">>>") and (not out or not out[-1].lstrip().startswith("```")):
            indent = lines[i][: len(lines[i]) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


class FenceDoctests(griffe.Extension):
    """Applies `fence_doctests` to every object's docstring as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
