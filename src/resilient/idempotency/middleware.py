"""``IdempotencyMiddleware``: retried writes made safe at the edge of an ASGI application.

It follows the IETF httpapi draft "The Idempotency-Key HTTP Header Field" and Stripe's
semantics: the first request with a key runs and its response is stored; a retry with the
same key gets that response back, byte for byte, with ``Idempotent-Replayed: true``; a
retry while the first is still running gets ``409``; the same key with a different
request gets ``422``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from math import ceil
from typing import Final, Literal

from resilient._asgi import ASGIApp, Message, Receive, Scope, Send
from resilient._routing import PathPattern
from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend
from resilient.clock import Clock
from resilient.errors import BackendError, ConfigurationError
from resilient.events import (
    BackendFailed,
    IdempotencyNotStored,
    IdempotencyRejected,
    IdempotencyReplayed,
    Observer,
    emit,
)
from resilient.idempotency.core import (
    ClaimStatus,
    IdempotencyStore,
    StoredResponse,
    decode_response,
    encode_response,
    validate_seconds,
)
from resilient.idempotency.keeper import BLOCK, DEFAULT_OBSERVER, Keeper, Sleep
from resilient.keys import by_user
from resilient.problem import send_problem

__all__ = [
    "DEFAULT_REFUSED_STATUSES",
    "IdempotencyMiddleware",
    "default_scope_key",
    "fingerprint_request",
    "parse_key",
]

DEFAULT_REFUSED_STATUSES: Final = frozenset({401, 403, 407, 408, 421, 425, 429})
"""Statuses that say a request was refused without being run, and may succeed if retried.

