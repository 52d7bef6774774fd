"""redis-py below its clients, fenced in one module: the Redis backend's own connection.

redis-py documents clients, pools and commands for applications. The backend needs one
thing below them: a connection of its own, made like its client's, on which a script call
is written once and its reply read, with nothing resent in between (:class:`Channel`).
Every line here that uses redis-py's connection internals (or asyncio's) ends with
``# fenced:`` and the reason; no other module of the package goes below redis-py's
clients. The tests in ``tests/backends`` run this module against redis-py 5.0, 5, 6, 7
and 8, over TCP, TLS, a unix socket, with an ACL user and on connections Sentinel
provides.

What redis-py raises, :func:`redis_errors`: its :class:`~redis.exceptions.RedisError`
tree; :class:`~redis.exceptions.RedisClusterException`, which is not a ``RedisError`` (a
cluster none of whose nodes answers, a slot no node serves); and :class:`OSError`, for
what the socket or TLS layers let through (``TimeoutError`` and ``asyncio.TimeoutError``
are one ``OSError`` class since Python 3.11). One more leaks: on Python 3.12, 3.13.0 to
3.13.9 and 3.14.0, asyncio's transport raises ``TypeError`` or ``AttributeError`` when
written to after the peer reset the connection (python/cpython#136234), which redis-py
releases before the fix of redis/redis-py#4287 pass on. :func:`transport_leak` tells those
apart from a defect's: by the frame that raised them, inside asyncio's transports, and by
what they are about, a ``None`` the torn-down transport left.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Channel", "pack", "redis_errors", "transport_leak"]

# Where asyncio's transports live: an AttributeError or TypeError raised in one of these
# files, while redis-py wrote or read, is a connection that died under it.
_TRANSPORTS = frozenset(
    str(Path(asyncio.__file__).parent / name)
    for name in ("selector_events.py", "proactor_events.py", "sslproto.py", "streams.py")
)


def redis_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types redis-py raises when Redis or the connection fails."""
    from redis.exceptions import RedisClusterException, RedisError  # noqa: PLC0415 (optional)

    return (RedisError, RedisClusterException, OSError)


def transport_leak(exc: BaseException) -> bool:
    """Whether *exc* is asyncio's transport failing on a dead connection (redis-py#4287).

    Only an ``AttributeError`` or ``TypeError`` about a ``None`` (what tearing a transport
    down leaves: ``'NoneType' object is not callable``, ``... has no attribute
    '_add_writer'``), raised inside asyncio's transports, counts. Anything else, raised
    there (a misuse of a live transport) or elsewhere, is a defect, and must not pass for
    a failure of Redis.
    """
    if not isinstance(exc, AttributeError | TypeError) or "'NoneType' object" not in str(exc):
        return False
    frame = exc.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_code.co_filename in _TRANSPORTS


