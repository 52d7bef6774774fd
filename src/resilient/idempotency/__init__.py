"""Idempotency keys: retried writes that run once and replay their first answer.

* :mod:`~resilient.idempotency.core`: the record's life and the store protocol;
* :class:`IdempotencyMiddleware`: the ``Idempotency-Key`` header at the ASGI edge;
* :func:`idempotent`: a decorator for async functions (queue consumers, jobs).
"""

from __future__ import annotations

from resilient.idempotency.core import Claim, ClaimStatus, IdempotencyStore, StoredResponse
from resilient.idempotency.decorator import idempotent
from resilient.idempotency.middleware import (
    DEFAULT_REFUSED_STATUSES,
    IdempotencyMiddleware,
    default_scope_key,
    fingerprint_request,
    parse_key,
)

__all__ = [
    "DEFAULT_REFUSED_STATUSES",
    "Claim",
    "ClaimStatus",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "StoredResponse",
    "default_scope_key",
    "fingerprint_request",
    "idempotent",
    "parse_key",
]
