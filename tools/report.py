"""The report of a run: ``report.md`` (the per-design table), PNG plots, ``runs.json`` and
``timeline.csv`` with the raw data.

A run plays every design under one or more seeds; ``runs.json`` keeps one
:class:`tools.player.RunRecord` per design and seed. The table aggregates them per design: every
cell is the mean across seeds with the min–max range in brackets ("44.3 (40–48)"), or just the
value when there is one seed or every seed gave the same value. Benefit (high-order allocations
while the workload runs, free order-9 blocks), cost (GPU stall, re-pins, callbacks, migrations,
refusals) and efficiency sit side by side in one table, metrics as rows and designs as columns so
that it reads at 80 columns as well as in a file. The end-of-run drain has a row of its own. Every
design figure is modelled; wall-clock figures of the harness are in a separate, labelled table.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no
display needed). Their x axis is modelled time; with several seeds a line is the mean across
seeds and the band their min–max, on the union of all sample times.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table

from gemfs.mm.types import NR_ORDERS, PAGE_SIZE, PAGEBLOCK_NR_PAGES, MigrateType, format_size
from tools.player import RunRecord, RunResult, TimelinePoint
from tools.workload import Workload

Value = int | float | None


# -- aggregation across seeds -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Stat:
    """One metric of one design across its seeds: ``n`` values out of ``runs`` records."""

    mean: float
    lo: float
    hi: float
    n: int
    runs: int

    @classmethod
    def of(cls, values: Sequence[Value]) -> Stat | None:
        """Mean, min and max of the values that exist (None and non-finite ones do not);
        None when no record has the metric."""
        xs = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not xs:
            return None
        return cls(
            mean=math.fsum(xs) / len(xs), lo=min(xs), hi=max(xs), n=len(xs), runs=len(values)
        )


def fmt_num(x: float) -> str:
    """A number for the table: integers plain, others to three significant digits."""
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 100:
        return str(round(x))
    if abs(x) < 0.001:
        return f"{x:.1e}"
    return f"{x:.3g}"


@dataclass(frozen=True, slots=True)
class Cell:
    """A table cell as parts ("44.3", "(40–48)"): one line on a wide console, stacked on a
    narrow one. ``wrap``: free text that the table may wrap at any space."""

    parts: tuple[str, ...]
    wrap: bool = False

    def text(self, stacked: bool = False) -> str:
        return ("\n" if stacked and not self.wrap else " ").join(self.parts)

    def need(self, stacked: bool) -> int:
        """Columns this cell needs without breaking a line the layout does not allow to break."""
        if self.wrap:
            return max((len(w) for w in self.text().split()), default=0)
        if stacked:
            return max((len(p) for p in self.parts), default=0)
        return len(self.text())


def stat_cell(s: Stat | None) -> Cell:
    """ "44.3 (40–48)"; just the value when there is one, or all are equal; "n/a" when none.
    A metric only some seeds have says how many: "3.2 (1–5) [2 of 3 seeds]"."""
    if s is None:
        return Cell(("n/a",))
    parts = [fmt_num(s.mean)]
    if s.lo != s.hi:
        parts.append(f"({fmt_num(s.lo)}–{fmt_num(s.hi)})")
    if s.n < s.runs:
        parts.append(f"[{s.n} of {s.runs} seeds]")
    return Cell(tuple(parts))


def fmt_stat(s: Stat | None) -> str:
    return stat_cell(s).text()


def by_design(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """The records grouped per design, designs in the order they first appear."""
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.design, []).append(r)
    return out


def _get(d: Mapping[str, Any], *keys: str) -> Value:
    """``d[k1][k2]…`` as a number, or None when a key is missing or the value is not a number."""
    x: Any = d
    for k in keys:
        if not isinstance(x, Mapping) or k not in x:
            return None
        x = x[k]
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return x


# -- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Metric:
    """One row: a number per record, aggregated across seeds; or a custom cell per design."""

    label: str
    value: Callable[[RunRecord], Value]
    cell: Callable[[Sequence[RunRecord]], Cell] | None = None
    # A design's own mechanism (pin-time migration, confine's region): the row is left out
    # when no record has a non-zero value for it.
    own: bool = False

    def shown(self, records: Sequence[RunRecord]) -> bool:
        return not self.own or any(self.value(r) for r in records)

    def render(self, runs: Sequence[RunRecord]) -> Cell:
        if self.cell is not None:
            return self.cell(runs)
        return stat_cell(Stat.of([self.value(r) for r in runs]))


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    metrics: tuple[Metric, ...]


def _alloc_latency(key: str) -> Callable[[RunRecord], Value]:
    def value(r: RunRecord) -> Value:
        # No latency without an allocation: a run with no attempts has no p50, not a p50 of 0.
        if not _get(r.alloc, "attempts"):
            return None
        return _get(r.alloc, "latency_us", key)

    return value


def _pageblocks(mt: MigrateType) -> Metric:
    name = mt.name.lower()

    def value(r: RunRecord) -> Value:
        return _get(r.pageblocks, name)

    return Metric(f"{name} pageblocks", value)


def drain_cell(runs: Sequence[RunRecord]) -> Cell:
    """ "44 (40–48)": the blocks the end-of-run drain got, a count, never a rate; "none" when
    the workload has no drain. Short, like every other cell, so that no column has to wrap."""
    drains = [r.drain for r in runs if r.drain]
    if not drains:
        return Cell(("n/a",))
    if not any(_get(d, "tried") for d in drains):
        return Cell(("none",))
    return stat_cell(Stat.of([_get(d, "blocks") for d in drains]))


def drain_stopped_cell(runs: Sequence[RunRecord]) -> Cell:
    """ "yes", "no" or "1 of 3 seeds": did the drain stop at a failure (rather than take every
    block the pool had)?"""
    drains = [r.drain for r in runs if r.drain and _get(r.drain, "tried")]
    if not drains:
        return Cell(("n/a",))
    stopped = sum(1 for d in drains if d.get("stopped_at_failure"))
    if stopped in (0, len(drains)):
        return Cell(("yes" if stopped else "no",))
    return Cell((f"{stopped} of {len(drains)}", "seeds"))


DRAIN_LABEL = "drain after idle: blocks got"

SECTIONS: tuple[Section, ...] = (
    Section(
        "benefit",
        (
            Metric("allocations tried", lambda r: _get(r.alloc, "attempts")),
            Metric("allocations succeeded", lambda r: _get(r.alloc, "successes")),
            Metric("succeeded via compaction", lambda r: _get(r.alloc, "compacted")),
            Metric("alloc latency p50 (µs)", _alloc_latency("p50")),
            Metric("alloc latency p99 (µs)", _alloc_latency("p99")),
            Metric("alloc latency max (µs)", _alloc_latency("max")),
            Metric("free order-9 blocks (time mean)", lambda r: r.order9_free_mean),
            Metric("huge pages recovered", lambda r: _get(r.efficiency, "hugepages_recovered")),
        ),
    ),
    Section(
        "cost",
        (
            Metric("GPU stall (ms)", lambda r: _get(r.costs, "gpu_stall_ms")),
            Metric("pages re-pinned", lambda r: _get(r.costs, "repinned_pages")),
            Metric("pages re-faulted", lambda r: _get(r.costs, "refaulted_pages")),
            Metric("owner callbacks", lambda r: _get(r.costs, "callbacks")),
            Metric("pages migrated", lambda r: _get(r.costs, "pages_migrated")),
            Metric("pages refused (distinct)", lambda r: _get(r.costs, "pages_refused")),
            Metric("refusals (EAGAIN answers)", lambda r: _get(r.costs, "refusals")),
            Metric("pages scanned", lambda r: _get(r.costs, "scanned_pages")),
            Metric("migration time (ms)", lambda r: _get(r.costs, "migration_ms")),
            Metric("waits (ms)", lambda r: _get(r.costs, "waits_ms")),
            Metric(
                "pages moved at pin time", lambda r: _get(r.costs, "pin_migrated_pages"), own=True
            ),
            Metric(
                "pin-time migration (ms)", lambda r: _get(r.costs, "pin_migration_ms"), own=True
            ),
            Metric(
                "pages evacuated (confine)", lambda r: _get(r.costs, "evacuated_pages"), own=True
            ),
            Metric("evacuation (ms)", lambda r: _get(r.costs, "evacuation_ms"), own=True),
            Metric("region grew (confine)", lambda r: _get(r.costs, "region_grows"), own=True),
            Metric("region shrank (confine)", lambda r: _get(r.costs, "region_shrinks"), own=True),
        ),
    ),
    Section(
        "efficiency",
        (
            Metric(
                "GPU stall per huge page (ms)",
                lambda r: _get(r.efficiency, "stall_ms_per_hugepage"),
            ),
            Metric(
                "pages migrated per huge page",
                lambda r: _get(r.efficiency, "migrated_per_hugepage"),
            ),
        ),
    ),
    Section(
        "correctness",
        (Metric("data errors", lambda r: r.data_errors),),
    ),
    Section(
        "end of run",
        (
            Metric(DRAIN_LABEL, lambda r: None, cell=drain_cell),
            Metric("drain stopped at a failure", lambda r: None, cell=drain_stopped_cell),
            Metric("drain order", lambda r: _get(r.drain, "order")),
        ),
    ),
    Section(
        "the pool",
        (
            Metric("free order-9 blocks before", lambda r: r.order9_before),
            Metric("free order-9 blocks after", lambda r: r.order9_after),
            Metric("order-9 ideal (free pages / 512)", lambda r: r.order9_ideal),
            Metric("free pages at end", lambda r: r.free_pages_end),
            Metric("free but unusable at order 9 (pages)", lambda r: r.unusable_free_order9_pages),
            Metric("fragmentation score at end", lambda r: r.fragmentation_score),
            Metric("fragmentation score peak", lambda r: r.fragmentation_score_peak),
            *(_pageblocks(mt) for mt in MigrateType),
            Metric("mixed pageblocks", lambda r: r.mixed_pageblocks),
            Metric("migrations done (vmstat)", lambda r: _get(r.migrations, "success")),
            Metric("migrations failed (vmstat)", lambda r: _get(r.migrations, "fail")),
            Metric("EAGAIN (vmstat)", lambda r: _get(r.migrations, "eagain")),
            Metric("GPU batches", lambda r: r.gpu_batches),
            Metric("page cache reclaimed (pages)", lambda r: r.reclaimed_pages),
            Metric("allocation failures", lambda r: r.alloc_failures),
            Metric("modelled time (s)", lambda r: r.sim_time_s),
        ),
    ),
)

# Wall-clock figures of the harness (tools.player.NONDETERMINISTIC): never among the design
# metrics, since they depend on the machine and its load, not on the design.
HARNESS = Section(
    "harness (wall clock, not modelled: depends on the machine and its load)",
    (
        Metric("run time (wall s)", lambda r: r.elapsed_s),
        Metric("owner callback latency p50 (wall µs)", lambda r: r.callback_p50_us),
        Metric("owner callback latency p99 (wall µs)", lambda r: r.callback_p99_us),
    ),
)


@dataclass(frozen=True, slots=True)
class TableRow:
    label: str
    cells: list[Cell]
    heading: bool = False


def _size_value(name: str, *keys: str) -> Callable[[RunRecord], Value]:
    def value(r: RunRecord) -> Value:
        return _get(r.alloc_sizes.get(name, {}), *keys)

    return value


def size_section(records: Sequence[RunRecord]) -> Section | None:
    """Allocations per size when a workload asks for more than one (e.g. 2 MiB and 16 MiB):
    successes, tries and latency of each, while the workload runs."""
    sizes: dict[str, int] = {}
    for r in records:
        for name, d in r.alloc_sizes.items():
            sizes[name] = int(d.get("order", 0))
    if len(sizes) < 2:
        return None
    metrics: list[Metric] = []
    for name in sorted(sizes, key=lambda k: sizes[k]):
        metrics.append(Metric(f"{name}: succeeded", _size_value(name, "successes")))
        metrics.append(Metric(f"{name}: tried", _size_value(name, "attempts")))
        metrics.append(Metric(f"{name}: latency p99 (µs)", _size_value(name, "latency_us", "p99")))
    return Section("benefit by allocation size", tuple(metrics))


def table_rows(
    records: Sequence[RunRecord], sections: Sequence[Section] = SECTIONS
) -> list[TableRow]:
    """The table: a heading row per section, then one row per metric, one cell per design
    (aggregated across that design's seeds)."""
    groups = list(by_design(records).values())
    rows: list[TableRow] = []
    if sections is SECTIONS:
        extra = size_section(records)
        if extra is not None:
            sections = (*SECTIONS[:1], extra, *SECTIONS[1:])
    for section in sections:
        rows.append(TableRow(section.title, [Cell(()) for _ in groups], heading=True))
        for m in section.metrics:
            if m.shown(records):
                rows.append(TableRow(m.label, [m.render(runs) for runs in groups]))
    return rows


# -- side by side: one row per design ------------------------------------------------------
def _section_metric(label: str) -> Metric:
    return next(m for sec in SECTIONS for m in sec.metrics if m.label == label)


def _short(short: str, label: str) -> Metric:
    """The full table's row ``label`` (one definition of its value) under a short heading."""
    return Metric(short, _section_metric(label).value)


SUMMARY: tuple[Metric, ...] = (
    _short("free 2M", "free order-9 blocks (time mean)"),
    _short("ok", "allocations succeeded"),
    _short("tried", "allocations tried"),
    Metric("drain", lambda r: _get(r.drain, "blocks")),  # the full row's cell adds a note
    _short("stall ms", "GPU stall (ms)"),
    _short("migrated", "pages migrated"),
    _short("callbacks", "owner callbacks"),
    _short("refaulted", "pages re-faulted"),
)


SUMMARY_KEY = (
    "free 2M: free 2 MiB blocks, mean over modelled time; ok/tried: high-order allocations; "
    "drain: blocks the final drain got; stall ms: GPU stall; migrated, refaulted: pages; "
    "callbacks: owner callbacks"
)


def summary_rows(records: Sequence[RunRecord]) -> list[tuple[str, list[Cell]]]:
    """Benefit and cost side by side, one row per design (mean across seeds, min–max)."""
    return [(d, [m.render(runs) for m in SUMMARY]) for d, runs in by_design(records).items()]


def summary_table(records: Sequence[RunRecord], width: int | None = None) -> RenderableType:
    """The designs as rows: readable with a dozen designs. When the one-line layout is wider
    than ``width``, ranges go under their means, then benefit and cost become two tables."""
    rows = summary_rows(records)
    design_width = max((len(d) for d, _ in rows), default=6)

    def build(columns: Sequence[int], stacked: bool, title: str, caption: str | None) -> Table:
        t = Table(
            title=title or None,
            caption=caption,
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        t.add_column("design", no_wrap=True, width=max(design_width, 6))
        for i in columns:
            need = max([len(SUMMARY[i].label), *(cells[i].need(stacked) for _, cells in rows)])
            t.add_column(SUMMARY[i].label, justify="right", no_wrap=True, width=need)
        for design, cells in rows:
            t.add_row(design, *(cells[i].text(stacked) for i in columns))
        return t

    title = "side by side (mean across seeds; min–max)"
    every = list(range(len(SUMMARY)))
    for stacked in (False, True):
        t = build(every, stacked, title, SUMMARY_KEY)
        if width is None or _fixed_width(t) <= width:
            return t
    half = len(SUMMARY) // 2  # benefit | cost
    return Group(
        build(every[:half], True, f"{title}: benefit", None),
        build(every[half:], True, "cost", SUMMARY_KEY),
    )


# The metric column is never squeezed below this (it wraps at spaces above it); a one-line
# ("inline") layout is used only when it leaves the labels at least INLINE_LABEL columns.
MIN_LABEL = 16
INLINE_LABEL = 28


def _table(
    rows: Sequence[TableRow],
    designs: Sequence[str],
    columns: Sequence[int],
    stacked: bool,
    label_width: int,
    title: str,
    headings: bool,
) -> Table:
    """``designs`` and ``columns`` (indices into each row's cells) with fixed widths."""
    t = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("metric", width=label_width)
    for i in columns:
        width = max([len(designs[i]), *(r.cells[i].need(stacked) for r in rows if not r.heading)])
        t.add_column(designs[i], justify="right", width=width)
    for k, row in enumerate(rows):
        last = k + 1 == len(rows) or rows[k + 1].heading
        if row.heading:
            if headings:
                t.add_row(row.label, *("" for _ in columns), style="bold", end_section=last)
        else:
            cells = (row.cells[i].text(stacked) for i in columns)
            t.add_row(row.label, *cells, end_section=last)
    return t


def _fixed_width(t: Table) -> int:
    return natural_width(Console(width=1 << 16, color_system=None), t)


def rich_table(
    records: Sequence[RunRecord],
    title: str = "",
    sections: Sequence[Section] = SECTIONS,
    headings: bool = True,
    width: int | None = None,
) -> RenderableType:
    """Metrics as rows, designs as columns, at most ``width`` columns wide (None: as wide as
    the table is, nothing wrapped). Narrower consoles get, in turn: labels wrapped; a cell's
    range under its mean; the designs in several tables, each with the labels."""
    rows = table_rows(records, sections)
    shown = rows if headings else [r for r in rows if not r.heading]
    designs = list(by_design(records))
    longest = max((len(r.label) for r in shown), default=6)
    if width is None:
        return _table(shown, designs, range(len(designs)), False, longest, title, headings)

    def fit(columns: Sequence[int], stacked: bool, least: int, title: str = title) -> Table | None:
        # The width the value columns and the borders take, measured with a 1-column label.
        probe = _table(shown, designs, columns, stacked, 1, "", headings)
        room = width - (_fixed_width(probe) - 1)
        if room < min(least, longest):
            return None
        return _table(shown, designs, columns, stacked, min(room, longest), title, headings)

    every = list(range(len(designs)))
    table = fit(every, False, INLINE_LABEL) or fit(every, True, MIN_LABEL)
    if table is not None:
        return table
    for k in range(len(designs) - 1, 0, -1):
        chunks = [every[i : i + k] for i in range(0, len(every), k)]
        tables = [fit(c, True, MIN_LABEL, title if n == 0 else "") for n, c in enumerate(chunks)]
        if all(t is not None for t in tables):
            return Group(*(t for t in tables if t is not None))
    # Not even one design beside the labels: give the labels what is left and let rich fold.
    return Group(
        *(
            _table(shown, designs, [i], True, MIN_LABEL, title if i == 0 else "", headings)
            for i in every
        )
    )


def render_text(renderable: RenderableType, width: int) -> str:
    """What a console of ``width`` columns prints (no colour, no escape codes)."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return out.getvalue()


def natural_width(console: Console, renderable: RenderableType) -> int:
    """The width the renderable takes when nothing has to wrap."""
    return console.measure(renderable, options=console.options.update_width(1 << 16)).maximum


def table_width(console: Console) -> int | None:
    """The width to lay tables out for: the terminal's; None (full width) when the output
    goes to a file or a pipe. Call :func:`widen` before printing a full-width table there."""
    return console.width if console.is_terminal else None


def widen(console: Console, *renderables: RenderableType) -> None:
    """Piped to a file, rich would wrap at 80 columns: widen the console to the renderables."""
    if not console.is_terminal:
        widths = [natural_width(console, r) for r in renderables]
        titles = [
            len(r.title) for r in renderables if isinstance(r, Table) and isinstance(r.title, str)
        ]
        console.width = max([console.width, *widths, *titles])


# -- provenance ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CostEntry:
    name: str
    value: str
    unit: str
    source: str


@dataclass(frozen=True, slots=True)
class Provenance:
    backends: tuple[str, ...]
    seeds: tuple[int, ...]
    versions: tuple[str, ...]
    version_from_records: bool
    workload_file: str
    # The driver policies the records name (wait-idle, i915-2016, per-page-flush; ", display
    # off" when the driver ran without a lit display), with the designs that ran under each;
    # empty when the records do not say.
    driver_policies: tuple[tuple[str, tuple[str, ...]], ...]
    # Each distinct cost table with the designs that used it (normally one for all).
    cost_tables: tuple[tuple[tuple[CostEntry, ...], tuple[str, ...]], ...]


def installed_version() -> str:
    try:
        return importlib.metadata.version("gemfs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cost_entries(
    table: Mapping[str, Any], sources: Mapping[str, Any] | None = None
) -> tuple[CostEntry, ...]:
    """A cost table as rows. An entry is a number, or a mapping with ``value`` and optionally
    ``unit`` and ``source``; ``sources`` (``provenance["cost_sources"]``) may name the rest."""
    out = []
    for name, v in table.items():
        unit, source = "", ""
        if isinstance(v, Mapping):
            value = v.get("value", "")
            unit = str(v.get("unit", ""))
            source = str(v.get("source", ""))
        else:
            value = v
        if not source and sources and name in sources:
            source = str(sources[name])
        text = fmt_num(float(value)) if isinstance(value, int | float) else str(value)
        out.append(CostEntry(str(name), text, unit, source))
    return tuple(out)


def provenance(workload: Workload, records: Sequence[RunRecord]) -> Provenance:
    versions = tuple(
        dict.fromkeys(str(v) for r in records if (v := r.provenance.get("gemfs_version")))
    )
    files = [str(f) for r in records if (f := r.provenance.get("workload_file"))]
    policies: dict[str, list[str]] = {}
    for r in records:
        if (pol := r.provenance.get("driver_policy")) is not None:
            off = r.provenance.get("display") == "off"  # (the default, on, goes unsaid)
            used = policies.setdefault(f"{pol}, display off" if off else str(pol), [])
            if r.design not in used:
                used.append(r.design)
    tables: dict[str, tuple[tuple[CostEntry, ...], list[str]]] = {}
    for r in records:
        table = r.provenance.get("cost_table")
        if not table:
            continue
        key = json.dumps(table, sort_keys=True, default=str)
        entries = cost_entries(table, r.provenance.get("cost_sources"))
        designs = tables.setdefault(key, (entries, []))[1]
        if r.design not in designs:
            designs.append(r.design)
    return Provenance(
        backends=tuple(dict.fromkeys(r.backend for r in records)),
        seeds=tuple(dict.fromkeys(r.seed for r in records)),
        versions=versions or (installed_version(),),
        version_from_records=bool(versions),
        workload_file=files[0] if files else workload.path,
        driver_policies=tuple((k, tuple(v)) for k, v in policies.items()),
        cost_tables=tuple((e, tuple(d)) for e, d in tables.values()),
    )


def provenance_line(p: Provenance) -> str:
    """One line for the terminal: backend, seeds, version, cost table."""
    costs = (
        f"cost table of {len(p.cost_tables[0][0])} entries (report.md)"
        if len(p.cost_tables) == 1
        else f"{len(p.cost_tables)} cost tables (report.md)"
        if p.cost_tables
        else "no cost table in the records"
    )
    driver = f"; driver {_policies(p)}" if p.driver_policies else ""
    return (
        f"backend {', '.join(p.backends)}; seeds {', '.join(map(str, p.seeds))}; "
        f"gemfs {', '.join(p.versions)}{driver}; {costs}"
    )


def _policies(p: Provenance) -> str:
    """``wait-idle``, or per policy the designs that ran under it when they differ."""
    if len(p.driver_policies) == 1:
        return p.driver_policies[0][0]
    return "; ".join(f"{pol} ({', '.join(ds)})" for pol, ds in p.driver_policies)


# -- Markdown ------------------------------------------------------------------------------------
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return out


def _md_rows(rows: Sequence[TableRow]) -> list[list[str]]:
    return [
        [f"**{r.label}**" if r.heading else r.label, *(c.text() for c in r.cells)] for r in rows
    ]


def _md_provenance(p: Provenance) -> list[str]:
    version = ", ".join(p.versions) + (
        "" if p.version_from_records else " (the installed package; the records do not say)"
    )
    lines = [
        "## Provenance",
        "",
        f"- backend: {', '.join(p.backends)}",
        f"- seeds: {', '.join(map(str, p.seeds))} ({len(p.seeds)} per design)",
        f"- gemfs version: {version}",
        f"- workload file: `{p.workload_file}`",
        f"- driver policy: {_policies(p) if p.driver_policies else 'not in the records'}",
        "",
    ]
    if not p.cost_tables:
        lines += ["The records carry no cost table.", ""]
    for entries, designs in p.cost_tables:
        used = "every design" if len(p.cost_tables) == 1 else ", ".join(designs)
        lines += [f"Cost table ({used}):", ""]
        lines += _md_table(
            ["cost", "value", "unit", "source"],
            [[e.name, e.value, e.unit, e.source] for e in entries],
        )
        lines.append("")
    return lines


def render_markdown(workload: Workload, records: Sequence[RunRecord]) -> str:
    groups = by_design(records)
    designs = list(groups)
    prov = provenance(workload, records)
    seeds = ", ".join(map(str, prov.seeds))
    lines = [
        f"# gemfs run: {workload.name}",
        "",
        workload.description or "",
        "",
        f"Workload `{workload.path}`: pool {format_size(workload.pool)} "
        f"({workload.pool_pages} pages of {PAGE_SIZE} bytes), seeds {seeds}, "
        f"compactor proactiveness {workload.compactor.proactiveness}, "
        f"backend {', '.join(prov.backends)}. Designs: {', '.join(designs)}.",
        "",
        *_md_provenance(prov),
        "## Results",
        "",
        f"Each cell is the mean across the {len(prov.seeds)} seed(s) with the min–max range in "
        "brackets; a single number means one seed, or every seed gave that value; n/a means the "
        "records do not have the metric. All times are modelled time.",
        "",
        "- **benefit**: the high-order allocations made while the workload runs (its probes, "
        "not the drain): how many were tried and succeeded, counted, and the modelled latency "
        "each saw; free order-9 blocks averaged over modelled time; huge pages compaction "
        "recovered.",
        "- **cost**: what the GPU and the core paid, in modelled time and pages; pages refused "
        "counts distinct pages, refusals every `EAGAIN` answer.",
        "- **efficiency**: GPU stall and pages migrated per huge page recovered.",
        '- **end of run**: the drain after idle (a `count = "all"` probe at the end) as the '
        "number of blocks it got; it stops at its first failure, so it is a count, not a rate "
        "(the next row says whether it stopped at one).",
        '- **the pool**: at the end of the run, except "before" and "after", taken around the '
        "first explicit compaction when the workload has one, else at the start and the end. "
        "Order-9 blocks are counted in 2 MiB units.",
        "",
        *_md_table(["metric", *designs], _md_rows(table_rows(records))),
        "",
        "### Side by side",
        "",
        f"The same figures, one row per design: benefit beside cost. {SUMMARY_KEY}.",
        "",
        *_md_table(
            ["design", *(m.label for m in SUMMARY)],
            [[d, *(c.text() for c in cells)] for d, cells in summary_rows(records)],
        ),
        "",
        "## Harness (wall clock)",
        "",
        "Measured on this machine's clock: they vary with its load between two runs of the "
        "same seed, and are not design metrics.",
        "",
        *_md_table(["metric", *designs], _md_rows(table_rows(records, (HARNESS,))[1:])),
        "",
        "## Free blocks per order at the end (buddyinfo)",
        "",
        *_md_table(
            ["design", "seed", *(str(o) for o in range(NR_ORDERS))],
            [[r.design, str(r.seed), *(str(n) for n in r.buddyinfo)] for r in records],
        ),
        "",
        "## Plots",
        "",
        "Free order-9 blocks over modelled time (line: mean across seeds; band: min–max):",
        "",
        "![free order-9 blocks](order9.png)",
        "",
        "Fragmentation score over modelled time (line: mean across seeds; band: min–max):",
        "",
        "![fragmentation score](score.png)",
        "",
        "The pool's pageblocks at the end, first seed of each design (colour: migrate type; "
        "shade: free / partly used / full; x: mixed):",
        "",
        "![pageblocks](pageblocks.png)",
        "",
        "Free blocks per order at the end (bar: mean across seeds; whisker: min–max):",
        "",
        "![buddyinfo](buddyinfo.png)",
        "",
        "![benefit against cost](benefit-cost.png)",
        "",
        "Raw data: `runs.json` (one record per design and seed), `timeline.csv` (one row per "
        "step, per design and seed).",
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
TIME_LABEL = "modelled time (s)"


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


def time_grid(results: Sequence[RunResult]) -> np.ndarray:
    """Every sample time of every run: the common grid the seed bands are drawn on."""
    times = [np.array([p.time_s for p in res.timeline], dtype=float) for res in results]
    grid: np.ndarray = np.unique(np.concatenate(times)) if times else np.zeros(1)
    return grid


def on_grid(timeline: Sequence[TimelinePoint], attr: str, grid: np.ndarray) -> np.ndarray:
    """A run's metric as a step function on the grid: the last sample at or before each time
    (the last one wins when several share a time), NaN after the run's end."""
    t = np.array([p.time_s for p in timeline], dtype=float)
    y = np.array([float(getattr(p, attr)) for p in timeline])
    idx = np.searchsorted(t, grid, side="right") - 1
    out = np.where(idx >= 0, y[np.clip(idx, 0, len(y) - 1)], np.nan)
    out[grid > t[-1]] = np.nan
    result: np.ndarray = out
    return result


@dataclass(frozen=True, slots=True)
class Band:
    """One design's metric across seeds on the grid: mean, min and max per grid time."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def seed_band(results: Sequence[RunResult], attr: str, grid: np.ndarray) -> Band:
    ys = np.vstack([on_grid(res.timeline, attr, grid) for res in results])
    live = ~np.all(np.isnan(ys), axis=0)
    mean = np.full(grid.shape, np.nan)
    lo, hi = mean.copy(), mean.copy()
    mean[live] = np.nanmean(ys[:, live], axis=0)
    lo[live] = np.nanmin(ys[:, live], axis=0)
    hi[live] = np.nanmax(ys[:, live], axis=0)
    return Band(mean, lo, hi)


def _results_by_design(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for res in results:
        out.setdefault(res.record.design, []).append(res)
    return out


def _plot_bands(ax: Axes, results: Sequence[RunResult], attr: str) -> None:
    grid = time_grid(results)
    for i, (design, runs) in enumerate(_results_by_design(results).items()):
        # Designs often coincide: vary the line so that every one stays visible.
        ls, lw = LINESTYLES[i % len(LINESTYLES)], 2.4 - 0.5 * (i % len(LINESTYLES))
        band = seed_band(runs, attr, grid)
        label = design if len(runs) == 1 else f"{design} ({len(runs)} seeds)"
        (line,) = ax.step(grid, band.mean, where="post", label=label, linestyle=ls, linewidth=lw)
        if len(runs) > 1:
            ax.fill_between(
                grid, band.lo, band.hi, step="post", alpha=0.18, color=line.get_color(), lw=0
            )
    ax.set_xlabel(TIME_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def plot_order9(results: Sequence[RunResult], path: Path) -> None:
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    _plot_bands(ax, results, "order9_free")
    ax.set_ylabel("free order-9 blocks (2 MiB units)")
    ax.set_ylim(bottom=0)
    ax.set_title("Free order-9 blocks over the run (line: mean across seeds; band: min–max)")
    _save(fig, path)


def plot_score(results: Sequence[RunResult], path: Path) -> None:
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    _plot_bands(ax, results, "score")
    ax.set_ylabel("fragmentation score")
    ax.set_ylim(-2, 102)
    ax.set_title("Fragmentation score (100 × unusable free index at order 9)")
    _save(fig, path)


def pool_map_rgb(record: RunRecord, width: int) -> np.ndarray:
    n = len(record.pageblock_types)
    rows = -(-n // width)
    img = np.ones((rows, width, 3))
    for b, (mt, st) in enumerate(zip(record.pageblock_types, record.pageblock_states, strict=True)):
        img[b // width, b % width] = _shade(MT_COLOURS[MigrateType(mt)], st)
    return img


def plot_pageblocks(records: Sequence[RunRecord], path: Path) -> None:
    """The pool map at the end, for the first seed of each design."""
    firsts = [runs[0] for runs in by_design(records).values()]
    n = max((len(r.pageblock_types) for r in firsts), default=1)
    width = 32 if n <= 512 else 64
    rows = -(-n // width)
    fig = Figure(figsize=(9, 1.0 + len(firsts) * (0.6 + rows * 0.2)), layout="constrained")
    axes = fig.subplots(len(firsts), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, firsts, strict=True):
        ax.imshow(pool_map_rgb(r, width), interpolation="nearest", aspect="equal")
        if r.pageblock_mixed:
            mixed = np.array(r.pageblock_mixed)
            ax.scatter(mixed % width, mixed // width, marker="x", c="black", s=14, linewidths=1)
        ax.set_title(
            f"{r.design} (seed {r.seed}): {n} pageblocks of {PAGEBLOCK_NR_PAGES} pages",
            fontsize=10,
        )
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
    groups = by_design(records)
    w = 0.8 / max(1, len(groups))
    for i, (design, runs) in enumerate(groups.items()):
        counts = np.array([r.buddyinfo for r in runs], dtype=float)
        mean = counts.mean(axis=0)
        x = orders + (i - (len(groups) - 1) / 2) * w
        label = design if len(runs) == 1 else f"{design} ({len(runs)} seeds)"
        ax.bar(x, mean, width=w, label=label)
        if len(runs) > 1:
            err = np.vstack([mean - counts.min(axis=0), counts.max(axis=0) - mean])
            ax.errorbar(x, mean, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
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


PLOTS = ("order9.png", "score.png", "pageblocks.png", "buddyinfo.png", "benefit-cost.png")


def write_runs_json(records: Sequence[RunRecord], path: Path) -> None:
    path.write_text(json.dumps([r.to_json() for r in records], indent=1) + "\n", encoding="utf-8")


def timeline_columns() -> list[str]:
    names = [f.name for f in fields(TimelinePoint)]
    return [names[0], "seed", *names[1:]]


def write_timeline(results: Sequence[RunResult], path: Path) -> None:
    """One row per sample: the timeline point's fields, with the run's seed after the design."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(timeline_columns())
        for res in results:
            for p in res.timeline:
                design, *rest = astuple(p)
                w.writerow([design, res.record.seed, *rest])


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
    plots = tuple(out / name for name in PLOTS)
    plot_order9(results, plots[0])
    plot_score(results, plots[1])
    plot_pageblocks(records, plots[2])
    plot_buddyinfo(records, plots[3])
    plot_benefit_cost(records, plots[4])
    return ReportFiles(out, md, runs, timeline, plots)


# -- benefit against cost, one point per design ---------------------------------------------
BenefitCost = tuple[str, tuple[float, float, float], tuple[float, float, float]]


def benefit_cost_points(
    records: Sequence[RunRecord],
    benefit: Callable[[RunRecord], float],
    cost: Callable[[RunRecord], float],
) -> list[BenefitCost]:
    """Per design: (name, (cost mean, min, max), (benefit mean, min, max)) over its seeds."""
    out: list[BenefitCost] = []
    for design, runs in by_design(records).items():
        c = np.array([cost(r) for r in runs], dtype=float)
        b = np.array([benefit(r) for r in runs], dtype=float)
        out.append(
            (
                design,
                (float(c.mean()), float(c.min()), float(c.max())),
                (float(b.mean()), float(b.min()), float(b.max())),
            )
        )
    return out


def _stall_ms(r: RunRecord) -> float:
    return float(r.costs.get("gpu_stall_ms", 0.0) or 0.0)


def _compaction_ms(r: RunRecord) -> float:
    """The CPU side of the bill: migration copies, scanning and the waits of the compactions."""
    c = r.costs
    return sum(float(c.get(k, 0.0) or 0.0) for k in ("migration_ms", "scan_ms", "waits_ms"))


def _scatter(ax: Axes, points: Sequence[BenefitCost], xlabel: str, ylabel: str) -> None:
    for i, (design, (cx, clo, chi), (by, blo, bhi)) in enumerate(points):
        colour = f"C{i % 10}"
        ax.errorbar(
            cx,
            by,
            xerr=[[cx - clo], [chi - cx]],
            yerr=[[by - blo], [bhi - by]],
            fmt="o",
            color=colour,
            capsize=3,
            label=design,
        )
    # one label per point: designs that land on the same spot share it ("shmem-hook, gemfs")
    spots: dict[tuple[float, float], list[str]] = {}
    for design, (cx, _lo, _hi), (by, _blo, _bhi) in points:
        spots.setdefault((round(cx, 9), round(by, 9)), []).append(design)
    for (cx, by), names in spots.items():
        label = "\n".join(", ".join(names[i : i + 3]) for i in range(0, len(names), 3))
        text = ax.annotate(
            label, (cx, by), textcoords="offset points", xytext=(5, 4), fontsize=8, va="bottom"
        )
        text.set_in_layout(False)  # many designs on one spot must not squeeze the axes away
    top = max((c[2] for _, c, _b in points), default=0.0)
    # symlog: designs that cost nothing sit at 0, the others spread over decades
    ax.set_xscale("symlog", linthresh=max(top / 1000, 1e-3))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def plot_benefit_cost(records: Sequence[RunRecord], path: Path) -> None:
    """What each design buys back against what it costs: time-weighted free 2 MiB blocks
    against the GPU's stall (left) and against the compactions' own time (right); points are
    the mean over seeds, bars the min–max."""
    benefit = "free 2 MiB blocks, time-weighted mean"
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    panels = (
        (_stall_ms, "GPU stall (ms, symlog)", "benefit against GPU stall"),
        (
            _compaction_ms,
            "migration + scanning + waits (ms, symlog)",
            "benefit against compaction time",
        ),
    )
    for ax, (cost, xlabel, title) in zip(fig.subplots(1, 2), panels, strict=True):
        points = benefit_cost_points(records, lambda r: r.order9_free_mean, cost)
        _scatter(ax, points, xlabel, benefit)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Benefit against cost per design (mean across seeds; bars: min–max)")
    _save(fig, path)
