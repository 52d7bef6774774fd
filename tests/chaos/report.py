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
    lost: list[str] = field(default_factory=list)  # run twice: completed before Redis lost it
    lost_running: list[str] = field(default_factory=list)  # run twice: running at the loss
    limit: int = 0
    admissions: list[Admission] = field(default_factory=list)
    recovery: dict[str, float | None] = field(default_factory=dict)  # by block
    bounds: dict[str, float] = field(default_factory=dict)  # by block
    fault: tuple[float, str] = (0.0, "")  # its length (s), and what it spans
    quarantine: float = 0.0  # seconds the shop refused orders after noticing a loss
    refusals: Counter[str] = field(default_factory=Counter)  # the 503s, by cause
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the run
    load: float = 0.0  # the machine's 1-minute load average when the run began

    def summary_row(self) -> str:
        """One line of the summary table."""
        answers: Counter[str] = Counter()
        for counts in self.statuses.values():
            answers.update(counts)
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(answers.items()))
        runs = ", ".join(f"{n}: {k}" for n, k in sorted(self.runs.items()))
        lost = len(self.lost) + len(self.lost_running)
        if lost:
            runs += f" ({lost} lost by Redis)"
        admitted = Counter(a.admitted for a in self.admissions)
        spread = ", ".join(f"{adm}: {n}" for adm, n in sorted(admitted.items()))
        unguarded = sum(a.unguarded for a in self.admissions)
        if unguarded:
            spread += f" (+ {unguarded} unguarded)"
        length, spans = self.fault
        quarantine = f"{self.quarantine:g} s (orders: 503)" if self.quarantine else "none"
        held = "all held" if not self.failures else f"**{len(self.failures)} failed**"
        return (
            f"| {self.name} | {length:.2f} s ({spans}) | {statuses} | {runs} | {spread} | "
            f"{self._recovery()} | {quarantine} | {held} |"
        )

    def _recovery(self) -> str:
        """The recovery per block against its bound, blocks with the same bound together."""
        by_bound: dict[float, list[str]] = {}
        for block, bound in self.bounds.items():
            by_bound.setdefault(bound, []).append(block)
        parts = []
        for bound, blocks in by_bound.items():
            times = [self.recovery.get(block) for block in blocks]
            worst = "never" if None in times else f"{max(t for t in times if t is not None):.2f} s"
            parts.append(f"{', '.join(blocks)} {worst} (≤ {bound:g} s)")
        return "; ".join(parts)

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
            + (
                f"; run twice as Redis lost their records: {len(self.lost)} completed before "
                f"the loss, {len(self.lost_running)} running at it"
                if self.lost or self.lost_running
                else ""
            )
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
            f"{name} {value:.2f} s (≤ {self.bounds[name]:g} s)"
            if value is not None
            else f"{name} never (≤ {self.bounds[name]:g} s)"
            for name, value in self.recovery.items()
        )
        length, spans = self.fault
        lines.append(f"- The fault: {length:.2f} s, {spans}")
        lines.append(f"- Recovery after the fault's end: {recovery}")
        if self.quarantine:
            lines.append(
                f"- Quarantine: every worker refused orders (503 with `Retry-After`) until "
                f"{self.quarantine:g} s after the first claim that noticed the loss, as "
                f"documented; the order bound is that plus 1 s"
            )
        if self.refusals:
            causes = ", ".join(f"{cause}: {n}" for cause, n in self.refusals.most_common())
            lines.append(f"- The 503s by cause: {causes}")
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
        lines.append(
            f"- Wall time of the run: {self.seconds:.1f} s; the machine's load average "
            f"(1 min) at its start: {self.load:.2f}"
        )
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
        "order) every 50 ms from the fault's end (recovery: until each serves normally, "
        "less the probe's own latency under the load), 1.5 s more load; then, once the "
        "idempotency lease (5 s in the suite) has passed, every key is sent once more and "
        "the shop's record of handler runs (`SHOP_RUN_LOG`) is counted;",
        "- the shop quarantines orders for one lease (5 s) from the first claim that notices "
        "that Redis lost its records: after `kill -9` and an empty restart, orders are "
        "allowed that plus 1 s to recover, every other block 1 s; on the cluster every block "
        "is allowed 1 s plus the node timeout, counted from the replica's promotion;",
        '- a run\'s "unguarded" admissions are logins the rate limiter admitted while its '
        'store failed, as its documented `on_backend_error="open"` says (no `RateLimit` '
        'headers); "forgotten" is what the store had counted before it lost its data.',
        "",
        "## Summary",
        "",
        "The fault's length (from its start to its end: what the recovery counts from), "
        "answers by status (every request of the run), the order handler's runs per "
        "idempotency key (runs: keys), what the login form admitted per address by its "
        "store (admitted: addresses), the time from the fault's end until each block "
        "served normally against its bound, the quarantine of orders (the documented "
        "refusal after Redis lost its records, inside the orders' bound), and the "
        "assertions.",
        "",
        "| fault | fault's length | answers by status | handler runs per key | admitted per "
        "rate-limit key (limit 20) | recovery | quarantine | assertions |",
        "|---|---|---|---|---|---|---|---|",
        *(report.summary_row() for report in reports),
        "",
        "## Results",
        "",
    ]
    for report in reports:
        parts += [report.markdown(), ""]
    parts += ["<!-- --8<-- [end:results] -->", ""]
    RESULTS.write_text("\n".join(parts))
