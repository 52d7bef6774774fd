"""OpenTelemetry metrics from the blocks' events.

::

    from resilient import CircuitBreaker
    from resilient.events import LoggingObserver, observe_all
    from resilient.opentelemetry import OpenTelemetryObserver

    observer = observe_all(LoggingObserver(), OpenTelemetryObserver())
    breaker = CircuitBreaker("payments", observer=observer)

The same metrics as :mod:`resilient.prometheus`, on the OpenTelemetry metrics API:
counters, histograms (unit ``s``) and observable gauges, named
``<namespace>.<block>.<what>`` (``resilient.ratelimit.denied``,
``resilient.breaker.call.duration``, ``resilient.breaker.state``) in the instrumentation
scope ``resilient``. Attributes never hold a key, a user or a client address.

This module needs only opentelemetry-api (``pip install
'resilient-asgi[opentelemetry]'``); the SDK and its exporters are the application's
choice. ``import resilient`` does not import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

try:
    from opentelemetry import metrics
except ImportError as error:  # pragma: no cover (the test suite always has opentelemetry)
    msg = (
        "resilient.opentelemetry needs opentelemetry-api: "
        "pip install 'resilient-asgi[opentelemetry]'"
    )
    raise ImportError(msg) from error

from resilient.__about__ import __version__
from resilient._metrics import METRICS, Metric, check_namespace, measure
from resilient.errors import ConfigurationError
from resilient.events import Event

__all__ = ["OpenTelemetryObserver"]

_Labels = tuple[str, ...]


class OpenTelemetryObserver:
    """An observer that records every event with OpenTelemetry metric instruments.

    Instruments come from *meter*, or from a ``resilient`` meter of *meter_provider*, or
    of the global meter provider when neither is given (a no-op until the application
    sets one: instruments made before then start recording when it does). *namespace*
    starts every instrument name. Create one observer and pass it to every block (with
    :func:`~resilient.events.observe_all` to keep logging too).

    A gauge reports the last value each set of attributes was given (a breaker's state
    once it first changed, the size of a key set once fetched).
    """

    __slots__ = ("_gauges", "_recorders", "namespace")

    def __init__(
        self,
        *,
        meter: metrics.Meter | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        namespace: str = "resilient",
    ) -> None:
        if meter is not None and meter_provider is not None:
            msg = "pass meter or meter_provider, not both"
            raise ConfigurationError(msg)
        self.namespace = check_namespace(namespace)
        if meter is None:
            meter = metrics.get_meter("resilient", __version__, meter_provider)
        # Written by events, read by the exporter's collection thread: each update is one
        # dict assignment, and the callback reads a copy.
        self._gauges: dict[Metric, dict[_Labels, float]] = {}
        self._recorders: dict[Metric, Callable[[float, dict[str, str]], None]] = {}
        for metric in METRICS:
            name = metric.opentelemetry_name(namespace)
            if metric.kind == "counter":
                counter = meter.create_counter(name, metric.unit, metric.description)
                self._recorders[metric] = counter.add
            elif metric.kind == "histogram":
                histogram = meter.create_histogram(
                    name,
                    metric.unit,
                    metric.description,
                    explicit_bucket_boundaries_advisory=metric.buckets,
                )
                self._recorders[metric] = histogram.record
            else:
                values = self._gauges[metric] = {}
                callback = _reader(metric, values)
                meter.create_observable_gauge(name, [callback], metric.unit, metric.description)

    def __call__(self, event: Event, /) -> None:
        """Record *event* in the instruments it maps to."""
        for measurement in measure(event):
            metric = measurement.metric
            if metric.kind == "gauge":
                self._gauges[metric][measurement.labels] = measurement.value
            else:
                attributes = dict(zip(metric.labels, measurement.labels, strict=True))
                self._recorders[metric](measurement.value, attributes)

    def __repr__(self) -> str:
        return f"OpenTelemetryObserver(namespace={self.namespace!r})"


def _reader(
    metric: Metric, values: dict[_Labels, float]
) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
    """Make a gauge's callback: the last value of each set of attributes."""
    names = metric.labels

    def read(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        # A copy: an event may add attributes while the exporter's thread reads.
        return [
            metrics.Observation(value, dict(zip(names, labels, strict=True)))
            for labels, value in list(values.items())
        ]

    return read
