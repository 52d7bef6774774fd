"""``python -m benchmarks report``: run the benchmarks and write the benchmark page.

The page, ``docs/benchmarks.md``, is built from the saved results
(``benchmarks/results/<name>.json``): the machine, then per block what is measured and
against which peers, a chart (``docs/img/bench-<name>.png``), the tables of medians with
their ratios to the peers and to the ceilings, the targets the project set and whether
the figures meet them, when the figures were taken and how to take them again.

Options: ``--from-results`` builds the page from the saved results without running
anything; ``--modules a,b`` runs only those benchmarks (the others keep their saved
results); ``--repeat N`` is passed on to each benchmark; ``--results DIR`` and ``--out
DIR`` read the results from and write the page into other directories.
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import MODULES
from benchmarks._common import RESULTS, Results, Section, table

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = "benchmarks.md"


@dataclass(frozen=True)
class Target:
    """A figure the project promised, and whether the results meet it."""

    claim: str
    source: str
    measured: str
    met: bool


def _row(section: Section, prefix: str) -> list[object]:
    """The first row of *section* whose label starts with *prefix*."""
    for row in section.rows:
        if str(row[0]).startswith(prefix):
            return list(row)
    raise KeyError(prefix)


def _number(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = re.search(r"-?[\d,]*\.?\d+", str(value))
    if match is None:
        raise KeyError(value)
    return float(match[0].replace(",", ""))


# --- what each block promised -----------------------------------------------------------------


def _ratelimit_targets(results: Results) -> list[Target]:
    targets = []
    # At concurrency 64, at least twice what redis-py itself can do: concurrent checks
    # must be batched into pipelined round trips.
    for concurrency, floor in ((1, 0.95), (64, 2.0)):
        section = results.section(f"redis-c{concurrency}")
        ceiling = _number(section.rows[0][1])
        ratios = [
            _number(_row(section, name)[1]) / ceiling
            for name in ("resilient SlidingWindow", "resilient TokenBucket")
        ]
        targets.append(
            Target(
                f"Redis checks at concurrency {concurrency}: at least {floor:g}x the checks/s "
                "of redis-py's bare `EVALSHA` of `return 1` (SlidingWindow, TokenBucket)",
                "issue #2",
                " / ".join(f"{ratio:.2f}x" for ratio in ratios),
                min(ratios) >= floor,
            )
        )
    added = _number(_row(results.section("middleware"), "resilient RateLimitMiddleware")[2])
    targets.append(
        Target(
            "the middleware adds at most 5 µs per request (memory backend, IETF headers)",
            "issue #2",
            f"{added:.1f} µs",
            added <= 5,
        )
    )
    http = results.section("http")
    bare = http.raw["bare"]["requests/s"]
    for backend, floor in (("memory", 0.9), ("redis", 0.5)):
        rates = http.raw[str(_row(http, backend)[0])]["requests/s"]
        # The median of the per-round ratios, unrounded (the table shows two digits).
        ratio = statistics.median(r / b for r, b in zip(rates, bare, strict=True))
        targets.append(
            Target(
                f"uvicorn + wrk, {backend} backend: at least {floor:.2f}x the bare app's req/s",
                "issue #2",
                f"{ratio:.2f}x",
                ratio >= floor,
            )
        )
    return targets


def _backend_targets(results: Results) -> list[Target]:
    busy = results.section("c64")
    ratio = _number(_row(busy, "TokenBucket (RateLimiter")[1]) / _number(busy.rows[0][1])
    idle = results.section("c1")
    bare, ours = (
        _row(idle, "redis-py EVALSHA ratelimit.lua"),
        _row(idle, "TokenBucket (RateLimiter"),
    )
    added = [_number(ours[n]) - _number(bare[n]) for n in (3, 4)]
    return [
        Target(
            "TokenBucket at concurrency 64: at least 2x the calls/s of redis-py's bare "
            "`EVALSHA` of `return 1`",
            'the issue "one shape for every block"',
            f"{ratio:.2f}x",
            ratio >= 2.0,
        ),
        Target(
            "TokenBucket at concurrency 1 adds no latency to redis-py's own `EVALSHA` of the "
            "same script (p50, p99)",
            'the issue "one shape for every block"',
            " / ".join(f"{value:+.0f} µs" for value in added),
            max(added) <= 0,
        ),
    ]


def _idempotency_targets(results: Results) -> list[Target]:
    trips = str(_row(results.section("latency"), "resilient, Redis")[5])
    return [
        Target(
            "one round trip claims, one stores, one replays",
            "docs/idempotency.md",
            f"{trips} (first / replay)",
            trips == "2.00 / 1.00",
        )
    ]


def _memory_bound_targets(results: Results) -> list[Target]:
    rows = results.section("new-key").rows
    worst = max(rows, key=lambda row: _number(row[-1]))
    ratio = _number(worst[-1])
    return [
        Target(
            "a new key in a full memory store costs within 2x of one below the bound",
            "issue #14",
            f"{ratio:.2f}x at worst ({worst[0]})",
            ratio <= 2.0,
        )
    ]


def _breaker_targets(results: Results) -> list[Target]:
    commands = _number(_row(results.section("shared"), "resilient")[2])
    return [
        Target(
            "with state in Redis, a successful call sends no Redis command",
            "docs/breaker.md",
            f"{commands:.2f} commands per call",
            commands == 0,
        )
    ]


def _cache_targets(results: Results) -> list[Target]:
    one = _number(_row(results.section("stampede"), "resilient `Cache` (Redis)")[1])
    four = _number(results.section("processes").rows[0][1])
    return [
        Target(
            "one load for a crowd of 1,000 requests on a cold key, in one process and across 4",
            "examples/ecommerce/README.md, docs/cache.md",
            f"{one:.0f} and {four:.0f} loader calls",
            one == 1 and four == 1,
        )
    ]


def _retry_targets(results: Results) -> list[Target]:
    added = [
        _number(_row(results.section(f"success-{kind}"), "resilient `@retry()`")[2])
        for kind in ("def", "async def")
    ]
    return [
        Target(
            "about 0.2 µs added to a call that succeeds, sync or async (under 0.5 µs)",
            "docs/retry.md",
            " / ".join(f"{ns / 1000:.2f} µs" for ns in added),
            max(added) < 500,
        )
    ]


def _auth_targets(results: Results) -> list[Target]:
    section = results.section("validations")
    ratios = {str(row[0]): _number(row[3]) / _number(row[1]) for row in section.rows}
    return [
        Target(
            "validation within 10% of a bare `jwt.decode` with the key in hand",
            "issue #6",
            ", ".join(f"{alg} {100 * (r - 1):+.0f}%" for alg, r in ratios.items()),
            min(ratios.values()) >= 0.9,
        )
    ]


def _load_targets(results: Results) -> list[Target]:
    load = results.section("load")
    statuses = " ".join(str(row[5]) for row in load.rows)
    failures = sorted({int(s) for s in re.findall(r"\b([45]\d\d): ", statuses)} - {409})
    targets = [
        Target(
            "no 5xx and no 429 under load (each client stays under its limits)",
            "issue #7",
            ", ".join(map(str, failures)) or "none",
            not any(s >= 500 or s == 429 for s in failures),
        )
    ]
    try:
        audit = results.section("audit")
    except KeyError:
        return targets
    verdicts = [str(row[-1]) for row in audit.rows]
    targets.append(
        Target(
            "one paid order per key answered 201, none without, stock conserved, every run",
            "issue #7",
            "; ".join(f"{row[0]}: {row[-1]}" for row in audit.rows),
            all(v.startswith("exact") and "FAILED" not in v for v in verdicts)
            and all(re.match(r"exact in (\d+)/\1 runs$", v) for v in verdicts),
        )
    )
    return targets


# --- the ratios the tables do not show -------------------------------------------------------


def _peers(section: Section, column: int, skip: Sequence[str] = ()) -> dict[str, float]:
    """The peers' figures in *column*: rows that are neither ours nor named in *skip*."""
    return {
        str(row[0]): _number(row[column])
        for row in section.rows
        if not str(row[0]).startswith("resilient") and not str(row[0]).startswith(tuple(skip))
    }


