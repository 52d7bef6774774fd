"""A request refused before it ran (401, 403, 429, ...) does not burn its idempotency key.

The stack is the one a service composes: authentication outside the idempotency guard,
authorization (``authorize``) and a rate limit inside it, on real middleware, a real
Starlette app and tokens from a real local issuer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from resilient import (
    ConfigurationError,
    IdempotencyMiddleware,
    JWTAuthMiddleware,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    Rule,
    SlidingWindow,
    authorize,
)
from resilient.auth import JWKSClient, JWTValidator
from resilient.idempotency import DEFAULT_REFUSED_STATUSES
from resilient.keys import by_user
from resilient.testing import FakeClock, LocalIssuer
from tests.idempotency.conftest import client_for

KEY = {"Idempotency-Key": "order-1"}


class Service:
    """Auth outside the guard; a rate limit and ``authorize`` inside it, as the shop has."""

    def __init__(self, issuer: LocalIssuer, clock: FakeClock, **options: Any) -> None:
        self.runs = 0
        self.issuer = issuer
        backend = MemoryBackend()

        @authorize(scopes=["orders:write"])
        async def create_order(request: Request) -> Response:
            self.runs += 1
            return JSONResponse({"order": self.runs}, status_code=201)

        async def status(request: Request) -> Response:
            self.runs += 1
            return JSONResponse({"run": self.runs}, status_code=int(request.path_params["code"]))

        app = Starlette(
            routes=[
                Route("/orders", create_order, methods=["POST"]),
                Route("/status/{code:int}", status, methods=["POST"]),
            ]
        )
        limited = RateLimitMiddleware(
            app,
            limiter=RateLimiter(backend, clock=clock),
            rules=[Rule(SlidingWindow("3/minute"), path="/orders", key=by_user())],
        )
        self.guard = IdempotencyMiddleware(limited, backend=backend, clock=clock, **options)
        validator = JWTValidator(
            JWKSClient(issuer.jwks_url, clock=clock),
            issuer=issuer.issuer,
            audience="api",
            clock=clock,
        )
        self.app = JWTAuthMiddleware(self.guard, validator=validator, optional=True)

    def bearer(self, scope: str, sub: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.mint({'sub': sub, 'scope': scope})}"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock) -> Iterator[LocalIssuer]:
    with LocalIssuer(clock=clock) as issuer:
        yield issuer


@pytest.fixture
async def service(issuer: LocalIssuer, clock: FakeClock) -> Service:
    return Service(issuer, clock)


@pytest.fixture
async def http(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(service.app) as client:
        yield client


async def test_a_403_from_requires_is_not_stored_and_the_key_runs_once_the_scope_is_granted(
    service: Service, http: httpx.AsyncClient
) -> None:
    refused = await http.post("/orders", json={}, headers={**KEY, **service.bearer("profile")})
    again = await http.post("/orders", json={}, headers={**KEY, **service.bearer("profile")})
    granted = service.bearer("profile orders:write")
    ran = await http.post("/orders", json={}, headers={**KEY, **granted})
    replayed = await http.post("/orders", json={}, headers={**KEY, **granted})
    for response in (refused, again):  # (JWTAuthMiddleware answers authorize' refusals
        assert response.status_code == 403  # itself, with its own header fields)
        assert "idempotent-replayed" not in response.headers
        assert "insufficient_scope" in response.headers["www-authenticate"]
    assert ran.status_code == 201
    assert "idempotent-replayed" not in ran.headers
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.content == ran.content
    assert service.runs == 1


async def test_a_401_from_requires_is_not_stored(service: Service, http: httpx.AsyncClient) -> None:
    first = await http.post("/orders", json={}, headers=KEY)  # no token: optional auth
    second = await http.post("/orders", json={}, headers=KEY)
    for response in (first, second):
        assert response.status_code == 401
        assert "idempotent-replayed" not in response.headers
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert service.runs == 0


async def test_a_429_from_a_rate_limit_inside_the_guard_is_not_stored(
    service: Service, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = service.bearer("orders:write")
    for n in (1, 2, 3):
        ok = await http.post("/orders", json={}, headers={"Idempotency-Key": f"k{n}", **token})
        assert ok.status_code == 201
    limited = await http.post("/orders", json={}, headers={**KEY, **token})
    clock.advance(120)  # the window has passed
    ran = await http.post("/orders", json={}, headers={**KEY, **token})
    assert limited.status_code == 429
    assert limited.headers["idempotency-stored"] == "false"
    assert "retry-after" in limited.headers
    assert ran.status_code == 201
    assert "idempotent-replayed" not in ran.headers
    assert service.runs == 4


@pytest.mark.parametrize("code", sorted(DEFAULT_REFUSED_STATUSES))
async def test_every_refusal_status_releases_its_key(
    service: Service, http: httpx.AsyncClient, code: int
) -> None:
    first = await http.post(f"/status/{code}", json={}, headers=KEY)
    second = await http.post(f"/status/{code}", json={}, headers=KEY)
    assert first.status_code == second.status_code == code
    assert first.headers["idempotency-stored"] == second.headers["idempotency-stored"] == "false"
    assert (first.json(), second.json()) == ({"run": 1}, {"run": 2})  # ran twice


@pytest.mark.parametrize("code", [200, 201, 302, 400, 404, 409, 410, 422])
async def test_an_answer_the_request_earned_is_stored(
    service: Service, http: httpx.AsyncClient, code: int
) -> None:
    # A 4xx such as 400, 409 or 422 is the outcome of running the request (invalid,
    # conflicting): the same request gets the same answer, replayed.
    first = await http.post(f"/status/{code}", json={}, headers=KEY)
    second = await http.post(f"/status/{code}", json={}, headers=KEY)
    assert first.status_code == second.status_code == code
    assert "idempotency-stored" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert service.runs == 1


async def test_the_refused_statuses_can_be_chosen(issuer: LocalIssuer, clock: FakeClock) -> None:
    service = Service(issuer, clock, refused_statuses=[*DEFAULT_REFUSED_STATUSES, 409])
    async with client_for(service.app) as http:
        first = await http.post("/status/409", json={}, headers=KEY)
        second = await http.post("/status/409", json={}, headers=KEY)
    assert first.headers["idempotency-stored"] == "false"
    assert "idempotent-replayed" not in second.headers
    assert service.runs == 2


async def test_no_refused_statuses_stores_every_answer_under_500(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    service = Service(issuer, clock, refused_statuses=())
    async with client_for(service.app) as http:
        await http.post("/status/403", json={}, headers=KEY)
        second = await http.post("/status/403", json={}, headers=KEY)
    assert second.headers["idempotent-replayed"] == "true"
    assert service.runs == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (403, "refused_statuses must be a collection of status codes"),
        ("403", "refused_statuses must be a collection of status codes"),
        ([True], "from 300 to 499"),
        (["403"], "from 300 to 499"),
        ([200], "from 300 to 499"),
        ([503], "from 300 to 499"),
        ([403.0], "from 300 to 499"),
    ],
)
def test_refused_statuses_are_checked_at_construction(value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        IdempotencyMiddleware(Starlette(), refused_statuses=value)  # type: ignore[arg-type]
