"""The coalescer: an idle one sends at once in the caller's task, a busy one batches, and
every caller gets its batch's result or its batch's error."""

from __future__ import annotations

import asyncio

import pytest

from resilient import BackendError
from resilient.backends.redis import Coalescer


class Sender:
    """A send function that records its batches and answers each when the test says."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.tasks: list[asyncio.Task[object] | None] = []
        self.replies: list[asyncio.Future[list[int]]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.tasks.append(asyncio.current_task())
        reply: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.replies.append(reply)
        return await reply

    def answer(self, batch: int, *, short: bool = False) -> None:
        results = [item * 10 for item in self.batches[batch]]
        self.replies[batch].set_result(results[:-1] if short else results)

    def fail(self, batch: int, error: BaseException) -> None:
        self.replies[batch].set_exception(error)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_coalescer_sends_in_the_callers_own_task_at_once() -> None:
    tasks: list[asyncio.Task[object] | None] = []

    async def send(items: list[int]) -> list[int]:
        tasks.append(asyncio.current_task())
        return [item * 10 for item in items]

    coalescer = Coalescer(send, max_batch=8)
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []
    plain_call_soon = loop.call_soon

    def call_soon(callback: object, *args: object, **kwargs: object) -> object:
        scheduled.append(callback)
        return plain_call_soon(callback, *args, **kwargs)  # type: ignore[arg-type]

    loop.call_soon = call_soon  # type: ignore[method-assign, assignment]
    try:
        result = await coalescer.submit(4)
    finally:
        del loop.call_soon
    assert result == 40
    assert tasks == [asyncio.current_task()]
    assert scheduled == []  # nothing made to run later: no task, no turn of the loop


async def test_calls_made_while_one_is_in_flight_go_out_together() -> None:
    send = Sender()
    coalescer = Coalescer(send, max_batch=3)
    calls = [asyncio.create_task(coalescer.submit(i)) for i in range(6)]
    await settle()
    assert send.batches == [[0]]
    send.answer(0)
    await settle()
    assert send.batches == [[0], [1, 2, 3]]
    send.answer(1)
    await settle()
    send.answer(2)
    assert await asyncio.gather(*calls) == [0, 10, 20, 30, 40, 50]
    assert send.batches == [[0], [1, 2, 3], [4, 5]]


async def test_every_caller_of_a_failed_batch_gets_its_error() -> None:
    send = Sender()
    coalescer = Coalescer(send, max_batch=8)
    calls = [asyncio.create_task(coalescer.submit(i)) for i in range(4)]
    await settle()
    send.answer(0)
    await settle()
    failure = BackendError("Redis failed running ratelimit.lua")
    send.fail(1, failure)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results == [0, failure, failure, failure]
    # The coalescer is idle again: the next call goes out alone, at once.
    call = asyncio.create_task(coalescer.submit(9))
    await settle()
    assert send.batches[-1] == [9]
    send.answer(2)
    assert await call == 90


async def test_a_defect_in_a_batch_reaches_its_callers_as_itself() -> None:
    send = Sender()
    coalescer = Coalescer(send, max_batch=8)
    first, *batch = [asyncio.create_task(coalescer.submit(i)) for i in range(3)]
    await settle()
    send.answer(0)
    await settle()
    send.answer(1, short=True)  # one result too few: a defect, not a failure of Redis
    assert await first == 0
    for call in batch:
        with pytest.raises(RuntimeError, match="1 results for a batch of 2 items"):
            await call


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    send = Sender()
    coalescer = Coalescer(send, max_batch=8)
    first, leaving, staying = [asyncio.create_task(coalescer.submit(i)) for i in range(3)]
    await settle()
    leaving.cancel()
    send.answer(0)
    await settle()
    send.answer(1)
    assert await first == 0
    assert await staying == 20
    assert leaving.cancelled()
    assert send.batches == [[0], [1, 2]]  # its item had left with the batch


async def test_callers_waiting_on_a_cancelled_drain_get_a_backend_error() -> None:
    send = Sender()
    coalescer = Coalescer(send, max_batch=1)
    first, *waiting = [asyncio.create_task(coalescer.submit(i)) for i in range(3)]
    await settle()
    send.answer(0)
    assert await first == 0
    await settle()
    assert send.batches == [[0], [1]]  # the drain sent [1], and waits for its reply
    drainer = send.tasks[-1]
    assert drainer is not None
    drainer.cancel()  # as the event loop's shutdown would
    for call in waiting:
        with pytest.raises(BackendError, match="cancelled"):
            await call
    call = asyncio.create_task(coalescer.submit(3))  # idle again
    await settle()
    send.answer(2)
    assert await call == 30
