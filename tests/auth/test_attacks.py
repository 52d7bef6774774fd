"""The attack suite: every known JWT attack, one test each, against real HTTP and keys."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from resilient.auth import JWKSClient, JWTValidator
from resilient.errors import (
    BadAudience,
    BadIssuer,
    BadSignature,
    ConfigurationError,
    DisallowedAlgorithm,
    ExpiredToken,
    InvalidToken,
    KeySetUnavailable,
    MalformedToken,
    MissingClaim,
    NotYetValid,
    UnknownKey,
    WrongTokenUse,
)
from resilient.testing import FakeClock, LocalIssuer
from resilient.testing._issuer import b64url

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def unsigned(header: dict[str, object], payload: dict[str, object], signature: bytes) -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(payload).encode())
    return f"{head}.{body}.{b64url(signature)}"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_good_token_is_accepted(
    validator: JWTValidator, issuer: LocalIssuer, alg: str
) -> None:
    claims = await validator.validate(issuer.mint({"sub": "alice"}, alg=alg))
    assert claims["sub"] == "alice"


async def test_alg_none_is_refused(validator: JWTValidator, issuer: LocalIssuer) -> None:
    for alg in ["none", "None", "NONE"]:
        token = unsigned({"alg": alg, "kid": issuer.kid()}, issuer.claims(), b"")
        with pytest.raises(DisallowedAlgorithm):
            await validator.validate(token)
    assert issuer.fetches == 0


async def test_rs256_to_hs256_with_the_public_key_as_secret_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    kid = issuer.kid("RS256")
    pem = issuer.public_key(kid).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = b64url(json.dumps({"alg": "HS256", "kid": kid}).encode())
    body = b64url(json.dumps(issuer.claims()).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(DisallowedAlgorithm):
        await validator.validate(f"{head}.{body}.{b64url(mac)}")


def test_symmetric_algorithms_cannot_be_allowed(jwks: JWKSClient) -> None:
    for algorithms in [["HS256"], ["RS256", "none"], []]:
        with pytest.raises(ConfigurationError, match="asymmetric only"):
            JWTValidator(jwks, issuer="https://i.example", audience="api", algorithms=algorithms)


async def test_an_algorithm_that_does_not_fit_the_key_type_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    # The header says ES256 but names the RSA key: refused before any signature check.
    token = issuer.sign(
        {"alg": "ES256", "kid": issuer.kid("RS256")}, issuer.claims(), key_id=issuer.kid("ES256")
    )
    with pytest.raises(DisallowedAlgorithm, match="does not match its key"):
        await validator.validate(token)
    token = issuer.sign(
        {"alg": "EdDSA", "kid": issuer.kid("ES256")}, issuer.claims(), key_id=issuer.kid("EdDSA")
    )
    with pytest.raises(DisallowedAlgorithm, match="does not match its key"):
        await validator.validate(token)


async def test_an_algorithm_other_than_the_one_the_key_pins_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    # The RSA key is published with alg RS256: a PS256 token under its kid is refused.
    token = issuer.sign(
        {"alg": "PS256", "kid": issuer.kid("RS256")},
        issuer.claims(),
        key_id=issuer.kid("RS256"),
        alg="PS256",
    )
    with pytest.raises(DisallowedAlgorithm):
        await validator.validate(token)


@pytest.mark.parametrize("kid", [123, None, ["a"], {"k": 1}, True, ""])
async def test_a_kid_that_is_not_a_string_is_refused(
    validator: JWTValidator, issuer: LocalIssuer, kid: object
) -> None:
    token = issuer.sign({"alg": "RS256", "kid": kid}, issuer.claims(), key_id=issuer.kid())
    with pytest.raises(UnknownKey):
        await validator.validate(token)
    assert issuer.fetches == 0


@pytest.mark.parametrize(
    "kid", ["../../../dev/null", "..\\..\\keys", "a\x00b", "k\nid", "x" * 129, "kid é"]
)
async def test_a_traversal_or_odd_kid_is_refused_without_a_fetch(
    validator: JWTValidator, issuer: LocalIssuer, kid: str
) -> None:
    token = issuer.sign({"alg": "RS256", "kid": kid}, issuer.claims(), key_id=issuer.kid())
    with pytest.raises(UnknownKey):
        await validator.validate(token)
    assert issuer.fetches == 0


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_keys_named_in_the_token_are_never_used_nor_fetched(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock, header: str
) -> None:
    with LocalIssuer(clock=clock) as attacker:
        kid = attacker.kid()
        jwk = attacker.jwks()["keys"][0]
        value: object = {
            "jku": attacker.jwks_url,
            "x5u": attacker.jwks_url,
            "jwk": jwk,
            "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
        }[header]
        claims = issuer.claims()  # the victim's iss and aud, the attacker's signature
        own_kid = attacker.sign({"alg": "RS256", "kid": kid, header: value}, claims, key_id=kid)
        with pytest.raises(UnknownKey):
            await validator.validate(own_kid)
        stolen_kid = attacker.sign(
            {"alg": "RS256", "kid": issuer.kid(), header: value}, claims, key_id=kid
        )
        with pytest.raises(BadSignature):
            await validator.validate(stolen_kid)
        assert attacker.fetches == 0


async def test_a_burst_of_random_kids_costs_at_most_one_fetch(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    good = issuer.mint()
    await validator.validate(good)
    assert issuer.fetches == 1
    clock.advance(31)  # past the refetch cooldown: the flood may cause one fetch
    forged = [
        issuer.sign(
            {"alg": "RS256", "kid": secrets.token_hex(8)}, issuer.claims(), key_id=issuer.kid()
        )
        for _ in range(1000)
    ]
    results = await asyncio.gather(
        *(validator.validate(t) for t in forged),
        *(validator.validate(good) for _ in range(50)),
        return_exceptions=True,
    )
    assert all(isinstance(r, UnknownKey) for r in results[:1000])
    assert all(isinstance(r, dict) for r in results[1000:])
    assert issuer.fetches <= 2
    # The next flood, inside the cooldown, costs nothing, and good tokens still pass.
    for token in forged[:100]:
        with pytest.raises(UnknownKey):
            await validator.validate(token)
    assert await validator.validate(good)
    assert issuer.fetches <= 2


async def test_a_cold_burst_of_random_kids_costs_one_fetch(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    forged = [
        issuer.sign(
            {"alg": "RS256", "kid": secrets.token_hex(8)}, issuer.claims(), key_id=issuer.kid()
        )
        for _ in range(1000)
    ]
    results = await asyncio.gather(*(validator.validate(t) for t in forged), return_exceptions=True)
    assert all(isinstance(r, UnknownKey) for r in results)
    assert issuer.fetches == 1


async def test_a_token_without_exp_is_refused(validator: JWTValidator, issuer: LocalIssuer) -> None:
    with pytest.raises(MissingClaim, match="'exp'"):
        await validator.validate(issuer.mint({"exp": None}))


async def test_an_exp_that_is_not_a_number_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    for exp in ["9999999999", True, [1]]:
        with pytest.raises(MissingClaim, match="'exp'"):
            await validator.validate(issuer.mint({"exp": exp}))


async def test_an_expired_token_is_refused_beyond_the_leeway_only(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    now = int(clock.time())
    assert await validator.validate(issuer.mint({"exp": now - 29}))
    with pytest.raises(ExpiredToken):
        await validator.validate(issuer.mint({"exp": now - 30}))


async def test_an_nbf_in_the_future_is_refused_beyond_the_leeway_only(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    now = int(clock.time())
    assert await validator.validate(issuer.mint({"nbf": now + 30}))
    with pytest.raises(NotYetValid):
        await validator.validate(issuer.mint({"nbf": now + 31}))


async def test_an_iat_in_the_future_is_refused_beyond_the_leeway_only(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    now = int(clock.time())
    assert await validator.validate(issuer.mint({"iat": now + 30}))
    with pytest.raises(NotYetValid, match="issued in the future"):
        await validator.validate(issuer.mint({"iat": now + 31}))


async def test_a_token_expires_as_the_clock_moves(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    token = issuer.mint()  # exp in 300 s
    assert await validator.validate(token)
    clock.advance(330)
    with pytest.raises(ExpiredToken):
        await validator.validate(token)


async def test_a_wrong_issuer_is_refused(validator: JWTValidator, issuer: LocalIssuer) -> None:
    with pytest.raises(BadIssuer):
        await validator.validate(issuer.mint({"iss": "https://evil.example"}))
    with pytest.raises(MissingClaim, match="'iss'"):
        await validator.validate(issuer.mint({"iss": None}))


async def test_a_wrong_audience_is_refused(validator: JWTValidator, issuer: LocalIssuer) -> None:
    with pytest.raises(BadAudience):
        await validator.validate(issuer.mint({"aud": "other"}))
    with pytest.raises(BadAudience):
        await validator.validate(issuer.mint({"aud": ["other", "more"]}))
    with pytest.raises(MissingClaim, match="'aud'"):
        await validator.validate(issuer.mint({"aud": None}))
    with pytest.raises(MissingClaim, match="'aud'"):
        await validator.validate(issuer.mint({"aud": [1]}))
    assert await validator.validate(issuer.mint({"aud": ["other", "api"]}))


async def test_an_unknown_crit_header_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    token = issuer.mint(headers={"crit": ["exp-ext"], "exp-ext": 1})
    with pytest.raises(MalformedToken, match="crit"):
        await validator.validate(token)


async def test_a_symmetric_key_in_the_key_set_is_never_used(
    validator: JWTValidator, jwks: JWKSClient, issuer: LocalIssuer
) -> None:
    secret = secrets.token_bytes(32)
    issuer.publish_jwk({"kty": "oct", "kid": "hmac", "k": b64url(secret), "alg": "HS256"})
    head = b64url(json.dumps({"alg": "HS256", "kid": "hmac"}).encode())
    body = b64url(json.dumps(issuer.claims()).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(DisallowedAlgorithm):
        await validator.validate(f"{head}.{body}.{b64url(mac)}")
    with pytest.raises(UnknownKey):
        await validator.validate(unsigned({"alg": "RS256", "kid": "hmac"}, issuer.claims(), mac))
    assert "hmac" not in jwks.keys
    assert issuer.kid() in jwks.keys


async def test_an_rsa_key_under_2048_bits_is_never_used(
    validator: JWTValidator, jwks: JWKSClient, issuer: LocalIssuer
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    kid = issuer.add_key(weak, alg="RS256", kid="weak")
    with pytest.raises(UnknownKey):
        await validator.validate(issuer.mint(kid=kid))
    assert "weak" not in jwks.keys
    assert issuer.kid() in jwks.keys


async def test_a_published_private_key_is_never_used(
    validator: JWTValidator, jwks: JWKSClient, issuer: LocalIssuer
) -> None:
    # A JWK carrying "d" is a private key published by mistake: drop it, do not trust it.
    public = issuer.jwks()["keys"][0]
    issuer.publish_jwk({**public, "kid": "leaked", "d": "AQAB"})
    await jwks.refresh()
    assert "leaked" not in jwks.keys


def _with_signature(token: str, signature: bytes) -> str:
    head, body, _ = token.split(".")
    return f"{head}.{body}.{b64url(signature)}"


async def test_an_es256_signature_with_a_high_s_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    token = issuer.mint(alg="ES256")
    assert await validator.validate(token)
    raw = JWTValidatorTools.signature(token)
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    high = r + (P256_ORDER - s).to_bytes(32, "big")  # the same signature, malleated
    with pytest.raises(BadSignature) as refused:
        await validator.validate(_with_signature(token, high))
    # Not "invalid": a genuine signature from an issuer that does not normalize S looks
    # just like this, so the message names the cause and the switch that accepts it.
    assert "high S" in str(refused.value)
    assert "reject_high_s=False" in str(refused.value)


async def test_an_es256_signature_with_r_and_s_zero_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    token = issuer.mint(alg="ES256")
    with pytest.raises(BadSignature):
        await validator.validate(_with_signature(token, bytes(64)))
    with pytest.raises(BadSignature):
        await validator.validate(_with_signature(token, P256_ORDER.to_bytes(32, "big") * 2))


async def test_an_es256_signature_of_the_wrong_length_is_refused(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    token = issuer.mint(alg="ES256")
    raw = JWTValidatorTools.signature(token)
    for signature in [raw[:63], raw + b"\x00", b"0D" + raw]:
        with pytest.raises(BadSignature):
            await validator.validate(_with_signature(token, signature))


async def test_a_tampered_payload_is_refused(validator: JWTValidator, issuer: LocalIssuer) -> None:
    for alg in ["RS256", "ES256", "EdDSA"]:
        head, _, signature = issuer.mint(alg=alg).split(".")
        body = b64url(json.dumps(issuer.claims(sub="admin")).encode())
        with pytest.raises(BadSignature):
            await validator.validate(f"{head}.{body}.{signature}")


async def test_an_id_token_is_refused_where_an_access_token_is_expected(
    jwks: JWKSClient, issuer: LocalIssuer, clock: FakeClock
) -> None:
    validator = JWTValidator(
        jwks,
        issuer=issuer.issuer,
        audience=None,
        token_use="access",
        client_id="app",
        clock=clock,
    )
    access = issuer.mint({"aud": None, "token_use": "access", "client_id": "app"})
    assert await validator.validate(access)
    with pytest.raises(WrongTokenUse):
        await validator.validate(issuer.mint({"aud": "app", "token_use": "id"}))
    with pytest.raises(BadAudience):
        await validator.validate(issuer.mint({"token_use": "access", "client_id": "other"}))


async def test_an_oversized_token_is_refused_before_any_work(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"blob": "x" * 9000})
    with pytest.raises(MalformedToken, match="too large"):
        await validator.validate(token)
    assert issuer.fetches == 0


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "é.b.c", "!!.b.c", "e30.e30.", b"\xff.a.b", "W10.e30.e30"],
)
async def test_a_malformed_token_is_refused(validator: JWTValidator, token: str | bytes) -> None:
    with pytest.raises(InvalidToken):
        await validator.validate(token)


async def test_the_error_messages_never_echo_the_token(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    token = issuer.mint({"aud": "secret-audience-value"})
    with pytest.raises(BadAudience) as caught:
        await validator.validate(token)
    assert "secret-audience-value" not in str(caught.value)
    assert caught.value.error == "invalid_token"
    assert caught.value.description == str(caught.value)


async def test_the_last_good_keys_serve_through_an_outage_within_the_stale_window(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    jwks = JWKSClient(issuer.jwks_url, stale_for=600, clock=clock)
    validator = JWTValidator(jwks, issuer=issuer.issuer, audience="api", clock=clock)
    await validator.validate(issuer.mint())
    issuer.fail(503)
    clock.advance(301)  # the key set expired (max-age=300): a refetch fails
    assert await validator.validate(issuer.mint())
    assert issuer.fetches == 2
    clock.advance(10)  # inside the cooldown: no new attempt hammers the failing endpoint
    assert await validator.validate(issuer.mint())
    assert issuer.fetches == 2
    clock.advance(30)  # past the cooldown: one more attempt, still served stale
    assert await validator.validate(issuer.mint())
    assert issuer.fetches == 3


async def test_an_outage_beyond_the_stale_window_is_reported(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    jwks = JWKSClient(issuer.jwks_url, stale_for=600, clock=clock)
    validator = JWTValidator(jwks, issuer=issuer.issuer, audience="api", clock=clock)
    await validator.validate(issuer.mint())
    issuer.fail(500)
    clock.advance(300 + 600)
    with pytest.raises(KeySetUnavailable):
        await validator.validate(issuer.mint())
    issuer.recover()
    clock.advance(30)
    assert await validator.validate(issuer.mint())


async def test_a_first_fetch_that_fails_is_reported_and_retried_after_the_cooldown(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    issuer.fail(502)
    with pytest.raises(KeySetUnavailable):
        await validator.validate(issuer.mint())
    with pytest.raises(KeySetUnavailable):
        await validator.validate(issuer.mint())
    assert issuer.fetches == 1
    issuer.recover()
    clock.advance(30)
    assert await validator.validate(issuer.mint())
    assert issuer.fetches == 2


async def test_a_rotated_key_is_picked_up_without_a_restart(
    validator: JWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    old = issuer.mint()
    await validator.validate(old)
    clock.advance(31)
    issuer.rotate("RS256")  # a new kid; the old key leaves the set
    assert await validator.validate(issuer.mint())
    assert issuer.fetches == 2
    with pytest.raises(UnknownKey):
        await validator.validate(old)


class JWTValidatorTools:
    """Helpers to take tokens apart."""

    @staticmethod
    def signature(token: str) -> bytes:
        import base64

        part = token.rsplit(".", 1)[1]
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def test_an_id_token_is_refused_where_an_rfc_9068_access_token_is_expected(
    jwks: JWKSClient, issuer: LocalIssuer, clock: FakeClock
) -> None:
    validator = JWTValidator(jwks, issuer=issuer.issuer, audience="api", typ="at+jwt", clock=clock)
    assert await validator.validate(issuer.mint(headers={"typ": "at+jwt"}))
    assert await validator.validate(issuer.mint(headers={"typ": "application/AT+JWT"}))
    for typ in ["JWT", None, 5]:
        with pytest.raises(WrongTokenUse, match="'at\\+jwt'"):
            await validator.validate(issuer.mint(headers={"typ": typ}))


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_signature_respelled_with_padding_bits_set_is_refused(
    validator: JWTValidator, issuer: LocalIssuer, alg: str
) -> None:
    # Found by fuzzing: the last character of a base64url part has unused bits; setting
    # them spelled the same signature another way, and the new token string validated.
    token = issuer.mint(alg=alg)
    assert len(token.rsplit(".", 1)[1]) % 4 in {2, 3}
    respelled = token[:-1] + B64URL[B64URL.index(token[-1]) ^ 1]
    assert JWTValidatorTools.signature(respelled) == JWTValidatorTools.signature(token)
    assert await validator.validate(token)
    with pytest.raises(MalformedToken):
        await validator.validate(respelled)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_time_claim_too_large_for_a_float_is_refused_not_a_crash(
    validator: JWTValidator, issuer: LocalIssuer, claim: str
) -> None:
    # Found by fuzzing: an integer past 1.8e308 raised OverflowError (a 500 at the edge).
    with pytest.raises(MissingClaim, match=repr(claim)):
        await validator.validate(issuer.mint({claim: 10**400}))
    with pytest.raises(MissingClaim, match=repr(claim)):
        await validator.validate(issuer.mint({claim: -(10**309)}))
    assert await validator.validate(issuer.mint({"exp": 10**300}))


@pytest.mark.parametrize(
    "claims",
    [{"sub": "\ud800alice"}, {"groups": ["staff", "\udfff"]}, {"ext": {"\udc80": 1}}],
    ids=["in a string", "in a list", "in a key"],
)
async def test_claims_holding_a_lone_surrogate_are_refused(
    validator: JWTValidator, issuer: LocalIssuer, claims: dict[str, object]
) -> None:
    # JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 text can hold: I-JSON
    # (RFC 7493) forbids it, and letting it into the claims breaks every consumer that
    # encodes them (a JSON response, a Redis key). The signature is the issuer's own.
    with pytest.raises(MalformedToken) as refused:
        await validator.validate(issuer.mint(claims))
    assert "surrogate" in str(refused.value)


async def test_claims_that_only_look_like_a_surrogate_are_accepted(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    # A pair of surrogates is one character; an escaped backslash before "ud800" is text.
    looks = {"sub": "\U0001f600 \\ud800", "groups": ["\\uDFFF"], "ext": {"\\udc80": [1]}}
    claims = await validator.validate(issuer.mint(looks))
    assert {name: claims[name] for name in looks} == looks
