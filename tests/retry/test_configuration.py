"""Bad options fail at decoration time, with a message that says what is wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from resilient import ConfigurationError, retry
from resilient.retries import RetryOptions
from resilient.testing import FakeClock


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": 0}, "attempts counts every try, the first included: an int >= 1, not 0"),
        ({"attempts": True}, "an int >= 1, not True"),
        ({"attempts": 2.5}, "an int >= 1, not 2.5"),
        ({"jitter": "none"}, "jitter must be one of 'full', 'equal', 'decorrelated', not 'none'"),
        ({"base": 0}, "base must be a finite number of seconds > 0, not 0"),
        ({"base": "1"}, "base must be a number of seconds"),
        ({"cap": float("inf")}, "cap must be a finite number of seconds > 0, not inf"),
        ({"base": 2.0, "cap": 1.0}, r"cap \(1.0\) must not be below base \(2.0\)"),
        ({"deadline": 0}, "deadline must be a finite number of seconds > 0, not 0"),
        ({"deadline": -1.0}, "deadline must be a finite number"),
        ({"on": KeyboardInterrupt}, "KeyboardInterrupt is not an Exception"),
        ({"on": (ValueError, asyncio.CancelledError)}, "CancelledError is not an Exception"),
        (
            {"on": (ValueError, "OSError")},
            "on= takes exception types or a predicate, not 'OSError'",
        ),
        ({"on": 42}, "on= takes exception types or a predicate, not 42"),
        ({"on": int}, "on= takes exception types or a predicate, not <class 'int'>"),
        ({"result": 429}, "result must be a predicate on the return value, not 429"),
        ({"budget": 0.2}, "budget must be a RetryBudget, not 0.2"),
        ({"sleep": 1.0}, "sleep must be a function of seconds, not 1.0"),
        ({"rng": 7}, "rng must be a random.Random, not 7"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        retry(**options)


def test_a_sync_function_cannot_take_an_async_sleep() -> None:
    clock = FakeClock()
    with pytest.raises(ConfigurationError, match=r"\.fetch is synchronous, so sleep must be too"):

        @retry(sleep=clock.sleep)
        def fetch() -> None: ...


def test_only_plain_functions_are_decorated() -> None:
    with pytest.raises(TypeError, match="not callable"):
        retry()(42)  # type: ignore[call-overload]

    def rows() -> Iterator[int]:
        yield 1

    async def pages() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        retry()(rows)
    with pytest.raises(TypeError, match="generator function"):
        retry()(pages)


def test_repr() -> None:
    assert repr(retry(attempts=5, deadline=10, jitter="equal")) == (
        "Retry(attempts=5, deadline=10.0, jitter='equal', base=0.1, cap=10.0)"
    )


def test_each_keyword_of_retry_is_the_option_of_the_same_name() -> None:
    keywords = inspect.signature(retry).parameters.values()
    fields = [field for field in dataclasses.fields(RetryOptions) if field.init]
    assert [(k.name, k.annotation) for k in keywords] == [(f.name, f.type) for f in fields]
    assert {k.kind for k in keywords} == {inspect.Parameter.KEYWORD_ONLY}
    defaults = retry().options
    assert all(getattr(defaults, k.name) == k.default for k in keywords)


def test_the_options_are_kept_validated_and_frozen() -> None:
    policy = retry(attempts=5, deadline=10, base=1, cap=2)
    assert policy.options.deadline == 10.0
    assert isinstance(policy.options.deadline, float)
    assert isinstance(policy.options.base, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.options.attempts = 1  # type: ignore[misc]
    narrowed = policy.narrowed(on=OSError, name="narrow")
    assert narrowed.options.name == "narrow"
    assert narrowed.options.attempts == 5
    assert policy.options.name is None  # the original is unchanged
    with pytest.raises(ConfigurationError, match="KeyboardInterrupt is not an Exception"):
        policy.narrowed(on=KeyboardInterrupt)  # type: ignore[arg-type]
