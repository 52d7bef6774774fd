"""The Python snippets of docs/auth.md run, in order, as a reader would run them."""

from __future__ import annotations

import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "auth.md"


def test_the_guide_snippets_run() -> None:
    snippets = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(snippets) >= 3
    namespace: dict[str, object] = {"__name__": "guide"}
    try:
        for snippet in snippets:
            exec(compile(snippet, str(GUIDE), "exec"), namespace)
    finally:
        issuer = namespace.get("issuer")
        if issuer is not None:
            issuer.close()  # type: ignore[attr-defined]
    assert namespace["refused"] == [
        "BadAudience",
        "MissingClaim",
        "DisallowedAlgorithm",
        "UnknownKey",
    ]