def _ratelimit_ratios(results: Results) -> list[str]:
    lines = []
    for concurrency in (1, 64):
        section = results.section(f"redis-c{concurrency}")
        ours = _number(_row(section, "resilient TokenBucket")[1])
        peers = _peers(section, 1, ["raw EVALSHA"])
        best = max(peers, key=peers.__getitem__)
        lines.append(
            f"Redis, concurrency {concurrency}: `TokenBucket` checks {ours / peers[best]:.1f}x "
            f"as fast as the fastest peer ({best.replace('`', '')}), "
            f"{ours / _number(section.rows[0][1]):.2f}x the bare `EVALSHA` ceiling."
        )
    middleware = results.section("middleware")
    ours = _number(_row(middleware, "resilient RateLimitMiddleware")[2])
    floor = _number(_row(middleware, "floor")[2])
    slowapi = _number(_row(middleware, "slowapi SlowAPIASGIMiddleware")[2])
    lines.append(
        f"In process, the middleware adds {ours:.1f} µs a request: {ours / floor:.1f}x the "
        f"floor of a pass-through middleware ({floor:.1f} µs); slowapi's ASGI middleware adds "
        f"{slowapi / ours:.0f}x as much."
    )
    if any(section.key == "instructions" for section in results.sections):
        counted = results.section("instructions")
        bare = _number(_row(counted, "bare")[1])
        memory = _number(_row(counted, "memory")[2])
        fields = _number(_row(counted, "floor")[2])
        lines.append(
            f"Under uvicorn, counted by callgrind: the middleware on the memory backend adds "
            f"{memory:,.0f} instructions a request to bare's {bare:,.0f} "
            f"({memory / bare:.0%}); {fields:,.0f} of them ({fields / memory:.0%}) are "
            "those of any middleware sending its two RateLimit fields (the floor): a "
            "wrapped `send`, and uvicorn's own checks of every field it sends."
        )
    return lines