def pack(
    args: tuple[str | int | bytes, ...], encoding: str = "utf-8", errors: str = "strict"
) -> bytes:
    """Encode one command in RESP, as redis-py's packer does for the types scripts take.

    *encoding* and *errors* are the client's (its ``encoding`` and ``encoding_errors``),
    so a key names the same bytes in a script call as in the client's own commands.
    redis-py's packer, general, costs a script call a fifth more instructions.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode(encoding, errors)
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:  # pragma: no cover - the stores only pass str, bytes and int
            msg = f"cannot send {arg!r} to Redis"
            raise TypeError(msg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Channel:
    """A connection of its own, made like *client*'s, for commands that are sent once.

    Going through the client costs a pool checkout, a release, redis-py's instrumentation,
    and a task per socket write when the client has a socket timeout (its per-write
    ``wait_for`` on Python 3.11), on every call: a busy limiter would pay that per request.
    The channel makes one connection with the client's settings (TLS, unix socket,
    credentials, database, protocol, Sentinel's master discovery) but no socket timeout
    (the backend bounds each call with one ``asyncio.timeout`` instead) and replies left
    undecoded, and sends each command on it under a lock; callers are few, since the
    coalescers batch everything else. A failure other than an error reply drops the
    connection.

    A command is sent at most once. Redis runs a script as soon as its bytes arrive, so
    once they may have left, a broken connection may have lost only the reply: sending
    again would run the script twice (a hit charged twice, a claim that finds itself in
    progress). The failure goes to the caller, and so to the block's policy: no retry of
    redis-py's runs around the write and the read. A kept connection that went stale while
    idle (Redis restarted, closed or reset it) is found *before* sending and replaced, so
    the first call after a restart succeeds. The check reads what the event loop has
    already learnt of the socket, without waiting (redis-py's own, before 8.0, waits a
    turn of the event loop): the peer's close, a reset, or bytes nobody asked for. A
    connection that breaks in the instant before the send fails that call.
    """

    __slots__ = (
        "_connection",
        "_encoding",
        "_lock",
        "_lost",
        "_new_connection",
        "_reply_error",
        "socket_timeout",
    )

    def __init__(self, client: Redis) -> None:
        from redis.exceptions import ConnectionError as ConnectionLost  # noqa: PLC0415
        from redis.exceptions import ResponseError  # noqa: PLC0415

        self._reply_error = ResponseError
        self._lost = ConnectionLost
        source: Any = client  # redis-py's asyncio client is not typed
        settings: dict[str, Any] = source.get_connection_kwargs()
        timeout = settings.get("socket_timeout")
        self.socket_timeout = float(timeout) if timeout else None
        self._encoding = (
            settings.get("encoding", "utf-8"),
            settings.get("encoding_errors", "strict"),
        )
        # Scripts return bytes (stored responses are binary), whatever the client decodes.
        kwargs = {**settings, "socket_timeout": None, "decode_responses": False}
        # The class the client's pool makes (TCP, TLS, unix socket, Sentinel-managed).
        new = source.connection_pool.connection_class  # fenced: the pool's kind, undocumented
        self._new_connection: Callable[[], Any] = functools.partial(new, **kwargs)
        self._connection: Any = None
        self._lock = asyncio.Lock()

    async def execute(self, *args: str | int | bytes) -> Any:
        """Send one command, once, and return its reply (an error reply is raised)."""
        async with self._lock:
            connection = self._connection
            if connection is None or not _open_and_idle(connection):
                connection = await self._reconnect()
            try:
                # One write (no health-check PING, no retry), then its reply, read once.
                packed = pack(args, *self._encoding)
                await connection.send_packed_command(packed, False)  # fenced: one write
                return await connection.read_response()  # fenced: its reply
            except self._reply_error:
                raise  # an error reply was read whole: the connection is still in step
            except BaseException as exc:
                await self._drop(connection)
                if transport_leak(exc):
                    msg = f"the connection to Redis was lost: {exc!r}"
                    raise self._lost(msg) from exc
                raise

    async def _reconnect(self) -> Any:
        if self._connection is not None:
            await self._drop(self._connection)
        connection = self._new_connection()
        try:
            await connection.connect()  # fenced: the client's handshake (AUTH, HELLO, SELECT)
        except BaseException:
            await asyncio.shield(connection.disconnect())  # fenced: closes the socket
            raise
        self._connection = connection
        return connection

    async def _drop(self, connection: Any) -> None:
        self._connection = None
        await asyncio.shield(connection.disconnect())  # fenced: closes the socket

    async def aclose(self) -> None:
        """Close the connection, if one is open."""
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                await connection.disconnect()  # fenced: closes the socket


def _open_and_idle(connection: Any) -> bool:
    """Whether a kept connection is open with nothing unread, decided without waiting."""
    # Bytes the parser has already taken from the stream are not looked at: after a whole
    # reply there are none (RESP2 sends nothing unasked; the parser reads past RESP3's
    # pushes), and a connection whose exchange was cut is dropped, never kept.
    # redis-py's own check (can_read_destructive) waits a turn of the event loop before 8.0.
    reader = connection._reader  # fenced: the connection's asyncio.StreamReader
    if reader is None or reader.exception() is not None or reader.at_eof():
        return False
    return not reader._buffer  # fenced: StreamReader has no public count of buffered bytes
