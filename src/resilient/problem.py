"""RFC 9457 problem details: the body of every error `resilient` answers at the edge."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from resilient._asgi import Send

__all__ = ["problem_body", "send_problem"]

CONTENT_TYPE = b"application/problem+json"


def problem_body(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    type_: str = "about:blank",
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Return the JSON bytes of a problem: ``type``, ``title``, ``status``, ``detail``.

    *title* defaults to the status code's reason phrase; *extra* adds extension members.
    """
    body: dict[str, Any] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if extra:
        body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


async def send_problem(
    send: Send,
    status: int,
    detail: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    title: str | None = None,
    type_: str = "about:blank",
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Send a complete ``application/problem+json`` response through an ASGI *send*."""
    body = problem_body(status, detail, title=title, type_=type_, extra=extra)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", CONTENT_TYPE),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
