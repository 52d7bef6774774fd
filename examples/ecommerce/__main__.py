"""``python -m examples.ecommerce``: serve the shop and its payment provider.

The shop listens on http://127.0.0.1:8000 and the payment provider on port 8001 (a
separate process, as a real provider would be). State is in memory and in a SQLite file
under ``.shop-data``; ``REDIS_URL=redis://localhost:6379/0`` moves every block's state to
Redis, which is what ``--workers 4`` needs to behave as one service.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def wait_until_up(url: str, timeout: float = 15.0) -> None:
    """Return once *url* answers, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(url) from None
            time.sleep(0.1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the example shop.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--payment-port", type=int, default=8001)
    parser.add_argument(
        "--payment-failure-rate", type=float, default=0.0, help="share of charges that fail"
    )
    parser.add_argument("--payment-latency", type=float, default=0.05, help="seconds per charge")
    args = parser.parse_args()
    if args.workers > 1 and not os.environ.get("REDIS_URL"):
        print(
            "warning: without REDIS_URL each worker keeps its own limits, idempotency keys, "
            "cache and circuit; set REDIS_URL to make them one service",
            file=sys.stderr,
        )
    os.environ.setdefault("SHOP_PUBLIC_URL", f"http://{args.host}:{args.port}")
    os.environ.setdefault("PAYMENT_URL", f"http://127.0.0.1:{args.payment_port}")
    # uvicorn re-raises SIGTERM once it has shut down: make it unwind this process (and
    # stop the provider below) instead of killing it on the spot.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    provider = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.ecommerce.payments",
            "--port",
            str(args.payment_port),
            "--failure-rate",
            str(args.payment_failure_rate),
            "--latency",
            str(args.payment_latency),
        ]
    )
    try:
        wait_until_up(f"http://127.0.0.1:{args.payment_port}/charges")
        import uvicorn

        # Seed the database once, before the workers race for it.
        from examples.ecommerce.db import Database
        from examples.ecommerce.settings import Settings

        settings = Settings.from_env()
        database = Database(settings.database, products=settings.products, seed=settings.seed)
        database.prepare()
        database.close()
        print(f"shop: http://{args.host}:{args.port}  (data in {settings.data_dir}/)")
        uvicorn.run(
            "examples.ecommerce.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="warning",
        )
    finally:
        provider.terminate()
        provider.wait(timeout=10)


if __name__ == "__main__":
    main()
