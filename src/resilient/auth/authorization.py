"""``authorize``: authorization by scopes, roles and groups, on top of ``JWTAuthMiddleware``.

::

    @authorize(scopes=["orders:read"], groups=["staff"])        # a decorator
    async def orders(request): ...

    @app.post("/orders", dependencies=[Depends(authorize(scopes=["orders:write"]))])
    async def create_order(): ...                               # a FastAPI dependency

    @app.get("/me")
    async def me(claims: dict = Depends(authorize())): ...       # which returns the claims

The principal is the one :class:`~resilient.auth.JWTAuthMiddleware` put in the scope.
Every listed scope, role and group is required:

* scopes come from the ``scope`` (space-separated) or ``scp`` claim;
* roles from the ``roles`` claim;
* groups from ``cognito:groups`` or ``groups``.

Both forms refuse alike, and the endpoint is not called: a request without an
authenticated principal (``optional=True`` on the middleware, or an excluded path) gets
401 with ``WWW-Authenticate: Bearer``; one whose token lacks something gets 403 with
``WWW-Authenticate: Bearer error="insufficient_scope"``. They raise Starlette's
``HTTPException`` (FastAPI's is the same class); behind :class:`JWTAuthMiddleware` the
refusal is answered as the middleware answers its own, with the realm and an RFC 9457
problem body, whatever the framework would have rendered. A WebSocket is closed with
code 1008. Without Starlette installed, :class:`~resilient.errors.Forbidden` is raised;
:meth:`Requirement.check` tests a set of claims directly, for any other framework.

FastAPI is never imported: the dependency is the :class:`Requirement` itself, whose
signature asks FastAPI for the connection. Being a plain function, FastAPI runs it in its
thread pool, as it runs every sync dependency.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, ParamSpec, TypeVar, overload

from resilient.auth.middleware import REFUSAL, challenge_value, scopes_of
from resilient.errors import ConfigurationError, Forbidden

__all__ = ["Requirement", "authorize"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _strings(claims: Mapping[str, Any], *names: str) -> set[str]:
    found: set[str] = set()
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


class _DependencySignature:
    """The signature FastAPI reads on a :class:`Requirement`: one ``request`` parameter.

    Annotated with Starlette's ``HTTPConnection`` (imported only when asked), so FastAPI
    passes the request or WebSocket. On the class itself it is ``None``, so that
    ``inspect.signature(Requirement)`` still describes the constructor.
    """

    def __get__(self, instance: object, owner: type | None = None) -> inspect.Signature | None:
        if instance is None:
            return None
        try:
            from starlette.requests import HTTPConnection  # noqa: PLC0415 (optional)
        except ImportError:  # pragma: no cover (the test suite always has Starlette)
            annotation: Any = inspect.Parameter.empty
        else:
            annotation = HTTPConnection
        request = inspect.Parameter(
            "request", inspect.Parameter.KEYWORD_ONLY, annotation=annotation
        )
        return inspect.Signature([request], return_annotation=dict[str, Any])


class Requirement:
    """What a request's claims must hold: every one of *scopes*, *roles* and *groups*.

    Use it as a decorator of an endpoint whose arguments include the request (any object
    with an ASGI ``scope``), as a FastAPI dependency (``Depends(requirement)``, which
    gives the endpoint the claims), or call :meth:`check` on the claims.
    """

    __slots__ = ("groups", "roles", "scopes")

    __signature__ = _DependencySignature()

    def __init__(
        self, *, scopes: Iterable[str] = (), roles: Iterable[str] = (), groups: Iterable[str] = ()
    ) -> None:
        for name, value in [("scopes", scopes), ("roles", roles), ("groups", groups)]:
            if isinstance(value, str):
                msg = f"{name} must be a list of strings, not the string {value!r}"
                raise ConfigurationError(msg)
        self.scopes = tuple(scopes)
        self.roles = tuple(roles)
        self.groups = tuple(groups)

    def check(self, claims: Mapping[str, Any] | None) -> None:
        """Raise :class:`~resilient.errors.Forbidden` unless *claims* hold everything."""
        claims = claims or {}
        have_scopes = set(scopes_of(claims))
        have_roles = _strings(claims, "roles")
        have_groups = _strings(claims, "cognito:groups", "groups")
        missing = (
            *(f"scope:{s}" for s in self.scopes if s not in have_scopes),
            *(f"role:{r}" for r in self.roles if r not in have_roles),
            *(f"group:{g}" for g in self.groups if g not in have_groups),
        )
        if missing:
            msg = "the token does not grant " + ", ".join(missing)
            raise Forbidden(msg, missing=missing)

    def check_scope(self, scope: Mapping[str, Any]) -> None:
        """Check the claims of the principal that the middleware put in an ASGI *scope*."""
        self.check(_claims_of(scope))

    @overload
    def __call__(self, endpoint: Callable[_P, _R], /) -> Callable[_P, _R]: ...

    @overload
    def __call__(self, *, request: Any) -> dict[str, Any]: ...

    def __call__(
        self, endpoint: Callable[..., Any] | None = None, *, request: Any = None
    ) -> Callable[..., Any] | dict[str, Any]:
        """Decorate an *endpoint*; or, called by FastAPI with the *request*, check it.

        As a decorator it wraps *endpoint* (sync or async) so that it runs only for a
        sufficient token. As a dependency it returns the request's claims, or refuses
        (see the module docstring).
        """
        if endpoint is None:
            scope = getattr(request, "scope", None)
            if not isinstance(scope, Mapping) or "type" not in scope:
                msg = f"{self!r} was called without an endpoint or a request"
                raise ConfigurationError(msg)
            return self._guard(scope)
        return self._decorate(endpoint)

    def _guard(self, scope: Mapping[str, Any]) -> dict[str, Any]:
        """Return the claims in *scope* if they hold everything, or refuse at the edge."""
        claims = _claims_of(scope)
        if claims is None:
            _refuse(scope, Forbidden("a bearer token is required"), authenticated=False)
        try:
            self.check(claims)
        except Forbidden as error:
            _refuse(scope, error, authenticated=True)
        return dict(claims)

    def _decorate(self, endpoint: Callable[_P, _R]) -> Callable[_P, _R]:
        def guard(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
            for value in (*args, *kwargs.values()):
                scope = getattr(value, "scope", None)
                if isinstance(scope, Mapping) and "type" in scope:
                    self._guard(scope)
                    return
            msg = f"{getattr(endpoint, '__name__', endpoint)!r} got no request to check"
            raise ConfigurationError(msg)

        if inspect.iscoroutinefunction(endpoint):

            @functools.wraps(endpoint)
            async def async_wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                guard(args, kwargs)
                return await endpoint(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(endpoint)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            guard(args, kwargs)
            return endpoint(*args, **kwargs)

        return wrapper

    def __repr__(self) -> str:
        return f"authorize(scopes={self.scopes!r}, roles={self.roles!r}, groups={self.groups!r})"


def _claims_of(scope: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return the claims of the authenticated principal in *scope*, or ``None``."""
    user = scope.get("user")
    if not getattr(user, "is_authenticated", False):
        return None
    claims = getattr(user, "claims", None)
    return claims if isinstance(claims, Mapping) else None


