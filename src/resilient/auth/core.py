"""The key set's cache: every decision of both JWKS clients, and no I/O.

Logic once, I/O twice (httpx's principle): :class:`~resilient.auth.JWKSClient` (asyncio)
and :class:`~resilient.auth.SyncJWKSClient` (threads) differ only in how they fetch and
how a caller waits for a fetch in flight. Everything else is decided here, by one
:class:`KeySetCache`:

* **how long keys are good**: ``Cache-Control: max-age`` bounded to ``[min_ttl, max_ttl]``
  (``default_ttl`` when the header says nothing), see :meth:`KeySetCache.ttl_for`;
* **when to fetch**: when the keys expired, and for an unknown ``kid`` at most once per
  ``refetch_cooldown`` (one clock for every kid);
* **when to share a fetch**: a caller that needs a fetch while one is in flight waits for
  that one (single flight);
* **when stale keys still serve**: for ``stale_for`` past their expiry while the endpoint
  fails, with one new attempt per cooldown;
* **when a lookup fails**: :class:`~resilient.errors.UnknownKey` or
  :class:`~resilient.errors.KeySetUnavailable`.

:meth:`KeySetCache.lookup` is a generator, like httpx's ``auth_flow``: it yields what it
needs done (:attr:`Need.FETCH`: start a fetch, which the caller now owns and reports with
:meth:`~KeySetCache.fetched` or :meth:`~KeySetCache.failed`; :attr:`Need.WAIT`: wait for
the fetch in flight) and is sent back how that fetch ended (``None``, or its
:class:`~resilient.errors.KeySetUnavailable`). The cache holds no lock: the async driver
runs on one event loop, and the sync driver advances a lookup under its own lock.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from resilient.clock import Clock
from resilient.errors import ConfigurationError, KeySetUnavailable, UnknownKey

__all__ = ["KeySetCache", "Lookup", "Need", "SigningKey", "parse_max_age"]

_MAX_AGE: Final = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One public signing key of a key set.

    ``kty`` is ``"RSA"``, ``"EC"`` or ``"OKP"``; ``crv`` names the curve (``None`` for
    RSA); ``alg`` is the algorithm the JWK pins, if it pins one; ``key`` is the
    ``cryptography`` public key object to verify with.
    """

    kid: str
    kty: str
    crv: str | None
    alg: str | None
    key: Any


class Need(enum.Enum):
    """What a lookup needs its driver to do before it can go on."""

    FETCH = "fetch"
    """Fetch the key set: this caller owns the fetch and reports how it ended."""

    WAIT = "wait"
    """Wait for the fetch another caller owns."""


Lookup: TypeAlias = Generator[Need, KeySetUnavailable | None, SigningKey]
"""A lookup in progress: yields :class:`Need`, is sent how the fetch ended."""


def parse_max_age(cache_control: str | None) -> int | None:
    """Return the ``max-age`` of a ``Cache-Control`` header, 0 for no-store/no-cache."""
    if not cache_control:
        return None
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0
    match = _MAX_AGE.search(lowered)
    return int(match.group(1)) if match else None


def _seconds(name: str, value: float) -> float:
    if not value >= 0:  # NaN too
        msg = f"{name} must be >= 0, got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


