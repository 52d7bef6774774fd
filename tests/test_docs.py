"""The code in the documentation runs: every ```python block of ``docs/`` and README.md.

How the blocks run, for whoever writes a page:

* The ```python blocks of one page run in order, in one namespace (a module of their
  own), one test per page. A block may ``await`` at top level, as in ``python -m
  asyncio``: such blocks run on one event loop per page, the other blocks run as plain
  code (so a page written as a script may call ``asyncio.run`` instead).
* A block that is not meant to run (a fragment, a signature, code for a service that
  is not there) says so on the line before its fence, with the reason::

      <!-- no-run: the decorator alone; the next block runs it -->

  The tests count these blocks, and refuse a marker without a reason, a marker not
  followed by a ```python block, and Python fenced under another name (```py,
  ```python3), so nothing is skipped silently. Blocks in other languages (``console``,
  ``text``, ``toml``) are not Python and are not run.
* Redis: a page that mentions ``REDIS_URL`` runs with ``os.environ["REDIS_URL"]``
  pointing at a real ``redis-server`` (the ``redis_server`` fixture, flushed first), and
  one that mentions ``REDIS_CLUSTER_URL`` with that variable naming a 3-master Redis
  Cluster (``redis_cluster``, every master flushed). A page makes its own client, as an
  application would: ``redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])``.
* Tracebacks point at the page itself: a failing line shows as ``docs/<page>.md``, line N.
* After a page, what it left open in its namespace is closed, newest first, as a
  reader's process would on exit: objects with an ``aclose()`` coroutine (clients,
  backends, caches), and objects with ``close()`` and a ``with`` form (issuers, sync
  clients). Name a backend (``backend = RedisBackend(client)``) so it is closed too;
  tasks left running are cancelled with the page's event loop, and whatever the page
  turned off globally (retry waits) is turned back on.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

import resilient
import resilient.testing
from resilient.retries.core import waits
from resilient.testing import RedisCluster, RedisServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
REFERENCE = DOCS / "reference"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run(?P<colon>:)?(?P<reason>.*?)-->\s*$")
_MISNAMED = {"py", "python3", "py3", "pycon", "pyi"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, where its code starts, the code, the marker."""

    language: str
    line: int  # the line number (from 1) of the block's first line of code
    source: str
    no_run: str | None  # the reason given by a no-run marker, if any


