"""``python -m examples.ecommerce.demo``: the shop's story, told by a client, as a table.

By default it starts its own shop and payment provider (fresh data, free ports, behind a
pretend load balancer on 127.0.0.1 so that it can play many clients), walks through each
scenario, prints what happened, and stops them. ``REDIS_URL`` in the environment puts
the shop it starts on Redis.

``--url`` points it at a running shop instead, started with its defaults. The demo plays
many clients through ``X-Forwarded-For``, which the shop must take for the client's
address: uvicorn does so for requests from loopback by default (its proxy headers), and
``SHOP_TRUSTED_PROXIES`` does so for other addresses. The demo checks first, and stops
saying what is missing if the shop does not believe it. The circuit's open period is read
from the shop's ``Retry-After``, whatever ``SHOP_BREAKER_OPEN_FOR`` is. An expired token
can only be made with the shop's signing key: pass ``--signing-key``
(``$SHOP_DATA_DIR/signing-key.pem``), or that case is reported as skipped, with why.

Scenarios: a brute-force login is blocked; a double-submitted order is placed once; a
crowd on a cold catalog page costs one database load; a payment outage opens the circuit
(fast 503s) and the shop recovers; forged, unsigned and expired tokens are refused; only
an admin changes a product, and readers see the change at once; each user has a token
bucket on the API.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from examples.ecommerce.__main__ import wait_until_up
from examples.ecommerce.issuer import Issuer

__all__ = ["Demo", "main"]

UNSIGNED = b'{"alg":"none"}'
# Seconds the payments circuit stays open in the demo's own shop: longer than the shop's
# retry deadline (3 s), so an order finds the circuit open and fails at once. A shop of
# its own defaults (10 s) works too: the demo waits as long as Retry-After says.
OPEN_FOR = 5.0
# Without SHOP_TRUSTED_PROXIES the shop sees one client, the demo's own address.
UNTRUSTED = (
    "the shop at {url} does not believe this client's X-Forwarded-For, so every request "
    "would count against one client address; start it with SHOP_TRUSTED_PROXIES set to "
    "the address the demo connects from (SHOP_TRUSTED_PROXIES=127.0.0.1/32 on this "
    "machine), or with uvicorn's proxy headers on for it (its default for loopback)"
)


@dataclass
class Row:
    """One line of the report."""

    scenario: str
    happened: str
    ok: bool
    skipped: str | None = None  # why the scenario could not be played


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def servers(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Start a shop and its payment provider; yield their URLs; stop them."""
    shop_port, payment_port = free_port(), free_port()
    env = {
        **os.environ,
        "SHOP_DATA_DIR": str(data_dir),
        "SHOP_TRUSTED_PROXIES": "127.0.0.1/32",
        "SHOP_BREAKER_OPEN_FOR": str(OPEN_FOR),
    }
    for name in ("SHOP_PUBLIC_URL", "PAYMENT_URL"):
        env.pop(name, None)
    log = (data_dir / "shop.log").open("wb")  # the shop's own log, events included
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.ecommerce", "--port", str(shop_port),
         "--payment-port", str(payment_port), "--payment-latency", "0.02"],
        env=env,
        stdout=log,
        stderr=log,
    )  # fmt: skip
    try:
        shop, payments = f"http://127.0.0.1:{shop_port}", f"http://127.0.0.1:{payment_port}"
        wait_until_up(shop + "/healthz", timeout=60)
        yield shop, payments
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Demo:
    """The scenarios, run against a shop at *shop* and its provider at *payments*."""

    def __init__(
        self,
        shop: str,
        payments: str,
        *,
        data_dir: Path | None = None,
        signing_key: Path | None = None,
    ) -> None:
        self.shop = shop
        self.payments = payments
        # The shop's private key, to mint tokens it would have issued (an expired one).
        self.signing_key = signing_key or (data_dir / "signing-key.pem" if data_dir else None)
        self.http = httpx.AsyncClient(base_url=shop, timeout=30.0)
        self.rows: list[Row] = []
        self._addresses = iter(range(1, 1 << 16))

    def client_ip(self) -> dict[str, str]:
        """Headers that make a request come from a client address of its own."""
        n = next(self._addresses)
        return {"X-Forwarded-For": f"10.{n >> 8 & 255}.{n & 255}.7"}

    def report(self, scenario: str, happened: str, *, ok: bool) -> None:
        self.rows.append(Row(scenario, happened, ok))

    def skip(self, scenario: str, reason: str) -> None:
        self.rows.append(Row(scenario, reason, ok=False, skipped=reason))

    async def forwarding_believed(self) -> bool:
        """Whether the shop takes each ``X-Forwarded-For`` address for a client of its own.

        One address spends its token bucket on the API; five requests from a fresh address
        then pass only if the shop keeps a bucket per forwarded address.
        """
        spent = self.client_ip()
        drained = await asyncio.gather(
            *(self.http.get("/api/products/1", headers=spent) for _ in range(60))
        )
        if all(r.status_code != 429 for r in drained):
            return True  # a bucket larger than the defaults: nothing to learn, carry on
        fresh = self.client_ip()
        tried = await asyncio.gather(
            *(self.http.get("/api/products/1", headers=fresh) for _ in range(5))
        )
        return all(r.status_code == 200 for r in tried)

    async def login(self, username: str, password: str) -> dict[str, str]:
        response = await self.http.post(
            "/api/login",
            json={"username": username, "password": password},
            headers=self.client_ip(),
        )
        response.raise_for_status()
        body = response.json()
        return {"Authorization": f"Bearer {body['access_token']}", "X-User": body["user_id"]}

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/metrics")).text
        selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    # -- the scenarios ------------------------------------------------------------------

    async def brute_force(self) -> None:
        attacker = self.client_ip()
        statuses = []
        for guess in range(6):
            response = await self.http.post(
                "/api/login",
                json={"username": "alice", "password": f"guess-{guess}"},
                headers=attacker,
            )
            statuses.append(response.status_code)
        right = await self.http.post(
            "/api/login", json={"username": "alice", "password": "wonderland"}, headers=attacker
        )
        self.report(
            "brute-force login on alice",
            f"6 guesses: {_counts(statuses)}; then the right password: {right.status_code}, "
            f"Retry-After {right.headers.get('retry-after')} s",
            ok=statuses == [401] * 5 + [429] and right.status_code == 429,
        )

    async def double_submit(self) -> None:
        bob = await self.login("bob", "builder")
        user = bob.pop("X-User")
        headers = {**bob, "Idempotency-Key": f"checkout-{time.time_ns()}"}
        order = {"items": [{"product_id": 1, "quantity": 1}]}
        first, second = await asyncio.gather(
            self.http.post("/api/orders", json=order, headers=headers),
            self.http.post("/api/orders", json=order, headers=headers),
        )
        if {first.status_code, second.status_code} == {201, 409}:  # both at once: one waits
            await asyncio.sleep(0.5)
            second = await self.http.post("/api/orders", json=order, headers=headers)
        changed = await self.http.post(
            "/api/orders", json={"items": [{"product_id": 2, "quantity": 1}]}, headers=headers
        )
        orders = (await self.http.get(f"/api/users/{user}/orders", headers=bob)).json()["orders"]
        self.report(
            "order submitted twice (same Idempotency-Key)",
            f"{first.status_code}, then {second.status_code} replayed="
            f"{second.headers.get('idempotent-replayed')}; same key, other order: "
            f"{changed.status_code}; orders in the database: {len(orders)}",
            ok=first.status_code == 201
            and second.headers.get("idempotent-replayed") == "true"
            and changed.status_code == 422
            and len(orders) == 1,
        )

    async def stampede(self) -> None:
        before = await self.metric("shop_catalog_loads_total", kind="list")
        query = {"category": "games", "page": "3", "per_page": "50"}
        responses = await asyncio.gather(
            *(self.http.get("/api/products", params=query, headers=self.client_ip())
              for _ in range(200))
        )  # fmt: skip
        after = await self.metric("shop_catalog_loads_total", kind="list")
        statuses = [r.status_code for r in responses]
        self.report(
            "200 clients at once on a cold catalog page",
            f"{_counts(statuses)}; database loads: {after - before:g}",
            ok=statuses == [200] * 200 and after - before == 1,
        )

    async def payment_outage(self) -> None:
        carol = await self.login("carol", "christmas")
        carol.pop("X-User")
        order = {"items": [{"product_id": 3, "quantity": 1}]}
        seen: list[str] = []

        async def place(label: str) -> httpx.Response:
            start = time.perf_counter()
            response = await self.http.post(
                "/api/orders",
                json=order,
                headers={**carol, "Idempotency-Key": f"{label}-{time.time_ns()}"},
            )
            seen.append(f"{response.status_code} in {(time.perf_counter() - start) * 1000:.0f} ms")
            return response

        await self.http.post(self.payments + "/control", json={"failure_rate": 1.0})
        during = [await place("outage") for _ in range(3)]
        await self.http.post(self.payments + "/control", json={"failure_rate": 0.0})
        # The circuit's open period, as the shop tells it (SHOP_BREAKER_OPEN_FOR), and a
        # sync between processes; then one probe goes through and closes it.
        retry_after = during[-1].headers.get("retry-after", "")
        waited = float(retry_after) if retry_after.isdigit() else OPEN_FOR
        await asyncio.sleep(waited + 1.5)
        after = await place("recovered")
        self.report(
            "payment provider down, then back",
            "; ".join(seen) + f" (Retry-After {retry_after or '-'} s, waited {waited + 1.5:g} s)",
            ok=[r.status_code for r in during] == [503] * 3 and after.status_code == 201,
        )

    async def bad_tokens(self) -> None:
        bob = await self.login("bob", "builder")
        token = bob["Authorization"][7:]
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        tokens = {
            "forged (roles edited)": ".".join(
                [header, _b64(json.dumps({**claims, "roles": ["admin"]}).encode()), signature]
            ),
            "unsigned (alg none)": f"{_b64(UNSIGNED)}.{payload}.",
        }
        outcomes = [await self.refusal(name, bad) for name, bad in tokens.items()]
        self.report(
            "forged and unsigned tokens",
            "; ".join(f"{name}: {status} ({why})" for name, status, why in outcomes),
            ok=all(status == 401 for _, status, _ in outcomes),
        )
        if self.signing_key is None or not self.signing_key.is_file():
            where = "no key given" if self.signing_key is None else f"no {self.signing_key}"
            self.skip(
                "an expired token",
                f"needs the shop's signing key to mint one ({where}): pass --signing-key "
                "with the shop's SHOP_DATA_DIR/signing-key.pem",
            )
            return
        issuer = Issuer(self.signing_key, issuer=claims["iss"], audience=claims["aud"])
        expired = issuer.mint(
            {"id": claims["sub"], "username": "bob", "roles": []}, now=time.time() - 3600
        )
        name, status, why = await self.refusal("expired", expired)
        self.report("an expired token", f"{name}: {status} ({why})", ok=status == 401)

    async def refusal(self, name: str, token: str) -> tuple[str, int, str]:
        """Present *token*: its name, the status and the refusal's error_description."""
        response = await self.http.get(
            "/api/products/1", headers={"Authorization": f"Bearer {token}", **self.client_ip()}
        )
        reason = re.search(
            r'error_description="([^"]*)"', response.headers.get("www-authenticate", "")
        )
        return name, response.status_code, reason.group(1) if reason else "-"

    async def admin_only(self) -> None:
        bob = await self.login("bob", "builder")
        admin = await self.login("admin", "admin-secret")
        bob.pop("X-User")
        admin.pop("X-User")
        before = (await self.http.get("/api/products/5", headers=self.client_ip())).json()
        price = before["price_cents"] + 100
        by_bob = await self.http.put("/api/products/5", json={"price_cents": price}, headers=bob)
        by_admin = await self.http.put(
            "/api/products/5", json={"price_cents": price}, headers=admin
        )
        after = (await self.http.get("/api/products/5", headers=self.client_ip())).json()
        self.report(
            "product price change",
            f"by bob: {by_bob.status_code}; by admin: {by_admin.status_code}; readers see "
            f"{before['price_cents']} -> {after['price_cents']}",
            ok=by_bob.status_code == 403
            and by_admin.status_code == 200
            and after["price_cents"] == price,
        )

    async def token_bucket(self) -> None:
        customer = await self.login("customer001", "password-1")
        customer.pop("X-User")
        # Sent at once, as a burst is: sent one after another, a slow machine's latency
        # would let the bucket refill between them.
        answers = await asyncio.gather(
            *(self.http.get("/api/products/9", headers=customer) for _ in range(60))
        )
        statuses = [answer.status_code for answer in answers]
        self.report(
            "one user, 60 requests in a burst",
            f"{_counts(statuses)} (a bucket of 40, refilled at 20/s)",
            ok=200 in statuses and 429 in statuses,
        )

    async def run(self) -> list[Row]:
        scenarios: list[Callable[[], Awaitable[None]]] = [
            self.brute_force,
            self.double_submit,
            self.stampede,
            self.payment_outage,
            self.bad_tokens,
            self.admin_only,
            self.token_bucket,
        ]
        try:
            if not await self.forwarding_believed():
                raise Misconfigured(UNTRUSTED.format(url=self.shop))
            for scenario in scenarios:
                await scenario()
        finally:
            await self.http.aclose()
        return self.rows


