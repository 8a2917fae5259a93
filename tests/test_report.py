"""The report: aggregation across seeds, the table at any width, provenance, files and plots.

Aggregation is checked on synthetic records with known values; the files on a real in-process
run of a small workload, where report.md must say what runs.json says.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gemfs.mm.types import NR_ORDERS, Design
from tests.workloads import SMALL
from tools.inproc_backend import InprocBackend
from tools.player import RunRecord, RunResult, TimelinePoint, play
from tools.report import (
    HARNESS,
    PLOTS,
    SECTIONS,
    ReportFiles,
    Stat,
    cost_entries,
    fmt_stat,
    on_grid,
    provenance,
    render_text,
    rich_table,
    seed_band,
    table_rows,
    time_grid,
    write_report,
)
from tools.workload import Workload, parse_workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The table's mechanics on the thread's four designs (the many-design table: below).
FOUR = (Design.PINNED, Design.SHMEM_HOOK, Design.GEMFS, Design.NOTIFIER)
DESIGNS = [d.value for d in FOUR]


@pytest.fixture(scope="module")
def workload() -> Workload:
    return parse_workload(SMALL, "small.toml")


@pytest.fixture(scope="module")
def results(workload: Workload) -> list[RunResult]:
    return [play(workload, InprocBackend(workload, d), d) for d in FOUR]


@pytest.fixture(scope="module")
def report(
    tmp_path_factory: pytest.TempPathFactory, workload: Workload, results: list[RunResult]
) -> ReportFiles:
    return write_report(workload, results, tmp_path_factory.mktemp("out") / "report")


# -- aggregation on synthetic records ------------------------------------------------------------
def test_stat_mean_min_max_exactly() -> None:
    s = Stat.of([40, 45, 48])
    assert s is not None
    assert s.mean == 133 / 3
    assert (s.lo, s.hi, s.n, s.runs) == (40.0, 48.0, 3, 3)
    assert fmt_stat(s) == "44.3 (40–48)"


def test_stat_formats() -> None:
    assert fmt_stat(Stat.of([7])) == "7"  # one seed: just the value
    assert fmt_stat(Stat.of([5, 5, 5])) == "5"  # every seed agrees
    assert fmt_stat(Stat.of([0.25, 0.5])) == "0.375 (0.25–0.5)"
    assert fmt_stat(Stat.of([21229.5, 4.0])) == "10617 (4–21230)"
    assert fmt_stat(Stat.of([])) == "n/a"
    assert fmt_stat(Stat.of([None, None])) == "n/a"
    # A metric only some seeds have: aggregated over those, and says so.
    s = Stat.of([1, None, 3])
    assert s is not None
    assert (s.mean, s.lo, s.hi, s.n, s.runs) == (2.0, 1.0, 3.0, 2, 3)
    assert fmt_stat(s) == "2 (1–3) [2 of 3 seeds]"
    assert fmt_stat(Stat.of([math.inf, 4])) == "4 [1 of 2 seeds]"


def base_record(results: list[RunResult], design: str) -> RunRecord:
    return next(r.record for r in results if r.record.design == design)


def synthetic(results: list[RunResult], design: str, seed: int, k: int) -> RunRecord:
    """A record whose measurement fields are set to known values that grow with ``k``."""
    return dataclasses.replace(
        base_record(results, design),
        seed=seed,
        backend="stack",
        alloc={
            "attempts": 10 + k,
            "successes": [40, 45, 48][k],
            "compacted": 2 * k,
            "latency_us": {"p50": 4.0 + k, "p99": 100.0 * (k + 1), "max": 21229.0 + k},
        },
        order9_free_mean=[7.5, 8.0, 9.25][k],
        costs={
            "gpu_stall_ms": [0.5, 1.0, 3.0][k],
            "repinned_pages": 100 * k,
            "refaulted_pages": 10 * k,
            "callbacks": 67 + k,
            "pages_migrated": 17669 + k,
            "pages_refused": 3 + k,
            "refusals": 30 + 3 * k,
            "scanned_pages": 1000,
            "migration_ms": 12.5,
            "waits_ms": 2.0 * k,
        },
        efficiency={
            "hugepages_recovered": 20 + 2 * k,
            "stall_ms_per_hugepage": 0.1 * (k + 1),
            "migrated_per_hugepage": 800 + k,
        },
        drain={
            "order": 9,
            "blocks": [40, 45, 48][k],
            "tried": [41, 46, 49][k],
            "stopped_at_failure": True,
        },
        data_errors=0,
        elapsed_s=1.5 + k,
        callback_p50_us=300.0 + k,
        callback_p99_us=900.0 + k,
        provenance={
            "gemfs_version": "9.9.9-test",
            "cost_table": {
                "page_copy_us": {"value": 1.5, "unit": "µs", "source": "migrate_folio, bench X"},
                "pin_call_us": 40,
            },
            "cost_sources": {"pin_call_us": "NVIDIA H100, driver 580"},
            "workload_file": "examples/synthetic.toml",
        },
    )


@pytest.fixture(scope="module")
def seeded_records(results: list[RunResult]) -> list[RunRecord]:
    """Every design under seeds 7, 8, 9 with known values."""
    return [synthetic(results, d, 7 + k, k) for d in DESIGNS for k in range(3)]


def rows_by_label(records: Sequence[RunRecord]) -> dict[str, list[str]]:
    return {r.label: [c.text() for c in r.cells] for r in table_rows(records) if not r.heading}


def test_table_aggregates_each_design_across_its_seeds(seeded_records: list[RunRecord]) -> None:
    rows = rows_by_label(seeded_records)
    expect = {
        "allocations tried": "11 (10–12)",
        "allocations succeeded": "44.3 (40–48)",
        "succeeded via compaction": "2 (0–4)",
        "alloc latency p50 (µs)": "5 (4–6)",
        "alloc latency p99 (µs)": "200 (100–300)",
        "alloc latency max (µs)": "21230 (21229–21231)",
        "free order-9 blocks (time mean)": "8.25 (7.5–9.25)",
        "huge pages recovered": "22 (20–24)",
        "GPU stall (ms)": "1.5 (0.5–3)",
        "pages re-pinned": "100 (0–200)",
        "pages re-faulted": "10 (0–20)",
        "owner callbacks": "68 (67–69)",
        "pages migrated": "17670 (17669–17671)",
        "pages refused (distinct)": "4 (3–5)",
        "refusals (EAGAIN answers)": "33 (30–36)",
        "pages scanned": "1000",
        "migration time (ms)": "12.5",
        "waits (ms)": "2 (0–4)",
        "GPU stall per huge page (ms)": "0.2 (0.1–0.3)",
        "pages migrated per huge page": "801 (800–802)",
        "data errors": "0",
        "drain after idle: blocks got": "44.3 (40–48)",
        "drain stopped at a failure": "yes",
        "drain order": "9",
    }
    for label, cell in expect.items():
        assert rows[label] == [cell] * len(DESIGNS), label


def test_table_keeps_designs_apart(results: list[RunResult]) -> None:
    records = [
        dataclasses.replace(
            synthetic(results, d, 1 + k, k),
            costs={"gpu_stall_ms": float(10 * i + k)},
            drain={"order": 9, "blocks": i, "tried": i + 1, "stopped_at_failure": k == 0},
        )
        for i, d in enumerate(DESIGNS)
        for k in range(2)
    ]
    rows = rows_by_label(records)
    assert rows["GPU stall (ms)"] == ["0.5 (0–1)", "10.5 (10–11)", "20.5 (20–21)", "30.5 (30–31)"]
    assert rows["drain after idle: blocks got"] == [str(i) for i in range(len(DESIGNS))]
    assert rows["drain stopped at a failure"] == ["1 of 2 seeds"] * len(DESIGNS)
    assert rows["pages re-pinned"] == ["n/a"] * len(DESIGNS)  # missing, never 0


def test_no_latency_without_allocations(results: list[RunResult]) -> None:
    r = dataclasses.replace(
        base_record(results, "pinned"),
        alloc={"attempts": 0, "successes": 0, "latency_us": {"p50": 0, "p99": 0, "max": 0}},
        drain={"order": 9, "blocks": 0, "tried": 0, "stopped_at_failure": False},
    )
    rows = rows_by_label([r])
    assert rows["allocations tried"] == ["0"]
    assert rows["alloc latency p50 (µs)"] == ["n/a"]
    assert rows["drain after idle: blocks got"] == ["none"]
    assert rows["drain stopped at a failure"] == ["n/a"]


def test_harness_figures_are_apart_from_the_design_metrics(
    seeded_records: list[RunRecord],
) -> None:
    assert "run time (wall s)" not in rows_by_label(seeded_records)
    harness = {
        r.label: [c.text() for c in r.cells]
        for r in table_rows(seeded_records, (HARNESS,))
        if not r.heading
    }
    assert harness["run time (wall s)"] == ["2.5 (1.5–3.5)"] * len(DESIGNS)
    assert harness["owner callback latency p50 (wall µs)"] == ["301 (300–302)"] * len(DESIGNS)


# -- the table at a console's width --------------------------------------------------------------
@pytest.mark.parametrize("width", [60, 80, 120])
def test_table_fits_the_console(seeded_records: list[RunRecord], width: int) -> None:
    main = render_text(rich_table(seeded_records, title="small: a title", width=width), width)
    harness = render_text(
        rich_table(seeded_records, title=HARNESS.title, sections=(HARNESS,), width=width), width
    )
    for text in (main, harness):
        assert max(len(line) for line in text.splitlines()) <= width
        for design in DESIGNS:
            assert design in text
    # Nothing is cut: every mean and every range is there whole, once per design.
    assert main.count("(17669–17671)") == len(DESIGNS)
    assert main.count("17670") == len(DESIGNS)
    assert main.count("44.3") == main.count("(40–48)") == 2 * len(DESIGNS)  # and the drain
    assert main.split().count("yes") == len(DESIGNS)  # whether the drain stopped at a failure
    assert harness.count("(1.5–3.5)") == len(DESIGNS)
    assert main.count("small: a title") == 1  # once, even when the designs are split


def test_table_at_120_columns_keeps_cells_on_one_line(seeded_records: list[RunRecord]) -> None:
    text = render_text(rich_table(seeded_records, width=120), 120)
    assert text.count("44.3 (40–48)") == 2 * len(DESIGNS)  # allocations and the drain
    assert max(len(line) for line in text.splitlines()) <= 120


def test_table_at_full_width_wraps_nothing(seeded_records: list[RunRecord]) -> None:
    text = render_text(rich_table(seeded_records, width=None), 400)
    line = next(x for x in text.splitlines() if "free order-9 blocks (time mean)" in x)
    assert line.split().count("8.25") == len(DESIGNS)
    assert max(len(x.rstrip()) for x in text.splitlines()) > 120


# -- provenance -----------------------------------------------------------------------------------
def test_cost_entries_take_sources_from_either_place() -> None:
    entries = cost_entries(
        {"copy": {"value": 1.5, "unit": "µs", "source": "A"}, "pin": 40, "flush": 0.25},
        {"pin": "B"},
    )
    assert [(e.name, e.value, e.unit, e.source) for e in entries] == [
        ("copy", "1.5", "µs", "A"),
        ("pin", "40", "", "B"),
        ("flush", "0.25", "", ""),
    ]


def timeline_of(results: list[RunResult], record: RunRecord) -> list[TimelinePoint]:
    return next(r.timeline for r in results if r.record.design == record.design)


def test_report_md_and_runs_json_state_the_provenance(
    tmp_path: Path,
    workload: Workload,
    results: list[RunResult],
    seeded_records: list[RunRecord],
) -> None:
    res = [RunResult(r, timeline_of(results, r)) for r in seeded_records]
    files = write_report(workload, res, tmp_path / "out")
    text = files.markdown.read_text()
    assert "- backend: stack" in text
    assert "- seeds: 7, 8, 9 (3 per design)" in text
    assert "- gemfs version: 9.9.9-test\n" in text
    assert "- workload file: `examples/synthetic.toml`" in text
    assert "| page_copy_us | 1.5 | µs | migrate_folio, bench X |" in text
    assert "| pin_call_us | 40 |  | NVIDIA H100, driver 580 |" in text
    runs = json.loads(files.runs.read_text())
    assert [(r["design"], r["seed"]) for r in runs] == [(d, s) for d in DESIGNS for s in (7, 8, 9)]
    assert {r["backend"] for r in runs} == {"stack"}
    assert {r["provenance"]["gemfs_version"] for r in runs} == {"9.9.9-test"}
    assert runs[0]["provenance"]["cost_table"]["pin_call_us"] == 40
    assert runs[4]["alloc"]["successes"] == 45
    # The results table carries the aggregate, the buddyinfo table every design and seed.
    tables = md_tables(text)
    main = {row[0]: row[1:] for row in next(t for t in tables if t[0][0] == "metric")}
    assert main["allocations succeeded"] == ["44.3 (40–48)"] * len(DESIGNS)
    buddy = next(t for t in tables if t[0][:2] == ["design", "seed"])
    assert [(row[0], int(row[1])) for row in buddy[1:]] == [
        (d, s) for d in DESIGNS for s in (7, 8, 9)
    ]


def test_provenance_without_a_version_says_where_it_came_from(
    workload: Workload, results: list[RunResult]
) -> None:
    import dataclasses
    import importlib.metadata

    bare = [dataclasses.replace(r.record, provenance={}) for r in results]
    p = provenance(workload, bare)
    assert p.versions == (importlib.metadata.version("gemfs"),)
    assert not p.version_from_records
    carried = provenance(workload, [r.record for r in results])
    assert carried.version_from_records
    assert carried.versions == (importlib.metadata.version("gemfs"),)
    assert p.backends == ("inproc",)
    assert p.seeds == (5,)
    assert p.workload_file == "small.toml"
    assert p.cost_tables == ()


# -- seed bands on a common time grid ----------------------------------------------------------
def point(t: float, order9: int, score: int = 0, design: str = "gemfs") -> TimelinePoint:
    return TimelinePoint(
        design=design, step=0, phase="p", time_s=t, score=score, free_pages=0,
        order9_free=order9, unusable_order9_pages=0, mixed_pageblocks=0, pinned_pages=0,
        migrate_success=0, migrate_fail=0, callbacks=0, gpu_stall_ms=0.0,
    )  # fmt: skip


def test_seed_band_on_the_union_of_sample_times(results: list[RunResult]) -> None:
    rec = base_record(results, "gemfs")
    a = RunResult(rec, [point(0, 0), point(1, 2), point(1, 3), point(2, 4)])
    b = RunResult(rec, [point(0, 10), point(1.5, 20)])
    grid = time_grid([a, b])
    assert grid.tolist() == [0.0, 1.0, 1.5, 2.0]
    # A step function: the last sample at or before each time; NaN after the run's end.
    assert on_grid(a.timeline, "order9_free", grid).tolist() == [0.0, 3.0, 3.0, 4.0]
    assert np.isnan(on_grid(b.timeline, "order9_free", grid)[3])
    band = seed_band([a, b], "order9_free", grid)
    assert band.mean.tolist() == [5.0, 6.5, 11.5, 4.0]
    assert band.lo.tolist() == [0.0, 3.0, 3.0, 4.0]
    assert band.hi.tolist() == [10.0, 10.0, 20.0, 4.0]


# -- the files of a real run -------------------------------------------------------------------
def test_files_exist(report: ReportFiles) -> None:
    names = {p.name for p in report.directory.iterdir()}
    assert names == {"report.md", "runs.json", "timeline.csv", *PLOTS}
    assert "order9.png" in PLOTS
    for p in report.directory.iterdir():
        assert p.stat().st_size > 0


def md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in the text, as rows of cells (separator rows dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def nums(cell: str) -> list[float]:
    """The numbers in a single-seed cell ("n/a" and headings have none)."""
    return [float(x) for x in NUMBER.findall(cell)]


def shown(x: float | None) -> list[float]:
    """What the table shows for one seed's value: three significant digits, whole from 100."""
    if x is None:
        return []
    if abs(x) >= 100 or x == int(x):
        return [float(round(x))]
    return [float(f"{x:.3g}")]


