"""What the distribution promises: its extras, its licence, and the groups dev.py installs."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("dev_py_groups", ROOT / "dev.py")
assert _spec is not None
assert _spec.loader is not None
dev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dev)  # this checkout's dev.py, whatever else is on sys.path


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def test_the_wheel_publishes_only_the_optional_integrations_as_extras() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    assert set(extras) == {"redis", "httpx", "jwt", "prometheus", "opentelemetry"}
    for requirements in extras.values():  # an extra never pulls in the project again
        assert not any(r.startswith("resilient-asgi") for r in requirements), requirements


def test_every_group_dev_py_installs_exists_and_includes_only_groups_that_exist() -> None:
    groups = pyproject()["dependency-groups"]
    for command, names in dev.GROUPS.items():
        assert set(names) <= set(groups), command
    for name, entries in groups.items():
        for entry in entries:
            if isinstance(entry, dict):
                assert entry["include-group"] in groups, name
            else:
                assert not entry.startswith("resilient-asgi"), name  # pip would fetch it


def test_the_dev_group_holds_what_the_tests_and_checks_need() -> None:
    groups = pyproject()["dependency-groups"]
    dev_group = groups["dev"]
    assert {"include-group": "lint"} in dev_group
    assert {"include-group": "examples"} in dev_group
    assert {"include-group": "test"} in groups["lint"]
    assert {"include-group": "docs"} in groups["test"]


def test_the_licence_is_declared_and_shipped() -> None:
    project = pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "The resilient authors" in text
