"""The Python snippets of docs/retry.md run, in order, as a reader would run them."""

from __future__ import annotations

import re
from pathlib import Path

from resilient.testing import set_retry_waits

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "retry.md"


def test_the_guide_snippets_run() -> None:
    snippets = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(snippets) >= 6
    namespace: dict[str, object] = {"__name__": "guide"}
    try:
        for snippet in snippets:
            exec(compile(snippet, str(GUIDE), "exec"), namespace)
    finally:
        set_retry_waits(True)
    assert namespace["calls"] == 3
