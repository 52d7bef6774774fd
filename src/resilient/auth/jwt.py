"""JWTValidator: every known JWT attack refused by default, keys from a :class:`JWKSClient`.

::

    validator = JWTValidator(jwks, issuer="https://issuer.example", audience="api")
    claims = await validator.validate(token)       # or an InvalidToken subclass

    validator = SyncJWTValidator(sync_jwks, issuer="https://issuer.example", audience="api")
    claims = validator.validate(token)             # the same, without an event loop

Both run the same checks (written once, in a base class); they differ only in how they
ask their key source for the key.

Checked before any key is looked up, on the raw header (never trusting PyJWT's defaults):

* the token is a compact JWS of three base64url parts, at most ``max_token_bytes``, each
  in its one canonical spelling (unused bits zero), so a token cannot be respelled;
* ``alg`` is in the allow-list, which holds asymmetric algorithms only (``none`` and
  ``HS*`` can never be allowed, so a public key can never serve as an HMAC secret);
* ``kid`` is a short printable string without ``..`` or a backslash;
* ``crit`` lists no extension (none is understood, so any is refused);
* ``jku``, ``x5u``, ``jwk`` and ``x5c`` are ignored: keys come only from the configured
  key set, never from the token.

Then the key named by ``kid`` must fit ``alg`` (RSA for ``RS*``/``PS*``, P-256 for ES256,
P-384 for ES384, OKP for EdDSA, and the JWK's own ``alg`` if it pins one); ECDSA signatures
must have the exact length with ``0 < r, s < n`` and, by default, a low ``s``; PyJWT's
algorithm objects verify the signature (on ``cryptography``), over the bytes parsed once
here rather than parsed again by ``jwt.decode``. Last the claims, against the injected
clock: the required ones (``exp`` by default), ``exp``, ``nbf`` and ``iat`` (finite
numbers, not in the future) with ``leeway``, ``iss``, ``aud``, and Cognito's
``token_use`` and ``client_id`` when asked for.

This module needs PyJWT and httpx (``pip install 'resilient-asgi[jwt]'``).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any, Final, Generic, Protocol, Self, TypeVar

try:
    import jwt
except ImportError as error:  # pragma: no cover (the test suite always has it)
    msg = "resilient.auth needs PyJWT and httpx: pip install 'resilient-asgi[jwt]'"
    raise ImportError(msg) from error

from resilient.auth.jwks import SigningKey
from resilient.clock import Clock, SystemClock
from resilient.errors import (
    BadAudience,
    BadIssuer,
    BadSignature,
    ConfigurationError,
    DisallowedAlgorithm,
    ExpiredToken,
    InvalidToken,
    MalformedToken,
    MissingClaim,
    NotYetValid,
    UnknownKey,
    WrongTokenUse,
)
from resilient.events import LoggingObserver, Observer, TokenRejected, emit

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "JWTValidator",
    "KeySource",
    "SyncJWTValidator",
    "SyncKeySource",
]

# alg -> (kty, crv or None for any supported curve of that kty)
_KEY_FOR_ALG: Final[Mapping[str, tuple[str, str | None]]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", None),
}

# PyJWT's own implementations verify the signatures (on cryptography).
_ALGORITHMS: Final = {name: jwt.get_algorithm_by_name(name) for name in _KEY_FOR_ALG}

ASYMMETRIC_ALGORITHMS: Final = tuple(_KEY_FOR_ALG)
"""Every algorithm a :class:`JWTValidator` can allow: the default allow-list."""

# ECDSA: (signature length in bytes, the curve's order n)
_ECDSA: Final[Mapping[str, tuple[int, int]]] = {
    "ES256": (64, 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551),
    "ES384": (
        96,
        0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
    ),
}

_DEFAULT_OBSERVER = LoggingObserver()
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64_VALUES: Final = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
# The last character of a part of 4n+2 characters carries 2 bits of data and 4 unused
# ones; of 4n+3 characters, 4 bits of data and 2 unused. Unused bits must be zero.
_UNUSED_BITS: Final = {2: 0b1111, 3: 0b11}
_KID = re.compile(r"[\x21-\x7e]{1,128}")
# A JSON escape that may spell a surrogate (\uD800 to \uDFFF): the only way a lone one,
# which no UTF-8 text can hold, gets into a parsed token.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_IGNORED_HEADERS: Final = ("jku", "x5u", "jwk", "x5c")


class KeySource(Protocol):
    """Where a :class:`JWTValidator` finds keys: :class:`JWKSClient` is one."""

    async def get_key(self, kid: str) -> SigningKey:
        """Return the key named *kid*, or raise :class:`~resilient.errors.UnknownKey`."""
        ...


class SyncKeySource(Protocol):
    """Where a :class:`SyncJWTValidator` finds keys: :class:`SyncJWKSClient` is one."""

    def get_key(self, kid: str) -> SigningKey:
        """Return the key named *kid*, or raise :class:`~resilient.errors.UnknownKey`."""
        ...


_S = TypeVar("_S", KeySource, SyncKeySource)


def _b64decode(part: str) -> bytes:
    if _B64URL.fullmatch(part) is None:
        raise MalformedToken
    rest = len(part) % 4
    if rest and (rest == 1 or _B64_VALUES[part[-1]] & _UNUSED_BITS[rest]):
        # Padding bits set: a second spelling of the same bytes. Refused, so that a token
        # has one spelling only (a denylist of tokens cannot be dodged by respelling).
        raise MalformedToken
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover (refused above)
        raise MalformedToken from None


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedToken from None
    if not isinstance(value, dict):
        raise MalformedToken
    if _SURROGATE_ESCAPE.search(raw) is not None and _holds_lone_surrogate(value):
        # I-JSON (RFC 7493) forbids them; let in, they break whatever encodes the claims
        # (a JSON response, a log line, a Redis key), far from here.
        msg = "the token's JSON holds a lone surrogate (\\uD800-\\uDFFF), which I-JSON forbids"
        raise MalformedToken(msg)
    return value


def _holds_lone_surrogate(value: object) -> bool:
    """Whether *value*, parsed JSON, holds a string (or a key) that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(k) or _holds_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_lone_surrogate(item) for item in value)
    return False


