"""An observer that keeps the events it receives, for tests to assert on."""

from __future__ import annotations

from typing import TypeVar

from resilient.events import Event

__all__ = ["RecordingObserver"]

E = TypeVar("E", bound=Event)


class RecordingObserver:
    """An :class:`~resilient.events.Observer` that keeps every event, in the order received.

    Give it to a block as its ``observer`` (alone, or beside others through
    :func:`~resilient.events.observe_all`), then assert on :attr:`events` or on the events
    of one kind with :meth:`of`. Safe to share between threads: events are only appended.

    >>> from resilient.events import RateLimited
    >>> events = RecordingObserver()
    >>> events(RateLimited(block="ratelimit", key="ip:203.0.113.7", policy="5/minute",
    ...                    retry_after=12.0))
    >>> [event.key for event in events.of(RateLimited)]
    ['ip:203.0.113.7']
    >>> events.clear(); events.events
    []
    """

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []
        """Every event received, oldest first."""

    def __call__(self, event: Event, /) -> None:
        """Keep *event*."""
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        """Return the events that are instances of *kind* (a subclass counts), in order."""
        return [event for event in self.events if isinstance(event, kind)]

    def clear(self) -> None:
        """Forget every event received so far."""
        self.events.clear()

    def __repr__(self) -> str:
        return f"RecordingObserver({len(self.events)} events)"
