"""The private-name check that ``dev.py check`` runs: what it catches and what it allows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dev", module)
    spec.loader.exec_module(module)
    return module


dev = load_dev()


def uses(source: str) -> list[str]:
    found: list[str] = dev.private_name_uses(Path("example.py"), source)
    return [line.split(": ", 1)[1] for line in found]


def test_importing_another_modules_private_name_is_caught() -> None:
    assert uses("from resilient.ratelimit.core import _Result\n") == [
        "imports _Result from resilient.ratelimit.core"
    ]


def test_reaching_another_objects_private_attribute_is_caught() -> None:
    source = "def f(limiter):\n    return limiter._hit_named\n"
    assert uses(source) == ["uses _hit_named, private to another module"]


def test_a_chain_through_self_is_caught() -> None:
    source = "class A:\n    def f(self):\n        return self.store._entries\n"
    assert uses(source) == ["uses _entries, private to another module"]


def test_own_private_names_are_allowed() -> None:
    source = (
        "class Rule:\n"
        "    __slots__ = ('_pattern',)\n"
        "    def __init__(self):\n"
        "        self._pattern = None\n"
        "def matches(rule):\n"
        "    return rule._pattern\n"
    )
    assert uses(source) == []


def test_documented_underscored_names_and_fenced_lines_are_allowed() -> None:
    source = (
        "def f(point, connection):\n"
        "    point._replace(x=1)\n"
        "    return connection._sock  # fenced: redis-py has no public socket accessor\n"
    )
    assert uses(source) == []


def test_the_repository_has_no_new_uses() -> None:
    found: list[str] = []
    for top in dev.PRIVATE_CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            found += dev.private_name_uses(relative, path.read_text(encoding="utf-8"))
    assert found == []


def test_the_baseline_holds_only_uses_that_still_exist() -> None:
    seen: set[tuple[str, str]] = set()
    for top in dev.PRIVATE_CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            tree_uses = dev.private_name_uses(
                relative, path.read_text(encoding="utf-8"), baseline=frozenset()
            )
            seen |= {(relative.as_posix(), use.split(": ", 1)[1]) for use in tree_uses}
    assert dev.PRIVATE_BASELINE - seen == set()


def test_an_attribute_assigned_on_another_object_is_a_use_not_a_definition() -> None:
    source = "def f(store):\n    store._data = {}\n    return store._data\n"
    assert uses(source) == ["uses _data, private to another module"] * 2


def test_a_string_is_a_definition_only_in_slots() -> None:
    source = "NAME = '_data'\ndef f(store):\n    return store._data\n"
    assert uses(source) == ["uses _data, private to another module"]
