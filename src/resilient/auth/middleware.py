"""``JWTAuthMiddleware``: bearer JWTs checked at the edge of an ASGI application.

::

    app = JWTAuthMiddleware(app, validator=validator, exclude=["/healthz"])

* The token comes from ``Authorization: Bearer <token>`` (RFC 6750 section 2.1) only:
  never from the query string or a form body.
* On success the scope carries the principal in Starlette's shape: ``scope["user"]`` (a
  :class:`JWTUser`: ``is_authenticated``, ``display_name``, ``identity``, ``claims``) and
  ``scope["auth"]`` (an :class:`AuthCredentials` whose ``scopes`` come from the ``scope``
  or ``scp`` claim), so ``request.user``, ``request.auth.scopes`` and Starlette's own
  ``authorize`` work. ``scope["state"]["claims"]`` holds the claims too.
* Without a token (no ``Authorization`` header, or one of another scheme, such as
  ``Basic``): 401 with a bare ``WWW-Authenticate: Bearer realm="..."`` (RFC 6750 section
  3.1: no error code when no bearer credentials were sent), unless ``optional=True``,
  which lets the request through with an unauthenticated user.
* An invalid token, including a ``Bearer`` credential that is not a token at all: 401
  with ``WWW-Authenticate: Bearer error="invalid_token", error_description="..."``; the
  description is the :class:`InvalidToken` message, safe to show.
* Several ``Authorization`` headers: 400, ``error="invalid_request"``.
* Every error has an RFC 9457 ``application/problem+json`` body.
* The key set unavailable (the issuer is down, no stale keys left): 503 with
  ``Retry-After``, since the client did nothing wrong.

WebSocket connections are checked the same way and closed with code 1008 when refused;
other scopes (lifespan) pass straight through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from resilient._asgi import ASGIApp, Message, Receive, Scope, Send
from resilient._routing import PathPattern
from resilient.errors import InvalidToken, KeySetUnavailable
from resilient.problem import send_problem

if TYPE_CHECKING:
    from resilient.auth.jwt import JWTValidator

__all__ = [
    "REFUSAL",
    "AuthCredentials",
    "JWTAuthMiddleware",
    "JWTUser",
    "UnauthenticatedUser",
    "challenge_value",
]

REFUSAL = "resilient.auth.refusal"
"""The scope key where :func:`~resilient.auth.authorization` leaves its refusal, ``(status,
detail, error)``, for the middleware to answer with its realm and a problem body."""

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_BEARER = re.compile(r"[ \t]*[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)[ \t]*")
# Credentials of the Bearer scheme, whatever follows (RFC 9110: the scheme is case-blind).
_BEARER_SCHEME = re.compile(r"[ \t]*[Bb][Ee][Aa][Rr][Ee][Rr](?:[ \t]|$)")
# RFC 6750 section 3: error_description is limited to %x20-21 / %x23-5B / %x5D-7E.
_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def challenge_value(text: str) -> str:
    """Return *text* without the characters a ``Bearer`` challenge's quoted values forbid.

    RFC 6750 section 3 limits ``error_description`` to ``%x20-21 / %x23-5B / %x5D-7E``:
    no double quote, no backslash, no control character, nothing beyond ASCII, so the
    value can stand between quotes as it is. The realm is held to the same.

    >>> challenge_value('no "kid" in the token')
    'no kid in the token'
    """
    return _UNSAFE.sub("", text)


class AuthCredentials:
    """What the request may do: ``scopes``, as Starlette's ``AuthCredentials`` has them."""

    __slots__ = ("scopes",)

    def __init__(self, scopes: Iterable[str] = ()) -> None:
        self.scopes = list(scopes)

    def __repr__(self) -> str:
        return f"AuthCredentials({self.scopes!r})"


class JWTUser:
    """The principal of a request with a valid token, shaped like Starlette's ``BaseUser``.

    ``identity`` is the ``sub`` claim; ``display_name`` the ``name``, ``username``,
    ``preferred_username`` or ``cognito:username`` claim, else ``sub``; ``claims`` all of
    them.
    """

    __slots__ = ("claims",)

    def __init__(self, claims: Mapping[str, Any]) -> None:
        self.claims = dict(claims)

    @property
    def is_authenticated(self) -> bool:
        """Always true: this user presented a valid token."""
        return True

    @property
    def identity(self) -> str:
        """The ``sub`` claim ("" when absent)."""
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else ""

    @property
    def display_name(self) -> str:
        """A human-readable name from the claims, or the ``sub``."""
        for name in ("name", "username", "preferred_username", "cognito:username"):
            value = self.claims.get(name)
            if isinstance(value, str) and value:
                return value
        return self.identity

    def __repr__(self) -> str:
        return f"JWTUser(identity={self.identity!r})"


