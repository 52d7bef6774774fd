"""The Python snippets of docs/httpx.md run, in order, as a reader would run them."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "httpx.md"


def test_the_guide_snippets_run() -> None:
    snippets = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(snippets) >= 4
    namespace: dict[str, object] = {"__name__": "guide"}
    for snippet in snippets:
        exec(compile(snippet, str(GUIDE), "exec"), namespace)
    assert namespace["calls"] == 3
    for client in ("client", "payments"):
        asyncio.run(namespace[client].aclose())  # type: ignore[attr-defined]
    namespace["blocking_client"].close()  # type: ignore[attr-defined]
