"""A record of every run of a handler, for tests that count them (the chaos suite).

With ``SHOP_RUN_LOG`` set to a file, each run of ``POST /api/orders`` (the handler, past
the idempotency middleware) appends one JSON line to it: the request's
``Idempotency-Key``, the handler's status (``201``: an order paid, so a charge), the
process id, and when the run began and ended (``began``, ``at``: Unix time in seconds).
Lines are appended whole (``O_APPEND``, one small write each), so several worker
processes may share the file. Unset, nothing is recorded and nothing is wrapped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["counted"]

Endpoint = Callable[[Request], Awaitable[Response]]


def counted(endpoint: Endpoint, path: Path | None) -> Endpoint:
    """Return *endpoint*, recording each of its runs in *path* (when there is one)."""
    if path is None:
        return endpoint

    async def run(request: Request) -> Response:
        began = time.time()
        status = 500  # what the client would see if the handler raised
        try:
            response = await endpoint(request)
            status = response.status_code
            return response
        except Exception as exc:
            status = getattr(exc, "status_code", 500)
            raise
        finally:
            line = {
                "key": request.headers.get("idempotency-key"),
                "status": status,
                "pid": os.getpid(),
                "began": began,
                "at": time.time(),
            }
            with path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(line) + "\n")

    return run
