"""authorize(...) as a FastAPI dependency: a real FastAPI app behind JWTAuthMiddleware."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from resilient import JWTAuthMiddleware, authorize
from resilient.auth import JWTValidator, Requirement
from resilient.testing import LocalIssuer

Claims = Annotated[dict[str, Any], Depends(authorize())]


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/orders", dependencies=[Depends(authorize(scopes=["orders:write"]))])
    async def create_order() -> dict[str, str]:
        return {"order": "created"}

    @app.get("/me")
    async def me(claims: Claims) -> dict[str, Any]:
        return {"sub": claims["sub"], "scope": claims.get("scope")}

    @app.get("/staff")
    def staff(
        claims: Annotated[dict[str, Any], Depends(authorize(groups=["staff"], roles=["ops"]))],
    ) -> dict[str, str]:
        return {"hello": claims["sub"]}

    admin = APIRouter(dependencies=[Depends(authorize(roles=["admin"]))])

    @admin.get("/admin/stats")
    async def stats() -> dict[str, int]:
        return {"users": 3}

    app.include_router(admin)
    return app


@pytest.fixture
async def client(validator: JWTValidator) -> AsyncIterator[httpx.AsyncClient]:
    # optional=True: anonymous requests reach the app, so authorize(...) must refuse them.
    app = JWTAuthMiddleware(make_app(), validator=validator, optional=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_token_with_the_scope_passes_and_the_endpoint_runs(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"scope": "orders:read orders:write"})
    response = await client.post("/orders", headers=bearer(token))
    assert response.status_code == 200
    assert response.json() == {"order": "created"}


async def test_a_missing_scope_is_a_403_with_a_problem_body(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    response = await client.post("/orders", headers=bearer(issuer.mint({"scope": "orders:read"})))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == (
        'Bearer realm="api", error="insufficient_scope", '
        'error_description="the token does not grant scope:orders:write"'
    )
    assert response.json() == {
        "type": "about:blank",
        "title": "Forbidden",
        "status": 403,
        "detail": "the token does not grant scope:orders:write",
    }
    assert int(response.headers["content-length"]) == len(response.content)


async def test_an_anonymous_request_is_a_401_with_a_problem_body(
    client: httpx.AsyncClient,
) -> None:
    for method, path in [("POST", "/orders"), ("GET", "/me"), ("GET", "/admin/stats")]:
        response = await client.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == 'Bearer realm="api"'
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == "a bearer token is required"


async def test_the_dependency_gives_the_endpoint_the_claims(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    response = await client.get("/me", headers=bearer(issuer.mint({"sub": "alice"})))
    assert response.json() == {"sub": "alice", "scope": None}
    token = issuer.mint({"sub": "bob", "cognito:groups": ["staff"], "roles": ["ops"]})
    assert (await client.get("/staff", headers=bearer(token))).json() == {"hello": "bob"}


async def test_roles_and_groups_are_checked_on_sync_endpoints_and_routers(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"groups": ["staff"]})
    response = await client.get("/staff", headers=bearer(token))
    assert response.status_code == 403
    assert response.json()["detail"] == "the token does not grant role:ops"
    denied = await client.get("/admin/stats", headers=bearer(issuer.mint({"roles": ["ops"]})))
    assert denied.status_code == 403
    allowed = await client.get("/admin/stats", headers=bearer(issuer.mint({"roles": "admin"})))
    assert allowed.json() == {"users": 3}


async def test_an_invalid_token_never_reaches_the_dependency(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    response = await client.post("/orders", headers=bearer(issuer.mint({"aud": "other"})))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_the_dependency_is_not_a_parameter_of_the_openapi_schema(
    client: httpx.AsyncClient, issuer: LocalIssuer
) -> None:
    schema = (await client.get("/openapi.json", headers=bearer(issuer.mint()))).json()
    for path in schema["paths"].values():
        for operation in path.values():
            assert "parameters" not in operation, operation
            assert "requestBody" not in operation, operation


async def test_without_the_middleware_fastapi_renders_the_refusal_itself() -> None:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/orders")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "a bearer token is required"}


def test_a_requirement_shows_fastapi_one_connection_parameter() -> None:
    signature = inspect.signature(authorize(scopes=["a"]))
    assert list(signature.parameters) == ["request"]
    # The class still describes its constructor.
    assert list(inspect.signature(Requirement).parameters) == ["scopes", "roles", "groups"]


def test_importing_the_auth_block_imports_neither_fastapi_nor_starlette() -> None:
    code = (
        "import sys, resilient.auth\n"
        "resilient.auth.authorize(scopes=['a'])\n"
        "assert 'fastapi' not in sys.modules and 'starlette' not in sys.modules\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr
