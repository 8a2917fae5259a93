"""Kernel vs model: the shapes compared, the tolerance, the verdict, the JSON and the plot.

Compared per scenario (the shapes a model of this size can honestly match):

- ``fraction_after``: free 2 MiB blocks after compaction as a fraction of the ideal
  (free pages // 512);
- ``recovered_fraction``: how much of what the holes cost compaction won back,
  (after − before) / (ideal − before);
- ``blocked``: whether pinning blocked recovery (recovered < 0.25);
- ``hugepages_fraction``: what the ``nr_hugepages`` loop got through the allocator's own direct
  compaction, for every scenario (for the ``*-nocompact`` ones it is the only outcome).

Direct compaction is history-dependent, so both sides are distributions: the kernel over boots,
the model over the knobs each boot's before-state gives times several seeds (see
:mod:`tools.calibrate.model`). A scenario agrees when, for every figure, the model's mean is within
the tolerance of the kernel's mean — the base tolerance plus half the kernel's own boot-to-boot
range on that figure — and ``blocked`` is the same on the means. Nothing is chosen from the
outcome: the chunk stream's phase is measured in the guest (pagemap), not tried both ways.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.calibrate.guest import GuestRun, KernelResult, KernelSnapshot
from tools.calibrate.model import (
    BLOCKED_BELOW,
    Carry,
    Knobs,
    ModelResult,
    knobs_from_kernel,
    run_model,
)


@dataclass(frozen=True)
class Tolerance:
    fraction_after: float = 0.10
    recovered: float = 0.10
    hugepages: float = 0.10
    reason: str = (
        "±0.10 of the ideal on each figure (order-9 after compaction, recovered, huge pages "
        "obtained) plus half the kernel's own boot-to-boot range on that figure: the base is "
        "less than half the smallest gap between distinct outcomes (mixed 0.73 vs movable "
        "0.94), so a model with the wrong mechanism cannot pass, and above what the model "
        "leaves out (one zone, no per-cpu lists, the kernel's own allocations as fixed holes: "
        "1-6% of free memory); the spread term because a model cannot be asked to predict one "
        "boot more closely than boots predict each other (direct compaction without "
        "compact_memory: 0.49-0.93 of the ideal on one pattern); one 2 MiB block is 0.008"
    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCE = Tolerance()


@dataclass(frozen=True)
class Shape:
    """What is compared, from either side."""

    order9_before: int
    order9_after: int
    ideal_order9: int
    fraction_before: float
    fraction_after: float
    recovered_fraction: float
    hugepages: int
    hugepages_fraction: float

    @property
    def blocked(self) -> bool:
        return self.recovered_fraction < BLOCKED_BELOW

    @classmethod
    def of(cls, result: KernelResult | ModelResult) -> Shape:
        return cls(
            order9_before=result.order9_before,
            order9_after=result.order9_after,
            ideal_order9=result.ideal_order9,
            fraction_before=result.fraction_before,
            fraction_after=result.fraction_after,
            recovered_fraction=result.recovered_fraction,
            hugepages=result.hugepages_obtained,
            hugepages_fraction=result.hugepages_fraction,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "blocked": self.blocked}


@dataclass(frozen=True)
class Spread:
    """Mean and range of one figure over boots or seeds."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values")
        return cls(sum(values) / len(values), min(values), max(values), len(values))

    @property
    def half_range(self) -> float:
        return (self.hi - self.lo) / 2

    def text(self) -> str:
        if self.n == 1 or self.hi - self.lo < 0.005:
            return f"{self.mean:.2f}"
        return f"{self.mean:.2f} [{self.lo:.2f}–{self.hi:.2f}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": round(self.mean, 4),
            "min": round(self.lo, 4),
            "max": round(self.hi, 4),
            "n": self.n,
        }


FIGURES = ("fraction_before", "fraction_after", "recovered_fraction", "hugepages_fraction")


def spreads(shapes: Sequence[Shape]) -> dict[str, Spread]:
    return {f: Spread.of([getattr(s, f) for s in shapes]) for f in FIGURES}


def mean_shape(shapes: Sequence[Shape]) -> Shape:
    """The mean of several shapes (block counts rounded)."""
    n = len(shapes)

    def avg(f: str) -> float:
        return float(sum(getattr(s, f) for s in shapes)) / n

    return Shape(
        order9_before=round(avg("order9_before")),
        order9_after=round(avg("order9_after")),
        ideal_order9=round(avg("ideal_order9")),
        fraction_before=avg("fraction_before"),
        fraction_after=avg("fraction_after"),
        recovered_fraction=avg("recovered_fraction"),
        hugepages=round(avg("hugepages")),
        hugepages_fraction=avg("hugepages_fraction"),
    )


