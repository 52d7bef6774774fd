"""``requires``: authorization by scopes, roles and groups, on top of ``JWTAuthMiddleware``.

::

    @requires(scopes=["orders:read"], groups=["staff"])
    async def orders(request): ...

The principal is the one :class:`~resilient.auth.JWTAuthMiddleware` put in the scope.
Every listed scope, role and group is required:

* scopes come from the ``scope`` (space-separated) or ``scp`` claim;
* roles from the ``roles`` claim;
* groups from ``cognito:groups`` or ``groups``.

When one is missing, the endpoint is not called: under Starlette (or FastAPI) a 403
``HTTPException`` is raised, with ``WWW-Authenticate: Bearer error="insufficient_scope"``;
elsewhere :class:`~resilient.errors.Forbidden`. :meth:`Requirement.check` tests a set of
claims directly, for any other framework.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

from resilient.auth.middleware import _UNSAFE, scopes_of
from resilient.errors import ConfigurationError, Forbidden

__all__ = ["Requirement", "requires"]

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


class Requirement:
    """What a request's claims must hold: every one of *scopes*, *roles* and *groups*.

    Use it as a decorator of an endpoint whose arguments include the request (any object
    with an ASGI ``scope``), or call :meth:`check` on the claims.
    """

    __slots__ = ("groups", "roles", "scopes")

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
        user = scope.get("user")
        claims = getattr(user, "claims", None) if getattr(user, "is_authenticated", False) else None
        self.check(claims if isinstance(claims, Mapping) else None)

    def __call__(self, endpoint: Callable[_P, _R]) -> Callable[_P, _R]:
        """Wrap *endpoint* (sync or async) so that it runs only for a sufficient token."""

        def guard(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
            for value in (*args, *kwargs.values()):
                scope = getattr(value, "scope", None)
                if isinstance(scope, Mapping) and "type" in scope:
                    try:
                        self.check_scope(scope)
                    except Forbidden as error:
                        _raise_http_error(error)
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
        return f"requires(scopes={self.scopes!r}, roles={self.roles!r}, groups={self.groups!r})"


def _raise_http_error(error: Forbidden) -> None:
    try:
        from starlette.exceptions import HTTPException  # noqa: PLC0415 (optional)
    except ImportError:
        raise error from None
    description = _UNSAFE.sub("", str(error))
    challenge = f'Bearer error="{error.error}", error_description="{description}"'
    raise HTTPException(403, str(error), headers={"WWW-Authenticate": challenge}) from error


def requires(
    *, scopes: Iterable[str] = (), roles: Iterable[str] = (), groups: Iterable[str] = ()
) -> Requirement:
    """Return a :class:`Requirement`: every one of *scopes*, *roles* and *groups*.

    >>> @requires(scopes=["orders:read"])
    ... async def orders(request): ...
    """
    return Requirement(scopes=scopes, roles=roles, groups=groups)
