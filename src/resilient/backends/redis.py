"""The Redis backend: Redis or Redis Cluster through redis-py's asyncio client.

Everything a block does in Redis is one Lua script, run with EVALSHA in one round trip.
Scripts live one per file next to the block that owns them and are loaded with
:mod:`importlib.resources`; when Redis answers NOSCRIPT (after a restart, a failover or
``SCRIPT FLUSH``) the call is repeated once with EVAL, which loads the script again.

Every key a script touches carries the same ``{hash tag}``, so each call runs on one
Redis Cluster node. What redis-py raises when Redis or the connection fails never escapes:
it becomes :class:`~resilient.errors.BackendError` here, once (see
:attr:`RedisBackend.errors`); anything else, a defect, is not disguised as one.

A script call is sent at most once. Redis runs a script when its bytes arrive; a
connection that breaks afterwards loses only the reply, and sending the call again would
run the script twice. So a call that may have reached Redis and then failed is a backend
failure, for the block's ``on_backend_error`` policy, never a resend: on a standalone
server the backend's own connection checks, before sending, that a kept connection is
still open (``backends/_redispy.py``, the one module that goes below redis-py's clients);
on a cluster each call names its node, which turns off redis-py's retry.

Concurrent calls of one script on one hash slot are *coalesced*: while a call is in flight
the next ones queue, and the queue goes out as a single script call when the first
returns. An idle backend sends a call at once, in the caller's own task (no task, no turn
of the event loop before the write), and a busy one pays one round trip for a whole batch
instead of one per call.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from resilient.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from resilient.backends._redispy import Channel

__all__ = ["Coalescer", "RedisBackend", "Script"]

_T = TypeVar("_T")
_NOW = resources.files("resilient.backends.lua").joinpath("now.lua").read_text(encoding="utf-8")
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class Script:
    """A Lua script shipped in a package, with its SHA1 computed once.

    With *needs_now*, the script is prefixed with ``backends/lua/now.lua``, which defines
    ``now_ms(ARGV[i])``: the caller's time, or Redis ``TIME`` for ``"r"``.
    """

    __slots__ = ("name", "sha", "source")

    def __init__(self, package: str, filename: str, *, needs_now: bool = False) -> None:
        self.name = filename
        source = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
        if needs_now:
            source = _NOW + source
        self.source = source
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:10]})"


class Coalescer(Generic[_Item, _Result]):
    """Send items one at a time when idle, in batches when busy.

    *send* takes a list of items and returns one result per item, in order. At most one
    call of *send* is in flight per coalescer; items that arrive meanwhile wait for the
    next call, which takes up to *max_batch* of them. An item submitted to an idle
    coalescer is sent at once, by the caller's own task: no task is made and the event
    loop is not entered before *send* runs. What *send* raises reaches every caller whose
    item it carried.
    """

    __slots__ = ("_busy", "_drainer", "_max_batch", "_pending", "_send")

    def __init__(
        self, send: Callable[[list[_Item]], Awaitable[Sequence[_Result]]], max_batch: int
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._pending: list[tuple[_Item, asyncio.Future[_Result]]] = []
        self._busy = False
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: _Item) -> _Result:
        """Send *item* (alone, or in the next batch) and return its result."""
        if self._busy:
            future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
            self._pending.append((item, future))
            return await future
        self._busy = True
        try:
            results = await self._send([item])
        finally:
            self._release()
        return results[0]

    def _release(self) -> None:
        if self._pending:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        batch: list[tuple[_Item, asyncio.Future[_Result]]] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._send([item for item, _ in batch])
                    if len(results) != len(batch):
                        msg = f"{len(results)} results for a batch of {len(batch)} items"
                        raise RuntimeError(msg)
                except Exception as exc:
                    # Not a filter: each waiter gets what the send raised, as the caller of
                    # an idle send would (a BackendError when Redis failed; anything else
                    # is a defect and must show as itself, not as a failure of Redis).
                    # Cancellation is a BaseException, for the finally below.
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._busy = False
            self._drainer = None
            # Waiters are left only when the drainer task itself was cancelled (the event
            # loop closing) or interrupted: nobody may wait forever.
            for _, future in (*batch, *self._pending):
                if not future.done():
                    future.set_exception(BackendError("the batch was cancelled"))
            self._pending.clear()


class RedisBackend:
    """Keep state in Redis (standalone) or Redis Cluster.

    *client* is a :class:`redis.asyncio.Redis` or :class:`redis.asyncio.cluster.RedisCluster`.
    Every key starts with *prefix*. *timeout* bounds each call in seconds (default: the
    client's ``socket_timeout``); a call that times out is a backend failure, handled by
    each block's ``on_backend_error`` policy. *max_batch* caps how many concurrent calls
    are coalesced into one script call.

    On a standalone server the backend keeps one connection of its own, made with the
    client's settings, for its script calls: close it with :meth:`aclose` (or use the
    backend as an async context manager) when you close the client.

    A script call is never sent twice: one whose connection fails after sending is a
    backend failure (its reply is lost, whether or not Redis ran it). On a cluster, the
    client's own retry is not used for scripts, so a call that meets a connection error
    or ``CLUSTERDOWN`` (a node restarted, a failover under way) fails too; the calls
    after it use the topology the client then refreshes.

    >>> import redis.asyncio
    >>> backend = RedisBackend(redis.asyncio.Redis(), prefix="shop")
    """

    __slots__ = (
        "_channel",
        "_errors",
        "_key_slot",
        "_leaked",
        "_noscript",
        "_stores",
        "client",
        "is_cluster",
        "max_batch",
        "prefix",
        "timeout",
    )

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "resilient",
        timeout: float | None = None,
        max_batch: int = 256,
    ) -> None:
        from redis.asyncio.cluster import RedisCluster  # noqa: PLC0415 (redis is optional)
        from redis.exceptions import NoScriptError  # noqa: PLC0415

        from resilient.backends._redispy import (  # noqa: PLC0415 (it imports redis)
            Channel,
            redis_errors,
            transport_leak,
        )

        if not prefix or "{" in prefix or "}" in prefix:
            msg = f"prefix must be non-empty and free of braces (they make hash tags): {prefix!r}"
            raise ConfigurationError(msg)
        if timeout is not None and not timeout > 0:
            msg = f"timeout must be a positive number of seconds or None, not {timeout!r}"
            raise ConfigurationError(msg)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            msg = f"max_batch must be a positive integer, not {max_batch!r}"
            raise ConfigurationError(msg)
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.max_batch = max_batch
        self.is_cluster = isinstance(client, RedisCluster)
        self._key_slot: Callable[[bytes], int] | None = None
        if self.is_cluster:
            from redis.crc import key_slot  # noqa: PLC0415

            self._key_slot = key_slot
        self._channel: Channel | None = None
        if not self.is_cluster:
            self._channel = Channel(client)  # type: ignore[arg-type]
        if timeout is None:
            if self._channel is not None:
                self.timeout = self._channel.socket_timeout
            else:  # a cluster client: its nodes' socket timeout
                configured = getattr(client, "connection_kwargs", {}).get("socket_timeout")
                self.timeout = float(configured) if configured else None
        self._noscript = NoScriptError
        self._errors = redis_errors()
        self._leaked = transport_leak
        self._stores: dict[str, Any] = {}

    async def aclose(self) -> None:
        """Stop the backend's background tasks, close the connection it keeps.

        Close the client yourself: the backend does not own it.
        """
        for store in list(self._stores.values()):
            close = getattr(store, "aclose", None)
            if close is not None:
                await close()
        if self._channel is not None:
            await self._channel.aclose()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def key(self, block: str, tag: str, suffix: str) -> str:
        """Return ``prefix:block:{tag}:suffix``; *tag* is the hash tag, placing the key's slot.

        Braces in *tag* would end the hash tag early (or empty it, and Redis would hash
        the whole key): they are escaped, with ``%``, so distinct tags stay distinct.
        """
        if "{" in tag or "}" in tag or "%" in tag:
            tag = tag.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return f"{self.prefix}:{block}:{{{tag}}}:{suffix}"

    def store(self, name: str, factory: Callable[[RedisBackend], _T]) -> _T:
        """Return this backend's store called *name*, made by *factory* on first use."""
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = factory(self)
        return store

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> Any:
        """Run *script* on *keys* and *args* in one round trip, reloading it after NOSCRIPT.

        Raise :class:`~resilient.errors.BackendError` for any failure of Redis or of the
        connection, including a timeout.
        """
        try:
            if self.timeout is None:
                return await self._run(script, keys, args)
            async with asyncio.timeout(self.timeout):
                return await self._run(script, keys, args)
        except self._errors as exc:
            raise _failure(f"running {script.name}", exc) from exc
        except (AttributeError, TypeError) as exc:
            if not self._leaked(exc):
                raise  # a defect, not a failure of Redis: no policy may hide it
            raise _failure(f"running {script.name}", exc) from exc

    async def _run(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> Any:
        channel = self._channel
        if channel is None:
            return await self._run_on_cluster(script, keys, args)
        try:
            return await channel.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._noscript:
            return await channel.execute("EVAL", script.source, len(keys), *keys, *args)

    async def _run_on_cluster(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> Any:
        # The client retries a command after a connection error or a timeout, and cannot
        # tell one raised while sending from one raised while reading the reply of a
        # script Redis already ran: such a retry would run it twice. A command sent to
        # nodes the caller names is not retried (MOVED, ASK and TRYAGAIN, errors replied
        # instead of running it, are still followed), so each call names the node that
        # serves its keys, after letting the client refresh its topology if an earlier
        # error asked for it.
        client: Any = self.client
        await client.initialize()
        node = client.get_node_from_key(keys[0])
        try:
            return await client.execute_command(
                "EVALSHA", script.sha, len(keys), *keys, *args, target_nodes=node
            )
        except self._noscript:
            return await client.execute_command(
                "EVAL", script.source, len(keys), *keys, *args, target_nodes=node
            )

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What redis-py raises when Redis or the connection fails.

        Its :class:`~redis.exceptions.RedisError` tree,
        :class:`~redis.exceptions.RedisClusterException` and :class:`OSError` (timeouts
        included): what this backend translates into :class:`BackendError`. It also
        translates the ``AttributeError`` and ``TypeError`` asyncio's transports raise on
        a connection that died under a write (redis/redis-py#4287), and nothing else.
        """
        return self._errors

    async def guard(self, operation: str, call: Awaitable[_T]) -> _T:
        """Await *call*, translating any Redis failure into :class:`BackendError`."""
        try:
            if self.timeout is None:
                return await call
            async with asyncio.timeout(self.timeout):
                return await call
        except self._errors as exc:
            raise _failure(operation, exc) from exc
        except (AttributeError, TypeError) as exc:
            if not self._leaked(exc):
                raise  # a defect, not a failure of Redis: no policy may hide it
            raise _failure(operation, exc) from exc

    def slot(self, key: str) -> int:
        """Return the cluster hash slot of *key* (0 on a standalone server)."""
        if self._key_slot is None:
            return 0
        return self._key_slot(key.encode())

    def __repr__(self) -> str:
        kind = "cluster" if self.is_cluster else "standalone"
        return f"RedisBackend(<{kind}>, prefix={self.prefix!r})"


def _failure(doing: str, exc: BaseException) -> BackendError:
    kind = "timed out" if isinstance(exc, TimeoutError) else "failed"
    return BackendError(f"Redis {kind} {doing}: {exc!r}")