def get(d: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) and not isinstance(d, bool) else None


def drain(r: dict[str, Any]) -> list[float]:
    if not r["drain"]:
        return []
    return shown(get(r, "drain", "blocks")) if r["drain"].get("tried") else []


def latency(key: str) -> Callable[[dict[str, Any]], list[float]]:
    def expect(r: dict[str, Any]) -> list[float]:
        return shown(get(r, "alloc", "latency_us", key)) if get(r, "alloc", "attempts") else []

    return expect


HEADINGS = {
    "**benefit**",
    "**cost**",
    "**efficiency**",
    "**correctness**",
    "**end of run**",
    "**the pool**",
}

EXPECTED: dict[str, Callable[[dict[str, Any]], list[float]]] = {
    **{h: lambda r: [] for h in HEADINGS},
    "allocations tried": lambda r: shown(get(r, "alloc", "attempts")),
    "allocations succeeded": lambda r: shown(get(r, "alloc", "successes")),
    "succeeded via compaction": lambda r: shown(get(r, "alloc", "compacted")),
    **{f"alloc latency {k} (µs)": latency(k) for k in ("p50", "p99", "max")},
    "free order-9 blocks (time mean)": lambda r: shown(r["order9_free_mean"]),
    "huge pages recovered": lambda r: shown(get(r, "efficiency", "hugepages_recovered")),
    "GPU stall (ms)": lambda r: shown(get(r, "costs", "gpu_stall_ms")),
    "pages re-pinned": lambda r: shown(get(r, "costs", "repinned_pages")),
    "pages re-faulted": lambda r: shown(get(r, "costs", "refaulted_pages")),
    "owner callbacks": lambda r: shown(get(r, "costs", "callbacks")),
    "pages migrated": lambda r: shown(get(r, "costs", "pages_migrated")),
    "pages refused (distinct)": lambda r: shown(get(r, "costs", "pages_refused")),
    "refusals (EAGAIN answers)": lambda r: shown(get(r, "costs", "refusals")),
    "pages scanned": lambda r: shown(get(r, "costs", "scanned_pages")),
    "migration time (ms)": lambda r: shown(get(r, "costs", "migration_ms")),
    "waits (ms)": lambda r: shown(get(r, "costs", "waits_ms")),
    "pages moved at pin time": lambda r: shown(get(r, "costs", "pin_migrated_pages")),
    "pin-time migration (ms)": lambda r: shown(get(r, "costs", "pin_migration_ms")),
    "pages evacuated (confine)": lambda r: shown(get(r, "costs", "evacuated_pages")),
    "evacuation (ms)": lambda r: shown(get(r, "costs", "evacuation_ms")),
    "region grew (confine)": lambda r: shown(get(r, "costs", "region_grows")),
    "region shrank (confine)": lambda r: shown(get(r, "costs", "region_shrinks")),
    "GPU stall per huge page (ms)": lambda r: shown(get(r, "efficiency", "stall_ms_per_hugepage")),
    "pages migrated per huge page": lambda r: shown(get(r, "efficiency", "migrated_per_hugepage")),
    "data errors": lambda r: shown(r["data_errors"]),
    "drain after idle: blocks got": drain,
    "drain stopped at a failure": lambda r: [],
    "drain order": lambda r: shown(get(r, "drain", "order")),
    "free order-9 blocks before": lambda r: shown(r["order9_before"]),
    "free order-9 blocks after": lambda r: shown(r["order9_after"]),
    "order-9 ideal (free pages / 512)": lambda r: shown(r["order9_ideal"]),
    "free pages at end": lambda r: shown(r["free_pages_end"]),
    "free but unusable at order 9 (pages)": lambda r: shown(r["unusable_free_order9_pages"]),
    "fragmentation score at end": lambda r: shown(r["fragmentation_score"]),
    "fragmentation score peak": lambda r: shown(r["fragmentation_score_peak"]),
    "unmovable pageblocks": lambda r: shown(r["pageblocks"]["unmovable"]),
    "movable pageblocks": lambda r: shown(r["pageblocks"]["movable"]),
    "reclaimable pageblocks": lambda r: shown(r["pageblocks"]["reclaimable"]),
    "mixed pageblocks": lambda r: shown(r["mixed_pageblocks"]),
    "migrations done (vmstat)": lambda r: shown(r["migrations"]["success"]),
    "migrations failed (vmstat)": lambda r: shown(r["migrations"]["fail"]),
    "EAGAIN (vmstat)": lambda r: shown(r["migrations"]["eagain"]),
    "GPU batches": lambda r: shown(r["gpu_batches"]),
    "page cache reclaimed (pages)": lambda r: shown(r["reclaimed_pages"]),
    "allocation failures": lambda r: shown(r["alloc_failures"]),
    "modelled time (s)": lambda r: shown(r["sim_time_s"]),
}