401 and 407 (no valid credentials), 403 (a permission the caller may be granted), 408
(the server gave up waiting for the request), 421 (sent to a server that does not serve
it), 425 (too early to risk a replay, RFC 8470), 429 (a rate limit). The default of
:class:`IdempotencyMiddleware`'s *refused_statuses*: such a response is not stored.
"""

MAX_KEY_LENGTH = 255
_NEVER_STORED = frozenset({b"set-cookie", b"authorization", b"proxy-authorization"})
_STORED_FALSE = (b"idempotency-stored", b"false")
_REPLAYED = (b"idempotent-replayed", b"true")
_user_key = by_user()


def parse_key(raw: bytes) -> str | None:
    """Return the key in an ``Idempotency-Key`` field value, or ``None`` if it is invalid.

    The draft makes the value a structured-field string (``"8e03978e-..."``); a bare
    token (``8e03978e-...``) is accepted too, as most clients send one. The key must be 1
    to 255 printable ASCII characters.

    >>> parse_key(b'"a b"'), parse_key(b"abc"), parse_key(b"a b"), parse_key(b'""')
    ('a b', 'abc', None, None)
    """
    if raw[:1] == b'"':
        if len(raw) < 2 or raw[-1:] != b'"':
            return None
        out = bytearray()
        inner = raw[1:-1]
        i = 0
        while i < len(inner):
            c = inner[i]
            if c == 0x5C:  # backslash: only \" and \\ are escapes
                if i + 1 >= len(inner) or inner[i + 1] not in b'"\\':
                    return None
                out.append(inner[i + 1])
                i += 2
                continue
            if c == 0x22 or not 0x20 <= c <= 0x7E:
                return None
            out.append(c)
            i += 1
        key = out.decode("ascii")
    else:
        if any(not 0x21 <= c <= 0x7E or c == 0x22 for c in raw):
            return None
        key = raw.decode("ascii")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return None
    return key


def fingerprint_request(scope: Scope, body: bytes) -> str:
    """Return the default request fingerprint: a SHA-256 of method, path, query string and body.

    Any path is accepted, even one no server decodes from the wire (a lone surrogate such
    as U+D800): ``surrogatepass`` spells every code point, so two paths never
    share a fingerprint, and a path that is valid UTF-8 is hashed as its UTF-8 bytes.
    """
    digest = hashlib.sha256()
    for part in (
        scope["method"].encode("utf-8", "surrogatepass"),
        scope["path"].encode("utf-8", "surrogatepass"),
    ):
        digest.update(part)
        digest.update(b"\x00")
    digest.update(scope.get("query_string", b""))
    digest.update(b"\x00")
    digest.update(body)
    return digest.hexdigest()


def default_scope_key(scope: Scope, key: str) -> str:
    """Return the default scope of a key: the authenticated user (if any), the method, the path.

    So the same key sent by two users, or to two routes, names two records. The result is
    always valid UTF-8, which every store can keep: a lone surrogate in the path (which
    no server decodes from the wire, but a scope may hold) is spelled as its escape.
    """
    user = _user_key(scope) or ""
    path = scope.get("root_path", "") + scope["path"]
    scoped = f"{user}\x1f{scope['method']}\x1f{path}\x1f{key}"
    if not scoped.isascii():
        # Such a path may then name the same record as one spelling the escape: the
        # fingerprint, which keeps the surrogate, tells them apart (422, never a replay).
        scoped = scoped.encode("utf-8", "backslashreplace").decode("utf-8")
    return scoped


class _TooLarge(Exception):
    pass


class IdempotencyMiddleware:
    """Make requests that carry an ``Idempotency-Key`` run once, and replay their response.

    Records live in *backend*: a :class:`~resilient.MemoryBackend` (a new one by
    default), a :class:`~resilient.RedisBackend` shared by every instance, or any
    :class:`~resilient.idempotency.IdempotencyStore`. Like every other option it is
    keyword-only (``IdempotencyMiddleware(app, backend=...)``), as the collaborators of
    every middleware are.

    Only *methods* (default ``POST`` and ``PATCH``) are guarded. A request without the
    *header* passes through, unless *required* says it needs one (``True`` for every
    guarded request, or path patterns such as ``["/api/orders"]``): then it gets ``400``.

    The first request with a key claims it for *lease* seconds, renewed while the handler
    runs; its response is stored for *ttl* seconds unless its status is 500 or more or
    one of *refused_statuses*, it is larger than *max_body* bytes, or the handler raised:
    those release the key and carry ``Idempotency-Stored: false``. ``Set-Cookie`` and
    ``Authorization`` fields are never stored nor replayed. A response reaches the client
    only once it is stored. Storing it is retried (with backoff, the lease renewed
    meanwhile) for up to one lease; if it still fails, the client never sees a success
    that a retry could run again: it gets ``503`` with ``Retry-After`` and
    ``Idempotency-Stored: false`` instead (nothing of a storable response goes out
    before it is stored, not even its status).

    *refused_statuses* (default :data:`DEFAULT_REFUSED_STATUSES`: 401, 403, 407, 408,
    421, 425 and 429) are the answers of a request refused before it ran: no credentials,
    a missing permission, a rate limit inside the guard. As Stripe saves no result for a
    request refused before its endpoint ran, such an answer does not burn the key: stored,
    it would be replayed for *ttl* seconds, even after the caller got the scope or the
    limit's window passed. Other 4xx are stored: a 400, 404, 409 or 422 answers the
    request itself (invalid, or at odds with the state it met), and its retry gets the
    same answer. An API whose 400 or 422 always come
    from validation done before anything runs may add them (a client can then correct
    its body and retry with the same key, as Stripe allows); ``()`` stores every answer
    under 500. The middleware goes by the status alone: a handler that acts, then answers
    one of these, runs again when retried.

    A duplicate gets the stored response with ``Idempotent-Replayed: true``; while the
    first is still running, ``409`` with ``Retry-After`` (or, with *wait* > 0, it waits up
    to *wait* seconds for the first to finish and replays its response). A key reused with
    a different request (by *fingerprint*: method, path, query and body by default) gets
    ``422``. Keys are scoped by *scope_key* (default: user, method and path).

    When the backend fails, ``on_backend_error="closed"`` (the default) answers ``503``
    with ``Retry-After``, since running unguarded could run a payment twice; ``"open"``
    runs the request unguarded and reports the failure to the *observer*. Request bodies
    over *max_request_body* bytes get ``413``.

    On a standalone Redis the backend's store notices when Redis lost its records
    (restarted empty, or flushed), through the first claim after the loss, made by this
    middleware or by any other guard on the same backend; that claim's guard emits
    :class:`~resilient.events.BackendDataLost`. With *quarantine* > 0 the middleware
    then refuses guarded requests (``503`` with ``Retry-After``) until that many seconds
    after the loss (its moment as recorded in Redis by the first instance that noticed
    it, the same for every instance), rather than run duplicates of requests that
    were in flight when the records vanished; :attr:`quarantine_left` says so to a
    readiness probe (on every instance sharing the backend). The default, 0, keeps
    serving: a quarantine is an outage of every keyed request, and no length of it
    brings the lost records back (see the durability section of the docs). At the ASGI
    lifespan's startup the middleware learns the store's marker (:meth:`prepare`), so
    that it notices a loss on its first claim even if it had claimed nothing before.
    With *replicas* > 0 (a standalone Redis with replicas), a response is stored only once
    that many replicas have its record (Redis ``WAIT``, up to *replica_timeout* seconds
    per try): a record a client was answered from survives the master's failover.

    >>> from starlette.applications import Starlette
    >>> app = IdempotencyMiddleware(Starlette(), required=["/api/orders"])
    >>> app.quarantine_left
    0.0
    """

    __slots__ = (
        "_keeper",
        "_required",
        "app",
        "conflict_retry_after",
        "fingerprint",
        "header",
        "max_body",
        "max_request_body",
        "methods",
        "observer",
        "refused_statuses",
        "scope_key",
        "wait",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        backend: MemoryBackend | RedisBackend | IdempotencyStore | None = None,
        methods: Iterable[str] = ("POST", "PATCH"),
        header: str = "Idempotency-Key",
        required: bool | Iterable[str] = False,
        ttl: float = 86_400.0,
        lease: float = 30.0,
        wait: float = 0.0,
        conflict_retry_after: float = 1.0,
        max_body: int = 1 << 20,
        max_request_body: int = 10 << 20,
        fingerprint: Callable[[Scope, bytes], str] | None = fingerprint_request,
        scope_key: Callable[[Scope, str], str] = default_scope_key,
        on_backend_error: Literal["open", "closed"] = "closed",
        backend_retry_after: float = 1.0,
        clock: Clock | None = None,
        observer: Observer | None = DEFAULT_OBSERVER,
        sleep: Sleep | None = None,
        quarantine: float = 0.0,
        replicas: int = 0,
        replica_timeout: float = 0.1,
        refused_statuses: Iterable[int] = DEFAULT_REFUSED_STATUSES,
    ) -> None:
        self.refused_statuses = _statuses(refused_statuses)
        if isinstance(methods, str):
            methods = [methods]
        self.methods = frozenset(m.upper() for m in methods)
        if not self.methods:
            msg = "methods must name at least one HTTP method"
            raise ConfigurationError(msg)
        if not isinstance(header, str) or not header or not header.isascii():
            msg = f"header must be a non-empty ASCII header name, not {header!r}"
            raise ConfigurationError(msg)
        for name, value in (("max_body", max_body), ("max_request_body", max_request_body)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = f"{name} must be an integer number of bytes >= 0, not {value!r}"
                raise ConfigurationError(msg)
        self.app = app
        self.header = header.lower().encode("ascii")
        if isinstance(required, bool):
            self._required: bool | tuple[PathPattern, ...] = required
        else:
            self._required = tuple(
                PathPattern(p) for p in ([required] if isinstance(required, str) else required)
            )
        self.wait = validate_seconds("wait", wait, allow_zero=True)
        self.conflict_retry_after = validate_seconds("conflict_retry_after", conflict_retry_after)
        self.max_body = max_body
        self.max_request_body = max_request_body
        self.fingerprint = fingerprint
        self.scope_key = scope_key
        self.observer = observer
        self._keeper = Keeper(
            backend,
            ttl=ttl,
            lease=lease,
            clock=clock,
            on_backend_error=on_backend_error,
            backend_retry_after=backend_retry_after,
            observer=observer,
            sleep=sleep,
            quarantine=quarantine,
            replicas=replicas,
            replica_timeout=replica_timeout,
        )

    def _is_required(self, path: str) -> bool:
        required = self._required
        if isinstance(required, bool):
            return required
        return any(pattern.matches(path) for pattern in required)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard one request (HTTP requests with a guarded method), pass the rest through.

        At the ASGI lifespan's startup it calls :meth:`prepare` first.
        """
        if scope["type"] != "http" or scope["method"] not in self.methods:
            if scope["type"] == "lifespan":
                receive = self._preparing(receive)
            await self.app(scope, receive, send)
            return
        header = self.header
        values = [value for name, value in scope["headers"] if name == header]
        if not values:
            if self._is_required(scope["path"]):
                await send_problem(send, 400, f"This request needs an {self._header_name} header.")
                return
            await self.app(scope, receive, send)
            return
        key = parse_key(values[0]) if len(values) == 1 else None
        if key is None:
            detail = (
                f"The {self._header_name} header must appear once and hold 1 to "
                f"{MAX_KEY_LENGTH} printable ASCII characters."
            )
            await send_problem(send, 400, detail)
            return
        try:
            body = await _read_body(receive, self.max_request_body)
        except _TooLarge:
            detail = f"An idempotent request body may not exceed {self.max_request_body} bytes."
            await send_problem(send, 413, detail)
            return
        if body is None:  # the client went away before sending its request
            return
        replay_receive = _replaying(body, receive)
        await self._guard(scope, replay_receive, send, key, body)

    @property
    def _header_name(self) -> str:
        return "-".join(part.capitalize() for part in self.header.decode().split("-"))

    async def _guard(
        self, scope: Scope, receive: Receive, send: Send, key: str, body: bytes
    ) -> None:
        keeper = self._keeper
        if keeper.quarantine_left() > 0:
            await self._refuse_in_quarantine(send)
            return
        fingerprint = "" if self.fingerprint is None else self.fingerprint(scope, body)
        scoped = self.scope_key(scope, key)
        try:
            if self.wait > 0:
                claim, owner = await keeper.wait(scoped, fingerprint, self.wait)
            else:
                claim, owner = await keeper.claim(scoped, fingerprint)
        except BackendError as exc:
            if keeper.on_backend_error == "open":
                emit(self.observer, BackendFailed(BLOCK, "claim", exc, "ran unguarded"))
                await self.app(scope, receive, send)
                return
            emit(self.observer, BackendFailed(BLOCK, "claim", exc, "answered 503"))
            retry_after = str(ceil(keeper.backend_retry_after)).encode()
            await send_problem(
                send,
                503,
                "The idempotency store is unavailable; the request was not run.",
                headers=[(b"retry-after", retry_after)],
            )
            return
        if keeper.quarantine_left() > 0:  # a loss noticed since (a claimed key is released)
            await self._refuse_in_quarantine(send)
            return
        status = claim.status
        if status is ClaimStatus.CLAIMED:
            await self._run(scope, receive, send, scoped, owner)
        elif status is ClaimStatus.COMPLETED:
            await self._replay(send, scoped, claim.payload or b"")
        elif status is ClaimStatus.IN_PROGRESS:
            emit(self.observer, IdempotencyRejected(BLOCK, scoped, "in_progress"))
            wait_s = min(claim.retry_after_ms / 1000, self.conflict_retry_after)
            await send_problem(
                send,
                409,
                "A request with this idempotency key is still being processed; retry later.",
                headers=[(b"retry-after", str(max(1, ceil(wait_s))).encode())],
            )
        else:
            emit(self.observer, IdempotencyRejected(BLOCK, scoped, "mismatch"))
            await send_problem(
                send,
                422,
                "This idempotency key was already used for a different request.",
            )

    async def prepare(self) -> None:
        """Make the backend's store ready to notice a loss of records on its first claim.

        On a standalone Redis the store learns (or makes) its marker: an instance that
        knows it notices a Redis restarted empty by its own first claim after it, even if
        it had claimed nothing before. Called at the ASGI lifespan's startup; call it
        yourself if the server runs no lifespan. Never raises: a failure of the store is
        reported to the *observer* (:class:`~resilient.events.BackendFailed`) and the
        first claim learns the marker instead.
        """
        await self._keeper.prepare()

    def _preparing(self, receive: Receive) -> Receive:
        async def preparing() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._keeper.prepare()
            return message

        return preparing

    @property
    def quarantine_left(self) -> float:
        """Seconds for which guarded requests are still refused after a loss of records.

        0.0 unless *quarantine* is set and the backend's store noticed that it had lost
        its records (Redis restarted empty), through this middleware's claim or any other
        guard's on the same backend: a readiness signal, e.g. for a ``/readyz``.
        """
        return self._keeper.quarantine_left()

    async def _refuse_in_quarantine(self, send: Send) -> None:
        retry_after = str(max(1, ceil(self._keeper.quarantine_left()))).encode()
        await send_problem(
            send,
            503,
            "The idempotency store lost its records; requests with an idempotency key are "
            "refused for a while, then run again.",
            headers=[(b"retry-after", retry_after)],
        )

    async def _replay(self, send: Send, scoped: str, payload: bytes) -> None:
        try:
            response = decode_response(payload)
        except (ValueError, KeyError, TypeError, UnicodeError) as exc:
            error = BackendError(f"unreadable stored response: {exc}")
            emit(self.observer, BackendFailed(BLOCK, "replay", error, "answered 503"))
            await send_problem(send, 503, "The stored response for this key cannot be read.")
            return
        emit(self.observer, IdempotencyReplayed(BLOCK, scoped))
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [*response.headers, _REPLAYED],
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, scoped: str, owner: str
    ) -> None:
        keeper = self._keeper
        capture = _Capture(send, self.max_body, self.refused_statuses)
        heartbeat = keeper.heartbeat(scoped, owner)
        try:
            await self.app(scope, receive, capture.send)
        except BaseException:
            heartbeat.cancel()
            await keeper.release(scoped, owner)
            raise
        if not (capture.storable and capture.finished):
            heartbeat.cancel()
            await keeper.release(scoped, owner)
            await capture.flush(stored=False)
            return
        response = StoredResponse(
            capture.status, capture.stored_headers(), b"".join(capture.chunks)
        )
        try:  # the heartbeat keeps the lease while complete is retried
            stored = await keeper.complete(scoped, owner, encode_response(response), heartbeat)
        finally:
            heartbeat.cancel()
        if stored:
            await capture.flush(stored=True)
            return
        await self._withhold(send, scoped)

    async def _withhold(self, send: Send, scoped: str) -> None:
        """Answer ``503`` for a response that ran but could not be stored.

        The handler ran, but nothing records it: a success reaching the client would let
        a later retry (once the lease runs out) run it again. Nothing of the response has
        gone out (:class:`_Capture` holds a storable response whole, its start included),
        so the client gets a plain, retryable ``503`` instead.

        Holding the start is what makes that possible. Were the start sent as the handler
        sent it, the only way left to fail the request would be to end the connection
        before the body: uvicorn does so both when the application raises and when it
        returns without finishing the response (it logs an error either way), but only
        raising is a failure every ASGI server and test client honours (httpx's
        ``ASGITransport`` asserts on the other, Starlette's ``TestClient`` takes the
        truncated body for the whole), and the exception would reach every outer
        middleware as a server error. The client would see a broken connection: no
        status, no ``Retry-After``.
        """
        retry_after = ceil(self._keeper.backend_retry_after)
        emit(self.observer, IdempotencyNotStored(BLOCK, scoped, "answered 503"))
        await send_problem(
            send,
            503,
            "The request ran, but its response could not be stored for its idempotency key; "
            "a retry may run it again.",
            headers=[(b"retry-after", str(retry_after).encode()), _STORED_FALSE],
        )


