"""The benchmarks' own machinery: saved results.

Nothing here asserts a timing: what is checked is that results survive a round trip.
"""

from __future__ import annotations

from pathlib import Path

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
