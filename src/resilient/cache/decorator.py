"""``@cached``: cache-aside for a function (async, or plain on memory), keyed by its arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from resilient._templates import key_function
from resilient.cache.cache import Cache
from resilient.cache.memory import MemoryCacheStore
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
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Serve the decorated function from *cache*, loading each key once at a time.

    *key* and each of *tags* are templates formatted with the call's arguments
    (``"product:{product_id}"``) or callables given the same arguments. An ``async def``
    works on every backend; a plain ``def`` on the memory backend, through
    :meth:`Cache.get_or_load_sync` (threads share one load per key, and refresh in the
    background as tasks do).

    >>> cache = Cache()
    >>> @cached(cache, key="product:{product_id}", ttl=600, tags=["products"])
    ... async def product(product_id: int) -> dict[str, object]: ...
    """
    tag_list = list(tags)

    def decorate(function: Callable[_P, Any]) -> Callable[_P, Any]:
        key_of = key_function(key, function)
        tags_of = [key_function(tag, function) for tag in tag_list]
        if not inspect.iscoroutinefunction(function):
            if not isinstance(cache.store, MemoryCacheStore):
                msg = f"@cached on a def needs the memory backend; {function!r} is not async"
                raise TypeError(msg)

            @functools.wraps(function)
            def through_cache_sync(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                name = key_of(*args, **kwargs)
                if not isinstance(name, str) or not name:
                    msg = f"the cache key must be a non-empty string, got {name!r}"
                    raise ConfigurationError(msg)
                return cache.get_or_load_sync(
                    name,
                    lambda: function(*args, **kwargs),
                    ttl=ttl,
                    tags=[tag(*args, **kwargs) for tag in tags_of],
                )

            return through_cache_sync

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
