"""The backend's tests again, under every redis-py major the package accepts, and on a
Python where redis/redis-py#4287 reproduces.

The suite itself runs them under the installed redis-py. Here they run under redis-py 5.0
(the oldest ``pyproject.toml`` accepts) and the last 5, 6 and 7: each release is installed
once (``pip install --target``, from the configured index) into a cache directory of its
own, which goes first on the path of a pytest run of this interpreter, so everything else
is the suite's own environment. The four runs go side by side (they mostly wait on
Redis): together some 15 s, plus a few seconds to install each release the first time.

Then, on Python 3.12, 3.13.0 to 3.13.9 or 3.14.0 when this machine has one (pyenv's, or
on the ``PATH``), in a virtual environment of its own with redis-py 7 (before its fix of
#4287) and the suite's versions of pytest and its plugins: the cluster test whose idle
connection is reset, where asyncio then raises ``AttributeError`` or ``TypeError``, which
must reach the block's policy as a backend failure.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RELEASES = ("5.0.8", "5.3.1", "6.4.0", "7.4.1")
TESTS = [
    "tests/backends/test_redis.py",
    "tests/backends/test_channel.py",
    "tests/backends/test_transports.py",
]
# The CPython releases whose transports raise AttributeError or TypeError on a write to a
# connection the peer reset (python/cpython#136234).
LEAKY = re.compile(r"3\.12\.\d+|3\.13\.[0-9]|3\.14\.0")
PYTEST = ("pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "tenacity")


def cache() -> Path:
    return Path(os.environ.get("RESILIENT_TEST_CACHE") or tempfile.gettempdir()) / "resilient"


def pip(python: str | Path, *args: str, timeout: float = 300) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    assert result.returncode == 0, f"pip install {' '.join(args)} failed:\n{result.stderr}"


def installed(release: str) -> Path:
    """The directory holding redis-py *release* alone, installed there on first use."""
    target = cache() / f"redis-py-{release}"
    if not (target / "redis").is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        pip(sys.executable, "--no-deps", "--target", str(scratch), f"redis=={release}")
        try:
            scratch.rename(target)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def environment(*paths: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(
        [*map(str, paths), str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    return env


def pytest_command(python: str | Path, *args: str) -> list[str]:
    return [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=120", *args]


def test_the_backend_tests_pass_under_redis_py_5_0_5_6_and_7() -> None:
    runs = {
        release: subprocess.Popen(
            pytest_command(sys.executable, *TESTS, "-m", "not slow"),
            cwd=ROOT,
            env=environment(installed(release)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for release in RELEASES
    }
    failed = {}
    for release, run in runs.items():
        output, _ = run.communicate(timeout=300)
        if run.returncode != 0:
            lines = output.splitlines()
            said = [line for line in lines if line.startswith(("E ", "FAILED", "ERROR"))]
            failed[release] = "\n".join(said or lines[-40:])[-3000:]
        else:
            assert re.search(r"\d+ passed", output), output[-3000:]
    assert failed == {}


def leaky_python() -> str | None:
    """A Python on this machine where #4287 reproduces, if there is one."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates = sorted(str(p / "bin" / "python") for p in pyenv.glob("3.1[234].*"))
    candidates += [found for name in ("3.12", "3.13") if (found := shutil.which(f"python{name}"))]
    for candidate in candidates:
        result = subprocess.run(
            [candidate, "-c", "import platform, venv; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and LEAKY.fullmatch(result.stdout.strip()):
            return candidate
    return None


def test_where_redis_py_4287_reproduces_the_leak_is_a_backend_failure() -> None:
    python = leaky_python()
    if python is None:
        pytest.skip("no Python 3.12, 3.13.0-3.13.9 or 3.14.0 here, where #4287 reproduces")
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PYTEST]
    home = cache() / f"leak-python-{version}-redis-py-{RELEASES[-1]}"
    venv_python = home / "bin" / "python"
    if not (home / ".ready").exists():
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(home)], check=True, timeout=120)
        pip(venv_python, f"redis=={RELEASES[-1]}", *pins)
        (home / ".ready").touch()
    test = "tests/backends/test_channel.py::"
    test += "test_on_a_cluster_an_idle_connection_reset_fails_one_call_into_the_policy"
    result = subprocess.run(
        pytest_command(venv_python, test),
        cwd=ROOT,
        env=environment(RESILIENT_EXPECT_TRANSPORT_LEAK="1"),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "1 passed" in result.stdout
