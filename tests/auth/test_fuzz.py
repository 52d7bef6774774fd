"""Fuzzing: the token parser and the middleware, with arbitrary and mutated input.

The parser, through both validators, must return claims or raise an InvalidToken
subclass, and nothing else; the middleware, in front of a real Starlette app, must answer
401 (with a challenge and a problem body) or 200, and let no exception escape. Keys come
from a real LocalIssuer on loopback; the clock is fake, so the key set stays fresh.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resilient import JWTAuthMiddleware
from resilient.auth import JWTValidator, SyncJWTValidator
from resilient.errors import InvalidToken
from resilient.testing import LocalIssuer
from resilient.testing._issuer import b64url

FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
header_names = st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u", "jwk", "x5c", "cty"])
claim_names = st.sampled_from(
    ["exp", "nbf", "iat", "iss", "aud", "sub", "scope", "scp", "token_use", "client_id"]
)


def outcome(validator: SyncJWTValidator, token: str | bytes) -> dict[str, Any] | InvalidToken:
    """Validate *token*; the claims, or the InvalidToken. Anything else fails the test."""
    try:
        return validator.validate(token)
    except InvalidToken as error:
        return error


async def async_outcome(
    validator: JWTValidator, token: str | bytes
) -> dict[str, Any] | InvalidToken:
    try:
        return await validator.validate(token)
    except InvalidToken as error:
        return error


async def both(
    validator: JWTValidator, sync_validator: SyncJWTValidator, token: str | bytes
) -> dict[str, Any] | InvalidToken:
    """The outcome of both validators, which must agree."""
    first = await async_outcome(validator, token)
    second = outcome(sync_validator, token)
    assert type(first) is type(second)
    return first


# -- the parser ---------------------------------------------------------------------


@FIXTURES
@given(token=st.binary(max_size=600) | st.text(max_size=600))
async def test_arbitrary_bytes_or_text_give_claims_or_an_invalid_token(
    validator: JWTValidator, sync_validator: SyncJWTValidator, token: str | bytes
) -> None:
    assert isinstance(await both(validator, sync_validator, token), InvalidToken)


@FIXTURES
@given(
    parts=st.lists(st.text(alphabet=B64URL + "=+/.!é\x00 ", max_size=120), min_size=1, max_size=5)
)
async def test_odd_base64_segments_give_an_invalid_token(
    validator: JWTValidator, sync_validator: SyncJWTValidator, parts: list[str]
) -> None:
    assert isinstance(await both(validator, sync_validator, ".".join(parts)), InvalidToken)


@FIXTURES
@given(data=st.data())
async def test_any_changed_character_of_a_valid_token_is_refused(
    validator: JWTValidator,
    sync_validator: SyncJWTValidator,
    issuer: LocalIssuer,
    data: st.DataObject,
) -> None:
    alg = data.draw(st.sampled_from(["RS256", "ES256", "EdDSA"]))
    token = issuer.mint(alg=alg)
    # The last character, whose unused bits once let a token be respelled, every time.
    index = data.draw(st.just(len(token) - 1) | st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from(B64URL + ".=+/"))
    mutated = token[:index] + char + token[index + 1 :]
    assume(mutated != token)
    assert isinstance(await both(validator, sync_validator, mutated), InvalidToken), mutated


@FIXTURES
@given(order=st.permutations([0, 1, 2]), alg=st.sampled_from(["RS256", "ES256", "EdDSA"]))
async def test_swapped_segments_are_refused(
    validator: JWTValidator,
    sync_validator: SyncJWTValidator,
    issuer: LocalIssuer,
    order: list[int],
    alg: str,
) -> None:
    assume(order != [0, 1, 2])
    parts = issuer.mint(alg=alg).split(".")
    swapped = ".".join(parts[i] for i in order)
    assert isinstance(await both(validator, sync_validator, swapped), InvalidToken)


@FIXTURES
@given(extra=st.dictionaries(header_names | st.text(max_size=6), json_values, max_size=5))
async def test_signed_headers_with_random_values_give_claims_or_an_invalid_token(
    validator: JWTValidator,
    sync_validator: SyncJWTValidator,
    issuer: LocalIssuer,
    extra: dict[str, Any],
) -> None:
    kid = issuer.kid("EdDSA")
    header = {"alg": "EdDSA", "kid": kid, **extra}
    token = issuer.sign(header, issuer.claims(), key_id=kid)
    result = await both(validator, sync_validator, token)
    if isinstance(result, dict):
        assert header["alg"] == "EdDSA"
        assert header["kid"] == kid
        assert "crit" not in header


@FIXTURES
@given(extra=st.dictionaries(claim_names | st.text(max_size=6), json_values, max_size=6))
async def test_signed_claims_with_random_values_give_claims_or_an_invalid_token(
    validator: JWTValidator,
    sync_validator: SyncJWTValidator,
    issuer: LocalIssuer,
    extra: dict[str, Any],
) -> None:
    kid = issuer.kid("EdDSA")
    claims = {**issuer.claims(), **extra}
    token = issuer.sign({"alg": "EdDSA", "kid": kid}, claims, key_id=kid)
    result = await both(validator, sync_validator, token)
    if isinstance(result, dict):
        assert result == claims
        assert result["iss"] == issuer.issuer


@FIXTURES
@given(payload=st.binary(max_size=200), alg=st.sampled_from(["ES256", "EdDSA"]))
async def test_signed_payloads_that_are_not_json_objects_are_refused(
    validator: JWTValidator,
    sync_validator: SyncJWTValidator,
    issuer: LocalIssuer,
    payload: bytes,
    alg: str,
) -> None:
    kid = issuer.kid(alg)
    token = issuer.sign({"alg": alg, "kid": kid}, payload, key_id=kid)
    result = await both(validator, sync_validator, token)
    assert isinstance(result, InvalidToken) or json.loads(payload) == result


@FIXTURES
@given(size=st.integers(1, 40_000), padding=st.sampled_from(["", "=", "==", "==="]))
async def test_huge_or_padded_segments_are_refused(
    validator: JWTValidator,
    sync_validator: SyncJWTValidator,
    issuer: LocalIssuer,
    size: int,
    padding: str,
) -> None:
    head, body, signature = issuer.mint(alg="EdDSA").split(".")
    huge = base64.urlsafe_b64encode(b"\xfb" * size).decode()
    for token in [f"{head}.{huge}.{signature}", f"{head}.{body}.{signature}{padding}x"]:
        assert isinstance(await both(validator, sync_validator, token), InvalidToken)


# -- the middleware -----------------------------------------------------------------


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"sub": request.user.identity})


@pytest.fixture
async def client(validator: JWTValidator) -> AsyncIterator[httpx.AsyncClient]:
    app = JWTAuthMiddleware(Starlette(routes=[Route("/me", whoami)]), validator=validator)
    transport = httpx.ASGITransport(app=app)  # app exceptions are raised, not turned to 500s
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


schemes = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Token", "", "Bearer:"])
spaces = st.text(alphabet=" \t", max_size=6)
token_like = st.text(alphabet=B64URL + ".~+/= \t\x00é☃", max_size=300)


def authorization_values(valid: str) -> st.SearchStrategy[bytes]:
    text = st.builds(
        lambda *p: "".join(p), spaces, schemes, spaces, token_like | st.just(valid), spaces
    )
    return (
        st.binary(max_size=400)
        | text.map(lambda v: v.encode("utf-8"))
        | text.map(lambda v: v.encode("latin-1", "replace"))
    )


async def check_answer(client: httpx.AsyncClient, value: bytes, valid: str) -> None:
    response = await client.get("/me", headers=[(b"authorization", value)])
    assert response.status_code in {200, 401}, (value, response.status_code, response.text)
    if response.status_code == 200:
        assert valid.encode() in value
        assert response.json() == {"sub": "user-1"}
        return
    assert response.headers["www-authenticate"].startswith('Bearer realm="api"')
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 401


@FIXTURES
@given(data=st.data())
@example(data=None)
async def test_any_authorization_header_is_a_401_or_a_200_never_a_500(
    client: httpx.AsyncClient, issuer: LocalIssuer, data: st.DataObject | None
) -> None:
    valid = issuer.mint(alg="EdDSA")
    if data is None:  # the edge cases, every run
        values = [b"", b" ", b"     ", b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"\xff\xfe"]
        values += ["Bearer ☃".encode(), b"Bearer " + b" " * 500, f"Bearer  {valid}  ".encode()]
        for value in values:
            await check_answer(client, value, valid)
        return
    await check_answer(client, data.draw(authorization_values(valid)), valid)


def test_the_fuzz_alphabet_is_base64url() -> None:
    assert len(set(B64URL)) == 64
    assert b64url(base64.urlsafe_b64decode("-_8=")) == "-_8"
