"""The public surface: what `import resilient` promises."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import resilient
import resilient.testing

PUBLIC_MODULES = [
    "resilient",
    "resilient.auth",
    "resilient.auth.core",
    "resilient.backends",
    "resilient.clock",
    "resilient.errors",
    "resilient.events",
    "resilient.httpx",
    "resilient.keys",
    "resilient.opentelemetry",
    "resilient.problem",
    "resilient.prometheus",
    "resilient.ratelimit",
    "resilient.retries",
    "resilient.retries.core",
    "resilient.retries.flow",
    "resilient.retries.options",
    "resilient.testing",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_every_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert list(exported) == sorted(exported)
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.{attribute}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(name: str) -> None:
    module = importlib.import_module(name)
    assert inspect.getdoc(module)
    for attribute in module.__all__:
        value = getattr(module, attribute)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name}.{attribute} has no docstring"


def test_the_design_names_are_importable_from_the_top() -> None:
    for name in [
        "RateLimiter",
        "Rate",
        "SlidingWindow",
        "TokenBucket",
        "Decision",
        "RateLimitExceeded",
        "RateLimitMiddleware",
        "Rule",
        "rate_limit",
        "MemoryBackend",
        "RedisBackend",
        "by_ip",
        "by_header",
        "by_user",
        "ResilienceError",
        "retry",
        "RetryBudget",
        "ResilientTransport",
        "JWKSClient",
        "JWTValidator",
        "JWTAuthMiddleware",
        "InvalidToken",
        "authorize",
    ]:
        assert name in resilient.__all__


def test_every_module_imports_without_optional_extras() -> None:
    # redis, starlette, httpx, PyJWT and the metrics clients are extras: nothing may need
    # them at import time, except the integrations with them, which say what to install.
    code = """
import sys, importlib, pkgutil
blocked = ("redis", "starlette", "httpx", "hiredis", "jwt", "cryptography",
           "prometheus_client", "opentelemetry")
for name in blocked:
    sys.modules[name] = None
import resilient
extras = {"resilient.httpx": "httpx", "resilient.prometheus": "prometheus",
          "resilient.opentelemetry": "opentelemetry"}
for info in pkgutil.walk_packages(resilient.__path__, "resilient."):
    try:
        importlib.import_module(info.name)
    except ImportError as error:
        if info.name in extras:
            assert f"pip install 'resilient-asgi[{extras[info.name]}]'" in str(error), error
        else:
            assert info.name.startswith(("resilient.auth", "resilient.testing._issuer")), info
            assert "pip install 'resilient-asgi[jwt]'" in str(error), error
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_every_module_is_reached_by_attribute_after_importing_resilient() -> None:
    # A name a package exports must not hide one of its modules: the `retry` decorator once
    # hid the package of the same name, so `resilient.retry.policy` raised AttributeError
    # after `import resilient`; the package is `resilient.retries` now. Likewise `requires`
    # hid `resilient.auth.requires`: the function is `authorize` now, in `authorization`.
    code = """
import functools, importlib, pkgutil
import resilient
import resilient.retries.policy
assert resilient.retries.policy.retry is resilient.retry
assert callable(resilient.retry) and resilient.retry.__module__ == "resilient.retries.policy"
hidden = []
for info in pkgutil.walk_packages(resilient.__path__, "resilient."):
    try:
        module = importlib.import_module(info.name)
    except ImportError:
        continue  # an integration whose extra is not installed
    reached = functools.reduce(getattr, info.name.split(".")[1:], resilient)
    if reached is not module:
        hidden.append(info.name)
assert hidden == [], hidden
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_retry_is_the_decorator_and_retries_the_package() -> None:
    import resilient.retries

    @resilient.retry(attempts=2)
    def answer() -> int:
        return 42

    assert answer() == 42
    assert resilient.retry is resilient.retries.retry
    assert inspect.isfunction(resilient.retry)
    assert inspect.ismodule(resilient.retries)


def test_importing_resilient_does_not_import_httpx_nor_jwt_nor_metrics_clients() -> None:
    code = (
        "import resilient, resilient.testing, sys\n"
        "for name in ('httpx', 'jwt', 'cryptography', 'prometheus_client', 'opentelemetry'):\n"
        "    assert name not in sys.modules, name\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_the_transports_are_imported_from_the_top_on_first_use() -> None:
    from resilient.httpx import ResilientTransport, SyncResilientTransport

    assert resilient.ResilientTransport is ResilientTransport
    assert resilient.SyncResilientTransport is SyncResilientTransport
    assert "ResilientTransport" in dir(resilient)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        resilient.Nothing  # noqa: B018


def test_exceptions_share_one_root() -> None:
    for name in ["BackendError", "BackendUnavailable", "ConfigurationError", "RateLimitExceeded"]:
        assert issubclass(getattr(resilient, name), resilient.ResilienceError)
    assert issubclass(resilient.ConfigurationError, ValueError)


def test_the_auth_names_are_imported_from_the_top_on_first_use() -> None:
    from resilient.auth import JWKSClient, JWTValidator, SyncJWKSClient, SyncJWTValidator
    from resilient.testing._issuer import LocalIssuer

    assert resilient.JWKSClient is JWKSClient
    assert resilient.JWTValidator is JWTValidator
    assert resilient.SyncJWKSClient is SyncJWKSClient
    assert resilient.SyncJWTValidator is SyncJWTValidator
    assert {"SyncJWKSClient", "SyncJWTValidator"} <= set(dir(resilient))
    assert resilient.testing.LocalIssuer is LocalIssuer
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        resilient.testing.Nothing  # noqa: B018


def test_one_name_per_thing_across_errors_and_events() -> None:
    # An exception and an event with one name are two things a reader cannot tell apart
    # in an import or a log line: `ResultNotStored` is the exception, the event says
    # `IdempotencyNotStored`; `IdempotencyConflict` is the exception, the event says
    # `IdempotencyRejected`.
    import resilient.errors
    import resilient.events

    both = set(resilient.errors.__all__) & set(resilient.events.__all__)
    assert not both, both
    assert issubclass(resilient.events.IdempotencyNotStored, resilient.events.Event)
    assert issubclass(resilient.events.IdempotencyRejected, resilient.events.Event)


def test_every_idempotency_exception_is_importable_from_the_top() -> None:
    import resilient.errors

    for name in resilient.errors.__all__:
        value = getattr(resilient.errors, name)
        if issubclass(value, resilient.errors.IdempotencyError):
            assert getattr(resilient, name) is value, name
            assert name in resilient.__all__
    assert issubclass(resilient.ResultNotStored, resilient.IdempotencyError)


def test_every_branch_of_the_error_tree_is_importable_from_the_top() -> None:
    # What a caller catches at the edge of a service: each first-level exception (the
    # token errors' details stay in resilient.errors, under InvalidToken).
    import resilient.errors

    branches = [
        getattr(resilient.errors, name)
        for name in resilient.errors.__all__
        if resilient.ResilienceError in getattr(resilient.errors, name).__bases__
    ]
    assert len(branches) >= 8
    for branch in branches:
        assert getattr(resilient, branch.__name__) is branch, branch.__name__
        assert branch.__name__ in resilient.__all__
    assert resilient.KeySetUnavailable is resilient.errors.KeySetUnavailable
