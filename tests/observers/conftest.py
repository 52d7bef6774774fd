"""Fixtures: a fresh Prometheus registry and a fresh OpenTelemetry SDK per test, and readers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from prometheus_client import CollectorRegistry

from resilient.opentelemetry import OpenTelemetryObserver
from resilient.prometheus import PrometheusObserver

Labels = frozenset[tuple[str, str]]


class Prometheus:
    """A PrometheusObserver on a registry of its own, and what that registry exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.observer = PrometheusObserver(registry=self.registry)

    def samples(self) -> dict[tuple[str, Labels], float]:
        """Every sample but the ``_created`` timestamps, which change on their own."""
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    def value(self, name: str, /, **labels: str) -> float | None:
        """The value of one sample, ``None`` when it was never recorded."""
        return self.registry.get_sample_value(name, labels)


class OpenTelemetry:
    """An OpenTelemetryObserver on an SDK meter provider read in memory."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.observer = OpenTelemetryObserver(meter_provider=self.provider)

    def points(self) -> dict[tuple[str, Labels], object]:
        """Every data point collected now: a number for sums and gauges, the point itself
        for histograms."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[str, Labels], object] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    assert isinstance(metric.data, (Sum, Gauge)) or metric.unit == "s"
                    for point in metric.data.data_points:
                        attributes = point.attributes or {}
                        key = (metric.name, frozenset((k, str(v)) for k, v in attributes.items()))
                        if isinstance(point, NumberDataPoint):
                            found[key] = point.value
                        else:
                            assert isinstance(point, HistogramDataPoint)
                            found[key] = point
        return found

    def units(self) -> dict[str, str]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            metric.name: metric.unit or ""
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


@pytest.fixture
def prometheus() -> Prometheus:
    return Prometheus()


@pytest.fixture
def otel() -> Iterator[OpenTelemetry]:
    telemetry = OpenTelemetry()
    yield telemetry
    telemetry.provider.shutdown()
