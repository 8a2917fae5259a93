"""Tables and plots of a sweep's or a fleet's results.csv (matplotlib's object API on Agg).

Sweeps: per metric, lines of the metric against the first grid parameter (one line per design:
the mean over seeds and the other parameters, with the min–max band), and with two or more
parameters a heatmap per design over the first two. Fleets: per metric, the CDF and the
histogram of the machines' values, one line per design, and the share of machines with no free
block of 2 MiB / 16 MiB / 1 GiB at the end.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gemfs.mm.types import PAGE_SIZE, parse_size
from tools.sweep import FREE_BLOCK_SIZES, number

CsvRow = Mapping[str, str]
LINESTYLES = ("-", "--", "-.", ":")
MAX_PANELS = 6  # values of a second parameter drawn as panels side by side


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)


def ok_rows(rows: Sequence[CsvRow]) -> list[CsvRow]:
    return [r for r in rows if r.get("status") == "ok"]


def values_of(rows: Sequence[CsvRow], metric: str) -> list[float]:
    out = []
    for r in rows:
        v = number(r.get(metric, ""))
        if v is not None and math.isfinite(v):
            out.append(v)
    return out


def _axis(values: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """A parameter's distinct values in a sensible order, and numeric positions if all are
    numbers or sizes (else None: categorical)."""
    distinct = list(dict.fromkeys(values))
    nums: list[float] = []
    for v in distinct:
        n = number(v)
        if n is None:
            try:
                n = float(parse_size(v))
            except ValueError:
                return distinct, None
        nums.append(n)
    order = sorted(range(len(distinct)), key=lambda i: nums[i])
    return [distinct[i] for i in order], [nums[i] for i in order]


# -- sweeps ----------------------------------------------------------------------------------------
def summary(
    rows: Sequence[CsvRow], params: Sequence[str], designs: Sequence[str], metric: str
) -> list[tuple[tuple[str, ...], dict[str, float | None]]]:
    """Per grid point (in the order first seen): the mean of the metric over seeds, per design."""
    points: dict[tuple[str, ...], dict[str, list[float]]] = {}
    for r in rows:
        point = tuple(r.get(p, "") for p in params)
        per = points.setdefault(point, {d: [] for d in designs})
        v = number(r.get(metric, "")) if r.get("status") == "ok" else None
        if v is not None and r.get("design") in per:
            per[r["design"]].append(v)
    return [
        (pt, {d: (float(np.mean(vs)) if vs else None) for d, vs in per.items()})
        for pt, per in points.items()
    ]


def plot_sweep(
    rows: Sequence[CsvRow],
    params: Sequence[str],
    designs: Sequence[str],
    metrics: Sequence[str],
    out: Path,
) -> list[Path]:
    """Lines (and heatmaps with two parameters or more) of each metric, per design."""
    out.mkdir(parents=True, exist_ok=True)
    good = ok_rows(rows)
    files: list[Path] = []
    if not good or not params:
        return files
    for metric in metrics:
        if not values_of(good, metric):
            continue
        files.append(_lines(good, params, designs, metric, out))
        if len(params) >= 2:
            files.append(_heatmaps(good, params[0], params[1], designs, metric, out))
    return files


def _lines(
    rows: Sequence[CsvRow], params: Sequence[str], designs: Sequence[str], metric: str, out: Path
) -> Path:
    """The metric against the first parameter, one line per design; with a second parameter,
    one panel per value of it (small multiples), so the band spans only seeds and the rest."""
    param = params[0]
    labels, xs = _axis([r.get(param, "") for r in rows])
    pos = xs if xs is not None else list(range(len(labels)))
    panels: list[tuple[str, list[CsvRow]]] = [("", list(rows))]
    if len(params) >= 2:
        second, _ = _axis([r.get(params[1], "") for r in rows])
        if len(second) <= MAX_PANELS:
            panels = [
                (f"{params[1]} = {v}", [r for r in rows if r.get(params[1]) == v]) for v in second
            ]
    fig = Figure(figsize=(4.2 * len(panels) + 1.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, sel) in zip(axes, panels, strict=True):
        for i, d in enumerate(designs):
            mean, lo, hi = [], [], []
            for label in labels:
                mine = [r for r in sel if r.get("design") == d and r.get(param) == label]
                vs = values_of(mine, metric)
                mean.append(float(np.mean(vs)) if vs else np.nan)
                lo.append(min(vs) if vs else np.nan)
                hi.append(max(vs) if vs else np.nan)
            ax.plot(pos, mean, marker="o", linestyle=LINESTYLES[i % 4], label=d)
            ax.fill_between(pos, lo, hi, alpha=0.15)
        if xs is None:
            ax.set_xticks(pos, labels)
        ax.set_xlabel(param)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend()
    fig.suptitle(f"{metric} against {param} (mean, min–max band over seeds and the rest)")
    return _save(fig, out / f"{_slug(metric)}.lines.png")


def _heatmaps(
    rows: Sequence[CsvRow], px: str, py: str, designs: Sequence[str], metric: str, out: Path
) -> Path:
    xl, _ = _axis([r.get(px, "") for r in rows])
    yl, _ = _axis([r.get(py, "") for r in rows])
    grids = []
    for d in designs:
        g = np.full((len(yl), len(xl)), np.nan)
        for j, y in enumerate(yl):
            for i, x in enumerate(xl):
                sel = [
                    r for r in rows if r.get("design") == d and r.get(px) == x and r.get(py) == y
                ]
                vs = values_of(sel, metric)
                if vs:
                    g[j, i] = float(np.mean(vs))
        grids.append(g)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.zeros(0)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(3.2 * len(designs) + 1.2, 3.6), layout="constrained")
    axes = fig.subplots(1, len(designs), squeeze=False)[0]
    im = None
    for ax, d, g in zip(axes, designs, grids, strict=True):
        im = ax.imshow(g, origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_xticks(range(len(xl)), xl, rotation=45, ha="right")
        ax.set_yticks(range(len(yl)), yl)
        ax.set_xlabel(px)
        ax.set_title(d)
        for j in range(len(yl)):
            for i in range(len(xl)):
                if np.isfinite(g[j, i]):
                    ax.text(i, j, f"{g[j, i]:.3g}", ha="center", va="center", fontsize=7, color="w")
    axes[0].set_ylabel(py)
    if im is not None:
        fig.colorbar(im, ax=list(axes), label=metric)
    fig.suptitle(f"{metric} (mean over seeds and other parameters)")
    return _save(fig, out / f"{_slug(metric)}.heatmap.png")


# -- fleets ----------------------------------------------------------------------------------------
FLEET_METRICS = (
    ("order9_free_mean", "free 2 MiB blocks, time-weighted mean"),
    ("alloc.failed", "huge-page allocations that failed during the run"),
    ("alloc_failures", "objects / files the pool could not hold"),
    ("costs.gpu_stall_ms", "GPU stall (modelled ms)"),
)


@dataclass(frozen=True, slots=True)
class Share:
    """Machines with no free block of a size at the end, among those whose pool can hold one."""

    none: int
    machines: int

    @property
    def fraction(self) -> float | None:
        return self.none / self.machines if self.machines else None


def _pool_bytes(r: CsvRow) -> int:
    return int(number(r.get("pool_pages", "")) or 0) * PAGE_SIZE


def with_derived(rows: Sequence[CsvRow]) -> list[dict[str, str]]:
    """Rows with ``alloc.failed`` (high-order allocations tried minus succeeded) added."""
    out = []
    for r in rows:
        d = dict(r)
        tried, ok = number(r.get("alloc.attempts", "")), number(r.get("alloc.successes", ""))
        d["alloc.failed"] = "" if tried is None or ok is None else str(int(tried - ok))
        out.append(d)
    return out


def fleet_stats(rows: Sequence[CsvRow], designs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per design: machines, failed runs, the share with no free 2 MiB / 16 MiB / 1 GiB block at
    the end, and p10 / p50 / p90 / mean of each fleet metric."""
    rows = with_derived(rows)
    stats: dict[str, dict[str, Any]] = {}
    for d in designs:
        mine = [r for r in rows if r.get("design") == d]
        good = ok_rows(mine)
        s: dict[str, Any] = {"machines": len(mine), "failed": len(mine) - len(good)}
        for name, pageblocks in FREE_BLOCK_SIZES:
            size = pageblocks * (2 << 20)
            able = [r for r in good if _pool_bytes(r) >= size]
            none = [r for r in able if number(r.get(f"free_blocks_end.{name}", "")) == 0]
            share = Share(len(none), len(able))
            s[f"no_free_{name}"] = {
                "machines": share.machines,
                "none": share.none,
                "share": share.fraction,
            }
        means = values_of(good, "order9_free_mean")
        s["order9_free_mean_below_1"] = {
            "machines": len(means),
            "none": sum(v < 1 for v in means),
            "share": sum(v < 1 for v in means) / len(means) if means else None,
        }
        for metric, _ in FLEET_METRICS:
            vs = values_of(good, metric)
            if vs:
                a = np.asarray(vs)
                p10, p50, p90 = np.percentile(a, [10, 50, 90]).tolist()
                s[metric] = {
                    "p10": p10,
                    "p50": p50,
                    "p90": p90,
                    "mean": float(a.mean()),
                    "max": float(a.max()),
                    "nonzero": float(np.count_nonzero(a) / len(a)),
                }
        stats[d] = s
    return stats


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def fleet_markdown(title: str, description: str, stats: Mapping[str, Mapping[str, Any]]) -> str:
    designs = list(stats)
    lines = [f"# {title}", "", description, "", "| | " + " | ".join(designs) + " |"]
    lines.append("|---|" + "---|" * len(designs))
    lines.append(
        "| machines (failed runs) | "
        + " | ".join(f"{stats[d]['machines']} ({stats[d]['failed']})" for d in designs)
        + " |"
    )
    for name, _ in FREE_BLOCK_SIZES:
        cells = []
        for d in designs:
            s = stats[d][f"no_free_{name}"]
            cells.append(
                f"{_pct(s['share'])} ({s['none']} of {s['machines']})"
                if s["machines"]
                else "n/a (no pool that large)"
            )
        lines.append(f"| no free {name} block at the end | " + " | ".join(cells) + " |")
    cells = []
    for d in designs:
        b = stats[d]["order9_free_mean_below_1"]
        cells.append(f"{_pct(b['share'])} ({b['none']} of {b['machines']})")
    lines.append(
        "| under one free 2MiB block on time-weighted average | " + " | ".join(cells) + " |"
    )
    for metric, label in FLEET_METRICS:
        cells = []
        for d in designs:
            m = stats[d].get(metric)
            cells.append("–" if m is None else f"{m['p50']:.3g} ({m['p10']:.3g}–{m['p90']:.3g})")
        lines.append(f"| {label}: p50 (p10–p90) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Free blocks at the end are naturally aligned, entirely free ranges counted from each "
        "run's per-pageblock states (2 MiB = a free pageblock, as buddyinfo's orders 9–10 say; "
        "16 MiB and 1 GiB are larger than the model's largest buddy block, order 10, so they are "
        "what a buddy allocator with a larger MAX_ORDER would hold). A share is over the machines "
        "whose pool can hold such a block at all. The end is after the workload's last phase: "
        "when that is a drain (huge pages asked for until one fails, then released), the end "
        "is what compaction could assemble; the time-weighted mean is the state during the run.",
        "",
    ]
    return "\n".join(lines)