def _idempotency_ratios(results: Results) -> list[str]:
    section = results.section("latency")
    lines = []
    for store in ("memory", "Redis"):
        ours = _row(section, f"resilient, {store}")
        theirs = _row(section, f"asgi-idempotency-header, {store}")
        lines.append(
            f"{store}: a first request costs {_number(ours[2]):.0f} µs more than bare "
            f"Starlette, {_number(theirs[2]) / _number(ours[2]):.1f}x less than with "
            f"asgi-idempotency-header ({_number(theirs[2]):.0f} µs)."
        )
    return lines


def _cache_ratios(results: Results) -> list[str]:
    stampede = results.section("stampede")
    ours = _number(_row(stampede, "resilient `Cache` (Redis)")[3])
    peers = _peers(stampede, 3)
    best = min(peers, key=peers.__getitem__)
    hits = results.section("hit")
    warm = _number(_row(hits, "resilient `Cache` (Redis)")[1])
    warm_peers = _peers(hits, 1)
    warm_best = min(warm_peers, key=warm_peers.__getitem__)
    return [
        f"Stampede p99: {ours:.0f} ms on Redis for a 50 ms loader; the best peer "
        f"({best.replace('`', '')}) takes {peers[best]:.0f} ms, {peers[best] / ours:.2f}x ours.",
        f"Warm reads on Redis: {warm:.0f} µs; the fastest peer ({warm_best.replace('`', '')}) "
        f"takes {warm_peers[warm_best]:.0f} µs, {warm_peers[warm_best] / warm:.2f}x ours.",
    ]