def disagreements(
    kernel: Sequence[Shape],
    model: Sequence[Shape],
    tol: Tolerance = TOLERANCE,
    *,
    compacted: bool = True,
) -> list[str]:
    """Why the model's distribution disagrees with the kernel's; empty when it agrees.

    Without ``compact_memory`` (``compacted=False``) after equals before on both sides; the
    huge pages the loop obtained are compared for every scenario."""
    k, m = spreads(kernel), spreads(model)
    checks = [("hugepages_fraction", "hugepages", tol.hugepages)]
    if compacted:
        checks = [
            ("fraction_after", "order-9 after", tol.fraction_after),
            ("recovered_fraction", "recovered", tol.recovered),
            *checks,
        ]
    out: list[str] = []
    for fig, label, base in checks:
        allowed = base + k[fig].half_range
        d = m[fig].mean - k[fig].mean
        if abs(d) > allowed + 1e-9:
            out.append(
                f"{label} {m[fig].text()} vs kernel {k[fig].text()} of the ideal (means off by "
                f"{d:+.2f}, tolerance ±{allowed:.2f} = {base:.2f} + half the kernel's range)"
            )
    if compacted:
        km, mm_ = mean_shape(kernel), mean_shape(model)
        if km.blocked != mm_.blocked:
            says = "blocks" if mm_.blocked else "does not block"
            out.append(f"the model says pinning {says} recovery; the kernel says the opposite")
    return out


