"""The shop's settings: embedded defaults, each one overridable from the environment.

* ``REDIS_URL``: keep every block's state in Redis (``redis+cluster://host:port`` for a
  Redis Cluster); unset, everything stays in process.
* ``SHOP_DATA_DIR``: where the SQLite file and the signing key live (``.shop-data``).
* ``SHOP_PUBLIC_URL``: the shop's own URL, which names the token issuer and where its JWKS
  is fetched from (``http://127.0.0.1:8000``).
* ``PAYMENT_URL``: the payment provider (``http://127.0.0.1:8001``).
* ``SHOP_PRODUCTS``: how many products the seed creates (``5000``).
* ``SHOP_TRUSTED_PROXIES``: comma-separated networks whose ``X-Forwarded-For`` is believed
  (none).
* ``SHOP_BREAKER_OPEN_FOR``: seconds the payments circuit stays open (``10``).
* ``SHOP_IDEMPOTENCY_LEASE``: seconds an order's idempotency key stays claimed by a run
  that stopped renewing it, and orders are refused after Redis lost its records (``30``).
* ``SHOP_RUN_LOG``: a file where each run of the order handler is recorded (unset: none;
  see ``runlog.py``).
* ``OIDC_ISSUER``: accept the access tokens of an external issuer instead of the shop's
  own (a Cognito user pool URL, say; its keys at ``{issuer}/.well-known/jwks.json``);
  ``OIDC_CLIENT_ID``: the app client id those tokens must carry.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the shop can be told; the defaults run it on one machine, in memory."""

    data_dir: Path = Path(".shop-data")
    redis_url: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    payment_url: str = "http://127.0.0.1:8001"
    products: int = 5000
    seed: int = 7
    audience: str = "shop-api"
    token_lifetime: int = 900
    trusted_proxies: tuple[str, ...] = ()
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    # Limits: the whole API per user (or per IP when anonymous), and the login form.
    api_rate: str = "20/second"
    api_burst: int = 40
    login_ip_rate: str = "20/minute"
    login_user_rate: str = "5/15minutes"
    login_block: float = 900.0
    breaker_open_for: float = 10.0
    idempotency_lease: float = 30.0
    run_log: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from *environ* (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        products = env.get("SHOP_PRODUCTS", str(defaults.products))
        if not products.isdigit() or int(products) < 1:
            msg = f"SHOP_PRODUCTS must be a positive integer, not {products!r}"
            raise ValueError(msg)
        open_for = env.get("SHOP_BREAKER_OPEN_FOR", str(defaults.breaker_open_for))
        try:
            breaker_open_for = float(open_for)
        except ValueError:
            breaker_open_for = -1.0
        if not breaker_open_for > 0:
            msg = f"SHOP_BREAKER_OPEN_FOR must be a positive number of seconds, not {open_for!r}"
            raise ValueError(msg)
        lease = env.get("SHOP_IDEMPOTENCY_LEASE", str(defaults.idempotency_lease))
        try:
            idempotency_lease = float(lease)
        except ValueError:
            idempotency_lease = -1.0
        if not idempotency_lease > 0:
            msg = f"SHOP_IDEMPOTENCY_LEASE must be a positive number of seconds, not {lease!r}"
            raise ValueError(msg)
        proxies = tuple(p.strip() for p in env.get("SHOP_TRUSTED_PROXIES", "").split(",") if p)
        return cls(
            data_dir=Path(env.get("SHOP_DATA_DIR", str(defaults.data_dir))),
            redis_url=env.get("REDIS_URL") or None,
            public_url=env.get("SHOP_PUBLIC_URL", defaults.public_url).rstrip("/"),
            payment_url=env.get("PAYMENT_URL", defaults.payment_url).rstrip("/"),
            products=int(products),
            trusted_proxies=proxies,
            oidc_issuer=env.get("OIDC_ISSUER") or None,
            oidc_client_id=env.get("OIDC_CLIENT_ID") or None,
            breaker_open_for=breaker_open_for,
            idempotency_lease=idempotency_lease,
            run_log=Path(env["SHOP_RUN_LOG"]) if env.get("SHOP_RUN_LOG") else None,
        )

    @property
    def database(self) -> Path:
        """The SQLite file."""
        return self.data_dir / "shop.sqlite3"

    @property
    def signing_key(self) -> Path:
        """The issuer's private key (PEM)."""
        return self.data_dir / "signing-key.pem"
