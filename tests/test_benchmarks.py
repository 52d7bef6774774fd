"""The benchmarks' own machinery: saved results, the report page, the shop's load script.

Nothing here asserts a timing: what is checked is that results survive a round trip, that
the page is built from them, and that a short load run ends with an exact order audit.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from pathlib import Path

import pytest

from benchmarks._common import Machine, Results, Section, table

MACHINE = Machine(
    cpu="Test CPU",
    cores=2,
    memory="1.0 GiB",
    python="3.11.7 (CPython)",
    system="Linux 6",
    redis="Redis server v=7.0.15",
    packages={"resilient-asgi": "0.1.0", "limits": "5.8.0"},
)


def results(name: str = "ratelimit", *, taken: str = "2025-01-02T03:04:05+00:00") -> Results:
    """Results of a run with two sections, one plotted."""
    return Results(
        name=name,
        taken=taken,
        repeat=5,
        command=f"python dev.py bench {name} --repeat 5",
        machine=MACHINE,
        sections=[
            Section(
                key="middleware",
                title="Middleware cost, in process",
                headers=["app", "µs per request", "µs added"],
                rows=[["bare Starlette", 12.5, 0.0], ["resilient", 18.75, 6.25]],
                raw={"bare Starlette": {"µs per request": [12.0, 12.5, 13.0]}},
                chart=[2],
                note="- the server pinned to CPU 0, the load to CPU 1",
            ),
            Section(
                key="notes",
                title="Round trips",
                headers=["contender", "per request"],
                rows=[["resilient", "2.00 / 1.00"], ["peer", None], ["count", 3]],
            ),
        ],
    )


def test_results_survive_a_json_round_trip(tmp_path: Path) -> None:
    saved = results()
    path = saved.save(tmp_path)
    assert path == tmp_path / "ratelimit.json"
    loaded = Results.load("ratelimit", tmp_path)
    assert loaded == saved
    # Floats stay floats and ints stay ints: the table renders exactly as it did.
    for before, after in zip(saved.sections, loaded.sections, strict=True):
        assert after.markdown() == before.markdown()
    assert loaded.section("notes").rows[2] == ["count", 3]
    assert isinstance(loaded.section("middleware").rows[0][1], float)


def test_machine_facts_render_as_the_reports_always_did() -> None:
    assert MACHINE.markdown().splitlines() == [
        "- CPU: Test CPU, 2 cores; memory 1.0 GiB",
        "- Python 3.11.7 (CPython), Linux 6",
        "- Redis server v=7.0.15",
        "- packages: resilient-asgi 0.1.0, limits 5.8.0",
    ]


def test_a_section_renders_its_rows_as_a_table() -> None:
    section = results().section("middleware")
    assert section.markdown() == table(section.headers, section.rows)
    assert "| resilient | 18.75 | 6.25 |" in section.markdown()


# --- the page ----------------------------------------------------------------------------------


def test_the_page_is_built_from_saved_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the page's charts need the bench extra")
    from benchmarks import report

    saved = tmp_path / "results"
    results("ratelimit").save(saved)
    results("auth", taken="2024-06-01T00:00:00+00:00").save(saved)
    (saved / "cache.md").write_text("# Cache benchmarks\n")
    out = tmp_path / "docs"

    assert report.main(["--from-results", "--results", str(saved), "--out", str(out)]) == 0

    text = (out / "benchmarks.md").read_text()
    assert "- CPU: Test CPU, 2 cores; memory 1.0 GiB" in text
    # Each block with data: its intro, when it was taken, its tables, its chart, the rerun.
    assert "## Rate limiting" in text
    assert "Figures taken 2025-01-02 03:04:05 UTC, medians of 5 runs" in text
    assert "Figures taken 2024-06-01 00:00:00 UTC" in text
    assert "| resilient | 18.75 | 6.25 |" in text
    assert "- the server pinned to CPU 0, the load to CPU 1\n\n| app |" in text
    assert "![Rate limiting: the charted figures](img/bench-ratelimit.png)" in text
    assert "python dev.py bench ratelimit --repeat 5" in text
    png = out / "img" / "bench-ratelimit.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A block without data says so and how to get it; one with only Markdown points to it.
    assert "No saved data for this block yet: `benchmarks/results/cache.md`" in text
    assert "run `python dev.py bench retry`" in text
    assert not (out / "img" / "bench-retry.png").exists()
    # The fixture lacks the figures the targets need: said, not crashed on.
    assert "Targets: not checked, the results lack a figure" in text
    # Nothing in the page is Python that tests/test_docs.py would try to run.
    assert "```python" not in text


def test_targets_are_checked_against_the_figures(tmp_path: Path) -> None:
    from benchmarks import report

    section = Section(
        key="validations",
        title="Validations per second",
        headers=["algorithm", "bare", "pyjwk", "ours", "vs bare"],
        rows=[["RS256", 1000.0, 800.0, 1500.0, "+50.0%"], ["ES256", 1000.0, 700.0, 850.0, "x"]],
    )
    slow = dataclasses.replace(results("auth"), sections=[section])
    (target,) = report.BLOCKS["auth"].targets(slow)
    assert not target.met
    assert target.measured == "RS256 +50%, ES256 -15%"
    section.rows[1][3] = 950.0
    (target,) = report.BLOCKS["auth"].targets(slow)
    assert target.met


# --- the shop's load script ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_a_short_order_run_ends_with_an_exact_audit() -> None:
    from benchmarks import ecommerce_load

    memory = ecommerce_load.CONFIGS[0]
    runs = ecommerce_load.bench([memory], 1, 2.0, 1.0, products=300, mixes=["order"])

    (run,) = runs["memory", "order"]
    assert run.audit is not None
    assert run.audit.problems == []
    assert run.audit.created > 0
    assert run.audit.paid == run.audit.created
    assert run.audit.keys >= run.audit.created
    assert run.statuses[201] > 0
    assert 429 not in run.statuses  # the load stays under the shop's limits
    assert not any(status >= 500 for status in run.statuses)
    load, audit = ecommerce_load.sections([memory], runs)
    assert audit is not None
    assert audit.rows[0][-1] == "exact in 1/1 runs"
    assert load.rows[0][0] == "memory, 1 process, order"


def books(tmp_path: Path) -> tuple[Path, Path]:
    """A seeded template and a copy of it holding one paid order: 2 of product 1."""
    from examples.ecommerce.db import Database

    template = tmp_path / "template.sqlite3"
    database = Database(template, products=5)
    database.prepare()
    database.close()
    copy = tmp_path / "shop.sqlite3"
    shutil.copy(template, copy)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE products SET stock = 10 WHERE id = 1")
        db.execute("INSERT INTO orders VALUES (1, '7', 'paid', 100, 'ch_1', 0)")
        db.execute("INSERT INTO order_items VALUES (1, 1, 2, 50)")
    with sqlite3.connect(template) as db:
        db.execute("UPDATE products SET stock = 12 WHERE id = 1")
    return copy, template


def test_the_audit_passes_books_that_match_the_answers(tmp_path: Path) -> None:
    from benchmarks.ecommerce_load import Key, audit

    database, template = books(tmp_path)
    keys = {
        "a": Key(0, '{"items":[{"product_id":1,"quantity":2}]}', [(201, False, 1), (201, True, 1)]),
        "b": Key(0, '{"items":[{"product_id":2,"quantity":1}]}', [(409, False, None)]),
    }
    result = audit(keys, 0, database, template, ["7"])
    assert result.problems == []
    assert (result.keys, result.created, result.paid, result.replayed) == (2, 1, 1, 1)


def test_the_audit_catches_a_key_run_twice_and_stock_sold_twice(tmp_path: Path) -> None:
    from benchmarks.ecommerce_load import Key, audit

    database, template = books(tmp_path)
    with sqlite3.connect(database) as db:  # a second order for the same key
        db.execute("INSERT INTO orders VALUES (2, '7', 'paid', 100, 'ch_2', 0)")
        db.execute("INSERT INTO order_items VALUES (2, 1, 2, 50)")
    body = '{"items":[{"product_id":1,"quantity":2}]}'
    keys = {"a": Key(0, body, [(201, False, 1), (201, False, 2)])}

    result = audit(keys, 0, database, template, ["7"])

    assert not result.exact
    assert any("ran more than once" in problem for problem in result.problems)
    assert any("no client was told of" in problem for problem in result.problems)
    assert any("product 1: stock 10, seeded 12, 4 sold" in p for p in result.problems)
    assert result.summary().startswith("FAILED: ")


def test_the_audit_catches_an_order_with_other_lines_or_owner(tmp_path: Path) -> None:
    from benchmarks.ecommerce_load import Key, audit

    database, template = books(tmp_path)
    keys = {"a": Key(0, '{"items":[{"product_id":3,"quantity":1}]}', [(201, False, 1)])}
    result = audit(keys, 0, database, template, ["8"])
    assert "order 1 (key a) belongs to 7" in result.problems
    assert "order 1 does not hold the lines of key a" in result.problems


def test_the_page_states_the_ratios_the_tables_do_not_show() -> None:
    from benchmarks import report

    section = Section(
        key="latency",
        title="Added latency",
        headers=["app", "first", "first added", "replay", "replay added", "round trips"],
        rows=[
            ["bare Starlette", 30.0, 0.0, 27.0, 0.0, "-"],
            ["resilient, memory", 90.0, 60.0, 25.0, -2.0, "-"],
            ["resilient, Redis", 330.0, 300.0, 130.0, 103.0, "2.00 / 1.00"],
            ["asgi-idempotency-header, memory", 150.0, 120.0, 15.0, -12.0, "-"],
            ["asgi-idempotency-header, Redis", 930.0, 900.0, 260.0, 233.0, "6.00 / 2.00"],
        ],
    )
    saved = dataclasses.replace(results("idempotency"), sections=[section])
    block = report.BLOCKS["idempotency"]
    assert block.ratios(saved) == [
        "memory: a first request costs 60 µs more than bare Starlette, 2.0x less than with "
        "asgi-idempotency-header (120 µs).",
        "Redis: a first request costs 300 µs more than bare Starlette, 3.0x less than with "
        "asgi-idempotency-header (900 µs).",
    ]
    (target,) = block.targets(saved)
    assert target.met


def test_a_benchmark_that_cannot_run_leaves_the_page_to_the_saved_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="the page's charts need the bench extra")
    import benchmarks.auth
    from benchmarks import report

    def cannot_run(argv: list[str]) -> int:
        raise SystemExit("wrk is not installed")

    monkeypatch.setattr(benchmarks.auth, "main", cannot_run)
    out = tmp_path / "docs"

    assert report.main(["--modules", "auth", "--out", str(out)]) == 1

    assert "auth: wrk is not installed" in capsys.readouterr().err
    assert "## JWT validation" in (out / "benchmarks.md").read_text()


# --- the apps the HTTP benchmark serves ----------------------------------------------------------


def test_the_floor_sends_the_fields_the_middleware_sends() -> None:
    import asyncio

    import httpx

    from benchmarks._apps import PassThrough, fields_sent, memory_app, starlette_app

    fields = fields_sent(memory_app())
    assert [name for name, _ in fields] == [b"ratelimit-policy", b"ratelimit"]
    assert fields_sent(memory_app("none")) == []

    async def get(app: object) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/")

    floor = asyncio.run(get(PassThrough(starlette_app(), fields)))
    limited = asyncio.run(get(memory_app()))
    assert floor.text == limited.text == "ok"
    assert floor.headers["ratelimit-policy"] == limited.headers["ratelimit-policy"]
    assert floor.headers["ratelimit"].split(";")[0] == limited.headers["ratelimit"].split(";")[0]
    assert sorted(floor.headers) == sorted(limited.headers)