def _refuse(scope: Mapping[str, Any], error: Forbidden, *, authenticated: bool) -> NoReturn:
    """Raise the framework's refusal for *error*: 403, or 401 without a principal."""
    try:
        from starlette.exceptions import HTTPException, WebSocketException  # noqa: PLC0415
    except ImportError:  # pragma: no cover (the test suite always has Starlette)
        raise error from None
    if scope["type"] == "websocket":
        raise WebSocketException(1008, "not authorized") from error  # policy violation
    if authenticated:
        status, code = 403, error.error
        description = challenge_value(str(error))
        challenge = f'Bearer error="{code}", error_description="{description}"'
    else:
        status, code, challenge = 401, None, "Bearer"
    if isinstance(scope, dict):
        # For JWTAuthMiddleware, which answers it with its realm and a problem body.
        scope[REFUSAL] = (status, str(error), code)
    raise HTTPException(status, str(error), headers={"WWW-Authenticate": challenge}) from error


def authorize(
    *, scopes: Iterable[str] = (), roles: Iterable[str] = (), groups: Iterable[str] = ()
) -> Requirement:
    """Return a :class:`Requirement`: every one of *scopes*, *roles* and *groups*.

    A decorator, or a FastAPI dependency that returns the claims:

    >>> @authorize(scopes=["orders:read"])
    ... async def orders(request): ...

    >>> def create_order(claims: dict = Depends(authorize(scopes=["orders:write"]))): ...
    """
    return Requirement(scopes=scopes, roles=roles, groups=groups)
