"""A griffe extension: the reST idioms of resilient's docstrings, rendered as Markdown.

The docstrings are written for ``help()`` and Sphinx habits: ``:class:`~resilient.X```
roles, ``>>>`` doctests, ``::`` literal blocks. mkdocstrings renders docstrings as
Markdown, where those would show as raw text (and ``>>>`` as nested block quotes), so
before rendering:

* a role becomes an optional cross-reference to the object's canonical path (a link
  when the API reference documents it, plain code otherwise); ``~`` keeps the last name;
* a run of ``>>>`` lines and their output becomes a ``pycon`` code block, without its
  ``# doctest:`` directives;
* a paragraph ending in ``::`` ends in ``:``, and its indented block is fenced as Python.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+|[^`<]+<[\w.]+>)`"
)
_TITLED = re.compile(r"(?P<title>[^`<]+?)\s*<(?P<target>[\w.]+)>")
_DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")


class RestToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded packages before mkdocstrings renders it."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Convert *obj*'s docstring in place."""
        docstring = obj.docstring
        if docstring is None:
            return
        text = _roles(docstring.value, obj, loader)
        docstring.value = _blocks(text)


def _roles(text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    def link(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2)
        shown = target.rsplit(".", 1)[-1] if short else target
        titled = _TITLED.fullmatch(target)
        if titled is not None:  # :meth:`Cache.get <resilient.Cache.get>`
            shown, target = titled["title"], titled["target"]
        path = _resolve(target, obj, loader)
        if path is None:
            return f"`{shown}`"
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(link, text)


def _resolve(target: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
    """Return the canonical path of *target*, looked up as written or from *obj*'s scope."""
    candidates = [target]
    scope: griffe.Object | None = obj
    while scope is not None:  # a bare name: a member of the class, then of the module
        candidates.append(f"{scope.path}.{target}")
        scope = scope.parent
    for candidate in candidates:
        try:
            found = loader.modules_collection.get_member(candidate)
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        try:
            return str(found.canonical_path)
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return candidate
    return None


def _blocks(text: str) -> str:
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            session = []
            while index < len(lines) and lines[index].strip():
                session.append(_DIRECTIVE.sub("", lines[index].removeprefix(indent)))
                index += 1
            out += [f"{indent}```pycon", *(f"{indent}{s}" for s in session), f"{indent}```"]
            continue
        if line.rstrip().endswith("::") and not line.lstrip().startswith((">>>", "...")):
            kept = line.rstrip()[:-2].rstrip()
            if kept:
                out.append(kept + ":")
            index += 1
            literal, index = _literal(lines, index)
            if literal:
                out += ["", "```python", *literal, "```"]
            continue
        out.append(line)
        index += 1
    return "\n".join(out)


def _literal(lines: list[str], index: int) -> tuple[list[str], int]:
    """Return the indented block that follows a ``::`` line (dedented), and where it ends."""
    while index < len(lines) and not lines[index].strip():
        index += 1
    block: list[str] = []
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
        block.append(lines[index])
        index += 1
    while block and not block[-1].strip():
        block.pop()
    indents = [len(line) - len(line.lstrip()) for line in block if line.strip()]
    margin = min(indents, default=0)
    return [line[margin:] for line in block], index
