"""Prometheus metrics from the blocks' events.

::

    from prometheus_client import start_http_server
    from resilient import RateLimiter
    from resilient.events import LoggingObserver, observe_all
    from resilient.prometheus import PrometheusObserver

    observer = observe_all(LoggingObserver(), PrometheusObserver())
    limiter = RateLimiter(observer=observer)
    start_http_server(9100)

Every event of :mod:`resilient.events` becomes a counter, a histogram or a gauge named
``<namespace>_<block>_<what>`` (``resilient_ratelimit_denied_total``,
``resilient_breaker_call_duration_seconds``, ``resilient_breaker_state``); the table is
in ``docs/observability.md``. Labels never hold a key, a user or a client address.

This module needs prometheus-client (``pip install 'resilient-asgi[prometheus]'``);
``import resilient`` does not import it.
"""

from __future__ import annotations

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
except ImportError as error:  # pragma: no cover (the test suite always has prometheus-client)
    msg = "resilient.prometheus needs prometheus-client: pip install 'resilient-asgi[prometheus]'"
    raise ImportError(msg) from error

from resilient._metrics import METRICS, Metric, check_namespace, measure
from resilient.errors import ConfigurationError
from resilient.events import Event

__all__ = ["PrometheusObserver"]

_Instrument = Counter | Histogram | Gauge


class PrometheusObserver:
    """An observer that records every event in Prometheus metrics on *registry*.

    *registry* defaults to prometheus-client's global ``REGISTRY`` (the one
    ``start_http_server`` and ``make_asgi_app`` expose). *namespace* starts every metric
    name. The metrics are registered here, once: create one observer per registry and
    pass it to every block (with :func:`~resilient.events.observe_all` to keep logging
    too). A second one on the same registry and namespace raises
    :class:`~resilient.ConfigurationError`.
    """

    __slots__ = ("_instruments", "namespace", "registry")

    def __init__(
        self, *, registry: CollectorRegistry | None = None, namespace: str = "resilient"
    ) -> None:
        if registry is not None and not isinstance(registry, CollectorRegistry):
            msg = f"registry must be a prometheus_client CollectorRegistry, not {registry!r}"
            raise ConfigurationError(msg)
        self.namespace = check_namespace(namespace)
        self.registry = REGISTRY if registry is None else registry
        instruments: dict[Metric, _Instrument] = {}
        try:
            for metric in METRICS:
                instruments[metric] = _instrument(metric, namespace, self.registry)
        except ValueError as error:  # prometheus-client refuses a name twice
            for registered in instruments.values():
                self.registry.unregister(registered)
            msg = (
                f"the registry already holds metrics named {namespace}_*: create one "
                f"PrometheusObserver per registry and share it ({error})"
            )
            raise ConfigurationError(msg) from error
        self._instruments = instruments

    def __call__(self, event: Event, /) -> None:
        """Record *event* in the metrics it maps to."""
        for measurement in measure(event):
            instrument = self._instruments[measurement.metric]
            if measurement.labels:
                instrument = instrument.labels(*measurement.labels)
            if isinstance(instrument, Counter):
                instrument.inc(measurement.value)
            elif isinstance(instrument, Histogram):
                instrument.observe(measurement.value)
            else:
                instrument.set(measurement.value)

    def __repr__(self) -> str:
        return f"PrometheusObserver(namespace={self.namespace!r})"


def _instrument(metric: Metric, namespace: str, registry: CollectorRegistry) -> _Instrument:
    name = metric.prometheus_name(namespace)
    # Prometheus label names take no dots: OpenTelemetry's error.type is error_type here.
    labels = tuple(label.replace(".", "_") for label in metric.labels)
    if metric.kind == "counter":
        return Counter(name, metric.description, labels, registry=registry)
    if metric.kind == "histogram":
        buckets = Histogram.DEFAULT_BUCKETS if metric.buckets is None else metric.buckets
        return Histogram(name, metric.description, labels, registry=registry, buckets=buckets)
    return Gauge(name, metric.description, labels, registry=registry)
