"""A flaky payment provider: the separate service the shop charges orders through.

``POST /charges`` takes ``{"amount_cents": int, "reference": str}`` and an
``Idempotency-Key`` header, as real providers do: a retried charge with the same key
returns the first charge instead of charging twice. It fails with ``503`` for a share
*failure_rate* of the calls and answers after *latency* seconds; ``POST /control``
changes both at run time (the demo uses it to stage an outage), ``GET /charges`` lists
the charges made.

Run alone with ``python -m examples.ecommerce.payments --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["PaymentProvider"]


class PaymentProvider:
    """The provider's state and its Starlette application (:attr:`app`)."""

    def __init__(
        self, *, failure_rate: float = 0.0, latency: float = 0.0, seed: int | None = None
    ) -> None:
        self.failure_rate = failure_rate
        self.latency = latency
        self.calls = 0
        self.failures = 0
        self.charges: dict[str, dict[str, Any]] = {}  # by idempotency key
        self._rng = random.Random(seed)
        self.app = Starlette(
            routes=[
                Route("/charges", self.charge, methods=["POST"]),
                Route("/charges", self.list_charges, methods=["GET"]),
                Route("/control", self.control, methods=["POST"]),
            ]
        )

    async def charge(self, request: Request) -> JSONResponse:
        self.calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        if self._rng.random() < self.failure_rate:
            self.failures += 1
            return JSONResponse({"error": "provider unavailable"}, status_code=503)
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "Idempotency-Key is required"}, status_code=400)
        try:
            body = json.loads(await request.body())
            amount = body["amount_cents"]
            reference = str(body["reference"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "malformed charge"}, status_code=400)
        if not isinstance(amount, int) or amount <= 0:
            return JSONResponse({"error": "amount_cents must be positive"}, status_code=400)
        charge = self.charges.get(key)
        if charge is None:
            charge = {"id": "ch_" + secrets.token_hex(8), "amount_cents": amount,
                      "reference": reference, "status": "succeeded"}  # fmt: skip
            self.charges[key] = charge
        return JSONResponse(charge, status_code=201)

    async def list_charges(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "charges": list(self.charges.values()),
                "calls": self.calls,
                "failures": self.failures,
            }
        )

    async def control(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            failure_rate = float(body.get("failure_rate", self.failure_rate))
            latency = float(body.get("latency", self.latency))
        except (ValueError, TypeError, AttributeError):
            return JSONResponse({"error": "malformed settings"}, status_code=400)
        if not 0 <= failure_rate <= 1 or not 0 <= latency <= 60:
            return JSONResponse({"error": "settings out of range"}, status_code=400)
        self.failure_rate, self.latency = failure_rate, latency
        return JSONResponse({"failure_rate": failure_rate, "latency": latency})


def main() -> None:
    parser = argparse.ArgumentParser(description="A flaky payment provider for the shop.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    import uvicorn

    provider = PaymentProvider(failure_rate=args.failure_rate, latency=args.latency)
    uvicorn.run(provider.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