def _statuses(value: Iterable[int]) -> frozenset[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        msg = f"refused_statuses must be a collection of status codes, not {value!r}"
        raise ConfigurationError(msg)
    statuses = list(value)
    for status in statuses:
        if isinstance(status, bool) or not isinstance(status, int) or not 300 <= status <= 499:
            msg = (
                "refused_statuses must hold status codes from 300 to 499 (a success is "
                f"always stored, a 5xx never is), not {status!r}"
            )
            raise ConfigurationError(msg)
    return frozenset(statuses)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


class _Capture:
    """Hold a response back, keeping a copy of it, until it is stored.

    A response that may be stored (a status under 500 and not in *refused*, a body of at
    most *max_body* bytes) is held whole, its start included, until :meth:`flush`: the client sees
    nothing of it before it is stored, so if it cannot be, the middleware can still
    answer ``503`` instead. The copy is kept to be stored anyway, so holding the start
    costs no memory, and no time either: the end waits for the store in any case. A
    response known not to be storable (a 5xx, a refusal, a ``content-length`` over
    *max_body*) goes
    through at once, as does one that outgrows *max_body* as it streams, from then on;
    both are marked ``Idempotency-Stored: false``.
    """

    __slots__ = (
        "chunks",
        "finished",
        "headers",
        "held_start",
        "max_body",
        "refused",
        "send_downstream",
        "size",
        "status",
        "storable",
    )

    def __init__(self, send: Send, max_body: int, refused: frozenset[int]) -> None:
        self.send_downstream = send
        self.max_body = max_body
        self.refused = refused
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.storable = True
        self.finished = False
        self.held_start: Message | None = None

    def stored_headers(self) -> list[tuple[bytes, bytes]]:
        return [(n, v) for n, v in self.headers if n.lower() not in _NEVER_STORED]

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = status = message["status"]
            self.headers = headers = list(message.get("headers", ()))
            length = _content_length(headers)
            if (
                status >= 500
                or status in self.refused
                or (length is not None and length > self.max_body)
            ):
                self.storable = False
                await self.send_downstream({**message, "headers": [*headers, _STORED_FALSE]})
                return
            self.held_start = message  # until the response is stored
            return
        if kind != "http.response.body" or not self.storable:
            if self.storable:  # trailers or an extension: not a response we can replay
                await self._give_up()
            await self.send_downstream(message)
            return
        chunk = message.get("body", b"")
        self.size += len(chunk)
        if self.size > self.max_body:
            await self._give_up()
            await self.send_downstream(message)
            return
        self.chunks.append(chunk)
        if not message.get("more_body", False):
            self.finished = True

    async def _give_up(self) -> None:
        """Stop keeping a copy; send what was held back, marked as not stored."""
        self.storable = False
        start, self.held_start = self.held_start, None
        if start is not None:
            await self.send_downstream({**start, "headers": [*self.headers, _STORED_FALSE]})
            if self.chunks:
                body = b"".join(self.chunks)
                await self.send_downstream(
                    {"type": "http.response.body", "body": body, "more_body": True}
                )
        self.chunks = []

    async def flush(self, stored: bool) -> None:
        """Send what was held back; mark the response as not stored unless *stored*."""
        start, self.held_start = self.held_start, None
        if start is None:  # nothing held: it went through as it came
            return
        headers = self.headers if stored else [*self.headers, _STORED_FALSE]
        await self.send_downstream({**start, "headers": headers})
        # more_body when the handler returned without finishing its response.
        body = b"".join(self.chunks)
        await self.send_downstream(
            {"type": "http.response.body", "body": body, "more_body": not self.finished}
        )


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
