"""JWKSClient: an issuer's signing keys, fetched with httpx, cached, and kept through outages.

::

    jwks = JWKSClient("https://issuer.example/.well-known/jwks.json")
    key = await jwks.get_key(kid)          # a SigningKey, or UnknownKey / KeySetUnavailable

    jwks = SyncJWKSClient("https://issuer.example/.well-known/jwks.json")
    key = jwks.get_key(kid)                # the same, for code without an event loop

Both clients make the same promises, because one :class:`~resilient.auth.core.KeySetCache`
makes every decision for both; they differ only in their I/O (``httpx.AsyncClient`` and an
asyncio task shared by concurrent callers, or ``httpx.Client`` and a future shared by
threads). What they promise:

* **cached**: the key set is kept for ``Cache-Control: max-age`` seconds, bounded to
  ``[min_ttl, max_ttl]`` (``default_ttl`` when the header says nothing);
* **single-flight**: concurrent callers (coroutines, or threads) that need a fetch share
  one;
* **flood-proof**: an unknown ``kid`` triggers a refetch at most once per
  ``refetch_cooldown`` (one clock for every kid), and known kids keep validating meanwhile;
* **outage-tolerant**: when the endpoint fails, the last good keys are served for
  ``stale_for`` seconds past their expiry, then :class:`KeySetUnavailable` is raised;
* **careful with the network**: https only (plain http only for loopback hosts), no
  redirects followed, the body capped at ``max_bytes``, every fetch bounded by ``timeout``;
* **one httpx client** per client: the one given, or one made on the first fetch (no
  connection kept between fetches, one TLS context for every client made) and closed by
  ``aclose()`` / ``close()``, after which the client fetches no more;
* **careful with keys**: only public signature keys are kept: RSA of 2048 bits or more,
  EC on P-256 or P-384, OKP Ed25519. Symmetric (``kty=oct``) and private keys, keys for
  encryption (``use=enc``) and anything PyJWT cannot parse are dropped.

This module needs PyJWT and httpx (``pip install 'resilient-asgi[jwt]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar
from urllib.parse import urlsplit

try:
    import httpx
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
except ImportError as error:  # pragma: no cover (the test suite always has them)
    msg = "resilient.auth needs PyJWT and httpx: pip install 'resilient-asgi[jwt]'"
    raise ImportError(msg) from error

from resilient.auth.core import KeySetCache, Need, SigningKey, parse_max_age
from resilient.clock import Clock, SystemClock
from resilient.errors import ConfigurationError, KeySetUnavailable
from resilient.events import (
    Event,
    KeySetFetched,
    KeySetFetchFailed,
    LoggingObserver,
    Observer,
    emit,
)

__all__ = [
    "JWKSClient",
    "SigningKey",
    "SyncJWKSClient",
    "check_url",
    "parse_key_set",
    "parse_max_age",
]

logger = logging.getLogger("resilient.auth")

MIN_RSA_BITS: Final = 2048
EC_CURVES: Final = frozenset({"P-256", "P-384"})
OKP_CURVES: Final = frozenset({"Ed25519"})
_DEFAULT_OBSERVER = LoggingObserver()
# What a failed fetch may raise: the network, the HTTP status, the size, the JSON, the keys.
_FETCH_ERRORS: Final = (httpx.HTTPError, ValueError, TimeoutError, RecursionError)
_T = TypeVar("_T")
# The client a JWKS client makes keeps no connection between fetches: they are minutes
# apart, past httpx's keep-alive expiry (5 s), and a connection kept by an AsyncClient
# fails the next fetch if the event loop it was made on has closed (asyncio.run, tests).
_UNPOOLED: Final = httpx.Limits(max_keepalive_connections=0)


@functools.cache
def _tls() -> ssl.SSLContext:
    """Return httpx's default TLS settings, made once for every client a JWKS client makes.

    Making them reads a bundle of CA certificates (certifi's, or ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` as found on the first call): tens of milliseconds, which a new
    httpx client would otherwise pay on a client's first fetch. Never changed once made.
    """
    return httpx.create_ssl_context()


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


_Http = TypeVar("_Http", httpx.AsyncClient, httpx.Client)


class _KeySetClient(Generic[_Http]):
    """What both clients share: their options, the cache, the httpx client, the checks.

    The options are spelled here only; the cache's decisions are made by
    :class:`~resilient.auth.core.KeySetCache`; the checks are those of what came back.
    """

    def __init__(
        self,
        url: str,
        http: _Http | None = None,
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
        self._cache = KeySetCache(
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            default_ttl=default_ttl,
            refetch_cooldown=refetch_cooldown,
            stale_for=stale_for,
        )
        if not timeout > 0 or max_bytes < 1:
            msg = "timeout and max_bytes must be positive"
            raise ConfigurationError(msg)
        self.timeout = float(timeout)
        self.max_bytes = int(max_bytes)
        self._clock = clock or SystemClock()
        self.observer = observer
        self.fetches = 0
        self._http: _Http | None = http
        self._owns_http = http is None  # made on the first fetch, closed with this client
        self._closed = False
        # Guards the cache, the fetch in flight and the httpx client when the callers are
        # threads (the sync client); never held during I/O, so a fetch does not block
        # lookups that need none. The async client's callers share one event loop.
        self._lock = threading.Lock()

    @property
    def keys(self) -> Mapping[str, SigningKey]:
        """The keys currently cached, by ``kid`` (empty before the first fetch)."""
        return dict(self._cache.keys)

    @property
    def min_ttl(self) -> float:
        """The shortest time keys are kept, whatever ``Cache-Control`` says."""
        return self._cache.min_ttl

    @property
    def max_ttl(self) -> float:
        """The longest time keys are kept, whatever ``Cache-Control`` says."""
        return self._cache.max_ttl

    @property
    def default_ttl(self) -> float:
        """How long keys are kept when the response has no ``max-age``."""
        return self._cache.default_ttl

    @property
    def refetch_cooldown(self) -> float:
        """The least time between two fetch attempts for unknown kids or after a failure."""
        return self._cache.refetch_cooldown

    @property
    def stale_for(self) -> float:
        """How long past their expiry the last good keys serve while the endpoint fails."""
        return self._cache.stale_for

    def _client(self) -> _Http:
        """Return the httpx client to fetch with: the one given, or this one's own."""
        with self._lock:
            if self._closed:
                msg = f"the {type(self).__name__} is closed"
                raise ValueError(msg)  # a failed fetch: stale keys still serve
            if self._http is None:
                self._http = self._new_client()
            return self._http

    def _new_client(self) -> _Http:
        raise NotImplementedError

    def _release(self) -> _Http | None:
        """Close this client to fetches; return the httpx client to close, if it made one."""
        with self._lock:
            self._closed = True
            http = self._http if self._owns_http else None
            if self._owns_http:
                self._http = None
        return http

    @staticmethod
    def _usable_keys(document: object) -> dict[str, SigningKey]:
        """Return the keys of a fetched *document*; raise :class:`ValueError` if none."""
        keys = parse_key_set(document)
        if not keys:
            msg = "the key set has no usable signature key"
            raise ValueError(msg)
        return keys

    def _keep(self, keys: Mapping[str, SigningKey], cache_control: str | None) -> Event:
        """Record a successful fetch of *keys*; return the event to emit."""
        ttl = self._cache.ttl_for(cache_control)
        self._cache.fetched(keys, ttl, self._clock.monotonic())
        return KeySetFetched("jwks", self.url, len(keys), ttl)

    def _reject(self, error: Exception) -> tuple[KeySetUnavailable, Event]:
        """Record a failed fetch: the error for its waiters, and the event to emit."""
        stale = self._cache.failed(self._clock.monotonic())
        event = KeySetFetchFailed("jwks", self.url, error, "stale" if stale else "unavailable")
        msg = "the key set is unavailable (its endpoint failed)"
        failure = KeySetUnavailable(msg)
        failure.__cause__ = error
        return failure, event

    def _request(self, http: _Http, url: str) -> httpx.Request:
        check_url(url)
        headers = {"accept": "application/json"}
        return http.build_request("GET", url, headers=headers, timeout=self.timeout)

    def _check_head(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            msg = f"HTTP {response.status_code} (redirects are not followed)"
            raise ValueError(msg)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self._too_large()

    def _check_size(self, body: bytearray) -> None:
        if len(body) > self.max_bytes:
            self._too_large()

    def _too_large(self) -> None:
        msg = f"the response is larger than {self.max_bytes} bytes"
        raise ValueError(msg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _discovery_url(issuer: str) -> str:
    check_url(issuer)
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


@contextlib.contextmanager
def _discovering(issuer: str) -> Iterator[None]:
    """Report a failed fetch of *issuer*'s discovery document as the key set unavailable."""
    try:
        yield
    except _FETCH_ERRORS as error:
        msg = f"OpenID Connect discovery failed for {issuer!r}"
        raise KeySetUnavailable(msg) from error


def _jwks_uri(issuer: str, document: object) -> str:
    if not isinstance(document, Mapping) or document.get("issuer") != issuer:
        msg = f"the discovery document of {issuer!r} names another issuer"
        raise ConfigurationError(msg)
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        msg = f"the discovery document of {issuer!r} has no jwks_uri"
        raise ConfigurationError(msg)
    return jwks_uri


class JWKSClient(_KeySetClient[httpx.AsyncClient]):
    """The signing keys of one issuer, fetched from its JWKS URL and cached (asyncio).

    *http* is an ``httpx.AsyncClient`` to fetch with (its redirects are not followed
    whatever it is configured to do), left open by :meth:`aclose`; without one, the
    client makes its own on its first fetch, keeps it for the next ones and closes it in
    :meth:`aclose` (or at the end of ``async with``), after which it fetches no more (its
    cached keys still serve, as through an outage). Times are in seconds. Each fetch
    emits :class:`~resilient.events.KeySetFetched` or
    :class:`~resilient.events.KeySetFetchFailed` to *observer* (logging by default). See
    the module docstring for the guarantees; :class:`SyncJWKSClient` is the same client
    for code without an event loop.

    >>> jwks = JWKSClient("https://issuer.example/.well-known/jwks.json")
    """

    _inflight: asyncio.Task[None] | None = None

    @classmethod
    async def from_issuer(
        cls, issuer: str, http: httpx.AsyncClient | None = None, **options: Any
    ) -> JWKSClient:
        """Discover the ``jwks_uri`` of *issuer* through OpenID Connect discovery.

        Fetches ``{issuer}/.well-known/openid-configuration`` (same network rules as the
        key set), checks that the document names the same issuer, and returns a client
        for its ``jwks_uri``. *options* are the constructor's keywords.
        """
        async with cls(issuer, http, **options) as probe:
            with _discovering(issuer):
                document, _ = await probe._get(_discovery_url(issuer))
        return cls(_jwks_uri(issuer, document), http, **options)

    async def get_key(self, kid: str) -> SigningKey:
        """Return the key named *kid*, fetching the key set when it must.

        Raises :class:`~resilient.errors.UnknownKey` when no key has that ``kid`` (after
        at most one refetch per cooldown), and :class:`~resilient.errors.KeySetUnavailable`
        when the key set cannot be fetched and no stale copy is recent enough.
        """
        key = self._cache.fresh_key(kid, self._clock.monotonic())
        if key is not None:
            return key
        return await self._drive(self._cache.lookup(kid, self._clock))

    async def refresh(self) -> None:
        """Fetch the key set now (sharing a fetch in flight); raise if it fails."""
        await self._drive(self._cache.refresh(self._clock))

    async def aclose(self) -> None:
        """Close the httpx client this one made (not one given as *http*); fetch no more."""
        http = self._release()
        if http is not None:
            await http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, limits=_UNPOOLED, verify=_tls()
        )

    async def _drive(self, flow: Generator[Need, KeySetUnavailable | None, _T]) -> _T:
        failure: KeySetUnavailable | None = None
        while True:
            try:
                need = flow.send(failure)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if need is Need.FETCH or self._inflight is None:  # the cache asks for one
                task = asyncio.create_task(self._fetch())
                task.add_done_callback(self._forget)
                self._inflight = task
            try:
                # Shielded: a caller that gives up does not cancel the others' fetch.
                await asyncio.shield(self._inflight)
            except KeySetUnavailable as error:
                failure = error
            else:
                failure = None

    def _forget(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None
            if self._cache.fetching:  # cancelled before it could report: let others try
                self._cache.abandoned()
        if not task.cancelled():
            task.exception()  # retrieved: the callers saw it through the shield

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            document, cache_control = await self._get(self.url)
            event = self._keep(self._usable_keys(document), cache_control)
        except _FETCH_ERRORS as error:
            failure, event = self._reject(error)
            emit(self.observer, event)
            raise failure from error
        emit(self.observer, event)

    async def _get(self, url: str) -> tuple[object, str | None]:
        http = self._client()
        async with asyncio.timeout(self.timeout):
            request = self._request(http, url)
            response = await http.send(request, stream=True, follow_redirects=False)
            try:
                self._check_head(response)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    self._check_size(body)
            finally:
                await response.aclose()
        return json.loads(body), response.headers.get("cache-control")


class SyncJWKSClient(_KeySetClient[httpx.Client]):
    """The signing keys of one issuer, fetched and cached, for code without an event loop.

    :class:`JWKSClient` for threads, with the same options and the same promises (one
    :class:`~resilient.auth.core.KeySetCache` decides for both): only the I/O differs.
    *http* is an ``httpx.Client``; without one, the client makes its own, closed by
    :meth:`close` (or at the end of ``with``). Fetches block the calling thread. It is
    thread-safe, and single-flight across threads: the threads that need a fetch while
    one is in flight wait for that one, while those whose kid is cached and fresh take
    no lock at all. Use it with a :class:`~resilient.auth.SyncJWTValidator`.

    >>> jwks = SyncJWKSClient("https://issuer.example/.well-known/jwks.json")
    """

    _inflight: Future[None] | None = None

    @classmethod
    def from_issuer(
        cls, issuer: str, http: httpx.Client | None = None, **options: Any
    ) -> SyncJWKSClient:
        """Discover the ``jwks_uri`` of *issuer* through OpenID Connect discovery.

        Fetches ``{issuer}/.well-known/openid-configuration`` (same network rules as the
        key set), checks that the document names the same issuer, and returns a client
        for its ``jwks_uri``. *options* are the constructor's keywords.
        """
        with cls(issuer, http, **options) as probe, _discovering(issuer):
            document, _ = probe._get(_discovery_url(issuer))
        return cls(_jwks_uri(issuer, document), http, **options)

    def get_key(self, kid: str) -> SigningKey:
        """Return the key named *kid*, fetching the key set when it must.

        Raises :class:`~resilient.errors.UnknownKey` when no key has that ``kid`` (after
        at most one refetch per cooldown), and :class:`~resilient.errors.KeySetUnavailable`
        when the key set cannot be fetched and no stale copy is recent enough.
        """
        key = self._cache.fresh_key(kid, self._clock.monotonic())
        if key is not None:
            return key
        return self._drive(self._cache.lookup(kid, self._clock))

    def refresh(self) -> None:
        """Fetch the key set now (sharing a fetch in flight); raise if it fails."""
        self._drive(self._cache.refresh(self._clock))

    def close(self) -> None:
        """Close the httpx client this one made (not one given as *http*); fetch no more."""
        http = self._release()
        if http is not None:
            http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self.timeout, follow_redirects=False, limits=_UNPOOLED, verify=_tls()
        )

    def _drive(self, flow: Generator[Need, KeySetUnavailable | None, _T]) -> _T:
        failure: KeySetUnavailable | None = None
        while True:
            with self._lock:
                try:
                    need = flow.send(failure)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                inflight = self._inflight
                fetch = need is Need.FETCH or inflight is None  # the cache asks for one
                if inflight is None or fetch:
                    inflight = self._inflight = Future()
            if fetch:
                self._fetch(inflight)
            error = inflight.exception()  # waits for the fetch to end
            failure = error if isinstance(error, KeySetUnavailable) else None

    def _fetch(self, inflight: Future[None]) -> None:
        self.fetches += 1
        try:
            document, cache_control = self._get(self.url)
            keys = self._usable_keys(document)  # parsing keys takes a while: not locked
            with self._lock:
                event = self._keep(keys, cache_control)
                self._inflight = None
        except _FETCH_ERRORS as error:
            with self._lock:
                failure, event = self._reject(error)
                self._inflight = None
            inflight.set_exception(failure)
        except BaseException:
            # Interrupted (KeyboardInterrupt, a bug): let the waiters, and the next caller,
            # go on instead of waiting for a fetch that will never report.
            with self._lock:
                self._cache.abandoned()
                self._inflight = None
            msg = "the fetch of the key set was interrupted"
            inflight.set_exception(KeySetUnavailable(msg))
            raise
        else:
            inflight.set_result(None)
        emit(self.observer, event)

    def _get(self, url: str) -> tuple[object, str | None]:
        http = self._client()
        # httpx bounds each read; a server trickling bytes is bounded here as a whole,
        # on the real clock (the async client uses asyncio.timeout the same way).
        deadline = time.monotonic() + self.timeout
        request = self._request(http, url)
        response = http.send(request, stream=True, follow_redirects=False)
        try:
            self._check_head(response)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                self._check_size(body)
                if time.monotonic() > deadline:
                    msg = f"the key set took longer than {self.timeout} seconds"
                    raise TimeoutError(msg)
        finally:
            response.close()
        return json.loads(body), response.headers.get("cache-control")