HARNESS_EXPECTED: dict[str, Callable[[dict[str, Any]], list[float]]] = {
    "run time (wall s)": lambda r: shown(r["elapsed_s"]),
    "owner callback latency p50 (wall µs)": lambda r: shown(r["callback_p50_us"]),
    "owner callback latency p99 (wall µs)": lambda r: shown(r["callback_p99_us"]),
}


def test_report_numbers_equal_runs_json(report: ReportFiles) -> None:
    runs = json.loads(report.runs.read_text())
    assert [r["design"] for r in runs] == DESIGNS
    tables = md_tables(report.markdown.read_text())
    results, harness = (t for t in tables if t[0][0] == "metric")
    buddy = next(t for t in tables if t[0][:2] == ["design", "seed"])
    for table, expected in ((results, EXPECTED), (harness, HARNESS_EXPECTED)):
        header, *rows = table
        assert header == ["metric", *(r["design"] for r in runs)]
        seen = set()
        for label, *cells in rows:
            seen.add(label)
            for cell, record in zip(cells, runs, strict=True):
                assert nums(cell) == expected[label](record), (label, record["design"])
        # a design's own rows (pin-time migration, confine's region) are left out: none of these
        # designs has them
        own = {m.label for sec in SECTIONS for m in sec.metrics if m.own}
        assert own
        assert seen == set(expected) - own
    # Values, not only labels: the real run has probes, migrations and a fragmented pool.
    by_design = {r["design"]: r for r in runs}
    assert by_design["shmem-hook"]["migrations"]["success"] > 0
    assert by_design["pinned"]["fragmentation_score_peak"] > 0
    # The buddyinfo table: one row per design and seed, one column per order.
    assert buddy[0] == ["design", "seed", *(str(o) for o in range(NR_ORDERS))]
    for (design, seed, *counts), record in zip(buddy[1:], runs, strict=True):
        assert (design, int(seed)) == (record["design"], record["seed"])
        assert [int(c) for c in counts] == record["buddyinfo"]


