"""Kernel vs model: the shapes compared, the tolerance, the verdict, the JSON and the plot.

Compared per scenario (the shapes a model of this size can honestly match):

- ``fraction_after``: free 2 MiB blocks after compaction as a fraction of the ideal
  (free pages // 512);
- ``recovered_fraction``: how much of what the holes cost compaction won back,
  (after − before) / (ideal − before);
- ``blocked``: whether pinning blocked recovery (recovered < 0.25);
- for the ``*-nocompact`` scenarios (no ``compact_memory``, so after = before on both sides):
  what the hugepage probe got through the allocator's own direct compaction.

A scenario agrees when both fractions are within :data:`TOLERANCE` and ``blocked`` is the same.
For scenarios whose outcome depends on which half of a pageblock the chunk stream started in
(``mixed``: see :func:`tools.calibrate.model.phase_variants`), the model plays both phases; the
kernel's before-state does not say which one it was in, so the verdict uses the phase that
agrees, and says so.
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
    Knobs,
    ModelResult,
    knobs_from_kernel,
    phase_variants,
    run_model,
)


@dataclass(frozen=True)
class Tolerance:
    fraction_after: float = 0.10
    recovered: float = 0.10
    reason: str = (
        "±0.10 of the ideal on order-9 after compaction and on recovered: less than half the "
        "smallest gap between distinct outcomes (mixed 0.73 vs movable 0.94), so a model with "
        "the wrong mechanism cannot pass; above the kernel's boot-to-boot spread (±0.03) plus "
        "what the model leaves out (one zone, no per-cpu lists, the kernel's own allocations "
        "as fixed holes: 1-6% of free memory); one 2 MiB block is 0.008 of ~128"
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


def disagreements(
    kernel: Shape, model: Shape, tol: Tolerance = TOLERANCE, *, compacted: bool = True
) -> list[str]:
    """Why the model disagrees with the kernel; empty when it agrees.

    Without ``compact_memory`` (``compacted=False``: the ``*-nocompact`` scenarios) after equals
    before on both sides and what is compared instead is what the hugepage probe got: the
    allocator's own direct compaction, kernel vs model, within the same tolerance."""
    out: list[str] = []
    if not compacted:
        d = model.hugepages_fraction - kernel.hugepages_fraction
        if abs(d) > tol.fraction_after:
            out.append(
                f"hugepages {model.hugepages_fraction:.2f} vs kernel "
                f"{kernel.hugepages_fraction:.2f} of the ideal (off by {d:+.2f}, tolerance "
                f"±{tol.fraction_after:.2f}): direct compaction without compact_memory"
            )
    d = model.fraction_after - kernel.fraction_after
    if abs(d) > tol.fraction_after:
        out.append(
            f"order-9 after {model.fraction_after:.2f} vs kernel {kernel.fraction_after:.2f} "
            f"(off by {d:+.2f}, tolerance ±{tol.fraction_after:.2f})"
        )
    d = model.recovered_fraction - kernel.recovered_fraction
    if abs(d) > tol.recovered:
        out.append(
            f"recovered {model.recovered_fraction:.2f} vs kernel {kernel.recovered_fraction:.2f} "
            f"(off by {d:+.2f}, tolerance ±{tol.recovered:.2f})"
        )
    if model.blocked != kernel.blocked:
        says = "blocks" if model.blocked else "does not block"
        out.append(f"the model says pinning {says} recovery; the kernel says the opposite")
    return out


@dataclass(frozen=True)
class Comparison:
    """One scenario: the kernel, the model phase the verdict uses, and every phase tried."""

    name: str
    kernel: KernelResult
    model: ModelResult
    variants: Sequence[ModelResult]
    failures: Sequence[str]
    tolerance: Tolerance = TOLERANCE

    @property
    def agree(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "agree" if self.agree else "disagree"

    @property
    def other_phase(self) -> bool:
        """The verdict uses a phase other than the knobs' own (see the module doc)."""
        return self.model is not self.variants[0]

    @property
    def kernel_shape(self) -> Shape:
        return Shape.of(self.kernel)

    @property
    def model_shape(self) -> Shape:
        return Shape.of(self.model)


def compare(
    kernel: KernelResult, variants: Sequence[ModelResult], tol: Tolerance = TOLERANCE
) -> Comparison:
    """Judge the model's phases against the kernel: the first one that agrees, else the first."""
    if not variants:
        raise ValueError("no model result to compare")
    ks = Shape.of(kernel)
    compacted = kernel.scenario.compact
    judged = [(m, disagreements(ks, Shape.of(m), tol, compacted=compacted)) for m in variants]
    model, failures = next(((m, f) for m, f in judged if not f), judged[0])
    return Comparison(kernel.scenario.name, kernel, model, list(variants), failures, tol)


KnobSource = Callable[[KernelResult], Knobs]


def kernel_knobs(result: KernelResult) -> Knobs:
    return knobs_from_kernel(result)


def default_knobs(result: KernelResult) -> Knobs:
    return Knobs()


def calibrate(
    kernel: Mapping[str, KernelResult],
    knobs: KnobSource = kernel_knobs,
    tol: Tolerance = TOLERANCE,
    progress: Callable[[str], None] | None = None,
) -> list[Comparison]:
    """Run the model for every kernel result (each phase variant) and compare."""
    out = []
    for name, result in kernel.items():
        if progress is not None:
            progress(name)
        k = knobs(result)
        variants = [run_model(result.scenario, v) for v in phase_variants(result.scenario, k)]
        out.append(compare(result, variants, tol))
    return out


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
    }


def comparison_json(c: Comparison) -> dict[str, Any]:
    return {
        "verdict": c.verdict,
        "failures": list(c.failures),
        "model_phase": c.model.knobs.offset_pages,
        "other_phase": c.other_phase,
        "kernel_shape": c.kernel_shape.to_json(),
        "model_shape": c.model_shape.to_json(),
        "knobs": c.model.knobs.to_json(),
        "kernel": kernel_json(c.kernel),
        "model": c.model.to_json(),
        "model_variants": [
            {"knobs": m.knobs.to_json(), "shape": Shape.of(m).to_json()} for m in c.variants
        ],
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