class Misconfigured(Exception):
    """The shop cannot play the story as it is configured; the message says what it needs."""


def _counts(statuses: list[int]) -> str:
    counts: dict[int, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{count} x {status}" for status, count in counts.items())


def render(rows: list[Row]) -> str:
    """The report as a plain-text table."""
    width = max(len(row.scenario) for row in rows)
    lines = [f"{'scenario':<{width}}  ok  what happened", f"{'-' * width}  --  {'-' * 40}"]
    lines += [f"{row.scenario:<{width}}  {_verdict(row)}  {row.happened}" for row in rows]
    skipped = sum(row.skipped is not None for row in rows)
    if skipped:
        lines.append(f"\n{skipped} scenario(s) skipped: see why above.")
    return "\n".join(lines)


def _verdict(row: Row) -> str:
    if row.skipped is not None:
        return "--"
    return "ok" if row.ok else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Walk through the shop's story.")
    parser.add_argument("--url", help="a running shop (else one is started)")
    parser.add_argument("--payments", default="http://127.0.0.1:8001")
    parser.add_argument(
        "--signing-key",
        type=Path,
        help="with --url: the shop's signing key (SHOP_DATA_DIR/signing-key.pem), to show "
        "an expired token refused; without it that case is skipped",
    )
    args = parser.parse_args(argv)
    try:
        if args.url:
            demo = Demo(args.url.rstrip("/"), args.payments, signing_key=args.signing_key)
            rows = asyncio.run(demo.run())
        else:
            with tempfile.TemporaryDirectory() as data, servers(Path(data)) as (shop, payments):
                print(f"started a shop at {shop} (payments at {payments})\n", flush=True)
                rows = asyncio.run(Demo(shop, payments, data_dir=Path(data)).run())
    except Misconfigured as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    print(render(rows))
    return 0 if all(row.ok for row in rows if row.skipped is None) else 1


if __name__ == "__main__":
    sys.exit(main())