@dataclass(frozen=True)
class Comparison:
    """One scenario: the kernel over boots, the model over each boot's knobs × seeds."""

    name: str
    kernels: Sequence[KernelResult]
    models: Sequence[ModelResult]
    failures: Sequence[str]
    tolerance: Tolerance = TOLERANCE

    @property
    def kernel(self) -> KernelResult:
        return self.kernels[0]

    @property
    def model(self) -> ModelResult:
        return self.models[0]

    @property
    def agree(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "agree" if self.agree else "disagree"

    @property
    def kernel_shapes(self) -> list[Shape]:
        return [Shape.of(k) for k in self.kernels]

    @property
    def model_shapes(self) -> list[Shape]:
        return [Shape.of(m) for m in self.models]

    @property
    def kernel_shape(self) -> Shape:
        return mean_shape(self.kernel_shapes)

    @property
    def model_shape(self) -> Shape:
        return mean_shape(self.model_shapes)

    @property
    def kernel_spread(self) -> dict[str, Spread]:
        return spreads(self.kernel_shapes)

    @property
    def model_spread(self) -> dict[str, Spread]:
        return spreads(self.model_shapes)


def compare(
    kernels: Sequence[KernelResult], models: Sequence[ModelResult], tol: Tolerance = TOLERANCE
) -> Comparison:
    """Judge the model's distribution against the kernel's."""
    if not kernels or not models:
        raise ValueError("nothing to compare")
    ks = [Shape.of(k) for k in kernels]
    ms = [Shape.of(m) for m in models]
    compacted = kernels[0].scenario.compact
    failures = disagreements(ks, ms, tol, compacted=compacted)
    return Comparison(kernels[0].scenario.name, list(kernels), list(models), failures, tol)


KnobSource = Callable[[KernelResult], Knobs]


def kernel_knobs(result: KernelResult) -> Knobs:
    return knobs_from_kernel(result)


def default_knobs(result: KernelResult) -> Knobs:
    return Knobs()


def calibrate(
    kernel: Mapping[str, KernelResult | Sequence[KernelResult]],
    knobs: KnobSource = kernel_knobs,
    tol: Tolerance = TOLERANCE,
    progress: Callable[[str], None] | None = None,
    *,
    seeds: int = 1,
) -> list[Comparison]:
    """Run the model for every kernel result (every boot's knobs, ``seeds`` seeds each) and
    compare the distributions scenario by scenario.

    Within one boot the guest ran the scenarios in the order given, and the zone's deferral
    carried from one to the next; so does the model's, per boot and seed (:class:`Carry`)."""
    if seeds < 1:
        raise ValueError("at least one seed")
    runs = {
        name: [results] if isinstance(results, KernelResult) else list(results)
        for name, results in kernel.items()
    }
    nboots = max(len(r) for r in runs.values())
    models: dict[str, list[ModelResult]] = {name: [] for name in runs}
    for boot in range(nboots):
        for seed in range(seeds):
            carry = Carry()
            for name, boots in runs.items():
                if boot >= len(boots):
                    continue
                if progress is not None:
                    progress(f"{name} (boot {boot + 1}, seed {seed})")
                k = boots[boot]
                m = run_model(k.scenario, knobs(k), seed, carry)
                models[name].append(m)
                carry = Carry.after(m)
    return [compare(runs[name], models[name], tol) for name in runs]


# -----------------------------------------------------------------------------------------------
# JSON


def _snapshot_json(s: KernelSnapshot) -> dict[str, Any]:
    zones = {f"{node}/{zone}": list(counts) for (node, zone), counts in s.buddyinfo.zones.items()}
    return {
        "buddyinfo": list(s.buddyinfo.per_order()),
        "buddyinfo_by_zone": zones,
        "free_by_type": {k: list(v) for k, v in s.pagetypeinfo.free_by_type().items()},
        "pageblocks": s.pagetypeinfo.blocks_by_type(),
        "free_pages": s.free_pages,
        "order9_blocks": s.order9_blocks,
        "order9_blocks_by_zone": s.order9_blocks_by_zone(),
        "mem_free_kib": s.mem_free_kib,
        "vmstat": dict(s.vmstat),
    }


def kernel_json(k: KernelResult) -> dict[str, Any]:
    return {
        "scenario": asdict(k.scenario),
        "mem_total_kib": k.mem_total_kib,
        "mem_free_start_kib": k.mem_free_start_kib,
        "chunk_bytes": k.chunk_bytes,
        "chunks": {
            "allocated": k.chunks_allocated,
            "freed": k.chunks_freed,
            "kept": k.chunks_kept,
            "pinned": k.chunks_pinned,
            "pinned_bytes": k.pinned_bytes,
            "rings": k.rings,
        },
        "ms": {"fill": k.fill_ms, "pin": k.pin_ms, "compact": k.compact_ms, "huge": k.hugepages_ms},
        "before": _snapshot_json(k.before),
        "after": _snapshot_json(k.after),
        "vmstat_delta": k.vmstat_delta,
        "hugepages_requested": k.hugepages_requested,
        "hugepages_obtained": k.hugepages_obtained,
        "phase_pages": k.phase_pages,
        "phase_chunks": k.phase_chunks,
        "contiguous_chunks": k.contiguous_chunks,
    }


def _shape_entry(shape: Shape, **extra: Any) -> dict[str, Any]:
    return {**extra, **shape.to_json()}


def comparison_json(c: Comparison) -> dict[str, Any]:
    return {
        "verdict": c.verdict,
        "failures": list(c.failures),
        "scenario": asdict(c.kernel.scenario),
        "kernel_shape": c.kernel_shape.to_json(),
        "model_shape": c.model_shape.to_json(),
        "kernel_spread": {k: v.to_json() for k, v in c.kernel_spread.items()},
        "model_spread": {k: v.to_json() for k, v in c.model_spread.items()},
        "kernel_shapes": [
            _shape_entry(Shape.of(k), boot=i, phase_pages=k.phase_pages)
            for i, k in enumerate(c.kernels)
        ],
        "model_shapes": [
            _shape_entry(Shape.of(m), seed=m.seed, offset_pages=m.knobs.offset_pages)
            for m in c.models
        ],
        "knobs": c.model.knobs.to_json(),
        "kernel": kernel_json(c.kernel),
        "kernels": [kernel_json(k) for k in c.kernels],
        "model": c.model.to_json(),
    }


@dataclass
class RunInfo:
    """How the kernel side ran (for the JSON and the summary line)."""

    memory_mib: int
    accel: str = ""
    boot_s: float = 0.0
    guest_total_s: float = 0.0
    model_total_s: float = 0.0
    kvm_fallback: str | None = None
    console_log: str = ""
    results_log: str = ""
    scenario_s: dict[str, float] = field(default_factory=dict)

    boots: int = 1
    seeds: int = 1

    @classmethod
    def of(cls, run: GuestRun, memory_mib: int) -> RunInfo:
        return cls(
            memory_mib=memory_mib,
            accel=run.accel,
            boot_s=round(run.boot_s, 2),
            guest_total_s=round(run.total_s, 2),
            kvm_fallback=run.kvm_fallback,
            console_log=str(run.console_log),
            results_log=str(run.results_log),
            scenario_s={k: round(v, 2) for k, v in run.scenario_s.items()},
        )


def write_json(path: Path, comparisons: Iterable[Comparison], info: RunInfo) -> None:
    data = {
        "tolerance": TOLERANCE.to_json() | {"blocked_below": BLOCKED_BELOW},
        "run": asdict(info),
        "scenarios": {c.name: comparison_json(c) for c in comparisons},
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


# -----------------------------------------------------------------------------------------------
# The plot: free blocks per order, kernel vs model, before and after compaction


def write_plot(path: Path, comparisons: Sequence[Comparison]) -> None:
    """One PNG, a row per scenario: free blocks per order before and after compaction (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(comparisons))
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.9 * rows), squeeze=False, sharey=True)
    width = 0.4
    for row, c in zip(axes, comparisons, strict=False):
        for ax, phase in zip(row, ("before", "after"), strict=True):
            k = getattr(c.kernel, phase)
            m = getattr(c.model, phase)
            kb = list(k.buddyinfo.per_order())
            mb = list(m.buddyinfo)
            orders = list(range(max(len(kb), len(mb))))
            kb += [0] * (len(orders) - len(kb))
            mb += [0] * (len(orders) - len(mb))
            ax.bar([o - width / 2 for o in orders], kb, width, label="kernel", color="#4c72b0")
            ax.bar([o + width / 2 for o in orders], mb, width, label="model", color="#dd8452")
            ax.set_yscale("symlog", linthresh=1)
            ax.set_xticks(orders)
            ax.set_title(
                f"{c.name}, {phase}: order-9 {k.order9_fraction:.2f} kernel, "
                f"{m.order9_fraction:.2f} model (of ideal)",
                fontsize=9,
            )
            ax.set_xlabel("order")
            ax.grid(axis="y", alpha=0.3)
        row[0].set_ylabel("free blocks")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
