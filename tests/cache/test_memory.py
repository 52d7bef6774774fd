"""The memory store's bound: least recently used first, in O(1)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from resilient import MemoryBackend
from resilient.cache import MISSING, Cache
from resilient.cache.memory import MemoryCacheStore
from resilient.testing import FakeClock
from tests.cache.conftest import Driver


def store_of(cache: Cache) -> MemoryCacheStore:
    store = cache.store
    assert isinstance(store, MemoryCacheStore)
    return store


async def test_a_full_store_makes_room_by_evicting_one_entry_not_by_sweeping(
    driver: Driver,
) -> None:
    # Each new key evicts exactly the least recently used entry: expired entries are not
    # swept out (a sweep would walk the store, and shrink it below its bound).
    clock = FakeClock()
    cache = Cache(MemoryBackend(max_keys=1_000), clock=clock, ttl=1.0, jitter=0.0)
    store = store_of(cache)

    def load() -> int:
        return 1

    for i in range(5_000):  # all unique: the hostile case, with entries expiring too
        await driver.get_or_load(cache, f"k{i}", load)
        clock.advance(0.01)
        assert len(store) == min(i + 1, 1_000)
        if i >= 1_000:
            assert next(iter(store)) == f"k{i - 999}"  # the oldest left is the next to go
    assert len(store) == 1_000
    assert list(store) == [f"k{i}" for i in range(4_000, 5_000)]


@settings(max_examples=200, deadline=None)
@given(
    operations=st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60),
    max_keys=st.integers(1, 5),
)
async def test_the_least_recently_used_entry_makes_room(
    operations: list[tuple[bool, int]], max_keys: int
) -> None:
    cache = Cache(MemoryBackend(max_keys=max_keys), clock=FakeClock(), jitter=0.0)
    model: list[str] = []  # least recently used first
    for write, k in operations:
        key = f"k{k}"
        if write:
            await cache.set(key, k)
            if key in model:
                model.remove(key)
            model.append(key)
            del model[:-max_keys]
        else:
            value = await cache.get(key)
            assert value == (k if key in model else MISSING)
            if key in model:
                model.remove(key)
                model.append(key)
        assert list(store_of(cache)) == model
