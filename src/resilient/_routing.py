"""Path patterns shared by the middlewares: exact paths, templates and prefixes."""

from __future__ import annotations

import re

from resilient.errors import ConfigurationError

__all__ = ["PathPattern"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(str|path|int))?\}")
_PARAM_REGEX = {None: "[^/]+", "str": "[^/]+", "path": ".*", "int": "[0-9]+"}


class PathPattern:
    """Match request paths against one pattern.

    * ``"/api/login"`` matches that path exactly;
    * ``"/api/users/{id}"`` is a route template: ``{name}`` matches one path segment,
      ``{name:int}`` digits, ``{name:path}`` the rest of the path;
    * ``"/api/*"`` matches every path that starts with ``/api/``.
    """

    __slots__ = ("_exact", "_prefix", "_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            msg = f"a path pattern must start with '/', not {pattern!r}"
            raise ConfigurationError(msg)
        self.pattern = pattern
        self._exact: str | None = None
        self._prefix: str | None = None
        self._regex: re.Pattern[str] | None = None
        if pattern.endswith("*"):
            if "*" in pattern[:-1] or "{" in pattern:
                msg = f"'*' may only end a plain prefix pattern: {pattern!r}"
                raise ConfigurationError(msg)
            self._prefix = pattern[:-1]
        elif "{" in pattern:
            parts: list[str] = []
            position = 0
            for match in _PARAM.finditer(pattern):
                parts.append(re.escape(pattern[position : match.start()]))
                parts.append(_PARAM_REGEX[match[2]])
                position = match.end()
            rest = pattern[position:]
            if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts):
                msg = f"malformed route template {pattern!r}: use {{name}} or {{name:int|path}}"
                raise ConfigurationError(msg)
            parts.append(re.escape(rest))
            self._regex = re.compile("".join(parts))
        else:
            self._exact = pattern

    def matches(self, path: str) -> bool:
        """Return whether *path* matches this pattern."""
        if self._exact is not None:
            return path == self._exact
        if self._prefix is not None:
            return path.startswith(self._prefix)
        return self._regex is not None and self._regex.fullmatch(path) is not None

    def __repr__(self) -> str:
        return f"PathPattern({self.pattern!r})"
