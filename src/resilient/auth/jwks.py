"""JWKSClient: an issuer's signing keys, fetched with httpx, cached, and kept through outages.

::

    jwks = JWKSClient("https://issuer.example/.well-known/jwks.json")
    key = await jwks.get_key(kid)          # a SigningKey, or UnknownKey / KeySetUnavailable

What it promises:

* **cached**: the key set is kept for ``Cache-Control: max-age`` seconds, bounded to
  ``[min_ttl, max_ttl]`` (``default_ttl`` when the header says nothing);
* **single-flight**: concurrent callers that need a fetch share one;
* **flood-proof**: an unknown ``kid`` triggers a refetch at most once per
  ``refetch_cooldown`` (one clock for every kid), and known kids keep validating meanwhile;
* **outage-tolerant**: when the endpoint fails, the last good keys are served for
  ``stale_for`` seconds past their expiry, then :class:`KeySetUnavailable` is raised;
* **careful with the network**: https only (plain http only for loopback hosts), no
  redirects followed, the body capped at ``max_bytes``, every fetch bounded by ``timeout``;
* **careful with keys**: only public signature keys are kept: RSA of 2048 bits or more,
  EC on P-256 or P-384, OKP Ed25519. Symmetric (``kty=oct``) and private keys, keys for
  encryption (``use=enc``) and anything PyJWT cannot parse are dropped.

This module needs PyJWT and httpx (``pip install 'resilient-asgi[jwt]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

try:
    import httpx
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
except ImportError as error:  # pragma: no cover (the test suite always has them)
    msg = "resilient.auth needs PyJWT and httpx: pip install 'resilient-asgi[jwt]'"
    raise ImportError(msg) from error

from resilient.clock import Clock, SystemClock
from resilient.errors import ConfigurationError, KeySetUnavailable, UnknownKey
from resilient.events import KeySetFetched, KeySetFetchFailed, LoggingObserver, Observer, emit

__all__ = ["JWKSClient", "SigningKey", "check_url"]

logger = logging.getLogger("resilient.auth")

MIN_RSA_BITS: Final = 2048
EC_CURVES: Final = frozenset({"P-256", "P-384"})
OKP_CURVES: Final = frozenset({"Ed25519"})
_DEFAULT_OBSERVER = LoggingObserver()
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)


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


def check_url(url: str) -> str:
    """Return *url* if it may be fetched: https, or plain http to a loopback host only.

    Raises :class:`~resilient.errors.ConfigurationError` otherwise.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and _is_loopback(host):
        return url
    msg = f"a key set must be fetched over https (plain http only for loopback): {url!r}"
    raise ConfigurationError(msg)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_max_age(cache_control: str | None) -> int | None:
    """Return the ``max-age`` of a ``Cache-Control`` header, 0 for no-store/no-cache."""
    if not cache_control:
        return None
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0
    match = _MAX_AGE.search(lowered)
    return int(match.group(1)) if match else None