def _no_ratios(results: Results) -> list[str]:
    return []  # the tables carry them: "added vs ours", "vs bare", "vs ceiling"


# --- the blocks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One benchmark module as the page presents it."""

    name: str
    title: str
    intro: str
    targets: Callable[[Results], list[Target]]
    ratios: Callable[[Results], list[str]] = _no_ratios


BLOCKS = {
    block.name: block
    for block in (
        Block(
            "ratelimit",
            "Rate limiting",
            "Checks per second against a local Redis next to the ceiling of a bare "
            "redis-py `EVALSHA` of `return 1` (one round trip doing nothing), at "
            "concurrency 1 and 64. That ceiling is redis-py's own per-call cost: resilient "
            "passes it by sending its scripts on a connection of its own, past redis-py's "
            "pool checkout and per-call machinery, and at concurrency 64 by batching "
            "concurrent checks into pipelined round trips. Then the microseconds each "
            "middleware adds to a Starlette app in process, next "
            "to the floor of a pass-through middleware; requests/s under uvicorn and wrk, "
            "and the instructions per request callgrind counts in the uvicorn process, "
            "which do not drift with the machine's load as requests/s do. "
            "Peers: limits (moving window, sliding window counter, fixed window), "
            "pyrate-limiter, slowapi.",
            _ratelimit_targets,
            _ratelimit_ratios,
        ),
        Block(
            "backend",
            "Redis backend",
            "The Redis backend's script calls next to redis-py's own: a bare `EVALSHA` of "
            "`return 1` (the ceiling), the `EVALSHA` of the rate-limit script a TokenBucket "
            "hit runs, sent by the client itself, and the same call through redis-py's client "
            "API on a dedicated client with the user's connection settings and no retry (the "
            "route the backend could take instead of its own connection), alone and coalesced "
            "as the backend "
            "coalesces, at concurrency 1 and 64. The backend sends each script call once, "
            "on a connection of its own, checked before each write without waiting; at "
            "concurrency 1 it must add nothing to redis-py's own call, at 64 it batches.",
            _backend_targets,
        ),
        Block(
            "idempotency",
            "Idempotency keys",
            "The latency a middleware adds to `POST /api/orders` in process, for a first "
            "request (claim, run, store) and for a replay, in memory and on Redis, and the "
            "Redis round trips per request. Peer: asgi-idempotency-header.",
            _idempotency_targets,
            _idempotency_ratios,
        ),
        Block(
            "breaker",
            "Circuit breakers",
            "What a breaker adds to a call that succeeds through a closed circuit, sync and "
            "async, and with its state shared through Redis. Peers: circuitbreaker, "
            "pybreaker, aiobreaker, purgatory.",
            _breaker_targets,
        ),
        Block(
            "cache",
            "Cache stampedes",
            "1,000 concurrent requests for one cold key with a 50 ms loader: loader calls, "
            "latency and Redis commands, in one process and over 4; then warm reads. "
            "Peers: cashews (lock, locked, early), aiocache `cached_stampede`.",
            _cache_targets,
            _cache_ratios,
        ),
        Block(
            "retry",
            "Retries",
            "What a retry decorator adds to a call that succeeds at once, and what one "
            "retry costs with waits turned off. Peers: tenacity, stamina, backoff.",
            _retry_targets,
        ),
        Block(
            "auth",
            "JWT validation",
            "Validations per second with a warm key cache, for RS256, ES256 and EdDSA. "
            "Peers: a bare `jwt.decode` with the key in hand (the floor of the work), and "
            "PyJWT's `PyJWKClient`.",
            _auth_targets,
        ),
        Block(
            "ecommerce_load",
            "The example shop under load",
            "The example shop as it runs in production (uvicorn, its payment provider, "
            "SQLite), driven by wrk: a read-heavy mix of catalog listings and product pages, "
            "and an order mix of signed-in customers posting orders with idempotency keys, "
            "some resent; in memory, on Redis, and on Redis with two processes, next to the "
            "ceiling of `GET /healthz` through the same middleware. After every order run "
            "the books are audited against what the clients were told.",
            _load_targets,
        ),
        Block(
            "memory_bound",
            "Memory stores at their bound",
            "What a new key costs in each in-process store (idempotency, rate limit, cache, "
            "and the L1 tier of a cache on Redis) once it holds `max_keys` keys and must "
            "evict one, next to what it costs in a store as big that is not full, at 10k, "
            "100k and 1M keys, every key unique (the hostile case). No peers: this is the "
            "figure that shows eviction costs O(1) or O(log n), not a walk of every entry.",
            _memory_bound_targets,
        ),
    )
}


