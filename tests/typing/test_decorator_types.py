"""What a type checker sees of a decorated function: its parameters and its return type.

``mypy --strict`` checks this module with the rest of the repository (the ``files`` of
pyproject's mypy configuration include ``tests``): a decorator that erased a signature
would fail the type check here, where ``typing.assert_type`` no longer holds or an
``# type: ignore`` for a call the signature forbids goes unused. The tests run as well,
so what is checked is a real decorated function.

One section per decorator. Each decorates a few functions (``def`` and ``async def``
alike where the decorator takes both), calls them, and asserts the static type of what
the calls give; calls the signature forbids sit in functions that never run.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

from resilient import MemoryBackend, idempotent

# --- @idempotent -------------------------------------------------------------------------


async def test_idempotent_keeps_the_return_type_of_the_function() -> None:
    backend = MemoryBackend()

    @idempotent("charge:{event_id}", backend=backend, observer=None)
    async def charge(event_id: str, cents: int) -> dict[str, int]:
        return {"charged": cents}

    @idempotent("refs:{order}", backend=backend, observer=None)
    async def references(order: int) -> list[str]:
        return [f"r{order}"]

    @idempotent("maybe:{found}", backend=backend, observer=None)
    async def lookup(*, found: bool) -> str | None:
        return "x" if found else None

    first = await charge("e1", 500)
    assert_type(first, dict[str, int])
    replayed = await charge(event_id="e1", cents=500)
    assert_type(replayed, dict[str, int])
    assert first == replayed == {"charged": 500}
    assert_type(await references(7), list[str])
    assert_type(await lookup(found=False), str | None)
    assert await lookup(found=True) == "x"


async def test_idempotent_keeps_the_parameters_of_the_function() -> None:
    @idempotent("{event_id}", backend=MemoryBackend(), observer=None)
    async def handle(event_id: str, *, retries: int = 0) -> int:
        return retries

    async def never_called() -> None:  # each ignore is needed only while the signature is kept
        await handle(42)  # type: ignore[arg-type]
        await handle("e1", 3)  # type: ignore[call-arg]
        await handle("e1", tries=3)  # type: ignore[call-arg]

    task = asyncio.create_task(handle("e1", retries=2))  # a coroutine, as `async def` gives
    assert_type(await task, int)
    assert task.result() == 2
