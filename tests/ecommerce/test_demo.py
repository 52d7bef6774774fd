"""The demo, run for real: it starts the shop and the payment provider as processes, plays
its story over HTTP, and every scenario must come out as told."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    verdicts = re.findall(r"^(?!scenario ).+?  (ok|NO)  ", result.stdout, re.MULTILINE)
    assert verdicts == ["ok"] * 7, result.stdout
    assert "database loads: 1" in result.stdout
    assert "orders in the database: 1" in result.stdout