# --- the page ----------------------------------------------------------------------------------


def chart(results: Results, path: Path) -> bool:
    """Draw the block's charted columns into *path* (PNG); ``False`` if none."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [s for s in results.sections if s.chart]
    if not plotted:
        return False
    heights = [0.8 + 0.28 * len(s.rows) * max(1, len(s.chart)) for s in plotted]
    figure, axes = plt.subplots(
        len(plotted),
        1,
        figsize=(8, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for axis, section in zip(axes[:, 0], plotted, strict=True):
        labels = [_short(str(row[0])) for row in section.rows]
        # resilient's rows stand out from the peers' (when the table has any)
        highlight = any("resilient" in str(row[0]) for row in section.rows)
        width = 0.8 / len(section.chart)
        for n, column in enumerate(section.chart):
            values = [
                _number(row[column]) if row[column] is not None else 0.0 for row in section.rows
            ]
            positions = [i + (n - (len(section.chart) - 1) / 2) * width for i in range(len(labels))]
            ours = [
                "C0" if "resilient" in str(row[0]) or not highlight else "C7"
                for row in section.rows
            ]
            colors = [f"C{n}"] * len(labels) if len(section.chart) > 1 else ours
            bars = axis.barh(
                positions, values, height=width, color=colors, label=section.headers[column]
            )
            axis.bar_label(bars, labels=[_figure(v) for v in values], fontsize=7, padding=2)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(section.title, fontsize=9, loc="left")
        axis.tick_params(axis="x", labelsize=7)
        axis.margins(x=0.15)
        if len(section.chart) > 1:
            axis.legend(fontsize=7, loc="lower right")
        else:
            axis.set_xlabel(section.headers[section.chart[0]], fontsize=8)
        axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _short(label: str, width: int = 58) -> str:
    label = label.replace("`", "")
    return label if len(label) <= width else label[: width - 1] + "…"


def _figure(value: float) -> str:
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def block_markdown(block: Block, results: Results | None, out: Path, md_exists: bool) -> str:
    parts = [f"## {block.title}", "", block.intro, ""]
    if results is None:
        saved = f"`benchmarks/results/{block.name}.md` holds its last report; " if md_exists else ""
        parts += [
            f"No saved data for this block yet: {saved}run "
            f"`python dev.py bench {block.name}` to measure it and add it here.",
            "",
        ]
        return "\n".join(parts)
    machine = results.machine
    parts += [
        f"Figures taken {results.taken.replace('T', ' ').replace('+00:00', ' UTC')}, "
        f"medians of {results.repeat} runs, on {machine.cpu} ({machine.cores} cores), "
        f"Python {machine.python}; "
        + ", ".join(f"{p} {v}" for p, v in machine.packages.items())
        + ".",
        "",
    ]
    try:
        ratios = block.ratios(results)
    except (KeyError, IndexError, ValueError, ZeroDivisionError):
        ratios = []
    parts += [f"- {line}" for line in ratios] + ([""] if ratios else [])
    if chart(results, out / "img" / f"bench-{block.name}.png"):
        parts += [f"![{block.title}: the charted figures](img/bench-{block.name}.png)", ""]
    for section in results.sections:
        parts += [f"### {section.title}", ""]
        parts += [section.note, ""] if section.note else []
        parts += [section.markdown(), ""]
    try:
        targets = block.targets(results)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        parts += [f"Targets: not checked, the results lack a figure ({exc}).", ""]
    else:
        if targets:
            rows = [
                [t.claim, t.source, t.measured, "met" if t.met else "**not met**"] for t in targets
            ]
            parts += ["**Targets**", "", table(["target", "stated in", "measured", ""], rows), ""]
    parts += [
        "Rerun:",
        "",
        "```console",
        f"{results.command}",
        "```",
        "",
    ]
    return "\n".join(parts)


def page(results_dir: Path, out: Path, names: Sequence[str] = MODULES) -> str:
    """Build the page from the results in *results_dir*; write it and its charts into *out*."""
    found = {
        name: Results.load(name, results_dir)
        for name in names
        if (results_dir / f"{name}.json").exists()
    }
    newest = max(found.values(), key=lambda r: r.taken, default=None)
    parts = [
        "# Benchmarks",
        "",
        "Each block of `resilient` measured next to the libraries that do the same job, on "
        "one machine, in one run per block: contenders alternate within each run so that "
        "the machine's drift touches them alike, and every figure is the median of several "
        "runs. Each block says when its figures were taken. Ratios to the peers and to the "
        "ceilings (what the same work costs with nothing around it) are in the tables' "
        "last columns.",
        "",
    ]
    if newest is not None:
        # The hardware and the runtimes; each block names the packages it measured.
        facts = newest.machine.markdown().splitlines()[:2]
        redis = next((r.machine.redis for r in found.values() if r.machine.redis), None)
        facts += [f"- {redis}"] if redis else []
        parts += ["## Machine", "", *facts, ""]
        others = sorted(name for name, r in found.items() if r.machine.cpu != newest.machine.cpu)
        if others:
            parts += [f"Taken on another machine: {', '.join(others)} (see each block).", ""]
    parts += [
        "## Run them",
        "",
        "```console",
        "python3 dev.py bench                       # every benchmark, then this page",
        "python3 dev.py bench cache --repeat 5      # one benchmark, its results saved",
        "python3 dev.py bench report --from-results # this page from the saved results",
        "```",
        "",
        "Results are saved in `benchmarks/results/` (`<name>.md`, the report, and "
        "`<name>.json`, the data, every run included); on a machine shared with other "
        "work, wrap wall-clock runs in `flock` so that two never overlap.",
        "",
    ]
    for name in names:
        block = BLOCKS[name]
        md_exists = (results_dir / f"{name}.md").exists()
        parts.append(block_markdown(block, found.get(name), out, md_exists))
    text = "\n".join(parts).rstrip() + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / PAGE).write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--from-results", action="store_true", help="run nothing")
    parser.add_argument("--modules", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--repeat", type=int, help="runs per figure, for each benchmark")
    parser.add_argument("--results", type=Path, default=RESULTS, help="saved results")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the page goes")
    args = parser.parse_args(argv)
    names = list(MODULES)
    if args.modules:
        names = [name.strip() for name in args.modules.split(",") if name.strip()]
        unknown = sorted(set(names) - set(MODULES))
        if unknown:
            parser.error(f"unknown benchmarks: {', '.join(unknown)} (known: {', '.join(MODULES)})")
    if not args.from_results and args.results != RESULTS:
        parser.error("--results goes with --from-results: runs save into benchmarks/results")
    failed = []
    if not args.from_results:
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            options = ["--repeat", str(args.repeat)] if args.repeat else []
            try:
                code: int = module.main(options)
            except SystemExit as exc:  # a benchmark that cannot run here (no wrk, say)
                print(f"{name}: {exc}", file=sys.stderr)
                code = 1
            if code:
                failed.append(name)
    page(args.results, args.out)
    print(f"wrote {args.out / PAGE}", file=sys.stderr)
    if failed:
        print(
            f"not measured this time: {', '.join(failed)} (the page shows their saved results)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