def test_report_mentions_the_workload_provenance_and_plots(report: ReportFiles) -> None:
    text = report.markdown.read_text()
    assert text.startswith("# gemfs run: small")
    assert "- backend: inproc" in text
    assert "- seeds: 5 (1 per design)" in text
    assert "The records carry no cost table." not in text
    assert "copy_page_us" in text
    assert "NVIDIA H100" in text  # the pin costs' source is printed beside the value
    for png in PLOTS:
        assert f"]({png})" in text


def test_timeline_csv(report: ReportFiles, results: list[RunResult]) -> None:
    with report.timeline.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r.timeline) for r in results)
    assert set(rows[0]) == {"seed", *TimelinePoint.__dataclass_fields__}
    first = results[0].timeline[-1]
    last_of_first = [r for r in rows if r["design"] == first.design][-1]
    assert int(last_of_first["seed"]) == 5
    assert int(last_of_first["score"]) == first.score
    assert int(last_of_first["free_pages"]) == first.free_pages
    assert float(last_of_first["time_s"]) == first.time_s


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400
    assert height >= 200
    assert len(data) > 10_000  # non-trivial: real content, not an empty canvas
    assert data[-8:-4] == b"IEND"


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_png(report: ReportFiles, name: str) -> None:
    check_png(report.directory / name)


