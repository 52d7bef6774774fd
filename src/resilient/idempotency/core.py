"""The idempotency record's life, and what the stores and the edges share.

A record goes ``ABSENT -> IN_PROGRESS -> COMPLETED``, or back to ``ABSENT``::

    ABSENT ──claim──▶ IN_PROGRESS(owner, fingerprint, lease) ──complete──▶ COMPLETED(payload)
       ▲                  │   │                                               │
       └──release─────────┘   └──lease runs out (a later claim takes over)    └── retention ends

* ``claim`` takes an absent (or expired) record for a new owner; on a live record it
  reports ``IN_PROGRESS`` (with the time left on the lease), ``COMPLETED`` (with the stored
  payload) or ``MISMATCH`` when the fingerprint differs from the one the record was made with.
* ``complete``, ``release`` and ``extend`` succeed only for the owner of a live lease: a
  caller whose lease ran out can never overwrite, free or prolong a newer owner's record.
  ``complete`` repeated by the owner that completed the record reports success and
  changes nothing: a caller whose reply was lost (a timeout) can try again safely.

Every operation is atomic: a lock in process, one Lua script on Redis. Times are integer
milliseconds; ``now_ms=None`` means the store's own clock (Redis ``TIME``, shared by every
application server).
"""

from __future__ import annotations

import enum
import json
import math
from typing import NamedTuple, Protocol

from resilient.errors import ConfigurationError

__all__ = [
    "Claim",
    "ClaimStatus",
    "IdempotencyStore",
    "StoredResponse",
    "decode_response",
    "encode_response",
]


class ClaimStatus(enum.Enum):
    """What a claim found."""

    CLAIMED = "claimed"
    """The record was absent: the caller owns it now and must complete or release it."""
    IN_PROGRESS = "in_progress"
    """Another owner holds a live lease on the record."""
    COMPLETED = "completed"
    """The record holds a stored result, now in ``Claim.payload``."""
    MISMATCH = "mismatch"
    """The record was made for a different request (another fingerprint)."""


class Claim(NamedTuple):
    """The answer to a claim: its status, the stored payload, the lease time left.

    ``data_lost`` is set on the one claim by which a store noticed that records it had
    known were lost (Redis restarted empty, or flushed): keys claimed before may be
    claimed again, as if new. The loss then stays a fact of the store
    (:attr:`IdempotencyStore.data_lost_at`), seen by every guard that shares it.
    """

    status: ClaimStatus
    payload: bytes | None = None
    retry_after_ms: int = 0
    data_lost: bool = False


class IdempotencyStore(Protocol):
    """Where idempotency records live. Implement it to plug in another store.

    Each method is atomic. Failures of the store are raised as
    :class:`~resilient.errors.BackendError`.

    ``data_lost_at`` says when the store's records were last lost, for every guard
    built on it: a store that cannot lose them, or cannot tell, returns ``None`` (a store
    without the attribute is taken to say ``None``). A store may also have an
    ``async prepare()`` method, which the guards call before their first claim (at the
    ASGI lifespan's startup) so that it learns what it needs to notice a loss.
    """

    @property
    def data_lost_at(self) -> float | None:
        """Wall-clock time (s since the epoch) of the last loss the store knows of, or ``None``.

        Taken from the store itself, as recorded by the first claim (of any instance) that
        noticed the loss, on that claim's clock: its ``now_ms`` when one was given (an
        injected clock), else the store's own (Redis ``TIME``). The same on every instance
        sharing the store, so their quarantines end together.
        """
        ...

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease_ms: int, now_ms: int | None
    ) -> Claim:
        """Take *key* for *owner* for *lease_ms*, or report what holds it."""
        ...

    async def complete(
        self, key: str, owner: str, payload: bytes, ttl_ms: int, now_ms: int | None
    ) -> bool:
        """Store *payload* for *ttl_ms* if *owner* holds a live lease on *key*."""
        ...

    async def release(self, key: str, owner: str, now_ms: int | None) -> bool:
        """Delete *key* if *owner* holds a live lease on it."""
        ...

    async def extend(self, key: str, owner: str, lease_ms: int, now_ms: int | None) -> bool:
        """Renew *owner*'s live lease on *key* to *lease_ms* from now."""
        ...


class StoredResponse(NamedTuple):
    """An HTTP response as stored for replay: status, header fields, body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def encode_response(response: StoredResponse) -> bytes:
    """Return the bytes a store keeps for *response*: a JSON head line, then the body.

    Header names and values are bytes in ASGI; latin-1 maps each byte to one character,
    so they survive JSON exactly. JSON never contains a raw newline, which ends the head.
    """
    head = {
        "v": 1,
        "status": response.status,
        "headers": [
            [name.decode("latin-1"), value.decode("latin-1")] for name, value in response.headers
        ],
    }
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + response.body


def decode_response(payload: bytes) -> StoredResponse:
    """Return the :class:`StoredResponse` that :func:`encode_response` encoded.

    Raise :class:`ValueError` when *payload* is not such an encoding.
    """
    head, sep, body = payload.partition(b"\n")
    if not sep:
        msg = "not a stored response: no head line"
        raise ValueError(msg)
    data = json.loads(head)
    if not isinstance(data, dict) or data.get("v") != 1:
        msg = "not a stored response: unknown head"
        raise ValueError(msg)
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in data["headers"]]
    return StoredResponse(int(data["status"]), headers, body)


def validate_seconds(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return *value* as a float if it is a positive (or, with *allow_zero*, >= 0) number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be a number of seconds, not {value!r}"
        raise ConfigurationError(msg)
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        msg = f"{name} must be a finite number of seconds {bound}, not {value!r}"
        raise ConfigurationError(msg)
    return float(value)
