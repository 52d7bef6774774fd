"""``@cached``: cache-aside for an async function, keyed by its arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar

from resilient._templates import key_function
from resilient.cache.cache import Cache
from resilient.errors import ConfigurationError

__all__ = ["cached"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def cached(
    cache: Cache,
    *,
    key: str | Callable[..., str],
    ttl: float | None = None,
    tags: Iterable[str | Callable[..., str]] = (),
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Coroutine[Any, Any, _R]]]:
    """Serve the decorated ``async def`` from *cache*, loading each key once at a time.

    *key* and each of *tags* are templates formatted with the call's arguments
    (``"product:{product_id}"``) or callables given the same arguments.

    >>> cache = Cache()
    >>> @cached(cache, key="product:{product_id}", ttl=600, tags=["products"])
    ... async def product(product_id: int) -> dict[str, object]: ...
    """
    tag_list = list(tags)

    def decorate(function: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        if not inspect.iscoroutinefunction(function):
            msg = f"cached decorates async functions; {function!r} is not one"
            raise TypeError(msg)
        key_of = key_function(key, function)
        tags_of = [key_function(tag, function) for tag in tag_list]

        @functools.wraps(function)
        async def through_cache(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            name = key_of(*args, **kwargs)
            if not isinstance(name, str) or not name:
                msg = f"the cache key must be a non-empty string, got {name!r}"
                raise ConfigurationError(msg)
            return await cache.get_or_load(
                name,
                lambda: function(*args, **kwargs),
                ttl=ttl,
                tags=[tag(*args, **kwargs) for tag in tags_of],
            )

        return through_cache

    return decorate
