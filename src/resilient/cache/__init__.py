"""Stampede-safe cache-aside: one load per key, early refresh, stale serving.

* :mod:`~resilient.cache.core`: entries, XFetch, serialisation, and the lookup and load
  both drivers run (no I/O);
* :class:`Cache`: ``get_or_load`` (asyncio) and ``get_or_load_sync`` (threads) with single
  flight, ``get``/``set``/``delete``, tags;
* :func:`cached`: the decorator, for ``async def`` (any backend) and ``def`` (memory).
"""

from __future__ import annotations

from resilient.cache.cache import Cache
from resilient.cache.core import MISSING, JSONSerializer, Serializer
from resilient.cache.decorator import cached

__all__ = ["MISSING", "Cache", "JSONSerializer", "Serializer", "cached"]
