"""docs/observability.md lists every metric and every event (tests/test_docs.py runs its
snippets)."""

from __future__ import annotations

import re
from pathlib import Path

from resilient._metrics import METRICS

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


def test_the_metrics_table_has_a_row_for_every_metric_in_both_namings() -> None:
    rows = [line for line in GUIDE.read_text().splitlines() if line.startswith("| `resilient")]
    assert len(rows) == len(METRICS)
    for metric, row in zip(METRICS, rows, strict=True):
        suffix = "_total" if metric.kind == "counter" else ""
        prometheus, opentelemetry, kind = (cell.strip() for cell in row.split("|")[1:4])
        assert prometheus == f"`{metric.prometheus_name('resilient')}{suffix}`"
        assert opentelemetry == f"`{metric.opentelemetry_name('resilient')}`"
        assert kind == metric.kind


def test_the_events_table_has_a_row_for_every_event() -> None:
    import resilient.events

    text = GUIDE.read_text()
    events = [
        name
        for name in resilient.events.__all__
        if isinstance(getattr(resilient.events, name), type)
        and issubclass(getattr(resilient.events, name), resilient.events.Event)
        and name != "Event"
    ]
    for name in events:
        assert re.search(rf"^\| `{name}` \|", text, flags=re.MULTILINE), name
