"""JWTAuthMiddleware: RFC 6750 bearer tokens, problem bodies, Starlette's user and auth."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from resilient import JWTAuthMiddleware
from resilient._asgi import Receive, Scope, Send
from resilient.auth import JWKSClient, JWTValidator
from resilient.auth.middleware import challenge_value
from resilient.testing import LocalIssuer


async def whoami(request: Request) -> JSONResponse:
    user = request.user
    return JSONResponse(
        {
            "authenticated": user.is_authenticated,
            "identity": user.identity,
            "name": user.display_name,
            "scopes": request.auth.scopes,
        }
    )


@requires("orders:read")
async def orders(request: Request) -> JSONResponse:
    return JSONResponse({"orders": []})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"identity": websocket.user.identity})
    await websocket.close()


def make_app(validator: JWTValidator, *, optional: bool = False) -> JWTAuthMiddleware:
    app = Starlette(
        routes=[
            Route("/me", whoami),
            Route("/orders", orders),
            Route("/healthz", healthz),
            WebSocketRoute("/ws", echo),
        ]
    )
    return JWTAuthMiddleware(app, validator=validator, exclude=["/healthz"], optional=optional)


@pytest.fixture
async def client(validator: JWTValidator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(validator))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_valid_token_puts_the_user_and_scopes_in_the_scope(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"sub": "alice", "name": "Alice", "scope": "orders:read profile"})
    response = await client.get("/me", headers=bearer(token))
    assert response.status_code == 200
    assert response.json() == {
        "authenticated": True,
        "identity": "alice",
        "name": "Alice",
        "scopes": ["orders:read", "profile"],
    }


async def test_starlettes_requires_sees_the_scopes(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    allowed = issuer.mint({"scp": ["orders:read"]})
    assert (await client.get("/orders", headers=bearer(allowed))).status_code == 200
    denied = issuer.mint({"scope": "profile"})
    assert (await client.get("/orders", headers=bearer(denied))).status_code == 403


async def test_no_token_is_a_401_with_a_bare_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/me")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 401


async def test_an_invalid_token_is_a_401_with_invalid_token(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    response = await client.get("/me", headers=bearer(issuer.mint({"aud": "other"})))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        'Bearer realm="api", error="invalid_token", '
        'error_description="the token is not meant for this audience"'
    )
    body = response.json()
    assert body["detail"] == "the token is not meant for this audience"
    assert body["title"] == "Unauthorized"


async def test_a_bearer_credential_that_is_no_token_is_a_401_invalid_token(
    client: httpx.AsyncClient,
) -> None:
    # Found by fuzzing: these were 400s, but RFC 6750 calls a malformed token invalid_token.
    values = [b"Bearer", b"Bearer ", b"Bearer a b", "Bearer t\u00e9".encode(), b"bearer\tx"]
    for value in values:
        response = await client.get("/me", headers={b"Authorization": value})
        assert response.status_code == 401, value
        assert response.headers["www-authenticate"] == (
            'Bearer realm="api", error="invalid_token", '
            'error_description="the bearer token is malformed"'
        )
        assert response.json()["detail"] == "the bearer token is malformed"


async def test_another_scheme_or_an_empty_header_is_a_401_with_a_bare_challenge(
    client: httpx.AsyncClient,
) -> None:
    # Found by fuzzing: these were 400s; RFC 6750 section 3.1 wants no error code when the
    # client sent no bearer credentials (another scheme, or nothing).
    for value in [b"Basic dXNlcjpwYXNz", b"", b"   ", b"Bearerx abc", b"\xff\xfe"]:
        response = await client.get("/me", headers={b"Authorization": value})
        assert response.status_code == 401, value
        assert response.headers["www-authenticate"] == 'Bearer realm="api"'


async def test_optional_mode_lets_requests_with_another_scheme_through_anonymously(
    validator: JWTValidator,
) -> None:
    transport = httpx.ASGITransport(app=make_app(validator, optional=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert response.json()["authenticated"] is False
        malformed = await client.get("/me", headers={"Authorization": "Bearer !!"})
        assert malformed.status_code == 401


async def test_surrounding_whitespace_and_many_spaces_are_accepted(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    value = f"  Bearer     {issuer.mint()}\t ".encode()
    response = await client.get("/me", headers={b"Authorization": value})
    assert response.status_code == 200


async def test_two_authorization_headers_are_a_400(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    token = issuer.mint()
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    response = await client.get("/me", headers=headers)
    assert response.status_code == 400


async def test_the_scheme_is_case_insensitive(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    response = await client.get("/me", headers={"Authorization": f"bEaReR {issuer.mint()}"})
    assert response.status_code == 200


async def test_a_token_in_the_query_string_is_ignored(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    response = await client.get("/me", params={"access_token": issuer.mint()})
    assert response.status_code == 401


async def test_excluded_paths_need_no_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200


async def test_optional_mode_lets_anonymous_requests_through(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    transport = httpx.ASGITransport(app=make_app(validator, optional=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/me")
        assert response.json() == {"authenticated": False, "identity": "", "name": "", "scopes": []}
        bad = await client.get("/me", headers=bearer(issuer.mint({"iss": "https://x.example"})))
        assert bad.status_code == 401


async def test_an_unavailable_key_set_is_a_503(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    issuer.fail(503)
    response = await client.get("/me", headers=bearer(issuer.mint()))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"


async def test_websockets_are_checked_too(validator: JWTValidator, issuer: LocalIssuer) -> None:
    users: list[str] = []
    sent: list[dict[str, object]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        users.append(scope["user"].identity)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    middleware = JWTAuthMiddleware(app, validator=validator)
    token = issuer.mint({"sub": "bob"})
    headers = [(b"authorization", f"Bearer {token}".encode())]
    await middleware({"type": "websocket", "path": "/ws", "headers": headers}, None, send)  # type: ignore[arg-type]
    assert users == ["bob"]
    await middleware({"type": "websocket", "path": "/ws", "headers": []}, None, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}]
    issuer.fail(503)
    sent.clear()
    cold = JWTValidator(JWKSClient(issuer.jwks_url), issuer=issuer.issuer, audience="api")
    cold_middleware = JWTAuthMiddleware(app, validator=cold)
    await cold_middleware({"type": "websocket", "path": "/ws", "headers": headers}, None, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1011, "reason": ""}]


async def test_lifespan_passes_straight_through(validator: JWTValidator) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await JWTAuthMiddleware(app, validator=validator)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.binary(max_size=300))
async def test_any_authorization_header_gives_a_401_never_a_500(
    validator: JWTValidator, value: bytes
) -> None:
    sent: list[dict[str, object]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never reached")  # pragma: no cover

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/me", "headers": [(b"authorization", value)]}
    middleware = JWTAuthMiddleware(app, validator=validator)
    await middleware(scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 401


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.text(alphabet="ABCabc012-_.=~+/", max_size=400))
async def test_any_bearer_token_gives_a_401_never_a_500(
    validator: JWTValidator, token: str
) -> None:
    sent: list[dict[str, object]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never reached")  # pragma: no cover

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    headers = [(b"authorization", f"Bearer {token}".encode())]
    middleware = JWTAuthMiddleware(app, validator=validator)
    await middleware({"type": "http", "path": "/", "headers": headers}, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 401
    body = sent[1]["body"]
    assert isinstance(body, bytes)
    assert json.loads(body)["status"] == sent[0]["status"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('no "kid" in the token', "no kid in the token"),
        ("a\\b\r\nc\x00d\x7f", "abcd"),
        ("clé", "cl"),
        ("scope:orders.write, role:admin!", "scope:orders.write, role:admin!"),
    ],
)
def test_a_challenge_value_keeps_what_rfc_6750_allows_between_quotes(text: str, value: str) -> None:
    assert challenge_value(text) == value
