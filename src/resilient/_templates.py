"""Keys from a function's arguments: templates such as ``"user:{user_id}"``."""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable
from typing import Any

from resilient.errors import ConfigurationError

__all__ = ["key_function"]


def key_function(key: str | Callable[..., str], function: Callable[..., Any]) -> Callable[..., str]:
    """Return a function of *function*'s arguments that renders *key* (or *key* itself)."""
    if callable(key):
        return key
    if not isinstance(key, str) or not key:
        msg = f"key must be a template string or a callable, not {key!r}"
        raise ConfigurationError(msg)
    signature = inspect.signature(function)
    fields = {
        name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(key) if name
    }
    unknown = fields - set(signature.parameters)
    if unknown or any(not name for name in fields):
        msg = (
            f"the key template {key!r} names {sorted(unknown)}, "
            f"which {function.__qualname__} does not take"
        )
        raise ConfigurationError(msg)
    if not fields:
        return lambda *args, **kwargs: key

    def render(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return key.format_map(bound.arguments)

    return render