def _media_type(typ: str) -> str:
    # RFC 7515 section 4.1.9: "application/" may be omitted, and compared case-insensitively.
    typ = typ.lower()
    return typ.removeprefix("application/")


def _date(claims: Mapping[str, Any], name: str) -> float | None:
    """Return the NumericDate claim *name* as a float (``None`` if absent), or refuse it."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)  # an int past 1.8e308 cannot be compared with a time
        except OverflowError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise MissingClaim(name)


def _strings(value: str | Collection[str] | None, name: str) -> frozenset[str] | None:
    if value is None:
        return None
    values = frozenset([value] if isinstance(value, str) else value)
    if not values or not all(isinstance(v, str) and v for v in values):
        msg = f"{name} must be a non-empty string or collection of strings"
        raise ConfigurationError(msg)
    return values


_REQUIRED: Final = {
    "issuer": "issuer= names the issuer (or issuers) a token must come from",
    "audience": (
        "audience= the audience (or audiences) it must be for, or None for tokens without "
        "aud (Cognito access tokens, checked with client_id=)"
    ),
}


class _RequiredOptions:
    """Refuses a validator made without ``issuer=`` or ``audience=``, naming what is missing.

    Python's own ``TypeError`` would name the private class that defines ``__init__``.
    """

    def __new__(cls, *args: Any, **options: Any) -> Self:
        missing = [name for name in _REQUIRED if name not in options]
        if missing and (args or options):  # copy and pickle call __new__ bare
            names = " and ".join(f"{name}=" for name in missing)
            reasons = "; ".join(_REQUIRED[name] for name in missing)
            msg = f"{cls.__name__} is missing {names}: {reasons}"
            raise ConfigurationError(msg)
        return super().__new__(cls)


class _Validation(_RequiredOptions, Generic[_S]):
    """The options and every check of a validator: all but the call for the key."""

    _wants_coroutines: bool

    def __init__(
        self,
        jwks: _S | Mapping[str, _S],
        *,
        issuer: str | Collection[str],
        audience: str | Collection[str] | None,
        algorithms: Collection[str] = ASYMMETRIC_ALGORITHMS,
        leeway: float = 30.0,
        required_claims: Collection[str] = ("exp",),
        max_token_bytes: int = 8192,
        token_use: str | None = None,
        client_id: str | Collection[str] | None = None,
        reject_high_s: bool = True,
        typ: str | None = None,
        clock: Clock | None = None,
        observer: Observer | None = _DEFAULT_OBSERVER,
    ) -> None:
        for source in jwks.values() if isinstance(jwks, Mapping) else [jwks]:
            self._check_source(source)
        self._jwks: _S | Mapping[str, _S] = jwks
        issuers = _strings(issuer, "issuer")
        if issuers is None:
            msg = f"issuer= is required: {_REQUIRED['issuer']}"
            raise ConfigurationError(msg)
        self.issuers = issuers
        self.audiences = _strings(audience, "audience")
        self.client_ids = _strings(client_id, "client_id")
        if isinstance(algorithms, str):
            algorithms = (algorithms,)
        disallowed = sorted(set(algorithms) - set(ASYMMETRIC_ALGORITHMS))
        if disallowed or not algorithms:
            msg = (
                f"algorithms must be a non-empty subset of {list(ASYMMETRIC_ALGORITHMS)} "
                f"(asymmetric only), got {sorted(algorithms)!r}"
            )
            raise ConfigurationError(msg)
        self.algorithms = frozenset(algorithms)
        if not 0 <= leeway <= 600:
            msg = f"leeway must be between 0 and 600 seconds, got {leeway!r}"
            raise ConfigurationError(msg)
        self.leeway = float(leeway)
        self.required_claims = tuple(required_claims)
        if max_token_bytes < 64:
            msg = f"max_token_bytes must be at least 64, got {max_token_bytes!r}"
            raise ConfigurationError(msg)
        self.max_token_bytes = int(max_token_bytes)
        self.token_use = token_use
        self.reject_high_s = reject_high_s
        self.typ = None if typ is None else _media_type(typ)
        self._clock = clock or SystemClock()
        self.observer = observer

    def _begin(self, token: str | bytes) -> tuple[str, list[str], str, str, _S]:
        """Check what can be checked before a key is needed; return what finishes the job.

        That is the token's text, its three parts, its ``alg`` and ``kid``, and the key
        source to ask for the key.
        """
        text = self._text(token)
        parts = text.split(".")
        if len(parts) != 3:
            raise MalformedToken
        header = _json_object(_b64decode(parts[0]))
        alg = self._check_header(header)
        return text, parts, alg, header["kid"], self._source_for(parts[1])

    def _finish(self, text: str, parts: list[str], alg: str, key: SigningKey) -> dict[str, Any]:
        """Check the key, the signature and the claims; return the claims."""
        self._check_key(alg, key)
        signature = _b64decode(parts[2])
        if alg in _ECDSA:
            self._check_ecdsa(alg, signature)
        signing_input = text[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
        try:
            verified = _ALGORITHMS[alg].verify(signing_input, key.key, signature)
        except (ValueError, TypeError):
            verified = False
        if not verified:
            raise BadSignature
        claims = _json_object(_b64decode(parts[1]))
        self._check_claims(claims)
        return claims

    def _rejected(self, error: InvalidToken) -> None:
        emit(self.observer, TokenRejected("jwt", type(error).__name__))

    def _check_source(self, source: object) -> None:
        get_key = getattr(source, "get_key", None)
        if get_key is None:
            msg = f"{source!r} is not a key source: it has no get_key method"
            raise ConfigurationError(msg)
        # Only plain functions say for sure whether they are coroutine functions.
        if inspect.ismethod(get_key) or inspect.isfunction(get_key):
            is_async = inspect.iscoroutinefunction(get_key)
            if is_async != self._wants_coroutines:
                kind, twin = (
                    ("a sync", "JWTValidator") if is_async else ("an async", "SyncJWTValidator")
                )
                msg = f"{source!r} is {kind} key source: use it with a {twin}"
                raise ConfigurationError(msg)

    def _text(self, token: str | bytes) -> str:
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedToken from None
        if not isinstance(token, str):
            raise MalformedToken
        if len(token) > self.max_token_bytes:
            msg = "the token is too large"
            raise MalformedToken(msg)
        if not token.isascii():
            raise MalformedToken
        return token

    def _check_header(self, header: dict[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise DisallowedAlgorithm
        if "crit" in header:
            msg = "the token requires an unsupported extension (crit)"
            raise MalformedToken(msg)
        kid = header.get("kid")
        if not isinstance(kid, str):
            msg = "the token has no valid key id (kid)"
            raise UnknownKey(msg)
        if _KID.fullmatch(kid) is None or ".." in kid or "\\" in kid:
            msg = "the token has no valid key id (kid)"
            raise UnknownKey(msg)
        # jku, x5u, jwk and x5c are deliberately never read: keys come from the key set.
        if self.typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) != self.typ:
                msg = f"the token is not of type {self.typ!r}"
                raise WrongTokenUse(msg)
        return alg

    def _source_for(self, payload_part: str) -> _S:
        if not isinstance(self._jwks, Mapping):
            return self._jwks
        issuer = _json_object(_b64decode(payload_part)).get("iss")
        source = self._jwks.get(issuer) if isinstance(issuer, str) else None
        if source is None:
            raise BadIssuer
        return source

    @staticmethod
    def _check_key(alg: str, key: SigningKey) -> None:
        kty, crv = _KEY_FOR_ALG[alg]
        if key.kty != kty or (crv is not None and key.crv != crv):
            msg = "the token's algorithm does not match its key"
            raise DisallowedAlgorithm(msg)
        if key.alg is not None and key.alg != alg:
            msg = "the token's algorithm does not match its key"
            raise DisallowedAlgorithm(msg)

    def _check_ecdsa(self, alg: str, signature: bytes) -> None:
        length, order = _ECDSA[alg]
        if len(signature) != length:
            raise BadSignature
        r = int.from_bytes(signature[: length // 2], "big")
        s = int.from_bytes(signature[length // 2 :], "big")
        if not (0 < r < order and 0 < s < order):
            raise BadSignature
        if self.reject_high_s and s > order // 2:
            # Maybe genuine: some issuers do not normalize S. Say so, and what accepts it.
            msg = (
                "the token's ECDSA signature has a high S value (a malleable spelling); "
                "validate with reject_high_s=False to accept issuers that do not normalize S"
            )
            raise BadSignature(msg)

    def _check_claims(self, claims: dict[str, Any]) -> None:  # noqa: PLR0912
        for name in self.required_claims:
            if name not in claims:
                raise MissingClaim(name)
        exp, nbf, iat = _date(claims, "exp"), _date(claims, "nbf"), _date(claims, "iat")
        now = self._clock.time()
        if exp is not None and now >= exp + self.leeway:
            raise ExpiredToken
        if nbf is not None and nbf > now + self.leeway:
            raise NotYetValid
        if iat is not None and iat > now + self.leeway:
            msg = "the token was issued in the future"
            raise NotYetValid(msg)
        iss = claims.get("iss")
        if not isinstance(iss, str):
            raise MissingClaim("iss")
        if iss not in self.issuers:
            raise BadIssuer
        if self.audiences is not None:
            aud = claims.get("aud")
            if aud is None:
                raise MissingClaim("aud")
            auds = [aud] if isinstance(aud, str) else aud
            if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
                raise MissingClaim("aud")
            if self.audiences.isdisjoint(auds):
                raise BadAudience
        if self.token_use is not None and claims.get("token_use") != self.token_use:
            msg = f"the token is not a {self.token_use!r} token"
            raise WrongTokenUse(msg)
        if self.client_ids is not None:
            # Cognito: access tokens carry client_id; ID tokens carry it as aud.
            client = claims.get("client_id", claims.get("aud"))
            if not isinstance(client, str) or client not in self.client_ids:
                raise BadAudience

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(issuer={sorted(self.issuers)!r}, audience={self.audiences!r})"
        )


class JWTValidator(_Validation[KeySource]):
    """Validates bearer JWTs against the keys of a :class:`JWKSClient` (asyncio).

    *jwks* is a key source, or a mapping ``issuer -> key source`` to accept tokens of
    several issuers (the unverified ``iss`` picks the key source, then the verified
    ``iss`` must be one of *issuer*). *issuer* and *audience* are required: pass
    ``audience=None`` only for tokens without ``aud`` (Cognito access tokens, checked by
    *client_id* instead). *typ* requires that ``typ`` header (``"at+jwt"`` for RFC 9068
    access tokens, so an ID token is refused where an access token is expected; a
    Cognito-style ``token_use`` claim is checked by *token_use*). Times are in seconds.
    :class:`SyncJWTValidator` is its twin for code without an event loop.

    >>> validator = JWTValidator(jwks, issuer="https://issuer.example", audience="api")
    >>> claims = await validator.validate(token)  # doctest: +SKIP
    """

    _wants_coroutines = True

    async def validate(self, token: str | bytes) -> dict[str, Any]:
        """Return the claims of *token* if it is valid; raise an :class:`InvalidToken` if not.

        May also raise :class:`~resilient.errors.KeySetUnavailable` when the issuer's key
        set cannot be had (a server-side outage, not the client's fault). Each refusal
        emits a :class:`~resilient.events.TokenRejected` to the observer.
        """
        try:
            text, parts, alg, kid, source = self._begin(token)
            return self._finish(text, parts, alg, await source.get_key(kid))
        except InvalidToken as error:
            self._rejected(error)
            raise


class SyncJWTValidator(_Validation[SyncKeySource]):
    """Validates bearer JWTs against a :class:`SyncJWKSClient`, for code without an event loop.

    Takes the same options as :class:`JWTValidator` and checks exactly the same things
    (both run one set of checks; only the call for the key differs), but its key source
    answers ``get_key`` synchronously and :meth:`validate` is a plain method.

    Why a twin class rather than a ``validate_sync`` method on :class:`JWTValidator`: a
    validator's key source is either async or sync, and so is everything it can do. With
    one class per kind, each has a single ``validate`` that cannot be called the wrong
    way, the type checker refuses a :class:`JWKSClient` here (and the constructor refuses
    it at run time with a clear message), and there is no method that would fail for
    half the key sources it accepts. It is the pairing httpx uses (``Client`` and
    ``AsyncClient``), and the one :class:`~resilient.httpx.SyncResilientTransport` follows.

    >>> validator = SyncJWTValidator(jwks, issuer="https://issuer.example", audience="api")
    >>> claims = validator.validate(token)  # doctest: +SKIP
    """

    _wants_coroutines = False

    def validate(self, token: str | bytes) -> dict[str, Any]:
        """Return the claims of *token* if it is valid; raise an :class:`InvalidToken` if not.

        May also raise :class:`~resilient.errors.KeySetUnavailable` when the issuer's key
        set cannot be had (a server-side outage, not the client's fault). Each refusal
        emits a :class:`~resilient.events.TokenRejected` to the observer.
        """
        try:
            text, parts, alg, kid, source = self._begin(token)
            return self._finish(text, parts, alg, source.get_key(kid))
        except InvalidToken as error:
            self._rejected(error)
            raise
