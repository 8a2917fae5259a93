"""The report of a run: ``report.md`` (the per-design table), PNG plots, ``runs.json`` and
``timeline.csv`` with the raw data.

Every number in the table comes straight from a :class:`tools.player.RunRecord` field (floats
printed as JSON prints them), so report.md and runs.json always agree. Plots are drawn with
matplotlib's object API on the Agg canvas (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich.table import Table

from gemfs.mm.types import NR_ORDERS, PAGE_SIZE, PAGEBLOCK_NR_PAGES, MigrateType, format_size
from tools.player import RunRecord, RunResult, TimelinePoint
from tools.workload import Workload


def _num(x: int | float) -> str:
    """A number as runs.json has it (ints plain, floats as Python/JSON repr)."""
    return json.dumps(x)


def _pair(*xs: int | float) -> str:
    return " / ".join(_num(x) for x in xs)


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    cell: Callable[[RunRecord], str]


ROWS: tuple[Row, ...] = (
    Row(
        "order-9 probes succeeded / tried",
        lambda r: _pair(r.probes["succeeded"], r.probes["tried"]),
    ),
    Row("free order-9 blocks before", lambda r: _num(r.order9_before)),
    Row("free order-9 blocks after", lambda r: _num(r.order9_after)),
    Row("order-9 ideal (free pages / 512)", lambda r: _num(r.order9_ideal)),
    Row("free pages at end", lambda r: _num(r.free_pages_end)),
    Row("free but unusable at order 9 (pages)", lambda r: _num(r.unusable_free_order9_pages)),
    Row(
        "fragmentation score end / peak",
        lambda r: _pair(r.fragmentation_score, r.fragmentation_score_peak),
    ),
    Row(
        "pageblocks unmovable / movable / reclaimable",
        lambda r: _pair(*(r.pageblocks[mt.name.lower()] for mt in MigrateType)),
    ),
    Row("mixed pageblocks", lambda r: _num(r.mixed_pageblocks)),
    Row(
        "migrations done / failed / EAGAIN",
        lambda r: _pair(r.migrations["success"], r.migrations["fail"], r.migrations["eagain"]),
    ),
    Row("owner callbacks", lambda r: _num(r.callbacks)),
    Row("callback latency p50 / p99 (µs)", lambda r: _pair(r.callback_p50_us, r.callback_p99_us)),
    Row("GPU stall (ms)", lambda r: _num(r.gpu_stall_ms)),
    Row("data errors", lambda r: _num(r.data_errors)),
    Row("page cache reclaimed (pages)", lambda r: _num(r.reclaimed_pages)),
    Row("allocation failures", lambda r: _num(r.alloc_failures)),
)


def table_cells(records: Sequence[RunRecord]) -> list[list[str]]:
    """The table as text: one row per metric, one column per design."""
    return [[row.label, *(row.cell(r) for r in records)] for row in ROWS]


def rich_table(records: Sequence[RunRecord], title: str = "") -> Table:
    t = Table(title=title or None, show_lines=False)
    t.add_column("metric", style="bold")
    for r in records:
        t.add_column(r.design, justify="right")
    for cells in table_cells(records):
        t.add_row(*cells)
    return t


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return out


def render_markdown(workload: Workload, records: Sequence[RunRecord]) -> str:
    designs = [r.design for r in records]
    lines = [
        f"# gemfs run: {workload.name}",
        "",
        workload.description or "",
        "",
        f"Workload `{workload.path}`: pool {format_size(workload.pool)} "
        f"({workload.pool_pages} pages of {PAGE_SIZE} bytes), seed {workload.seed}, "
        f"compactor proactiveness {workload.compactor.proactiveness}. "
        f"Designs: {', '.join(designs)}.",
        "",
        '"Before" and "after" are taken around the first explicit compaction when the workload '
        "has one, else at the start and the end. Order-9 blocks are counted in 2 MiB units.",
        "",
        "## Results",
        "",
        *_md_table(["metric", *designs], table_cells(records)),
        "",
        "## Free blocks per order at the end (buddyinfo)",
        "",
        *_md_table(
            ["design", *(str(o) for o in range(NR_ORDERS))],
            [[r.design, *(_num(n) for n in r.buddyinfo)] for r in records],
        ),
        "",
        "## Plots",
        "",
        "Fragmentation score over the run:",
        "",
        "![fragmentation score](score.png)",
        "",
        "The pool's pageblocks at the end (colour: migrate type; shade: free / partly used / "
        "full; x: mixed):",
        "",
        "![pageblocks](pageblocks.png)",
        "",
        "Free blocks per order at the end:",
        "",
        "![buddyinfo](buddyinfo.png)",
        "",
        "Raw data: `runs.json` (one record per design), `timeline.csv` (one row per step).",
        "",
    ]
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------
MT_COLOURS = {
    MigrateType.UNMOVABLE: np.array([0.80, 0.15, 0.15]),
    MigrateType.MOVABLE: np.array([0.15, 0.55, 0.20]),
    MigrateType.RECLAIMABLE: np.array([0.15, 0.35, 0.80]),
}
STATE_NAMES = ("free", "partly used", "full")


def _shade(colour: np.ndarray, state: int) -> np.ndarray:
    """Free pageblocks pale, partly used ones mid, full ones the full colour."""
    mix = (0.2, 0.6, 1.0)[state]
    out: np.ndarray = 1.0 - mix * (1.0 - colour)
    return out


def _rgb(colour: np.ndarray) -> tuple[float, float, float]:
    r, g, b = (float(x) for x in colour)
    return (r, g, b)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


LINESTYLES = ("-", "--", "-.", ":")


def plot_score(results: Sequence[RunResult], path: Path) -> None:
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for i, res in enumerate(results):
        # Designs often coincide: vary the line so that every one stays visible.
        ls, lw = LINESTYLES[i % len(LINESTYLES)], 2.4 - 0.5 * (i % len(LINESTYLES))
        steps = [p.step for p in res.timeline]
        for ax, ys in (
            (ax1, [p.score for p in res.timeline]),
            (ax2, [p.order9_free for p in res.timeline]),
        ):
            ax.step(steps, ys, where="post", label=res.record.design, linestyle=ls, linewidth=lw)
    ax1.set_ylabel("fragmentation score")
    ax1.set_ylim(-2, 102)
    ax1.set_title("Fragmentation score (100 × unusable free index at order 9)")
    ax1.legend(loc="best")
    ax2.set_ylabel("free order-9 blocks")
    ax2.set_xlabel("workload step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    _save(fig, path)


def pool_map_rgb(record: RunRecord, width: int) -> np.ndarray:
    n = len(record.pageblock_types)
    rows = -(-n // width)
    img = np.ones((rows, width, 3))
    for b, (mt, st) in enumerate(zip(record.pageblock_types, record.pageblock_states, strict=True)):
        img[b // width, b % width] = _shade(MT_COLOURS[MigrateType(mt)], st)
    return img


def plot_pageblocks(records: Sequence[RunRecord], path: Path) -> None:
    n = max((len(r.pageblock_types) for r in records), default=1)
    width = 32 if n <= 512 else 64
    rows = -(-n // width)
    fig = Figure(figsize=(9, 1.0 + len(records) * (0.6 + rows * 0.2)), layout="constrained")
    axes = fig.subplots(len(records), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, records, strict=True):
        ax.imshow(pool_map_rgb(r, width), interpolation="nearest", aspect="equal")
        if r.pageblock_mixed:
            mixed = np.array(r.pageblock_mixed)
            ax.scatter(mixed % width, mixed // width, marker="x", c="black", s=14, linewidths=1)
        ax.set_title(f"{r.design}: {n} pageblocks of {PAGEBLOCK_NR_PAGES} pages", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=_rgb(MT_COLOURS[mt]), label=mt.name.lower()) for mt in MigrateType]
    handles += [
        Patch(color=_rgb(_shade(np.array([0.3, 0.3, 0.3]), s)), label=name)
        for s, name in enumerate(STATE_NAMES)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize=8)
    _save(fig, path)


def plot_buddyinfo(records: Sequence[RunRecord], path: Path) -> None:
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    orders = np.arange(NR_ORDERS)
    w = 0.8 / max(1, len(records))
    for i, r in enumerate(records):
        ax.bar(orders + (i - (len(records) - 1) / 2) * w, r.buddyinfo, width=w, label=r.design)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(orders)
    ax.set_xlabel("order (block of 2^order pages)")
    ax.set_ylabel("free blocks")
    ax.set_title("Free blocks per order at the end (buddyinfo)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    _save(fig, path)


# -- files -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReportFiles:
    directory: Path
    markdown: Path
    runs: Path
    timeline: Path
    plots: tuple[Path, ...]


def write_runs_json(records: Sequence[RunRecord], path: Path) -> None:
    path.write_text(json.dumps([r.to_json() for r in records], indent=1) + "\n", encoding="utf-8")


def write_timeline(results: Sequence[RunResult], path: Path) -> None:
    names = [f.name for f in fields(TimelinePoint)]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        for res in results:
            for p in res.timeline:
                w.writerow(astuple(p))


def write_report(workload: Workload, results: Sequence[RunResult], out: Path) -> ReportFiles:
    """Write report.md, runs.json, timeline.csv and the PNG plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    records = [r.record for r in results]
    md = out / "report.md"
    md.write_text(render_markdown(workload, records), encoding="utf-8")
    runs = out / "runs.json"
    write_runs_json(records, runs)
    timeline = out / "timeline.csv"
    write_timeline(results, timeline)
    plots = (out / "score.png", out / "pageblocks.png", out / "buddyinfo.png")
    plot_score(results, plots[0])
    plot_pageblocks(records, plots[1])
    plot_buddyinfo(records, plots[2])
    return ReportFiles(out, md, runs, timeline, plots)
