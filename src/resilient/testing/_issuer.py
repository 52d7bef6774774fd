"""LocalIssuer: a token issuer for tests, its JWKS served over real loopback HTTP."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

try:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
except ImportError as error:  # pragma: no cover (the test suite always has them)
    msg = "LocalIssuer needs PyJWT: pip install 'resilient-asgi[jwt]'"
    raise ImportError(msg) from error

from resilient.clock import Clock, SystemClock

__all__ = ["LocalIssuer"]

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P384_ORDER = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)


def b64url(data: bytes) -> str:
    """Encode *data* as unpadded base64url, the JWS way."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _generate(alg: str) -> Any:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    msg = f"LocalIssuer cannot make a key for {alg!r}"
    raise ValueError(msg)


class LocalIssuer:
    """A token issuer for tests: keys, a JWKS on ``http://127.0.0.1:<free port>``, tokens.

    It makes one key per algorithm of *algorithms* (RSA 2048, EC P-256, Ed25519, ...),
    serves them at :attr:`jwks_url` (and an OpenID discovery document at
    ``{issuer}/.well-known/openid-configuration``), counts the JWKS fetches in
    :attr:`fetches`, rotates keys (:meth:`rotate`), withdraws them (:meth:`unpublish`),
    fails on demand (:meth:`fail`), and mints tokens with chosen claims and headers
    (:meth:`mint`, :meth:`sign`). Claims' times come from *clock*, so a test can share its
    :class:`FakeClock` with the validator.

    It closes each connection after one response (HTTP/1.0), unless *keep_alive*: then it
    keeps connections open for the next request (HTTP/1.1, as real issuers do), and
    counts them in :attr:`connections` (accepted so far) and :attr:`open_connections`
    (not yet closed by the client), so a test can see a client reuse its connection.

    >>> with LocalIssuer() as issuer:  # doctest: +SKIP
    ...     token = issuer.mint({"sub": "alice"})
    """

    def __init__(
        self,
        *,
        audience: str = "api",
        algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA"),
        max_age: int | None = 300,
        clock: Clock | None = None,
        keep_alive: bool = False,
    ) -> None:
        self.audience = audience
        self.max_age = max_age
        self.keep_alive = keep_alive
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._private: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key)
        self._published: list[str] = []  # kids, in JWKS order
        self._extra: list[dict[str, Any]] = []  # raw JWKs published as they are
        self._current: dict[str, str] = {}  # alg -> kid used by default
        self.fetches = 0
        self.connections = 0
        self.open_connections = 0
        self.failing: int | None = None
        self.redirect_to: str | None = None
        self.padding = 0
        for alg in algorithms:
            self.rotate(alg, keep_old=True)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_url = self.issuer + JWKS_PATH
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving (in a daemon thread); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- keys ---------------------------------------------------------------------------

    def add_key(
        self, private_key: Any, *, alg: str, kid: str | None = None, publish: bool = True
    ) -> str:
        """Add a signing key (a ``cryptography`` private key) under *kid*; return the kid."""
        kid = kid or secrets.token_urlsafe(8)
        with self._lock:
            self._private[kid] = (alg, private_key)
            if publish:
                self._published.append(kid)
        return kid

    def publish_jwk(self, jwk: Mapping[str, Any]) -> None:
        """Publish a raw JWK as it is (a symmetric key, a weak key, garbage...)."""
        with self._lock:
            self._extra.append(dict(jwk))

    def unpublish(self, *kids: str) -> None:
        """Take the keys *kids* out of the JWKS (every key when none is named).

        They still sign tokens (:meth:`mint`); raw JWKs of :meth:`publish_jwk` stay.
        """
        with self._lock:
            self._published = [kid for kid in self._published if kids and kid not in kids]

    def rotate(self, alg: str = "RS256", *, keep_old: bool = False) -> str:
        """Make a new key for *alg*, sign with it from now on, and publish it; return its kid.

        Unless *keep_old*, the previous key of that algorithm leaves the JWKS.
        """
        old = self._current.get(alg)
        kid = self.add_key(_generate(alg), alg=alg)
        with self._lock:
            self._current[alg] = kid
            if old is not None and not keep_old and old in self._published:
                self._published.remove(old)
        return kid

    def kid(self, alg: str = "RS256") -> str:
        """Return the kid of the key that signs *alg* tokens by default."""
        return self._current[alg]

    def public_key(self, kid: str) -> Any:
        """Return the public key of *kid* (a ``cryptography`` object)."""
        return self._private[kid][1].public_key()

    def jwks(self) -> dict[str, Any]:
        """Return the JWKS document served now."""
        with self._lock:
            keys: list[dict[str, Any]] = []
            for kid in self._published:
                alg, private = self._private[kid]
                algorithm = jwt.get_algorithm_by_name(alg)
                jwk = json.loads(algorithm.to_jwk(private.public_key()))
                jwk.update({"kid": kid, "use": "sig", "alg": alg})
                keys.append(jwk)
            keys.extend(self._extra)
        return {"keys": keys}

    # -- behaviour on demand ----------------------------------------------------------

    def fail(self, status: int = 503) -> None:
        """Answer every request with *status* until :meth:`recover`."""
        self.failing = status

    def recover(self) -> None:
        """Serve normally again."""
        self.failing = None

    # -- tokens -------------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Default claims (iss, aud, sub, iat, exp in 5 minutes), with *overrides* applied.

        An override whose value is ``None`` removes the claim.
        """
        now = int(self._clock.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-1",
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Return a signed token: :meth:`claims` updated with *claims*, signed with *alg*.

        *kid* picks the signing key (the current one of *alg* by default); *headers* adds
        to, or with ``None`` values removes from, the JOSE header.
        """
        kid = kid or self._current[alg]
        header: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": kid}
        header.update(headers or {})
        header = {k: v for k, v in header.items() if v is not None}
        return self.sign(header, self.claims(**dict(claims or {})), key_id=kid)

    def sign(
        self,
        header: Mapping[str, Any],
        payload: Mapping[str, Any] | bytes,
        *,
        key_id: str,
        alg: str | None = None,
    ) -> str:
        """Sign exactly *header* and *payload* with the private key *key_id*.

        *alg* is the algorithm actually used to sign (the key's own by default), whatever
        the header says: attacks are made this way. ECDSA signatures are low-S.
        """
        signing_alg, private = self._private[key_id]
        signing_alg = alg or signing_alg
        body = payload if isinstance(payload, bytes) else json.dumps(dict(payload)).encode()
        message = f"{b64url(json.dumps(dict(header)).encode())}.{b64url(body)}"
        signature = sign_raw(signing_alg, private, message.encode())
        return f"{message}.{b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if issuer.keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                with issuer._lock:
                    issuer.connections += 1
                    issuer.open_connections += 1

            def finish(self) -> None:
                with issuer._lock:
                    issuer.open_connections -= 1
                super().finish()

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == JWKS_PATH:
                    with issuer._lock:
                        issuer.fetches += 1
                if issuer.failing is not None:
                    self._send(issuer.failing, b'{"error":"failing on demand"}')
                elif path == JWKS_PATH and issuer.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", issuer.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == JWKS_PATH:
                    document = issuer.jwks()
                    if issuer.padding:
                        document["padding"] = "x" * issuer.padding
                    self._send(200, json.dumps(document).encode())
                elif path == DISCOVERY_PATH:
                    document = {"issuer": issuer.issuer, "jwks_uri": issuer.jwks_url}
                    self._send(200, json.dumps(document).encode())
                else:
                    self._send(404, b"{}")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if issuer.max_age is not None and status == 200:
                    self.send_header("Cache-Control", f"public, max-age={issuer.max_age}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet in tests

        return Handler

    def __repr__(self) -> str:
        return f"LocalIssuer({self.issuer!r})"


def sign_raw(alg: str, private_key: Any, message: bytes) -> bytes:
    """Sign *message* with *alg* as a JWS does (ECDSA as raw ``r || s``, low-S)."""
    if alg in {"ES256", "ES384"}:
        hash_alg = jwt.get_algorithm_by_name(alg).hash_alg  # type: ignore[attr-defined]
        der = private_key.sign(message, ec.ECDSA(hash_alg()))
        r, s = decode_dss_signature(der)
        order, size = (_P256_ORDER, 32) if alg == "ES256" else (_P384_ORDER, 48)
        s = min(s, order - s)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    signature: bytes = jwt.get_algorithm_by_name(alg).sign(message, private_key)
    return signature
