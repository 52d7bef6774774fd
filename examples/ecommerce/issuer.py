"""The shop's own token issuer: one ES256 key, its JWKS, and short-lived access tokens.

The private key lives in the data directory so that every application process signs with
the same key (and a restart does not log everyone out). The service validates its own
tokens the way it would validate an external identity provider's: through
:class:`resilient.JWKSClient`, over HTTP, from ``/.well-known/jwks.json``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = ["Issuer"]

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the key at *path*, or create it there atomically (first process wins)."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        # link() fails if another process created the key first: then use theirs.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        temporary.unlink()
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        msg = f"{path} does not hold an EC private key"
        raise TypeError(msg)
    return loaded


class Issuer:
    """Mints the shop's access tokens (RFC 9068 ``at+jwt``) and publishes its JWKS."""

    def __init__(self, key_path: Path, *, issuer: str, audience: str, lifetime: int = 900) -> None:
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._key = _load_or_create_key(key_path)
        numbers = self._key.public_key().public_numbers()
        self._public_jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        # RFC 7638 thumbprint: the members in lexical order, no whitespace.
        canonical = json.dumps(self._public_jwk, sort_keys=True, separators=(",", ":"))
        self.kid = _b64(hashlib.sha256(canonical.encode()).digest())

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at ``/.well-known/jwks.json``."""
        return {"keys": [{**self._public_jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def mint(self, user: dict[str, Any], *, now: float | None = None) -> str:
        """An access token for *user* (``id``, ``username``, ``roles``)."""
        issued = int(time.time() if now is None else now)
        roles = list(user["roles"])
        scopes = ["products:read", "orders:read", "orders:write"]
        if "admin" in roles:
            scopes.append("products:write")
        claims = {
            "iss": self.issuer,
            "sub": str(user["id"]),
            "aud": self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + self.lifetime,
            "jti": secrets.token_urlsafe(12),
            "client_id": "shop-web",
            "username": user["username"],
            "roles": roles,
            "scope": " ".join(scopes),
        }
        return self._sign({"alg": "ES256", "kid": self.kid, "typ": "at+jwt"}, claims)

    def _sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """A compact JWS with a canonical (low-S) ECDSA signature.

        ECDSA signatures come in two valid forms, ``s`` and ``n - s``; validators that
        refuse malleable signatures (``resilient``'s do, by default) accept the low one
        only, so the issuer always sends that one.
        """
        parts = [
            _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        ]
        signing_input = ".".join(parts).encode()
        r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        if s > _P256_ORDER // 2:
            s = _P256_ORDER - s
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode()}.{_b64(signature)}"