class UnauthenticatedUser:
    """The user of a request without a token, when the middleware is ``optional``."""

    __slots__ = ()

    @property
    def is_authenticated(self) -> bool:
        """Always false."""
        return False

    @property
    def display_name(self) -> str:
        """Always ``""``."""
        return ""

    @property
    def identity(self) -> str:
        """Always ``""``."""
        return ""


def scopes_of(claims: Mapping[str, Any]) -> list[str]:
    """Return the OAuth scopes of *claims*: ``scope`` (space-separated) or ``scp``."""
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
    return []


def _bearer_token(scope: Scope) -> str | tuple[int, str, str] | None:
    """Return the request's bearer token, ``None`` if it sent none, or a refusal."""
    values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
    if len(values) > 1:
        return 400, "the request has more than one Authorization header", "invalid_request"
    text = values[0].decode("latin-1") if values else ""
    match = _BEARER.fullmatch(text)
    if match is not None:
        return match.group(1)
    if _BEARER_SCHEME.match(text) is not None:
        return 401, "the bearer token is malformed", "invalid_token"
    return None


class JWTAuthMiddleware:
    """Authenticate every HTTP and WebSocket request with a bearer JWT.

    *validator* checks the tokens; *exclude* lists path patterns that need no token
    (exact paths, ``{templates}`` or ``prefix*``); *optional* lets requests without a
    token through as :class:`UnauthenticatedUser` (an invalid token is still refused);
    *realm* names the protection space in ``WWW-Authenticate``. See the module docstring.

    >>> app = JWTAuthMiddleware(app, validator=validator, exclude=["/healthz"])  # doctest: +SKIP
    """

    __slots__ = ("_exclude", "app", "optional", "realm", "retry_after", "validator")

    def __init__(
        self,
        app: ASGIApp,
        *,
        validator: JWTValidator,
        exclude: Iterable[str] = (),
        optional: bool = False,
        realm: str = "api",
        retry_after: int = 30,
    ) -> None:
        self.app = app
        self.validator = validator
        self._exclude = tuple(PathPattern(p) for p in exclude)
        self.optional = optional
        self.realm = challenge_value(realm)
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request's bearer token, then call the application or refuse."""
        if scope["type"] in {"http", "websocket"} and not any(
            p.matches(scope.get("path", "")) for p in self._exclude
        ):
            refusal = await self._authenticate(scope)
            if refusal is not None:
                await self._refuse(scope, send, *refusal)
                return
            if scope["type"] == "http":
                send = _Responder(self, scope, send).send
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> tuple[int, str, str | None] | None:
        """Put the principal in *scope*; or return (status, detail, error) to refuse."""
        token = _bearer_token(scope)
        if isinstance(token, tuple):
            return token
        if token is None:  # no credentials, or another scheme's: no bearer token was sent
            if self.optional:
                scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
                return None
            return 401, "a bearer token is required", None
        try:
            claims = await self.validator.validate(token)
        except InvalidToken as error:
            return 401, error.description, error.error
        except KeySetUnavailable:
            return 503, "tokens cannot be checked right now; try again later", None
        scope["user"] = JWTUser(claims)
        scope["auth"] = AuthCredentials(scopes_of(claims))
        scope.setdefault("state", {})["claims"] = claims
        return None

    async def _refuse(
        self, scope: Scope, send: Send, status: int, detail: str, error: str | None
    ) -> None:
        """Send the refusal: a problem body, and a challenge (or ``Retry-After`` for 503)."""
        if scope["type"] == "websocket":
            code = 1011 if status == 503 else 1008  # server error, or policy violation
            await send({"type": "websocket.close", "code": code, "reason": ""})
            return
        if status == 503:
            headers = [(b"retry-after", str(self.retry_after).encode())]
        else:
            challenge = f'Bearer realm="{self.realm}"'
            if error is not None:
                description = challenge_value(detail)
                challenge += f', error="{error}", error_description="{description}"'
            headers = [(b"www-authenticate", challenge.encode())]
        await send_problem(send, status, detail, headers=headers)


class _Responder:
    """One request's way out: answers a refusal of ``authorize`` as the middleware's own.

    The application renders the ``HTTPException`` that ``authorize`` raised its own way
    (plain text, FastAPI's JSON...); when the response starts with the status that
    ``authorize`` left in the scope, the middleware sends its refusal instead and drops
    the application's body.
    """

    __slots__ = ("_send", "middleware", "replaced", "scope")

    def __init__(self, middleware: JWTAuthMiddleware, scope: Scope, send: Send) -> None:
        self.middleware = middleware
        self.scope = scope
        self._send = send
        self.replaced = False

    async def send(self, message: Message) -> None:
        """Pass *message* on, unless it belongs to a refusal answered in its place."""
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            refusal = self.scope.get(REFUSAL)
            if refusal is not None and refusal[0] == message["status"]:
                self.replaced = True
                await self.middleware._refuse(self.scope, self._send, *refusal)
                return
        await self._send(message)
