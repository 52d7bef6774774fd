"""Backends: where the blocks keep their state.

:class:`MemoryBackend` keeps it in this process (the embedded default: bounded, and safe
under threads and coroutines); :class:`RedisBackend` keeps it in Redis or Redis Cluster,
so that every process and machine agrees. A block asks its backend for the narrow store it
needs (a rate-limit store, an idempotency store, ...); the same backend object passed to
several blocks shares one connection, one key prefix and one place to configure them.
"""

from __future__ import annotations

from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend

__all__ = ["MemoryBackend", "RedisBackend"]
