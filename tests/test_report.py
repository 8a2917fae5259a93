"""The report: files exist, report.md says what runs.json says, plots are real PNG images."""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest

from gemfs.mm.types import NR_ORDERS, Design
from tests.workloads import SMALL
from tools.inproc_backend import InprocBackend
from tools.player import RunResult, TimelinePoint, play
from tools.report import ReportFiles, write_report
from tools.workload import Workload, parse_workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workload() -> Workload:
    return parse_workload(SMALL, "small.toml")


@pytest.fixture(scope="module")
def results(workload: Workload) -> list[RunResult]:
    return [play(workload, InprocBackend(workload, d), d) for d in Design]


@pytest.fixture(scope="module")
def report(
    tmp_path_factory: pytest.TempPathFactory, workload: Workload, results: list[RunResult]
) -> ReportFiles:
    return write_report(workload, results, tmp_path_factory.mktemp("out") / "report")


def test_files_exist(report: ReportFiles) -> None:
    names = {p.name for p in report.directory.iterdir()}
    expected = {"report.md", "runs.json", "timeline.csv"}
    expected |= {"score.png", "pageblocks.png", "buddyinfo.png"}
    assert names == expected
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


def nums(cell: str) -> list[float]:
    return [float(x) for x in cell.split(" / ")]


EXPECTED: dict[str, Callable[[dict[str, Any]], list[float]]] = {
    "order-9 probes succeeded / tried": lambda r: [r["probes"]["succeeded"], r["probes"]["tried"]],
    "free order-9 blocks before": lambda r: [r["order9_before"]],
    "free order-9 blocks after": lambda r: [r["order9_after"]],
    "order-9 ideal (free pages / 512)": lambda r: [r["order9_ideal"]],
    "free pages at end": lambda r: [r["free_pages_end"]],
    "free but unusable at order 9 (pages)": lambda r: [r["unusable_free_order9_pages"]],
    "fragmentation score end / peak": lambda r: [
        r["fragmentation_score"],
        r["fragmentation_score_peak"],
    ],
    "pageblocks unmovable / movable / reclaimable": lambda r: [
        r["pageblocks"]["unmovable"],
        r["pageblocks"]["movable"],
        r["pageblocks"]["reclaimable"],
    ],
    "mixed pageblocks": lambda r: [r["mixed_pageblocks"]],
    "migrations done / failed / EAGAIN": lambda r: [
        r["migrations"]["success"],
        r["migrations"]["fail"],
        r["migrations"]["eagain"],
    ],
    "owner callbacks": lambda r: [r["callbacks"]],
    "callback latency p50 / p99 (µs)": lambda r: [r["callback_p50_us"], r["callback_p99_us"]],
    "GPU stall (ms)": lambda r: [r["gpu_stall_ms"]],
    "data errors": lambda r: [r["data_errors"]],
    "page cache reclaimed (pages)": lambda r: [r["reclaimed_pages"]],
    "allocation failures": lambda r: [r["alloc_failures"]],
}


def test_report_numbers_equal_runs_json(report: ReportFiles) -> None:
    runs = json.loads(report.runs.read_text())
    assert [r["design"] for r in runs] == [d.value for d in Design]
    results, buddy = md_tables(report.markdown.read_text())
    header, *rows = results
    assert header == ["metric", *(r["design"] for r in runs)]
    seen = set()
    for label, *cells in rows:
        expect = EXPECTED[label]
        seen.add(label)
        for cell, record in zip(cells, runs, strict=True):
            assert nums(cell) == [float(x) for x in expect(record)], (label, record["design"])
    assert seen == set(EXPECTED)
    # The buddyinfo table: one row per design, one column per order.
    assert buddy[0] == ["design", *(str(o) for o in range(NR_ORDERS))]
    for (design, *counts), record in zip(buddy[1:], runs, strict=True):
        assert design == record["design"]
        assert [int(c) for c in counts] == record["buddyinfo"]


def test_report_mentions_the_workload_and_plots(report: ReportFiles) -> None:
    text = report.markdown.read_text()
    assert text.startswith("# gemfs run: small")
    for png in ("score.png", "pageblocks.png", "buddyinfo.png"):
        assert f"]({png})" in text


def test_timeline_csv(report: ReportFiles, results: list[RunResult]) -> None:
    with report.timeline.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r.timeline) for r in results)
    assert set(rows[0]) == set(TimelinePoint.__dataclass_fields__)
    first = results[0].timeline[-1]
    last_of_first = [r for r in rows if r["design"] == first.design][-1]
    assert int(last_of_first["score"]) == first.score
    assert int(last_of_first["free_pages"]) == first.free_pages


@pytest.mark.parametrize("name", ["score.png", "pageblocks.png", "buddyinfo.png"])
def test_plots_are_png(report: ReportFiles, name: str) -> None:
    data = (report.directory / name).read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400
    assert height >= 200
    assert len(data) > 10_000  # non-trivial: real content, not an empty canvas
    assert data[-8:-4] == b"IEND"
