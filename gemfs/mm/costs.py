"""The cost model and the modelled clock: what migration costs, in modelled time.

Every time gemfs reports for a design is modelled time, the same in process and on the stack:
the workload's clock (:class:`Clock`), GPU busy intervals on it, and the costs below, charged
by the one migration mechanism (:mod:`gemfs.mm.migrate`) and the compaction scanners. No
wall-clock figure enters a design's metrics, so they do not depend on how loaded the machine is.

:class:`CostTable` is the documented table: every default has a source (a measurement, a
kernel figure, or an estimate with its reasoning), and a workload's ``[costs]`` table may
override any entry. :class:`Ledger` accumulates what a run paid.

What "GPU stall" means here: modelled time during which a GPU object could not be used because
of migration, from the moment its owner stops using it (after waiting for its batches to finish)
until it may use it again: the idle wait itself (the pipeline drains; no new batch may be queued
on the object), unpinning, the copies, the GTT rewrite, flushes and re-pinning; under the
notifier design, the re-fault and re-pin on the next use. Nothing else is counted as stall.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from gemfs.mm.pool import I64


@dataclass(frozen=True, slots=True, kw_only=True)
class CostTable:
    """Per-operation costs in modelled microseconds (``[costs]`` in a workload overrides)."""

    copy_page_us: float = 2.0
    gtt_pte_us: float = 0.05
    callback_us: float = 2.0
    flush_page_us: float = 0.0
    pin_call_us: float = 40.0
    pin_page_us: float = 0.15
    unpin_call_us: float = 28.0
    unpin_page_us: float = 0.06
    refault_page_us: float = 0.25
    scan_page_us: float = 0.01
    alloc_fast_us: float = 1.0

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> CostTable:
        """A table with the given entries overridden; unknown names or bad values: ValueError."""
        known = {f.name for f in fields(cls)}
        out = cls()
        for k, v in data.items():
            if k not in known:
                raise ValueError(f"unknown cost {k!r} (expected one of {', '.join(sorted(known))})")
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or v != v:
                raise ValueError(f"cost {k!r} must be a number >= 0 (µs), not {v!r}")
            out = replace(out, **{k: float(v)})
        return out

    def to_json(self) -> dict[str, float]:
        return asdict(self)


# Where each default comes from (report.md prints this beside the values used).
COST_SOURCES: dict[str, str] = {
    "copy_page_us": "migrate_folio of one 4 KiB page: unmap, TLB flush, copy, remap. Estimate: "
    "a 4 KiB copy is ~0.4 µs at 10 GB/s; the TLB-flush IPIs dominate (batching them alone "
    "raised migrated pages/s by 292%, Huang Ying's migrate_pages batching series, linux-mm 2022)",
    "gtt_pte_us": "rewrite one GPU PTE (i915 GGTT: one 64-bit write through a write-combined "
    "mapping). Estimate",
    "callback_us": "one call of the owner's migrate/invalidate callback (indirect call, the "
    "driver's object lock). Estimate; the 2016 patch bounded its struct_mutex trylock at ~10 ms",
    "flush_page_us": "GPU cache flush per migrated page: 0 for i915 (coherent); a Mali developer "
    "(2016 thread) needs an L2 flush+invalidate per page -- set it for such GPUs; the "
    "per-page-flush driver policy sets 5 µs (an estimate: Mali's FLUSH_MEM command issued and "
    "polled per page, driver/gem.py MALI_FLUSH_PAGE_US; no published figure found)",
    "pin_call_us": "pin (register) host memory for a GPU, per call: ~40 µs, measured on an "
    "NVIDIA H100 with driver 580 (2026)",
    "pin_page_us": "pin per 4 KiB page: ~0.15 µs (the same H100 measurement)",
    "unpin_call_us": "unpin (unregister), per call: ~28 µs (the same H100 measurement)",
    "unpin_page_us": "unpin per 4 KiB page: ~0.06 µs (the same H100 measurement)",
    "refault_page_us": "GPU page-table re-population per page after an invalidation, on top of "
    "re-pinning. Estimate (a PTE write plus a page-table walk)",
    "scan_page_us": "compaction scanners, per page looked at. Upper bound from the Linux 5.9 "
    "proactive-compaction cover letter: a full compaction of 32 GB (8 M pages, scanning and "
    "migrating) in under 1 s, i.e. < 0.12 µs a page in all",
    "alloc_fast_us": "a high-order allocation served from the free lists (fast path). Estimate",
}


@dataclass(slots=True)
class Clock:
    """The modelled clock (seconds). Only ``advance`` and ``advance_to`` move it."""

    now: float = 0.0

    def advance(self, dt: float) -> None:
        self.now += max(0.0, dt)

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


@dataclass(slots=True)
class Task:
    """One task's share of modelled time: a direct compaction inside an allocation, a
    kcompactd pass. ``t`` is the task's own time (waits and costs move it); ``us`` sums what
    it was charged, in µs."""

    t: float
    us: float = 0.0

    def charge(self, us: float) -> None:
        if us > 0:
            self.us += us
            self.t += us / 1e6


@dataclass
class Ledger:
    """What a pool paid for migration over its life (all modelled)."""

    gpu_stall_us: float = 0.0
    waits_us: float = 0.0  # part of the stall: waiting for the GPU to go idle
    migration_us: float = 0.0  # copy + remap + GTT + flush + (un)pin, all owners
    scan_us: float = 0.0
    scanned_pages: int = 0
    callbacks: int = 0
    pages_migrated: int = 0
    refusals: int = 0  # -EAGAIN answers (attempts)
    repinned_pages: int = 0
    refaulted_pages: int = 0
    # longterm-pin / confine (gemfs.mm.region): pages moved before a long-term pin
    # (MR_LONGTERM_PIN) and what it cost; pages evacuated when confine's region grew
    pin_migrated_pages: int = 0
    pin_migration_us: float = 0.0
    evacuated_pages: int = 0
    evacuation_us: float = 0.0
    region_grows: int = 0
    region_shrinks: int = 0
    _refused: set[int] = field(default_factory=set)

    def refuse(self, obj_ids: I64, idx: I64) -> None:
        """Record -EAGAIN answers for these (object, page index) pairs."""
        if len(idx) == 0:
            return
        self.refusals += len(idx)
        keys = (obj_ids.astype(np.int64) << np.int64(32)) | idx.astype(np.int64)
        self._refused.update(np.unique(keys).tolist())

    @property
    def pages_refused(self) -> int:
        """Distinct (object, page) pairs that were refused at least once."""
        return len(self._refused)

    def to_json(self) -> dict[str, float]:
        return {
            "gpu_stall_ms": round(self.gpu_stall_us / 1000, 6),
            "waits_ms": round(self.waits_us / 1000, 6),
            "migration_ms": round(self.migration_us / 1000, 6),
            "scan_ms": round(self.scan_us / 1000, 6),
            "scanned_pages": self.scanned_pages,
            "callbacks": self.callbacks,
            "pages_migrated": self.pages_migrated,
            "pages_refused": self.pages_refused,
            "refusals": self.refusals,
            "repinned_pages": self.repinned_pages,
            "refaulted_pages": self.refaulted_pages,
            "pin_migrated_pages": self.pin_migrated_pages,
            "pin_migration_ms": round(self.pin_migration_us / 1000, 6),
            "evacuated_pages": self.evacuated_pages,
            "evacuation_ms": round(self.evacuation_us / 1000, 6),
            "region_grows": self.region_grows,
            "region_shrinks": self.region_shrinks,
        }


class LatencySketch:
    """Percentiles of many latencies in bounded memory: a log-bucketed histogram.

    Values fall into buckets whose bounds grow by ``1 + 2 * accuracy``; a percentile is
    answered with its bucket's geometric middle, clamped to the exact minimum and maximum, so it
    is within ``accuracy`` (relative) of the true value. Memory grows with the logarithm of the
    value range, never with the count (a year of huge-page faults costs a few kB).
    """

    def __init__(self, accuracy: float = 0.01) -> None:
        if not 0 < accuracy < 0.5:
            raise ValueError("accuracy must be in (0, 0.5)")
        self.gamma = (1 + accuracy) / (1 - accuracy)
        self._log_gamma = math.log(self.gamma)
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.min = math.inf
        self.max = 0.0

    def add(self, value: float) -> None:
        v = max(value, 1e-9)
        key = math.ceil(math.log(v) / self._log_gamma)
        self.buckets[key] = self.buckets.get(key, 0) + 1
        self.count += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = q * (self.count - 1)
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen > rank:
                mid = 2 * self.gamma**key / (self.gamma + 1)
                return min(self.max, max(self.min, mid))
        return self.max

    def summary(self) -> dict[str, float]:
        """{"p50", "p99", "max"} (0 when nothing was added)."""
        return {
            "p50": round(self.quantile(0.50), 3),
            "p99": round(self.quantile(0.99), 3),
            "max": round(self.max, 3),
        }