class KeySetCache:
    """The keys of one key set, and when to fetch them again (times in seconds).

    ``now`` is always the monotonic reading of the caller's clock. See the module
    docstring for the decisions and how a driver runs them.
    """

    __slots__ = (
        "default_ttl",
        "expires_at",
        "fetching",
        "keys",
        "last_attempt",
        "last_failed",
        "max_ttl",
        "min_ttl",
        "refetch_cooldown",
        "stale_for",
    )

    def __init__(
        self,
        *,
        min_ttl: float = 60.0,
        max_ttl: float = 86_400.0,
        default_ttl: float = 300.0,
        refetch_cooldown: float = 30.0,
        stale_for: float = 6 * 3600.0,
    ) -> None:
        self.min_ttl = _seconds("min_ttl", min_ttl)
        self.refetch_cooldown = _seconds("refetch_cooldown", refetch_cooldown)
        self.stale_for = _seconds("stale_for", stale_for)
        self.default_ttl = _seconds("default_ttl", default_ttl)
        if not max_ttl >= min_ttl:
            msg = f"max_ttl ({max_ttl!r}) must be >= min_ttl ({min_ttl!r})"
            raise ConfigurationError(msg)
        self.max_ttl = float(max_ttl)
        self.keys: Mapping[str, SigningKey] = {}  # replaced whole, never mutated
        self.expires_at = float("-inf")  # -inf: never fetched
        self.last_attempt: float | None = None
        self.last_failed = False
        self.fetching = False

    def fresh_key(self, kid: str, now: float) -> SigningKey | None:
        """Return the key *kid* if the keys are fresh and hold it: the path with no I/O."""
        return self.keys.get(kid) if now < self.expires_at else None

    def may_fetch(self, now: float) -> bool:
        """Whether the cooldown since the last attempt is over (or there was none)."""
        return self.last_attempt is None or now - self.last_attempt >= self.refetch_cooldown

    def servable(self, now: float) -> bool:
        """Whether the keys may be served at *now*, if only as stale ones."""
        return now < self.expires_at + self.stale_for

    def lookup(self, kid: str, clock: Clock) -> Lookup:
        """Find the key *kid*, yielding the fetches it needs; return it or raise.

        Raises :class:`~resilient.errors.UnknownKey` when no key has that ``kid`` (after
        at most one refetch per cooldown), and :class:`~resilient.errors.KeySetUnavailable`
        when the key set cannot be fetched and no stale copy is recent enough.
        """
        now = clock.monotonic()
        if now >= self.expires_at:
            if not self.fetching and self.last_failed and not self.may_fetch(now):
                # The endpoint failed a moment ago: do not hammer it, serve stale if we may.
                if not self.servable(now):
                    msg = "the key set is unavailable (its endpoint failed, no recent keys)"
                    raise KeySetUnavailable(msg)
            else:
                failure = yield self._fetch_or_wait(now)
                if failure is not None and not self.servable(clock.monotonic()):
                    raise failure
        key = self.keys.get(kid)
        if key is not None:
            return key
        now = clock.monotonic()
        if self.fetching or self.may_fetch(now):
            # An unknown kid: perhaps the issuer rotated. One fetch per cooldown for all;
            # its failure only means the kid stays unknown.
            yield self._fetch_or_wait(now)
            key = self.keys.get(kid)
            if key is not None:
                return key
        raise UnknownKey

    def refresh(self, clock: Clock) -> Generator[Need, KeySetUnavailable | None, None]:
        """Fetch the key set now (or wait for the fetch in flight); raise if it fails."""
        failure = yield self._fetch_or_wait(clock.monotonic())
        if failure is not None:
            raise failure

    def _fetch_or_wait(self, now: float) -> Need:
        if self.fetching:
            return Need.WAIT
        self.fetching = True
        self.last_attempt = now
        return Need.FETCH

    def ttl_for(self, cache_control: str | None) -> float:
        """How long keys served with this ``Cache-Control`` header stay fresh."""
        max_age = parse_max_age(cache_control)
        ttl = self.default_ttl if max_age is None else float(max_age)
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def fetched(self, keys: Mapping[str, SigningKey], ttl: float, now: float) -> None:
        """Keep *keys*, fresh for *ttl* from *now*: the fetch in flight succeeded."""
        self.keys = keys
        self.expires_at = now + ttl
        self.last_failed = False
        self.fetching = False

    def failed(self, now: float) -> bool:
        """Record that the fetch in flight failed; return whether stale keys still serve."""
        self.last_failed = True
        self.fetching = False
        return self.servable(now)

    def abandoned(self) -> None:
        """Forget the fetch in flight, which ended without a word (cancelled)."""
        self.fetching = False

    def __repr__(self) -> str:
        return f"KeySetCache(keys={sorted(self.keys)!r}, expires_at={self.expires_at!r})"
