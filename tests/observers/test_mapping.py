"""Every event of resilient.events becomes metrics, the same in both adapters, never keyed."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint

import resilient.events
from resilient._metrics import METRICS, measure
from resilient.events import BreakerStateChanged, Event, StaleServed
from tests.observers.conftest import OpenTelemetry, Prometheus

EVENTS = sorted(
    (
        kind
        for _, kind in inspect.getmembers(resilient.events, inspect.isclass)
        if issubclass(kind, Event) and kind is not Event and kind.__module__ == "resilient.events"
    ),
    key=lambda kind: kind.__name__,
)

# A value a per-request field could hold: it must never become a label.
SECRET = "user:42:secret"

# Values the blocks really send, where a field has a closed set of them.
REAL_VALUES: dict[tuple[str, str], object] = {
    ("BreakerStateChanged", "old"): "closed",
    ("BreakerStateChanged", "new"): "open",
    ("IdempotencyRejected", "reason"): "mismatch",
    ("KeySetFetchFailed", "outcome"): "stale",
    ("RetryGaveUp", "reason"): "attempts",
    ("StaleServed", "reason"): "revalidating",
    ("CacheRefreshed", "reason"): "early",
    ("CacheEntryInvalid", "reason"): "body",
}


def sample(kind: type[Event]) -> Event:
    """An instance of *kind* built from its fields' types: a new event needs no edit here."""
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(kind):
        hint = hints[field.name]
        if (kind.__name__, field.name) in REAL_VALUES:
            values[field.name] = REAL_VALUES[kind.__name__, field.name]
        elif field.name == "key":
            values[field.name] = SECRET
        elif hint is str:
            values[field.name] = field.name
        elif hint is bool:
            values[field.name] = True
        elif hint is int:
            values[field.name] = 3
        elif hint is float or hint == float | None:
            values[field.name] = 0.25
        else:  # BaseException, BaseException | None, object: an error or a cause
            values[field.name] = ConnectionError("down")
    return kind(**values)


def test_the_events_are_all_found() -> None:
    exported = {getattr(resilient.events, name) for name in resilient.events.__all__}
    assert set(EVENTS) == {
        value for value in exported if inspect.isclass(value) and issubclass(value, Event)
    } - {Event}
    assert len(EVENTS) >= 20


@pytest.mark.parametrize("kind", EVENTS, ids=lambda kind: kind.__name__)
def test_every_event_changes_a_prometheus_sample(kind: type[Event], prometheus: Prometheus) -> None:
    before = prometheus.samples()
    prometheus.observer(sample(kind))
    after = prometheus.samples()
    changed = {key for key, value in after.items() if before.get(key) != value}
    assert changed, f"{kind.__name__} has no Prometheus metric: map it in resilient._metrics"
    for _, labels in after:
        assert all(SECRET not in value for _, value in labels), labels


@pytest.mark.parametrize("kind", EVENTS, ids=lambda kind: kind.__name__)
def test_every_event_changes_an_opentelemetry_point(kind: type[Event], otel: OpenTelemetry) -> None:
    before = {key: _comparable(point) for key, point in otel.points().items()}
    otel.observer(sample(kind))
    after = {key: _comparable(point) for key, point in otel.points().items()}
    changed = {key for key, value in after.items() if before.get(key) != value}
    assert changed, f"{kind.__name__} has no OpenTelemetry metric: map it in resilient._metrics"
    for _, attributes in after:
        assert all(SECRET not in value for _, value in attributes), attributes


@pytest.mark.parametrize("kind", EVENTS, ids=lambda kind: kind.__name__)
def test_both_adapters_record_the_same_metrics_and_values(
    kind: type[Event], prometheus: Prometheus, otel: OpenTelemetry
) -> None:
    event = sample(kind)
    before = prometheus.samples()
    prometheus.observer(event)
    otel.observer(event)
    units = otel.units()
    from_otel: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for (name, attributes), point in otel.points().items():
        base = name.replace(".", "_") + ("_seconds" if units[name] == "s" else "")
        labels = frozenset((k.replace(".", "_"), v) for k, v in attributes)
        if isinstance(point, HistogramDataPoint):
            from_otel[base + "_count", labels] = point.count
            from_otel[base + "_sum", labels] = point.sum
        elif name.endswith(("state", "keys")):  # gauges keep their name
            assert isinstance(point, (int, float))
            from_otel[base, labels] = point
        else:
            assert isinstance(point, (int, float))
            from_otel[base + "_total", labels] = point
    from_prometheus = {
        key: value
        for key, value in prometheus.samples().items()
        if before.get(key) != value and not key[0].endswith("_bucket")
    }
    assert from_otel
    assert from_prometheus == from_otel


def _comparable(point: object) -> object:
    if isinstance(point, HistogramDataPoint):
        return (point.count, point.sum)
    return point


def test_every_metric_is_reachable_from_some_event() -> None:
    reached = {m.metric for kind in EVENTS for m in measure(sample(kind))}
    reached |= {m.metric for m in measure(StaleServed("cache", "k", "error"))}
    assert reached == set(METRICS)


def test_a_breaker_change_sets_its_new_state_to_1_and_every_other_to_0() -> None:
    measurements = measure(BreakerStateChanged("breaker", "db", "open", "half_open", "open_for"))
    gauge = {m.labels: m.value for m in measurements if m.metric.kind == "gauge"}
    assert gauge == {
        ("db", "closed"): 0.0,
        ("db", "open"): 0.0,
        ("db", "half_open"): 1.0,
        ("db", "forced_open"): 0.0,
        ("db", "disabled"): 0.0,
    }


def test_a_subclass_of_an_event_is_measured_as_its_parent() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Tagged(StaleServed):
        tag: str = ""

    [lookup, served] = measure(Tagged("cache", SECRET, "revalidating", tag="t"))
    assert lookup.labels == ("stale",)
    assert served.labels == ("revalidating",)


def test_an_event_no_metric_covers_measures_nothing() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Custom(Event):
        detail: str

    assert measure(Custom("mine", "x")) == ()
    assert measure(Event("mine")) == ()


def test_no_label_is_a_key_a_user_or_an_address() -> None:
    for metric in METRICS:
        assert not {"key", "user", "client", "ip", "token"} & set(metric.labels), metric.name
        assert metric.kind in ("counter", "histogram", "gauge")
        assert (metric.buckets is not None) == (metric.kind == "histogram"), metric.name
        assert (metric.unit == "s") == (metric.kind == "histogram"), metric.name