def blocks_of(path: Path) -> list[Block]:
    """Return the fenced code blocks of the Markdown file *path*, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        language = match["info"].strip().split(" ")[0].strip("{}.").lower()
        end = index + 1
        while end < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]
        ):
            end += 1
        body = [
            line[indent:] if line[:indent].isspace() else line for line in lines[index + 1 : end]
        ]
        previous = lines[index - 1] if index else ""
        marker = _NO_RUN.match(previous)
        reason = None
        if marker is not None:
            reason = marker["reason"].strip() if marker["colon"] else ""
        found.append(Block(language, index + 2, "\n".join(body) + "\n", reason))
        index = end + 1
    return found


def python_blocks(path: Path) -> list[Block]:
    """Return the ```python blocks of *path*, run or marked."""
    return [block for block in blocks_of(path) if block.language == "python"]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture
def redis_urls(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], None]:
    """Point ``REDIS_URL`` / ``REDIS_CLUSTER_URL`` at real, flushed servers, for a page."""

    def provide(text: str) -> None:
        if "REDIS_URL" in text.replace("REDIS_CLUSTER_URL", ""):
            server: RedisServer = request.getfixturevalue("redis_server")
            if not server.is_running:  # another test may have stopped it
                server.start()
            with redis.Redis.from_url(server.url) as client:
                client.flushall()
            monkeypatch.setenv("REDIS_URL", server.url)
        if "REDIS_CLUSTER_URL" in text:
            cluster: RedisCluster = request.getfixturevalue("redis_cluster")
            for host, port in cluster.nodes:
                with redis.Redis(host=host, port=port) as node:
                    node.flushall()
            monkeypatch.setenv("REDIS_CLUSTER_URL", cluster.url)

    return provide


async def _close_leftovers(namespace: dict[str, object]) -> None:
    """Close what a page left open in its namespace, newest first."""
    for value in reversed(list(namespace.values())):
        if isinstance(value, type | types.ModuleType | types.FunctionType):
            continue
        aclose = getattr(value, "aclose", None)
        if inspect.iscoroutinefunction(aclose):
            await aclose()
        elif hasattr(value, "__enter__") and callable(getattr(value, "close", None)):
            value.close()  # type: ignore[attr-defined]


async def _cancel_leftovers() -> None:
    """Cancel the tasks a page left running (background refreshes, sync loops)."""
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def run_blocks(path: Path, blocks: list[Block]) -> types.ModuleType:
    """Run *blocks* of *path* in order in a fresh module; return the module."""
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # dataclasses and pickle look classes up here
    loop = asyncio.new_event_loop()
    enabled = waits.enabled
    try:
        for block in blocks:
            # Padded so that line numbers in tracebacks are the page's own.
            source = "\n" * (block.line - 1) + block.source
            code = compile(source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if code.co_flags & inspect.CO_COROUTINE:
                loop.run_until_complete(eval(code, module.__dict__))
            else:
                exec(code, module.__dict__)
    finally:
        waits.enabled = enabled
        loop.run_until_complete(_close_leftovers(module.__dict__))
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        del sys.modules[module.__name__]
    return module


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_the_python_blocks_of_a_page_run(
    path: Path, redis_urls: Callable[[str], None], record_property: Callable[[str, object], None]
) -> None:
    blocks = python_blocks(path)
    runnable = [block for block in blocks if block.no_run is None]
    record_property("blocks_run", len(runnable))
    record_property("blocks_not_run", len(blocks) - len(runnable))
    if not runnable:
        return
    redis_urls(path.read_text(encoding="utf-8"))
    run_blocks(path, runnable)


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_no_block_is_skipped_silently(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = {block.line - 1 for block in blocks_of(path)}  # the fences' line numbers
    for number, line in enumerate(lines, start=1):
        marker = _NO_RUN.match(line)
        if marker is None:
            continue
        assert number + 1 in starts, f"{_name(path)}:{number}: a no-run marker before no block"
        assert marker["colon"], f"{_name(path)}:{number}: say why: <!-- no-run: why -->"
        assert marker["reason"].strip(), f"{_name(path)}:{number}: say why: <!-- no-run: why -->"
    for block in blocks_of(path):
        assert block.language not in _MISNAMED, (
            f"{_name(path)}:{block.line - 1}: fence Python as ```python, "
            "and mark it <!-- no-run: why --> if it must not run"
        )
        if block.no_run is not None:
            assert block.language == "python", (
                f"{_name(path)}:{block.line - 1}: only ```python blocks run; no marker needed"
            )


def test_the_harness_runs_top_level_await_and_reports_page_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n"
        "```python\nimport asyncio\n\nvalue = await asyncio.sleep(0, result=41)\n```\n\n"
        "<!-- no-run: a fragment -->\n```python\nraise SystemExit\n```\n\n"
        "```python\nvalue += 1\nassert value == 41, value\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [block.no_run for block in blocks] == [None, "a fragment", None]
    with pytest.raises(AssertionError, match="42") as failure:
        run_blocks(page, [block for block in blocks if block.no_run is None])
    assert (str(page), 16) in [(str(entry.path), entry.lineno + 1) for entry in failure.traceback]


def test_the_api_reference_names_every_public_name() -> None:
    pages = "\n".join(page.read_text(encoding="utf-8") for page in REFERENCE.glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", pages, flags=re.MULTILINE))

    def is_documented(module: types.ModuleType, name: str) -> bool:
        if f"{module.__name__}.{name}" in documented:
            return True
        if any(entry.endswith(f".{name}") for entry in documented):
            return True  # documented where it is defined
        return getattr(getattr(module, name), "__module__", None) in documented  # a whole module

    missing = [
        f"{module.__name__}.{name}"
        for module in (resilient, resilient.testing)
        for name in module.__all__
        if name != "__version__" and not is_documented(module, name)
    ]
    assert missing == []
