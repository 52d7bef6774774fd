"""Hypothesis strategies for rate-limit policies and traces of checks."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from resilient.ratelimit.core import Policy, Rate, SlidingWindow, TokenBucket

periods = st.sampled_from([1, 3, 7, 100, 1000, 60_000])  # milliseconds


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    limit = draw(st.integers(1, 6))
    rate = Rate(limit, draw(periods) / 1000)
    # Blocks shorter than the window, as long, and longer: the block's end then falls in
    # the next window or the one after, whose weighting it must not see.
    block = draw(st.sampled_from([0, 0, 0, 0.005, 2.5, rate.period, 1.5 * rate.period]))
    if draw(st.booleans()):
        return SlidingWindow(rate, block_for=block)
    return TokenBucket(rate, burst=draw(st.integers(1, 6)), block_for=block)


@dataclass(frozen=True)
class Step:
    advance_ms: int
    action: str  # "hit", "peek" or "reset"
    cost: int
    which: tuple[int, ...]  # indexes into the trace's policies


@st.composite
def traces(draw: st.DrawFn, max_steps: int = 40) -> tuple[list[Policy], list[Step]]:
    pool = draw(st.lists(policies(), min_size=1, max_size=3, unique_by=lambda p: p.id))
    smallest = min(p.capacity for p in pool)
    steps = draw(
        st.lists(
            st.builds(
                Step,
                advance_ms=st.one_of(
                    st.just(0), st.integers(0, 10), st.integers(0, 3000), st.integers(0, 200_000)
                ),
                action=st.sampled_from(["hit"] * 8 + ["peek"] * 2 + ["reset"]),
                cost=st.integers(0, smallest),
                which=st.lists(
                    st.integers(0, len(pool) - 1), min_size=1, max_size=len(pool), unique=True
                ).map(tuple),
            ),
            min_size=1,
            max_size=max_steps,
        )
    )
    return pool, steps
