"""authorize: scopes, roles and groups, checked on the principal the middleware found."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from resilient import Forbidden, JWTAuthMiddleware, authorize
from resilient.auth import JWTUser, JWTValidator
from resilient.errors import ConfigurationError
from resilient.testing import LocalIssuer


@authorize(scopes=["orders:read"], groups=["staff"])
async def orders(request: Request) -> JSONResponse:
    return JSONResponse({"orders": []})


@authorize(roles=["admin"])
def admin(request: Request) -> PlainTextResponse:
    return PlainTextResponse("admin")


@authorize(scopes=["chat"])
async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def make_app() -> Starlette:
    return Starlette(
        routes=[Route("/orders", orders), Route("/admin", admin), WebSocketRoute("/chat", chat)]
    )


@pytest.fixture
async def client(validator: JWTValidator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=JWTAuthMiddleware(make_app(), validator=validator))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_token_with_everything_required_passes(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"scope": "orders:read profile", "cognito:groups": ["staff"]})
    assert (await client.get("/orders", headers=bearer(token))).status_code == 200


async def test_a_missing_scope_or_group_is_a_403_naming_it(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"scope": "profile", "groups": ["staff"]})
    response = await client.get("/orders", headers=bearer(token))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == (
        'Bearer realm="api", error="insufficient_scope", '
        'error_description="the token does not grant scope:orders:read"'
    )
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "the token does not grant scope:orders:read"
    token = issuer.mint({"scp": ["orders:read"]})
    response = await client.get("/orders", headers=bearer(token))
    assert response.status_code == 403
    assert "group:staff" in response.headers["www-authenticate"]


async def test_roles_are_checked_on_sync_endpoints_too(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    assert (
        await client.get("/admin", headers=bearer(issuer.mint({"roles": ["admin"]})))
    ).text == "admin"
    response = await client.get("/admin", headers=bearer(issuer.mint({"roles": "user"})))
    assert response.status_code == 403


def test_check_raises_forbidden_with_what_is_missing() -> None:
    requirement = authorize(scopes=["a", "b"], roles=["r"], groups=["g"])
    with pytest.raises(Forbidden) as caught:
        requirement.check({"scope": "a", "roles": ["r"]})
    assert caught.value.missing == ("scope:b", "group:g")
    with pytest.raises(Forbidden):
        requirement.check(None)
    requirement.check({"scope": "a b", "roles": "r", "groups": ["g"]})


def test_an_unauthenticated_scope_is_forbidden() -> None:
    requirement = authorize(scopes=["a"])
    with pytest.raises(Forbidden):
        requirement.check_scope({"type": "http"})
    requirement.check_scope({"type": "http", "user": JWTUser({"scope": "a"})})


def test_an_endpoint_without_a_request_is_a_configuration_error() -> None:
    @authorize(scopes=["a"])
    def lonely() -> None:
        pass  # pragma: no cover

    with pytest.raises(ConfigurationError, match="got no request"):
        lonely()


def test_a_string_instead_of_a_list_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="list of strings"):
        authorize(scopes="orders:read")


async def test_an_anonymous_request_is_a_401_with_the_middlewares_challenge(
    validator: JWTValidator,
) -> None:
    app = JWTAuthMiddleware(make_app(), validator=validator, optional=True, realm="shop")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in ["/orders", "/admin"]:
            response = await client.get(path)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Bearer realm="shop"'
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == 401


async def test_without_the_middleware_starlette_renders_the_refusal_itself() -> None:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/orders")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.text == "a bearer token is required"


async def test_a_websocket_without_the_scope_is_closed_with_1008(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    app = JWTAuthMiddleware(make_app(), validator=validator)

    async def connect(token: str) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []
        messages: list[dict[str, object]] = [
            {"type": "websocket.connect"},
            {"type": "websocket.disconnect"},
        ]

        async def receive() -> dict[str, object]:
            return messages.pop(0)

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        headers = [(b"authorization", f"Bearer {token}".encode())]
        scope = {"type": "websocket", "path": "/chat", "headers": headers, "subprotocols": []}
        await app(scope, receive, send)  # type: ignore[arg-type]
        return sent

    allowed = await connect(issuer.mint({"scope": "chat"}))
    assert [m["type"] for m in allowed] == ["websocket.accept", "websocket.send", "websocket.close"]
    denied = await connect(issuer.mint({"scope": "other"}))
    assert [(m["type"], m.get("code")) for m in denied] == [("websocket.close", 1008)]


def test_a_requirement_called_with_neither_endpoint_nor_request_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="without an endpoint or a request"):
        authorize(scopes=["a"])(request=object())
