"""The chaos suite's figures, per fault, and the page they are written to
(``benchmarks/results/faults.md``), which the docs' "Fault tolerance" page includes."""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import machine_facts
from resilient.testing import find_redis_server

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "faults.md"
FAULTS = 7  # the page is written only when every fault ran (a partial run keeps the last)
PACKAGES = ["resilient-asgi", "starlette", "uvicorn", "redis", "httpx"]


@dataclass
class Admission:
    """One rate-limit key (an attacker's address) and what the login form admitted."""

    key: str
    admitted: int  # admitted by the limiter's store (its headers present)
    unguarded: int  # admitted while the store failed (on_backend_error="open": no headers)
    denied: int
    forgotten: int  # admitted before the store lost its data (0 when it lost nothing)


@dataclass
class FaultReport:
    """What one fault run measured and which of its assertions failed."""

    name: str
    what: str
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    keys: int = 0
    runs: Counter[int] = field(default_factory=Counter)  # runs per key -> keys
    lost: list[str] = field(default_factory=list)  # keys run twice: Redis provably lost them
    limit: int = 0
    admissions: list[Admission] = field(default_factory=list)
    recovery: dict[str, float | None] = field(default_factory=dict)
    bound: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the run

    def summary_row(self) -> str:
        """One line of the summary table."""
        answers: Counter[str] = Counter()
        for counts in self.statuses.values():
            answers.update(counts)
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(answers.items()))
        runs = ", ".join(f"{n}: {k}" for n, k in sorted(self.runs.items()))
        if self.lost:
            runs += f" ({len(self.lost)} lost by Redis)"
        admitted = Counter(a.admitted for a in self.admissions)
        spread = ", ".join(f"{adm}: {n}" for adm, n in sorted(admitted.items()))
        unguarded = sum(a.unguarded for a in self.admissions)
        if unguarded:
            spread += f" (+ {unguarded} unguarded)"
        times = [v for v in self.recovery.values() if v is not None]
        recovery = f"{max(times):.2f} s" if len(times) == len(self.recovery) and times else "never"
        held = "all held" if not self.failures else f"**{len(self.failures)} failed**"
        return (
            f"| {self.name} | {statuses} | {runs} | {spread} | {recovery} "
            f"(≤ {self.bound:g} s) | {held} |"
        )

    def markdown(self) -> str:
        kinds = sorted(self.statuses)
        codes = sorted({c for counts in self.statuses.values() for c in counts})
        lines = [f"### {self.name}", "", self.what, ""]
        lines += ["| requests | " + " | ".join(codes) + " |"]
        lines += ["|---|" + "---:|" * len(codes)]
        for kind in kinds:
            cells = [str(self.statuses[kind].get(c, 0) or "") for c in codes]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
        runs = ", ".join(
            f"{n} run{'s' if n != 1 else ''}: {k}" for n, k in sorted(self.runs.items())
        )
        lines.append(
            f"- Handler runs per idempotency key ({self.keys} keys, each resent after the run): "
            f"{runs or 'none'}"
            + (f"; {len(self.lost)} keys provably lost by Redis" if self.lost else "")
        )
        admitted = Counter((a.admitted, a.unguarded) for a in self.admissions)
        spread = ", ".join(
            f"{n} key{'s' if n != 1 else ''}: {adm}" + (f" + {ung} unguarded" if ung else "")
            for (adm, ung), n in sorted(admitted.items())
        )
        forgotten = sum(a.forgotten for a in self.admissions)
        lines.append(
            f"- Admitted per rate-limit key (login form, limit {self.limit} a minute per "
            f"address, {len(self.admissions)} addresses): {spread}"
            + (f"; forgotten by Redis: {forgotten}" if forgotten else "")
        )
        recovery = ", ".join(
            f"{name} {value:.2f} s" if value is not None else f"{name} never"
            for name, value in self.recovery.items()
        )
        lines.append(f"- Recovery after the fault's end: {recovery} (bound {self.bound:g} s)")
        lines += [f"- {note}" for note in self.notes]
        if self.failures:
            lines.append(f"- **Assertions failed ({len(self.failures)})**, by kind:")
            grouped: dict[str, list[str]] = {}
            for failure in self.failures:
                kind, _, detail = failure.partition(": ")
                grouped.setdefault(kind, []).append(detail)
            for kind, details in grouped.items():
                shown = "; ".join(f"`{d[:160]}`" for d in dict.fromkeys(details[:2]))
                lines.append(f"    - {kind} ({len(details)}): {shown}")
        else:
            lines.append("- Every assertion held.")
        lines.append(f"- Wall time of the run: {self.seconds:.1f} s")
        return "\n".join(lines)


def write_report(reports: list[FaultReport]) -> None:
    """Write every fault's table to ``benchmarks/results/faults.md`` (all faults ran only)."""
    if len(reports) < FAULTS:
        return
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    total = sum(r.seconds for r in reports)
    parts = [
        "# Faults: the example shop under injected Redis failures",
        "",
        # The docs' "Fault tolerance" page includes what lies between the markers.
        "<!-- --8<-- [start:results] -->",
        f"Measured {today} by `python3 dev.py test -m chaos` (`tests/chaos/`): "
        f"{total:.0f} s of fault runs, {len(reports)} faults, "
        f"{sum(1 for r in reports if not r.failures)} with every assertion holding.",
        "",
        "## Machine",
        "",
        machine_facts(PACKAGES, find_redis_server()),
        "",
        "## Setup",
        "",
        "- the shop: `python -m examples.ecommerce --workers 2` (two uvicorn worker "
        "processes, SQLite, its payment provider a separate process answering in 0.1 s), "
        "every block on Redis; "
        "a standalone `redis-server` reached through the suite's own TCP proxy, or a 6-node "
        "Redis Cluster (3 masters, 3 replicas, `cluster-node-timeout` 1000 ms);",
        "- the load, from the test process (httpx): catalog reads and logins from many "
        "client addresses (`X-Forwarded-For`, the test being the trusted proxy), orders "
        "with a new `Idempotency-Key` each, 15% resending an earlier key, and 8 addresses "
        "guessing passwords at the login form (24 attempts each, 0.05 s apart, starting "
        "spread over the run);",
        "- each run: 1 s of load, the fault, a probe of each block (a read, a login, an "
        "order) every 50 ms from the fault's end (recovery: until all three serve normally, "
        "less the probe's own latency under the load), 1.5 s more load; then, once the "
        "idempotency lease (5 s in the suite) has passed, every key is sent once more and "
        "the shop's record of handler runs (`SHOP_RUN_LOG`) is counted;",
        '- a run\'s "unguarded" admissions are logins the rate limiter admitted while its '
        'store failed, as its documented `on_backend_error="open"` says (no `RateLimit` '
        'headers); "forgotten" is what the store had counted before it lost its data.',
        "",
        "## Summary",
        "",
        "Answers by status (every request of the run), the order handler's runs per "
        "idempotency key (runs: keys), what the login form admitted per address by its "
        "store (admitted: addresses), the time until every block served normally after "
        "the fault's end, and the assertions.",
        "",
        "| fault | answers by status | handler runs per key | admitted per rate-limit key "
        "(limit 20) | recovery | assertions |",
        "|---|---|---|---|---|---|",
        *(report.summary_row() for report in reports),
        "",
        "## Results",
        "",
    ]
    for report in reports:
        parts += [report.markdown(), ""]
    parts += ["<!-- --8<-- [end:results] -->", ""]
    RESULTS.write_text("\n".join(parts))