def parse_key_set(document: object) -> dict[str, SigningKey]:
    """Return the usable signature keys of a JWKS document, by ``kid``.

    Keys that are not usable (see the module docstring) are dropped with a log line;
    a document that is not a JSON object with a ``keys`` list raises :class:`ValueError`.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        msg = "the key set is not a JSON object with a 'keys' list"
        raise ValueError(msg)
    keys: dict[str, SigningKey] = {}
    for entry in document["keys"]:
        key = _parse_key(entry)
        if key is not None and key.kid not in keys:
            keys[key.kid] = key
    return keys


def _parse_key(entry: object) -> SigningKey | None:  # noqa: PLR0911 (one reason per return)
    if not isinstance(entry, Mapping):
        return None
    kid, kty, crv, alg = entry.get("kid"), entry.get("kty"), entry.get("crv"), entry.get("alg")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        logger.info("JWKS: a key without a usable kid was ignored")
        return None
    if entry.get("use", "sig") != "sig" or "d" in entry or kty not in {"RSA", "EC", "OKP"}:
        logger.info("JWKS: key %r ignored (not a public signature key)", kid[:64])
        return None
    if alg is not None and not isinstance(alg, str):
        return None
    if (kty == "EC" and crv not in EC_CURVES) or (kty == "OKP" and crv not in OKP_CURVES):
        logger.info("JWKS: key %r ignored (curve not supported)", kid[:64])
        return None
    try:
        parsed = jwt.PyJWK(dict(entry))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as error:
        logger.info("JWKS: key %r ignored (%s)", kid[:64], type(error).__name__)
        return None
    public = parsed.key
    if kty == "RSA" and (
        not isinstance(public, rsa.RSAPublicKey) or public.key_size < MIN_RSA_BITS
    ):
        logger.warning("JWKS: RSA key %r ignored (under %d bits)", kid[:64], MIN_RSA_BITS)
        return None
    return SigningKey(
        kid=kid, kty=str(kty), crv=crv if isinstance(crv, str) else None, alg=alg, key=public
    )


class JWKSClient:
    """The signing keys of one issuer, fetched from its JWKS URL and cached.

    *http* is an ``httpx.AsyncClient`` to fetch with (its redirects are not followed
    whatever it is configured to do); without one, each fetch opens a short-lived client.
    Times are in seconds. Each fetch emits :class:`~resilient.events.KeySetFetched` or
    :class:`~resilient.events.KeySetFetchFailed` to *observer* (logging by default). See
    the module docstring for the guarantees.

    >>> jwks = JWKSClient("https://issuer.example/.well-known/jwks.json")
    """

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient | None = None,
        *,
        min_ttl: float = 60.0,
        max_ttl: float = 86_400.0,
        default_ttl: float = 300.0,
        refetch_cooldown: float = 30.0,
        stale_for: float = 6 * 3600.0,
        timeout: float = 5.0,
        max_bytes: int = 1 << 20,
        clock: Clock | None = None,
        observer: Observer | None = _DEFAULT_OBSERVER,
    ) -> None:
        self.url = check_url(url)
        for name, value in [
            ("min_ttl", min_ttl),
            ("refetch_cooldown", refetch_cooldown),
            ("stale_for", stale_for),
        ]:
            if not value >= 0:
                msg = f"{name} must be >= 0, got {value!r}"
                raise ConfigurationError(msg)
        if not max_ttl >= min_ttl:
            msg = f"max_ttl ({max_ttl!r}) must be >= min_ttl ({min_ttl!r})"
            raise ConfigurationError(msg)
        if not timeout > 0 or max_bytes < 1:
            msg = "timeout and max_bytes must be positive"
            raise ConfigurationError(msg)
        self._http = http
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.default_ttl = float(default_ttl)
        self.refetch_cooldown = float(refetch_cooldown)
        self.stale_for = float(stale_for)
        self.timeout = float(timeout)
        self.max_bytes = int(max_bytes)
        self._clock = clock or SystemClock()
        self.observer = observer
        self._keys: dict[str, SigningKey] = {}
        self._expires_at = float("-inf")  # monotonic; -inf: never fetched
        self._last_attempt: float | None = None
        self._last_failed = False
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0

    @classmethod
    async def from_issuer(
        cls, issuer: str, http: httpx.AsyncClient | None = None, **options: Any
    ) -> JWKSClient:
        """Discover the ``jwks_uri`` of *issuer* through OpenID Connect discovery.

        Fetches ``{issuer}/.well-known/openid-configuration`` (same network rules as the
        key set), checks that the document names the same issuer, and returns a client
        for its ``jwks_uri``. *options* are the constructor's keywords.
        """
        check_url(issuer)
        probe = cls(issuer, http, **options)
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            document = await probe._get_json(url)
        except (httpx.HTTPError, ValueError, TimeoutError, RecursionError) as error:
            msg = f"OpenID Connect discovery failed for {issuer!r}"
            raise KeySetUnavailable(msg) from error
        if not isinstance(document, Mapping) or document.get("issuer") != issuer:
            msg = f"the discovery document of {issuer!r} names another issuer"
            raise ConfigurationError(msg)
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            msg = f"the discovery document of {issuer!r} has no jwks_uri"
            raise ConfigurationError(msg)
        return cls(jwks_uri, http, **options)

    @property
    def keys(self) -> Mapping[str, SigningKey]:
        """The keys currently cached, by ``kid`` (empty before the first fetch)."""
        return dict(self._keys)

    async def get_key(self, kid: str) -> SigningKey:
        """Return the key named *kid*, fetching the key set when it must.

        Raises :class:`~resilient.errors.UnknownKey` when no key has that ``kid`` (after
        at most one refetch per cooldown), and :class:`~resilient.errors.KeySetUnavailable`
        when the key set cannot be fetched and no stale copy is recent enough.
        """
        now = self._clock.monotonic()
        if now >= self._expires_at:
            await self._refresh_expired(now)
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._may_fetch(self._clock.monotonic()):
            # An unknown kid: perhaps the issuer rotated. One fetch per cooldown for all.
            with contextlib.suppress(KeySetUnavailable):
                await self._fetch_shared()
            key = self._keys.get(kid)
            if key is not None:
                return key
        elif self._inflight is not None:
            with contextlib.suppress(KeySetUnavailable):
                await asyncio.shield(self._inflight)
            key = self._keys.get(kid)
            if key is not None:
                return key
        raise UnknownKey

    async def refresh(self) -> None:
        """Fetch the key set now (sharing a fetch in flight); raise if it fails."""
        await self._fetch_shared()

    def _may_fetch(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self.refetch_cooldown

    async def _refresh_expired(self, now: float) -> None:
        stale_until = self._expires_at + self.stale_for
        if self._inflight is None and self._last_failed and not self._may_fetch(now):
            # The endpoint failed a moment ago: do not hammer it, serve stale if we may.
            if now < stale_until:
                return
            msg = "the key set is unavailable (its endpoint failed, no recent keys)"
            raise KeySetUnavailable(msg)
        try:
            await self._fetch_shared()
        except KeySetUnavailable:
            if self._clock.monotonic() < stale_until:
                return
            raise

    async def _fetch_shared(self) -> None:
        if self._inflight is None:
            self._last_attempt = self._clock.monotonic()
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._forget)
        await asyncio.shield(self._inflight)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: the callers saw it through the shield

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            document, cache_control = await self._get(self.url)
            keys = parse_key_set(document)
            if not keys:
                msg = "the key set has no usable signature key"
                raise ValueError(msg)
        except (httpx.HTTPError, ValueError, TimeoutError, RecursionError) as error:
            self._last_failed = True
            stale = self._clock.monotonic() < self._expires_at + self.stale_for
            outcome = "stale" if stale else "unavailable"
            emit(self.observer, KeySetFetchFailed("jwks", self.url, error, outcome))
            msg = "the key set is unavailable (its endpoint failed)"
            raise KeySetUnavailable(msg) from error
        max_age = parse_max_age(cache_control)
        ttl = self.default_ttl if max_age is None else float(max_age)
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        self._keys = keys
        self._expires_at = self._clock.monotonic() + ttl
        self._last_failed = False
        emit(self.observer, KeySetFetched("jwks", self.url, len(keys), ttl))

    async def _get_json(self, url: str) -> object:
        document, _ = await self._get(url)
        return document

    async def _get(self, url: str) -> tuple[object, str | None]:
        check_url(url)
        async with asyncio.timeout(self.timeout):
            if self._http is not None:
                return await self._get_with(self._http, url)
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
                return await self._get_with(http, url)

    async def _get_with(self, http: httpx.AsyncClient, url: str) -> tuple[object, str | None]:
        request = http.build_request(
            "GET", url, headers={"accept": "application/json"}, timeout=self.timeout
        )
        response = await http.send(request, stream=True, follow_redirects=False)
        try:
            if response.status_code != 200:
                msg = f"HTTP {response.status_code} (redirects are not followed)"
                raise ValueError(msg)
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                msg = f"the response is larger than {self.max_bytes} bytes"
                raise ValueError(msg)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    msg = f"the response is larger than {self.max_bytes} bytes"
                    raise ValueError(msg)
        finally:
            await response.aclose()
        return json.loads(body), response.headers.get("cache-control")

    def __repr__(self) -> str:
        return f"JWKSClient({self.url!r})"