def plot_fleet(rows: Sequence[CsvRow], designs: Sequence[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    good = ok_rows(with_derived(rows))
    files: list[Path] = []
    if not good:
        return files
    for metric, label in FLEET_METRICS:
        per = {d: values_of([r for r in good if r.get("design") == d], metric) for d in designs}
        if not any(per.values()):
            continue
        fig = Figure(figsize=(11, 4), layout="constrained")
        cdf, hist = fig.subplots(1, 2)
        _cdf(cdf, per, label)
        _hist(hist, per, label)
        fig.suptitle(f"{label} across the fleet ({metric})")
        files.append(_save(fig, out / f"{_slug(metric)}.cdf.png"))
    stats = fleet_stats(rows, designs)
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.add_subplot()
    names = [n for n, _ in FREE_BLOCK_SIZES]
    width = 0.8 / max(1, len(designs))
    for i, d in enumerate(designs):
        ys = [stats[d][f"no_free_{n}"]["share"] for n in names]
        xs = np.arange(len(names)) + i * width
        ax.bar(xs, [100 * y if y is not None else 0 for y in ys], width, label=d)
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, 1, "n/a" if y is None else f"{100 * y:.0f}%", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(names)) + width * (len(designs) - 1) / 2, names)
    ax.set_ylabel("machines with no free block at the end (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title("Share of the fleet without a free block of each size")
    files.append(_save(fig, out / "no-free-block.png"))
    return files


def _cdf(ax: Axes, per: Mapping[str, Sequence[float]], label: str) -> None:
    for i, (d, vs) in enumerate(per.items()):
        if not vs:
            continue
        xs = np.sort(np.asarray(vs))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax.step(xs, ys, where="post", linestyle=LINESTYLES[i % 4], label=d)
    ax.set_xlabel(label)
    ax.set_ylabel("share of machines ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()


def _hist(ax: Axes, per: Mapping[str, Sequence[float]], label: str) -> None:
    every = [v for vs in per.values() for v in vs]
    lo, hi = min(every), max(every)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 21).tolist()
    for i, (d, vs) in enumerate(per.items()):
        if vs:
            ax.hist(vs, bins=bins, histtype="step", linestyle=LINESTYLES[i % 4], label=d)
    ax.set_xlabel(label)
    ax.set_ylabel("machines")
    ax.legend()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
