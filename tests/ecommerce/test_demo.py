"""The demo, run for real: it starts the shop and the payment provider as processes, plays
its story over HTTP, and every scenario must come out as told."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from examples.ecommerce.__main__ import wait_until_up
from examples.ecommerce.demo import free_port
from resilient.testing import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_demo_tells_its_story(backend: str, request: pytest.FixtureRequest) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("fresh_redis_server")
        env["REDIS_URL"] = server.url
    result = subprocess.run(
        [sys.executable, "-m", "examples.ecommerce.demo"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = re.findall(r"^(?!scenario |-).+?  (ok|NO|--)  ", result.stdout, re.MULTILINE)
    assert verdicts == ["ok"] * 8, result.stdout  # it started the shop: it has its key
    assert "database loads: 1" in result.stdout
    assert "orders in the database: 1" in result.stdout


@contextmanager
def shop(data_dir: Path, **env: str) -> Iterator[tuple[str, str]]:
    """A shop started as a user would, on its defaults but for *env*; its URLs."""
    shop_port, payment_port = free_port(), free_port()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "SHOP_DATA_DIR": str(data_dir)}
    for name in ("REDIS_URL", "SHOP_PUBLIC_URL", "PAYMENT_URL", "SHOP_BREAKER_OPEN_FOR",
                 "SHOP_TRUSTED_PROXIES", "FORWARDED_ALLOW_IPS"):  # fmt: skip
        environ.pop(name, None)
    environ.update(env)
    with (data_dir / "shop.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.ecommerce", "--port", str(shop_port),
             "--payment-port", str(payment_port), "--payment-latency", "0.02"],
            env=environ, cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            wait_until_up(f"http://127.0.0.1:{shop_port}/healthz", timeout=60)
            yield f"http://127.0.0.1:{shop_port}", f"http://127.0.0.1:{payment_port}"
        finally:
            process.terminate()
            process.wait(timeout=15)


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.ecommerce.demo", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
def test_the_demo_plays_against_a_shop_on_its_defaults(tmp_path: Path) -> None:
    # The circuit stays open the default 10 s, and the demo has no signing key: it waits
    # as the shop's Retry-After says, and reports the expired token as skipped, with why.
    # (On loopback uvicorn takes X-Forwarded-For for the client's address by default.)
    with shop(tmp_path) as (url, payments):
        result = demo("--url", url, "--payments", payments)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^(?!scenario |-)(.+?)  (ok|NO|--)  (.*)$", result.stdout, re.MULTILINE)
    verdicts = {scenario.strip(): verdict for scenario, verdict, _ in rows}
    assert list(verdicts.values()).count("ok") == 7, result.stdout
    assert verdicts["an expired token"] == "--", result.stdout
    assert "pass --signing-key" in result.stdout
    assert "1 scenario(s) skipped" in result.stdout


@pytest.mark.slow
def test_the_demo_says_what_a_shop_without_trusted_proxies_lacks(tmp_path: Path) -> None:
    # uvicorn told to trust another proxy only, and the shop no proxy at all: every
    # request comes from the demo's own address, and the story cannot be told.
    with shop(tmp_path, FORWARDED_ALLOW_IPS="192.0.2.1") as (url, payments):
        result = demo("--url", url, "--payments", payments)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SHOP_TRUSTED_PROXIES=127.0.0.1/32" in result.stderr
    assert result.stdout == ""