@pytest.mark.parametrize("width", [80, 120])
def test_every_design_fits_the_console(workload: Workload, width: int) -> None:
    """A dozen designs stay readable: split over tables as wide as the console, none cut."""
    records = [play(workload, InprocBackend(workload, d), d).record for d in Design]
    text = render_text(rich_table(records, title="all designs", width=width), width)
    assert max(len(line) for line in text.splitlines()) <= width
    for d in Design:
        assert f" {d.value}" in text
    assert text.count("all designs") == 1


def test_benefit_cost_points_are_the_seed_means_and_ranges(
    seeded_records: list[RunRecord], tmp_path: Path
) -> None:
    """One point per design: order9_free_mean (7.5, 8, 9.25) against GPU stall (0.5, 1, 3) and
    against migration + scanning + waits (12.5 + 0 + 0, 12.5 + 2, 12.5 + 4)."""
    from tools.report import _compaction_ms, _stall_ms, benefit_cost_points, plot_benefit_cost

    by_stall = benefit_cost_points(seeded_records, lambda r: r.order9_free_mean, _stall_ms)
    assert [name for name, _c, _b in by_stall] == list(DESIGNS)
    for _name, cost, benefit in by_stall:
        assert cost == pytest.approx((1.5, 0.5, 3.0))
        assert benefit == pytest.approx((24.75 / 3, 7.5, 9.25))
    by_time = benefit_cost_points(seeded_records, lambda r: r.order9_free_mean, _compaction_ms)
    assert by_time[0][1] == pytest.approx((14.5, 12.5, 16.5))
    out = tmp_path / "bc.png"
    plot_benefit_cost(seeded_records, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _many(seeded_records: list[RunRecord], n: int) -> list[RunRecord]:
    """``n`` designs' worth of records (the synthetic ones, renamed)."""
    out = []
    for i in range(n):
        base = [r for r in seeded_records if r.design == DESIGNS[i % len(DESIGNS)]]
        out += [dataclasses.replace(r, design=f"design-number-{i:02d}") for r in base]
    return out


@pytest.mark.parametrize("width", [80, 120, None])
def test_side_by_side_has_a_row_per_design_and_fits(
    seeded_records: list[RunRecord], width: int | None
) -> None:
    from tools.report import summary_rows, summary_table

    records = _many(seeded_records, 12)
    rows = dict(summary_rows(records))
    assert len(rows) == 12
    cells = [c.text() for c in rows["design-number-00"]]
    # free 2M 7.5/8/9.25, ok 40/45/48, tried 10/11/12, drain 40/45/48, stall 0.5/1/3, ...
    assert cells[:5] == ["8.25 (7.5–9.25)", "44.3 (40–48)", "11 (10–12)", "44.3 (40–48)",
                         "1.5 (0.5–3)"]  # fmt: skip
    text = render_text(summary_table(records, width), width or 400)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= (width or 400)
    for i in range(12):  # each design starts a row (twice when benefit and cost are split)
        starts = [ln for ln in lines if ln.lstrip().startswith(f"design-number-{i:02d}")]
        assert len(starts) in (1, 2), (i, starts)
    assert "44.3" in text
    assert "(40–48)" in text


def test_a_design_s_own_rows_show_only_when_a_record_has_them(
    seeded_records: list[RunRecord],
) -> None:
    labels = {r.label for r in table_rows(seeded_records)}
    assert "pages moved at pin time" not in labels  # no design here moves pages at pin time
    assert "pages migrated" in labels
    one = dataclasses.replace(
        seeded_records[0], costs={**seeded_records[0].costs, "pin_migrated_pages": 47}
    )
    rows = {r.label: [c.text() for c in r.cells] for r in table_rows([one, *seeded_records[1:]])}
    assert rows["pages moved at pin time"][0] == "47 [1 of 3 seeds]"  # the others lack the key
    assert rows["pages moved at pin time"][1:] == ["n/a"] * (len(DESIGNS) - 1)
