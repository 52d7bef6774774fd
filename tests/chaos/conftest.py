"""The chaos suite's servers and shops, started once for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from resilient.testing import RedisCluster, RedisServer
from tests.chaos.proxy import ChaosProxy
from tests.chaos.report import FaultReport, write_report
from tests.chaos.shop import ShopProcesses

NODE_TIMEOUT = 1.0  # the cluster's cluster-node-timeout, seconds (the issue allows 2)


@pytest.fixture(scope="module")
def reports() -> Iterator[list[FaultReport]]:
    """Each fault's figures; written to benchmarks/results/faults.md once every fault ran."""
    found: list[FaultReport] = []
    yield found
    write_report(found)


@pytest.fixture(scope="module")
def redis_behind_proxy() -> Iterator[tuple[RedisServer, ChaosProxy]]:
    """One standalone Redis, and the suite's TCP proxy in front of it."""
    with RedisServer() as server:
        proxy = ChaosProxy((server.host, server.port))
        proxy.start()
        try:
            yield server, proxy
        finally:
            proxy.close()


@pytest.fixture(scope="module")
def shop(
    redis_behind_proxy: tuple[RedisServer, ChaosProxy], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ShopProcesses]:
    """The shop, two worker processes, on the standalone Redis through the proxy."""
    _, proxy = redis_behind_proxy
    processes = ShopProcesses(proxy.url, Path(tmp_path_factory.mktemp("chaos-shop")))
    try:
        yield processes
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """Six nodes: three masters, a replica each."""
    with RedisCluster(masters=3, replicas=1, node_timeout=NODE_TIMEOUT) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_shop(
    cluster: RedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ShopProcesses]:
    """The shop, two worker processes, on the cluster."""
    url = cluster.url.replace("redis://", "redis+cluster://", 1)
    processes = ShopProcesses(url, Path(tmp_path_factory.mktemp("chaos-cluster-shop")))
    try:
        yield processes
    finally:
        processes.stop()
