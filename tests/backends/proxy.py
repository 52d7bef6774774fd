"""A TCP proxy to a real Redis that can lose a reply after Redis has run the command."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["ReplyLosingProxy"]


class ReplyLosingProxy:
    """Forward loopback connections to *port*; on demand, lose the next reply.

    After :meth:`lose_next_reply`, the next bytes Redis sends back (the reply to a
    command it has already run) are not forwarded: the client's connection is reset
    (``SO_LINGER`` 0, so the client reads ``ECONNRESET``) and the upstream one closed,
    as a proxy or a network that drops a connection at the wrong moment would.
    :meth:`reset_clients` resets every client connection at once, idle or not.
    """

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.replies_lost = 0
        self._lose_next = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._done: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> ReplyLosingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):  # ends every connection's pumps
            writer.transport.abort()
        await asyncio.gather(*self._done)
        if self._server is not None:
            await self._server.wait_closed()

    def lose_next_reply(self) -> None:
        """Reset the client's connection instead of forwarding the next reply."""
        self._lose_next = True

    def reset_clients(self) -> int:
        """Reset every client connection now (``ECONNRESET`` on its next read or write).

        Return how many were reset.
        """
        reset = 0
        for writer in list(self._clients):
            _reset(writer)
            reset += 1
        return reset

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done = asyncio.get_running_loop().create_future()
        self._done.append(done)
        self.connections += 1
        self._open.add(writer)
        self._clients.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
        except OSError:  # Redis is down: so is this connection
            self._open.discard(writer)
            self._clients.discard(writer)
            writer.transport.abort()
            done.set_result(None)
            return
        self._open.add(upstream_writer)
        try:
            requests = asyncio.create_task(self._requests(reader, upstream_writer))
            try:
                await self._replies(upstream_reader, writer)
            finally:
                requests.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await requests
        except OSError:
            pass  # either side went away: close both
        finally:
            self._open.difference_update((writer, upstream_writer))
            self._clients.discard(writer)
            upstream_writer.transport.abort()
            writer.transport.abort()
            done.set_result(None)

    async def _requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.requests += 1
            upstream.write(data)
            await upstream.drain()
        upstream.close()  # the client closed: so does the proxy, upstream

    async def _replies(self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await upstream.read(65536):
            if self._lose_next:
                self._lose_next = False
                self.replies_lost += 1
                _reset(writer)
                return
            writer.write(data)
            await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with ``SO_LINGER`` 0: the peer gets a reset, not an orderly end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
