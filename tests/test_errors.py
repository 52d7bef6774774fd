"""Every exception of the tree crosses a process boundary whole: pickled, with its message
and its attributes, whatever its constructor takes."""

from __future__ import annotations

import concurrent.futures
import copy
import inspect
import multiprocessing
import pickle
from typing import Any

import pytest

import resilient
import resilient.errors
from resilient import SlidingWindow
from resilient.errors import BackendUnavailable, ResilienceError
from resilient.ratelimit.core import Decision

# The tree, as resilient.errors defines it: a new exception is covered without being named.
TREE = sorted(
    (
        value
        for value in vars(resilient.errors).values()
        if isinstance(value, type) and issubclass(value, ResilienceError)
    ),
    key=lambda cls: cls.__name__,
)

# A value for each constructor parameter of the tree, by name. A new parameter fails
# `test_every_parameter_has_a_sample` until it has one here.
SAMPLES: dict[str, Any] = {
    "message": "the store did not answer in 0.25 s",
    "retry_after": 2.5,
    "breaker": "payments",
    "decision": Decision(
        allowed=False,
        limit=5,
        remaining=0,
        reset_after=30.0,
        retry_after=12.5,
        policy=SlidingWindow("5/minute"),
    ),
    "claim": "sub",
    "missing": ("scope:orders:read", "role:admin"),
}


def parameters(cls: type[ResilienceError]) -> list[inspect.Parameter]:
    """The constructor's parameters; a class that keeps Exception's takes a message."""
    try:
        return list(inspect.signature(cls).parameters.values())
    except ValueError:  # Exception(*args) has no signature to show
        return [inspect.Parameter("message", inspect.Parameter.POSITIONAL_ONLY)]


def make(cls: type[ResilienceError], *, every: bool) -> ResilienceError:
    """An instance of *cls*: with a sample for every parameter, or for the required ones."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for parameter in parameters(cls):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if not every and parameter.default is not parameter.empty:
            continue
        value = SAMPLES[parameter.name]
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = value
        else:
            args.append(value)
    return cls(*args, **kwargs)


def test_the_tree_is_every_exception_the_module_exports() -> None:
    exported = {
        getattr(resilient.errors, name)
        for name in resilient.errors.__all__
        if isinstance(getattr(resilient.errors, name), type)
    }
    assert set(TREE) == exported
    assert len(TREE) >= 23


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_every_parameter_has_a_sample(cls: type[ResilienceError]) -> None:
    unknown = [p.name for p in parameters(cls) if p.name not in SAMPLES]
    assert not unknown, f"add a sample for {cls.__name__}'s {unknown} to SAMPLES"


@pytest.mark.parametrize("every", [True, False], ids=["every-argument", "required-only"])
@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_exception_pickles_with_its_message_and_attributes(
    cls: type[ResilienceError], every: bool, protocol: int
) -> None:
    error = make(cls, every=every)
    error.add_note("while placing order 42")
    again = pickle.loads(pickle.dumps(error, protocol=protocol))
    assert type(again) is cls
    assert str(again) == str(error)
    assert again.args == error.args
    assert vars(again) == vars(error)
    assert again.__notes__ == ["while placing order 42"]
    for parameter in parameters(cls):
        if hasattr(error, parameter.name):
            assert getattr(again, parameter.name) == getattr(error, parameter.name)


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_every_exception_copies(cls: type[ResilienceError]) -> None:
    error = make(cls, every=True)
    for duplicate in (copy.copy(error), copy.deepcopy(error)):
        assert type(duplicate) is cls
        assert str(duplicate) == str(error)
        assert vars(duplicate) == vars(error)


def test_the_attributes_that_say_when_to_retry_survive() -> None:
    samples = {
        name: make(getattr(resilient, name), every=False)
        for name in resilient.__all__
        if name in resilient.errors.__all__
    }
    again = {name: pickle.loads(pickle.dumps(error)) for name, error in samples.items()}
    assert again["BackendUnavailable"].retry_after == 2.5
    assert again["CircuitOpenError"].breaker == "payments"
    assert again["CircuitOpenError"].retry_after == 2.5
    assert again["IdempotencyConflict"].retry_after == 2.5
    assert again["ResultNotStored"].retry_after == 2.5
    assert again["RateLimitExceeded"].retry_after == 12.5
    assert again["RateLimitExceeded"].decision == SAMPLES["decision"]
    assert str(again["RateLimitExceeded"]) == (
        "rate limit exceeded (SlidingWindow('5/minute')); retry in 12.500s"
    )
    assert again["Forbidden"].missing == ()
    assert str(again["InvalidToken"]) == "the token is invalid"


def test_the_default_message_of_a_token_error_survives() -> None:
    error = pickle.loads(pickle.dumps(resilient.errors.MissingClaim("exp")))
    assert str(error) == "the token has no valid 'exp' claim"
    assert error.claim == "exp"
    assert error.description == str(error)
    expired = pickle.loads(pickle.dumps(resilient.errors.ExpiredToken()))
    assert str(expired) == "the token has expired"


def fail_closed() -> None:
    """Run in a worker process: raise as a fail-closed block does."""
    raise BackendUnavailable("redis did not answer", retry_after=1.5)


def test_an_exception_raised_in_a_worker_process_reaches_the_caller_whole() -> None:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(fail_closed)
        with pytest.raises(BackendUnavailable, match="redis did not answer") as caught:
            future.result(timeout=60)
    assert caught.value.retry_after == 1.5
    assert isinstance(caught.value, resilient.BackendError)
