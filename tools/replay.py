"""gemfs replay: a real kernel's allocation stream played into the model, and where they part.

The pool is the trace's largest zone (from /proc/zoneinfo in the record; else the span of the
pfns the trace touches), one model frame per kernel frame, ``model pfn = kernel pfn - base``.

Start state. The trace itself says which frames were free at the start (their first event is an
allocation) and which were allocated (their first event is a free); the first snapshot's
buddyinfo says how many pages were free in which orders. The model frees the first set, keeps
the second allocated, and fills the rest of the free count with untouched aligned blocks,
largest order first, up to the counts buddyinfo shows. Pageblock types: a block whose first
allocation in the trace came without a fallback (``mm_page_alloc_extfrag``) was of that
allocation's type; the others get the remaining counts of the first pagetypeinfo (unmovable and
reclaimable to the blocks with the least free memory). The report gives the start divergence
this leaves.

Placement. ``kernel``: each allocation takes the frames the kernel took (when they are free in
the model; else the model's allocator places it, counted as a conflict); ``extfrag`` events with
``change_ownership`` move the pageblock. ``model``: the model's buddy allocator places every
allocation itself (fallbacks and stealing by its own rules) and frees follow the kernel's pfn to
the model's frames. Movable allocations are pages of one object, so the model's compaction can
move them (``owner`` none: plain shmem rules); others are unmovable kernel blocks.

Compaction. The kernel's compaction takes its targets off the free lists without an allocation
event, then frees the sources (``mm_page_free`` inside the ``mm_compaction_begin``/``end`` window
on that CPU). The model does not follow it: those frees turn the page into an *orphan* (alive,
place unknown), and a later free of a pfn the model does not know releases an orphan of that
order. At each ``mm_compaction_end`` the model runs its own policy (the order from the preceding
``try_to_compact_pages`` or ``kcompactd_wake``, else the whole zone as ``compact_memory``); each
such moment is one row of "compaction choices": kernel status and pages moved against the
model's.

Over time: at every snapshot marker the kernel's buddyinfo/pagetypeinfo/vmstat (of the zone) and
the model's state are sampled side by side. Divergence at a sample: the pages in free blocks that
do not match, sum over orders of |kernel - model| x 2^order, over the free pages of both sides
(0 equal, 1 nothing in common).
"""

from __future__ import annotations

import bisect
import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from driver.gem import DriverObject
from driver.inproc import InprocDriver
from gemfs.mm.buddy import BuddyAllocator, largest_aligned_order
from gemfs.mm.compaction import CompactionPolicy
from gemfs.mm.core import MemoryManager
from gemfs.mm.objects import GemObject
from gemfs.mm.pool import (
    OWNER_KERNEL,
    OWNER_NONE,
    PG_ALLOC,
    PG_FREE,
    PG_MT_SHIFT,
    PG_OBJECT,
    PG_TARGET,
)
from gemfs.mm.types import (
    MAX_ORDER,
    NR_ORDERS,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    Design,
    MigrateMode,
    MigrateType,
    OutOfMemory,
)
from tools.gpu_trace import GPU_CREATE, GPU_DESTROY, GpuAttribution, GpuBo
from tools.tracefile import Event, Trace, TraceFormatError, Zone, pcp_pages

Placement = Literal["kernel", "model"]
MAX_BLOCK = 1 << MAX_ORDER
TYPE_NAMES = ("Unmovable", "Movable", "Reclaimable")
DEFAULT_MAX_POOL = 8 << 30


class ReplayError(ValueError):
    """The trace cannot be replayed (one line for the user)."""


@dataclass
class Sample:
    snapshot: int
    t: float
    kernel_free: list[int]
    model_free: list[int]
    kernel_blocks: dict[str, int]
    model_blocks: dict[str, int]
    kernel_mixed: int | None
    model_mixed: int
    kernel_extfrag: int
    model_extfrag: int
    kernel_compact: dict[str, int]
    model_compact: dict[str, int]
    in_compaction: bool = False
    """Taken while a kernel compaction was under way (the model runs its own at the end)."""
    kernel_known: bool = True
    """False for a plain trace (no snapshots): the model's side only, every second."""
    kernel_pcp: int | None = None
    """Pages on the kernel's per-CPU lists (zoneinfo): free, but not in its buddyinfo. The
    model has no per-CPU lists, so about this many more pages show in its low orders."""

    @property
    def divergence(self) -> float:
        if not self.kernel_known:
            return math.nan
        return divergence(self.kernel_free, self.model_free)


@dataclass
class Choice:
    """One kernel compaction and what the model did at the same moment."""

    line: int
    t: float
    comm: str
    order: int
    kernel_status: str
    kernel_migrated: int
    model_result: str
    model_migrated: int

    @property
    def differs(self) -> bool:
        k_ok = self.kernel_status == "success"
        m_ok = self.model_result == "SUCCESS"
        far = abs(self.kernel_migrated - self.model_migrated) > max(
            32, 0.2 * max(self.kernel_migrated, self.model_migrated)
        )
        return k_ok != m_ok or far


@dataclass
class ReplayResult:
    path: str
    design: str
    placement: str
    zone: str
    base_pfn: int
    pool_pages: int
    samples: list[Sample] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, float] = field(default_factory=dict)
    """GPU pages under this design: objects and pages found (tools/gpu_trace.py), where they
    ended, and what the model's migrations of them cost (empty: the trace has no GPU events)."""

    @property
    def final(self) -> Sample:
        return self.samples[-1]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for s, sample in zip(out["samples"], self.samples, strict=True):
            s["divergence"] = None if math.isnan(sample.divergence) else sample.divergence
        for c, choice in zip(out["choices"], self.choices, strict=True):
            c["differs"] = choice.differs
        out["summary"] = self.summary()
        return out

    def summary(self) -> dict[str, Any]:
        known = [s for s in self.samples if s.kernel_known]
        if not known:
            return {"model_final_free": self.final.model_free} if self.samples else {}
        divs = [s.divergence for s in known]
        f = known[-1]
        return {
            "start_divergence": divs[0],
            "final_divergence": divs[-1],
            "max_divergence": max(divs),
            "mean_divergence": sum(divs) / len(divs),
            "final_kernel_free": f.kernel_free,
            "final_model_free": f.model_free,
            "final_order_diff": [m - k for k, m in zip(f.kernel_free, f.model_free, strict=True)],
            "choices_differ": sum(c.differs for c in self.choices),
            "choices": len(self.choices),
        }


def divergence(kernel: Sequence[int], model: Sequence[int]) -> float:
    """Pages in free blocks that do not match, over the free pages of both sides."""
    diff = sum(abs(k - m) << o for o, (k, m) in enumerate(zip(kernel, model, strict=True)))
    total = sum(k << o for o, k in enumerate(kernel)) + sum(m << o for o, m in enumerate(model))
    return diff / total if total else 0.0


def pick_zone(trace: Trace, name: str | None) -> Zone:
    """The zone to replay: ``name``, else the largest (managed pages) of the first snapshot."""
    snaps = trace.complete_snapshots or sorted(trace.snapshots)
    zones = trace.snapshots[snaps[0]].zones if snaps else {}
    if not zones:
        pfns = [e.int("pfn") for e in trace.events if "pfn" in e.fields and e.name != "x"]
        pfns = [p for p in pfns if isinstance(p, int)]
        if not pfns:
            raise ReplayError(f"{trace.path}: no zone information and no page events")
        lo, hi = min(pfns) & ~(MAX_BLOCK - 1), max(pfns) + MAX_BLOCK
        return Zone(name or "trace", 0, lo, hi - lo, hi - lo, hi - lo)
    if name is not None:
        if name not in zones:
            raise ReplayError(f"{trace.path}: no zone {name!r}; the trace has {', '.join(zones)}")
        return zones[name]
    return max(zones.values(), key=lambda z: z.managed)


class Replayer:
    def __init__(
        self,
        trace: Trace,
        *,
        design: Design | str = Design.PINNED,
        placement: Placement = "model",
        zone: str | None = None,
        max_pool: int = DEFAULT_MAX_POOL,
    ) -> None:
        self.trace = trace
        self.design = Design.parse(design) if isinstance(design, str) else design
        self.placement = placement
        self.zone = pick_zone(trace, zone)
        self.base = self.zone.start_pfn & ~(MAX_BLOCK - 1)
        end = self.zone.end_pfn
        self.nr = -(-(end - self.base) // MAX_BLOCK) * MAX_BLOCK
        self.counts: dict[str, int] = {}
        self.window = self.nr * PAGE_SIZE > max_pool
        if self.window:
            self._pick_window(max_pool)
        self.kstart = max(self.zone.start_pfn, self.base)
        self.kend = min(end, self.base + self.nr)
        self.lo, self.hi = self.kstart - self.base, self.kend - self.base
        self.events = [e for e in trace.events if self._mine(e)]
        self.mm = MemoryManager(self.nr * PAGE_SIZE, design=self.design)
        self.anon = self.mm.create_object(0, migratetype=MigrateType.MOVABLE, path="replay")
        # GPU pages: found by tools/gpu_trace.py, owned by the driver (in process) under the
        # design: its migrate type, its pins, and whether the core asks it before moving them
        self.gpu = GpuAttribution()
        self.driver = InprocDriver(self.mm, self.design)
        self.gpu_objects: dict[int, tuple[GemObject, DriverObject]] = {}  # GpuBo.index ->
        self.gpu_next: dict[int, int] = {}  # GpuBo.index -> next page index in the object
        self.extents: list[tuple[GpuBo, int]] = []  # handle of a "g" block -> (bo, first index)
        self.next_slot = 0
        self.live: dict[int, tuple[str, int, int]] = {}  # kernel pfn -> (kind, handle, order)
        self.orphans: dict[int, deque[tuple[str, int]]] = {o: deque() for o in range(NR_ORDERS)}
        self.boot = np.zeros(self.nr, dtype=np.bool_)
        self.windows: dict[int, dict[str, Any]] = {}
        self.pending_order: dict[int, int] = {}
        self.kcompactd_order = -1
        self.kernel_extfrag = 0
        self._build_start()

    # -- setting up ---------------------------------------------------------------------------
    def _pick_window(self, max_pool: int) -> None:
        """A zone too large to model whole: replay the aligned window of ``max_pool`` with the
        most page events, compared with the kernel's free runs in it (/proc/kpageflags)."""
        zone, trace = self.zone, self.trace
        snaps = trace.complete_snapshots
        if not snaps or trace.snapshots[snaps[0]].free_runs is None:
            raise ReplayError(
                f"zone {zone.name} spans {self.nr * PAGE_SIZE >> 20} MiB, more than --max-pool "
                f"{max_pool >> 20} MiB, and the record has no /proc/kpageflags free runs to "
                "compare a window of it; pick a smaller zone with --zone"
            )
        size = max(1, max_pool // PAGE_SIZE // MAX_BLOCK)
        chunks = self.nr // MAX_BLOCK
        hist = np.zeros(chunks, dtype=np.int64)
        for e in trace.events:
            pfn = e.fields.get("pfn")
            if isinstance(pfn, int) and zone.start_pfn <= pfn < zone.end_pfn:
                hist[(pfn - self.base) // MAX_BLOCK] += 1
        sums = np.convolve(hist, np.ones(min(size, chunks), dtype=np.int64), mode="valid")
        best = int(np.argmax(sums))
        self.base += best * MAX_BLOCK
        self.nr = min(size, chunks) * MAX_BLOCK
        self.counts["window_first_pfn"] = self.base
        self.counts["window_pages"] = self.nr

    def _runs_free(self, runs: Sequence[tuple[int, int]]) -> npt.NDArray[np.bool_]:
        free = np.zeros(self.nr, dtype=np.bool_)
        for start, length in runs:
            lo, hi = max(start, self.kstart), min(start + length, self.kend)
            if lo < hi:
                free[lo - self.base : hi - self.base] = True
        return free

    def _runs_per_order(self, runs: Sequence[tuple[int, int]]) -> list[int]:
        """Free blocks per order in the window: each run of free pages split into aligned
        blocks, as the buddy allocator holds a fully merged run."""
        out = [0] * NR_ORDERS
        for start, length in runs:
            lo, hi = max(start, self.kstart), min(start + length, self.kend)
            while lo < hi:
                o = largest_aligned_order(lo, hi - lo)
                out[o] += 1
                lo += 1 << o
        return out

    def _inc(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def _mine(self, e: Event) -> bool:
        pfn = e.fields.get("pfn")
        if pfn is None:
            if e.name.startswith("mm_compaction_begin") or e.name == "mm_compaction_end":
                start = e.fields.get("zone_start")
                zone = self.zone
                return isinstance(start, int) and zone.start_pfn <= start < zone.end_pfn
            return True
        ok = isinstance(pfn, int) and self.kstart <= pfn < self.kend
        if not ok:
            self._inc(f"{e.name}_outside_{'window' if self.window else 'zone'}")
        return ok

    def _start_snapshot(self) -> tuple[list[int] | None, dict[str, int] | None]:
        snaps = self.trace.complete_snapshots or sorted(self.trace.snapshots)
        if not snaps:
            return None, None
        snap = self.trace.snapshots[snaps[0]]
        free = list(snap.buddyinfo.per_order(self.zone.name))
        pti = snap.pagetypeinfo
        return free, (pti.blocks_by_type(self.zone.name) if pti else None)

    def _build_start(self) -> None:
        nr = self.nr
        first = np.zeros(nr, dtype=np.int8)  # 1: first seen allocated, 2: first seen freed
        block_type = np.full(nr // PAGEBLOCK_NR_PAGES, -1, dtype=np.int8)
        fell_back = np.zeros(nr // PAGEBLOCK_NR_PAGES, dtype=np.bool_)
        for e in self.events:
            if e.name == "mm_page_alloc" or e.name == "mm_page_free":
                p = e.int("pfn") - self.base
                q = p + (1 << e.int("order"))
                seg = first[p:q]
                seg[seg == 0] = 1 if e.name == "mm_page_alloc" else 2
                if e.name == "mm_page_alloc":
                    b = p >> PAGEBLOCK_ORDER
                    mt = e.int("migratetype")
                    if block_type[b] < 0 and not fell_back[b] and mt < 3:
                        block_type[b] = mt
            elif e.name == "mm_page_alloc_extfrag":
                b = (e.int("pfn") - self.base) >> PAGEBLOCK_ORDER
                if block_type[b] < 0:
                    fell_back[b] = True
                    block_type[b] = e.int("fallback_migratetype")
        inside = np.zeros(nr, dtype=np.bool_)
        inside[self.lo : self.hi] = True
        free = (first == 1) & inside
        target_free, blocks = self._start_snapshot()
        snaps = self.trace.complete_snapshots
        runs = self.trace.snapshots[snaps[0]].free_runs if snaps else None
        if runs is not None:  # the kernel's own free layout at the start
            free = self._runs_free(runs)
            self.counts["start_from_kpageflags"] = 1
        elif target_free is not None:
            budget = sum(c << o for o, c in enumerate(target_free)) - int(free.sum())
            unknown = (first == 0) & inside
            for order in range(MAX_ORDER, -1, -1):
                size = 1 << order
                if budget < size:
                    continue
                cand = unknown.reshape(-1, size).all(axis=1)
                idx = np.flatnonzero(cand)[::-1][: min(target_free[order], budget >> order)]
                for b in idx.tolist():
                    free[b * size : (b + 1) * size] = True
                    unknown[b * size : (b + 1) * size] = False
                budget -= len(idx) * size
            if budget > 0:  # the rest: any untouched frames, from the top
                rest = np.flatnonzero(unknown)[::-1][:budget]
                free[rest] = True
        self.counts["start_free_pages_model"] = int(free.sum())
        # pageblock types: inferred ones, then the rest by the first pagetypeinfo's counts
        types = block_type.astype(np.int16)
        if blocks is not None:
            scale = self.nr / max(1, self.zone.spanned) if self.window else 1.0
            want = [round(blocks.get(n, 0) * scale) for n in TYPE_NAMES]
            want[0] += sum(v for k, v in blocks.items() if k not in TYPE_NAMES)
            have = [int(np.count_nonzero(types == t)) for t in range(3)]
            free_per_block = free.reshape(-1, PAGEBLOCK_NR_PAGES).sum(axis=1)
            open_blocks = np.flatnonzero(types < 0)
            open_blocks = open_blocks[np.argsort(free_per_block[open_blocks], kind="stable")]
            pos = 0
            for t in (0, 2):
                n = max(0, want[t] - have[t])
                types[open_blocks[pos : pos + n]] = t
                pos += n
        types[types < 0] = int(MigrateType.MOVABLE)
        pool = self.mm.pool
        pool.pageblock_mt[:] = types.astype(np.uint8)
        self.mm.buddy = BuddyAllocator(pool)
        busy = np.flatnonzero(~free).astype(np.int64)
        self.mm.buddy.isolate_free(busy)
        mts = pool.pageblock_mt[busy >> PAGEBLOCK_ORDER].astype(np.uint8)
        pool.flags[busy] = PG_ALLOC | (mts << np.uint8(PG_MT_SHIFT))
        pool.owner[busy] = OWNER_KERNEL
        self.boot[busy] = True
        self.counts["start_boot_pages"] = len(busy)

    # -- one event ----------------------------------------------------------------------------
    def _attach(self, pfn: int, order: int, mt: int) -> tuple[str, int, int]:
        n = 1 << order
        pool = self.mm.pool
        if mt != MigrateType.MOVABLE:
            pool.owner[pfn : pfn + n] = OWNER_KERNEL
            return ("k", pfn, order)
        slot = self.next_slot
        self.next_slot += n
        obj = self.anon
        if len(obj.pages) < self.next_slot:
            obj.pages.resize(max(self.next_slot, 2 * len(obj.pages)))
        pfns = np.arange(pfn, pfn + n, dtype=np.int64)
        pool.flags[pfns] |= PG_OBJECT
        pool.owner[pfns] = obj.id
        pool.index[pfns] = np.arange(slot, slot + n, dtype=np.int32)
        obj.pages[slot : slot + n] = pfns
        return ("o", slot, order)

    def _gpu_object(self, bo: GpuBo) -> tuple[GemObject, DriverObject]:
        got = self.gpu_objects.get(bo.index)
        if got is None:
            o = self.driver.create(0, path=f"{bo.driver}:{bo.key}")
            got = self.gpu_objects[bo.index] = (self.mm.get(o.id), o)
        return got

    def _gpu_attach(self, bo: GpuBo, pfn: int, order: int) -> tuple[str, int, int]:
        """The frames [pfn, pfn + 2^order) are pages of GPU object ``bo``: the driver pins and
        maps them (every design pins what the GPU uses; the design decides who may move it)."""
        obj, o = self._gpu_object(bo)
        n = 1 << order
        slot = self.gpu_next.get(bo.index, 0)
        self.gpu_next[bo.index] = slot + n
        if len(obj.pages) < slot + n:
            obj.pages.resize(max(slot + n, 2 * len(obj.pages)))
        pool = self.mm.pool
        pfns = np.arange(pfn, pfn + n, dtype=np.int64)
        pool.flags[pfns] |= PG_OBJECT
        pool.owner[pfns] = obj.id
        pool.index[pfns] = np.arange(slot, slot + n, dtype=np.int32)
        obj.pages[slot : slot + n] = pfns
        obj.size = max(obj.size, (slot + n) * PAGE_SIZE)
        self.mm.nr_gem_pages += n
        self.driver.adopt(o, slot, n)
        self.extents.append((bo, slot))
        self._inc("gpu_pages", n)
        return ("g", len(self.extents) - 1, order)

    def _gpu_release(self, handle: int, order: int) -> None:
        bo, slot = self.extents[handle]
        obj, o = self.gpu_objects[bo.index]
        n = 1 << order
        mm = self.mm
        mm.release(self.driver, obj, slot, n)
        pfns = np.asarray(obj.pages[slot : slot + n], dtype=np.int64)
        obj.pages[slot : slot + n] = np.full(n, -1, dtype=np.int64)
        pfns = pfns[pfns >= 0]
        self.driver.gem.forget(o, slot, n)
        mm.nr_gem_pages -= len(pfns)
        mm.buddy.free_pfns(pfns)
        self._gpu_maybe_gone(bo)

    def _gpu_maybe_gone(self, bo: GpuBo) -> None:
        """An object with no pages left that will get none (destroyed, or its quota used up)
        leaves the driver and the core."""
        got = self.gpu_objects.get(bo.index)
        if got is None or bo.open or got[0].nr_resident:
            return
        obj, o = got
        self.driver.gem.remove_object(o.id)
        self.mm.destroy_object(obj)
        del self.gpu_objects[bo.index]

    def _gpu_destroy(self, e: Event) -> None:
        """i915_gem_object_destroy: the driver's pins go; the pages stay until shmem frees
        them (their own mm_page_free events)."""
        bo = self.gpu.destroy(e)
        if bo is None:
            return
        got = self.gpu_objects.get(bo.index)
        if got is not None:
            obj, o = got
            self.mm.release(self.driver, obj, 0, len(obj.pages))
            self.driver.gem.unbind(o)
        self._gpu_maybe_gone(bo)

    def _release(self, kind: str, handle: int, order: int) -> None:
        n = 1 << order
        if kind == "g":
            self._gpu_release(handle, order)
            return
        if kind == "k":
            pfns = np.arange(handle, handle + n, dtype=np.int64)
        else:
            pfns = np.asarray(self.anon.pages[handle : handle + n], dtype=np.int64)
            self.anon.pages[handle : handle + n] = np.full(n, -1, dtype=np.int64)
            pfns = pfns[pfns >= 0]
        self.mm.buddy.free_pfns(pfns)

    def _take_exact(self, p: int, order: int, mt: int) -> bool:
        n = 1 << order
        pool = self.mm.pool
        if p < 0 or p + n > self.nr:
            return False
        seg = pool.flags[p : p + n]
        if not np.all(seg & PG_FREE) or np.any(seg & PG_TARGET):
            return False
        pfns = np.arange(p, p + n, dtype=np.int64)
        self.mm.buddy.isolate_free(pfns)
        pool.flags[pfns] = PG_ALLOC | (mt << PG_MT_SHIFT)
        return True

    def _alloc(self, e: Event) -> None:
        kpfn, order, mt = e.int("pfn"), e.int("order"), e.int("migratetype")
        mt = mt if mt in (0, 1, 2) else 0
        bo = self.gpu.claim(e)
        if bo is not None:  # a GPU page: the design's migrate type, whatever the kernel's
            mt = int(self.design.gem_migratetype)
        if kpfn in self.live:
            self._inc("alloc_of_live_pfn")
            self._release(*self.live.pop(kpfn))
        p = kpfn - self.base
        if self.placement == "kernel" and self._take_exact(p, order, mt):
            self.live[kpfn] = (
                self._gpu_attach(bo, p, order) if bo is not None else self._attach(p, order, mt)
            )
            return
        if self.placement == "kernel":
            self._inc("placement_conflicts")
        buddy = self.mm.buddy
        try:
            pfn = buddy.alloc(order, MigrateType(mt))
        except OutOfMemory:
            if order == 0:
                self._inc("model_alloc_failed")
                return
            self.mm.compact(order, MigrateMode.SYNC_LIGHT)
            try:
                pfn = buddy.alloc(order, MigrateType(mt))
            except OutOfMemory:
                self._inc("model_alloc_failed")
                return
        self.live[kpfn] = (
            self._gpu_attach(bo, pfn, order) if bo is not None else self._attach(pfn, order, mt)
        )

    def _free(self, e: Event) -> None:
        kpfn, order = e.int("pfn"), e.int("order")
        window = self.windows.get(e.cpu)
        got = self.live.pop(kpfn, None)
        if got is not None:
            if window is not None and got[0] in ("o", "g"):
                self.orphans[got[2]].append((got[0], got[1]))  # migrated by the kernel
                self._inc("kernel_migrated_sources")
                return
            self._release(*got)
            return
        if window is not None:
            self._inc("compaction_frees_unknown")  # isolated free pages given back
            return
        if self.orphans[order]:
            kind, handle = self.orphans[order].popleft()
            self._release(kind, handle, order)
            self._inc("orphans_freed")
            return
        p = kpfn - self.base
        n = 1 << order
        if p + n <= self.nr and np.all(self.boot[p : p + n]):
            self.boot[p : p + n] = False
            pool = self.mm.pool
            pool.owner[p : p + n] = OWNER_NONE
            self.mm.buddy.free_pfns(np.arange(p, p + n, dtype=np.int64))
            self._inc("boot_pages_freed", n)
            return
        self._inc("unmatched_frees")

    def _extfrag(self, e: Event) -> None:
        self.kernel_extfrag += 1
        if self.placement != "kernel":
            return
        change = e.fields.get("change_ownership")
        if change == 1 or e.int("fallback_order") >= PAGEBLOCK_ORDER:
            p = e.int("pfn") - self.base
            mt = e.int("alloc_migratetype")
            if mt in (0, 1, 2):
                pool = self.mm.pool
                first = p >> PAGEBLOCK_ORDER
                nblocks = max(1, 1 << max(0, e.int("fallback_order") - PAGEBLOCK_ORDER))
                for b in range(first, min(first + nblocks, pool.nr_pageblocks)):
                    pool.pageblock_mt[b] = mt
                    self.mm.buddy._move_freepages_block(b * PAGEBLOCK_NR_PAGES, MigrateType(mt))

    def _compaction(self, e: Event) -> None:
        if e.name == "mm_compaction_try_to_compact_pages":
            self.pending_order[e.cpu] = e.int("order")
        elif e.name == "mm_compaction_kcompactd_wake":
            self.kcompactd_order = e.int("order")
        elif e.name == "mm_compaction_begin":
            order = self.pending_order.pop(e.cpu, -1)
            if e.comm.startswith("kcompactd"):
                order = self.kcompactd_order
            self.windows[e.cpu] = {"order": order, "migrated": 0, "sync": "sync" in str(
                e.fields.get("mode", "sync"))}  # fmt: skip
        elif e.name == "mm_compaction_migratepages":
            w = self.windows.get(e.cpu)
            if w is not None:
                w["migrated"] += e.int("nr_migrated")
        elif e.name == "mm_compaction_end":
            w = self.windows.pop(e.cpu, None)
            if w is None:
                return
            before = self.mm.vmstat["pgmigrate_success"]
            order = int(w["order"])
            mode = MigrateMode.SYNC_LIGHT if w["sync"] else MigrateMode.ASYNC
            if order < 0 or e.comm.startswith("kcompactd"):
                policy = CompactionPolicy(self.mm.pool.nr_pageblocks, order=order, mode=mode)
                result = self.mm.run_policy(policy)
            else:
                result = self.mm.compact(order, mode)
            self.choices.append(
                Choice(
                    line=e.line,
                    t=e.ts,
                    comm=e.comm,
                    order=order,
                    kernel_status=str(e.fields.get("status", "?")),
                    kernel_migrated=int(w["migrated"]),
                    model_result=result.name,
                    model_migrated=self.mm.vmstat["pgmigrate_success"] - before,
                )
            )

    # -- sampling -----------------------------------------------------------------------------
    def _model_sample(self, index: int, t: float) -> Sample:
        mm = self.mm
        keys = ("compact_stall", "compact_fail", "compact_success")
        return Sample(
            snapshot=index,
            t=t,
            kernel_free=[0] * NR_ORDERS,
            model_free=mm.free_blocks_per_order(),
            kernel_blocks=dict.fromkeys(TYPE_NAMES, 0),
            model_blocks=dict(zip(TYPE_NAMES, mm.pageblocks_per_type(), strict=True)),
            kernel_mixed=None,
            model_mixed=mm.mixed_pageblocks(),
            kernel_extfrag=self.kernel_extfrag,
            model_extfrag=mm.buddy.fallbacks - self._fallbacks0,
            kernel_compact=dict.fromkeys(keys, 0),
            model_compact={k: mm.vmstat[k] for k in keys},
            in_compaction=bool(self.windows),
            kernel_known=False,
        )

    def _sample(self, index: int, t: float, base_vmstat: dict[str, int]) -> Sample:
        if index < 0:
            return self._model_sample(-index - 1, t)
        snap = self.trace.snapshots[index]
        pti = snap.pagetypeinfo
        kblocks = pti.blocks_by_type(self.zone.name) if pti else {}
        scale = self.nr / max(1, self.zone.spanned) if self.window else 1.0
        kblocks = {n: round(kblocks.get(n, 0) * scale) for n in TYPE_NAMES}
        mixed = None
        if pti and pti.mixed_blocks:
            mixed = sum(v for (_, z, _), v in pti.mixed_blocks.items() if z == self.zone.name)
        vm = snap.vmstat
        keys = ("compact_stall", "compact_fail", "compact_success")
        kcomp = {k: vm.get(k, 0) - base_vmstat.get(k, 0) for k in keys}
        mm = self.mm
        mblocks = dict(zip(TYPE_NAMES, mm.pageblocks_per_type(), strict=True))
        return Sample(
            snapshot=index,
            t=t,
            kernel_free=(
                self._runs_per_order(snap.free_runs or [])
                if self.window
                else list(snap.buddyinfo.per_order(self.zone.name))
            ),
            model_free=mm.free_blocks_per_order(),
            kernel_blocks=kblocks,
            model_blocks=mblocks,
            kernel_mixed=mixed,
            model_mixed=mm.mixed_pageblocks(),
            kernel_extfrag=self.kernel_extfrag,
            model_extfrag=mm.buddy.fallbacks - self._fallbacks0,
            kernel_compact=kcomp,
            model_compact={k: mm.vmstat[k] for k in keys},
            in_compaction=bool(self.windows),
            kernel_pcp=pcp_pages(snap.files.get("/proc/zoneinfo", ""), self.zone.name),
        )

    def run(self) -> ReplayResult:
        self.choices: list[Choice] = []
        self._fallbacks0 = self.mm.buddy.fallbacks
        result = ReplayResult(
            self.trace.path, self.design.value, self.placement, self.zone.name, self.base,
            self.nr,
        )  # fmt: skip
        # where each snapshot marker falls among *our* events (those of the zone)
        snaps = self.trace.complete_snapshots
        pos_in_all = {id(e): i for i, e in enumerate(self.trace.events)}
        mine_pos = [pos_in_all[id(e)] for e in self.events]
        by_pos: dict[int, list[int]] = {}
        for s in snaps:
            k = bisect.bisect_left(mine_pos, self.trace.snapshot_at[s])
            by_pos.setdefault(k, []).append(s)
        base_vm = self.trace.snapshots[snaps[0]].vmstat if snaps else {}
        if not snaps and self.events:  # a plain trace: the model's side, every second
            self.counts["model_only"] = 1
            t0, n = self.events[0].ts, 0
            for i, e in enumerate(self.events):
                if e.ts >= t0 + n:
                    by_pos.setdefault(i, []).append(-n - 1)
                    n += 1
            by_pos.setdefault(len(self.events), []).append(-n - 1)
        t = self.events[0].ts if self.events else 0.0
        if self.window:  # the kernel side of a window needs the free runs of that snapshot
            for k in list(by_pos):
                by_pos[k] = [s for s in by_pos[k] if self.trace.snapshots[s].free_runs is not None]
        for i, e in enumerate(self.events):
            for s in by_pos.get(i, ()):
                result.samples.append(self._sample(s, t, base_vm))
            t = e.ts
            name = e.name
            if name == "mm_page_alloc":
                if str(e.fields.get("page", "")).strip("0x") == "" or e.fields.get("page") in (
                    "(nil)",
                    "0000000000000000",
                ):
                    self._inc("kernel_alloc_failed")
                    continue
                self._alloc(e)
            elif name == "mm_page_free":
                self._free(e)
            elif name == "mm_page_alloc_extfrag":
                self._extfrag(e)
            elif name in GPU_CREATE:
                self.gpu.create(e)
            elif name in GPU_DESTROY:
                self._gpu_destroy(e)
            elif name.startswith("mm_compaction"):
                self._compaction(e)
        for s in by_pos.get(len(self.events), ()):
            result.samples.append(self._sample(s, t, base_vm))
        result.choices = self.choices
        self.counts["kernel_extfrag"] = self.kernel_extfrag
        self.counts["model_extfrag"] = self.mm.buddy.fallbacks - self._fallbacks0
        self.counts["orphans_left"] = sum(len(q) for q in self.orphans.values())
        self.counts["events"] = len(self.events)
        result.counts = dict(sorted(self.counts.items()))
        result.gpu = self._gpu_summary()
        return result

    def _gpu_summary(self) -> dict[str, float]:
        gpu = self.gpu
        if not gpu.objects:
            return {}
        mm = self.mm
        resident = pinned = 0
        for obj, _o in self.gpu_objects.values():
            _idx, pfns = obj.resident()
            resident += len(pfns)
            pinned += int(np.count_nonzero(mm.pool.pin[pfns]))
        led = mm.ledger
        stats = self.driver.gem.stats
        return {
            "objects": len(gpu.objects),
            "objects_with_pages": sum(1 for bo in gpu.objects if bo.backed),
            "pages": self.counts.get("gpu_pages", 0),
            "pages_at_end": resident,
            "pinned_at_end": pinned,
            "migratetype": int(self.design.gem_migratetype),
            "owner_asked": int(self.design.asks_owner),
            "callbacks": led.callbacks,
            "pages_moved_by_driver": led.repinned_pages,
            "invalidations": stats.invalidations,
            "refusals": led.refusals,
            "migration_ms": round(led.migration_us / 1000, 6),
            "gpu_stall_ms": round(led.gpu_stall_us / 1000, 6),
            "vram_objects_ignored": gpu.ignored_vram,
            "destroys_of_unknown_objects": gpu.unknown_destroys,
        }


def replay(
    trace: Trace,
    designs: Sequence[str] = ("pinned",),
    placement: Placement = "model",
    zone: str | None = None,
    max_pool: int = DEFAULT_MAX_POOL,
) -> list[ReplayResult]:
    """Replay under each design. A plain trace (no snapshots: trace-cmd, perf script) gives the
    model's side only, sampled every second of trace time."""
    out = []
    for d in designs:
        r = Replayer(trace, design=d, placement=placement, zone=zone, max_pool=max_pool)
        try:
            out.append(r.run())
        finally:
            r.mm.close()
    return out


# -- output -----------------------------------------------------------------------------------
def format_table(results: Sequence[ReplayResult]) -> str:
    lines: list[str] = []
    for r in results:
        lines.append(
            f"replay of {r.path}: zone {r.zone} ({r.pool_pages} pages from pfn {r.base_pfn:#x}), "
            f"design {r.design}, placement {r.placement}"
        )
        head = "snap    t(s)  divergence  " + " ".join(f"{o:>9}" for o in range(NR_ORDERS))
        lines.append(head + "   extfrag k/m   stall k/m  fail k/m  blocks U/M/R k | m")
        if r.samples and not r.samples[0].kernel_known:
            lines.append(
                "(a plain trace without /proc snapshots: the kernel's side is unknown, '-')"
            )
        for s in r.samples:
            pairs = " ".join(
                f"{k if s.kernel_known else '-':>4}/{m:<4}"
                for k, m in zip(s.kernel_free, s.model_free, strict=True)
            )
            kb, mb = s.kernel_blocks, s.model_blocks
            lines.append(
                f"{s.snapshot:>4} {s.t:>7.2f}  {s.divergence:>10.3f}  {pairs}   "
                f"{s.kernel_extfrag:>5}/{s.model_extfrag:<5} "
                f"{s.kernel_compact['compact_stall']:>5}/{s.model_compact['compact_stall']:<5} "
                f"{s.kernel_compact['compact_fail']:>4}/{s.model_compact['compact_fail']:<4} "
                f"{kb['Unmovable']}/{kb['Movable']}/{kb['Reclaimable']} | "
                f"{mb['Unmovable']}/{mb['Movable']}/{mb['Reclaimable']} mixed(m) {s.model_mixed}"
                + (f" pcp(k) {s.kernel_pcp}" if s.kernel_pcp is not None else "")
                + ("  (kernel compacting)" if s.in_compaction else "")
            )
        lines.append("(per order: kernel/model free blocks)")
        if r.choices:
            lines.append("compaction choices (kernel | model):")
            for c in r.choices:
                mark = "  DIFFERS" if c.differs else ""
                lines.append(
                    f"  line {c.line} t={c.t:.3f} {c.comm} order {c.order}: kernel "
                    f"{c.kernel_status}, {c.kernel_migrated} migrated | model "
                    f"{c.model_result.lower()}, {c.model_migrated} migrated{mark}"
                )
        summ = r.summary()
        if "start_divergence" in summ:
            lines.append(
                f"divergence: start {summ['start_divergence']:.3f}, final "
                f"{summ['final_divergence']:.3f}, max {summ['max_divergence']:.3f}, mean "
                f"{summ['mean_divergence']:.3f}; final model-kernel per order "
                f"{summ['final_order_diff']}"
            )
        lines.append(gpu_line(r))
        lines.append("counts: " + ", ".join(f"{k}={v}" for k, v in r.counts.items()))
        lines.append("")
    if len(results) > 1:
        lines.extend(compare_designs(results))
    return "\n".join(lines)


NO_GPU_EVENTS = (
    "no GPU buffer events in this trace (i915_gem_object_create, xe_bo_create, "
    "amdgpu_bo_create): no page is known to back a GPU buffer, so designs that differ only in "
    "how GPU pages are treated replay it alike"
)


def gpu_line(r: ReplayResult) -> str:
    g = r.gpu
    if not g:
        return NO_GPU_EVENTS
    mt = MigrateType(int(g["migratetype"])).title
    who = "asks the driver before moving them" if g["owner_asked"] else "never moves them"
    return (
        f"GPU pages under {r.design}: {g['objects']:.0f} objects ({g['objects_with_pages']:.0f} "
        f"with pages found), {g['pages']:.0f} pages, {mt} pageblocks, pinned while used; the "
        f"core {who}. At the end {g['pages_at_end']:.0f} resident, {g['pinned_at_end']:.0f} "
        f"pinned; moved and re-pinned by the driver {g['pages_moved_by_driver']:.0f}, callbacks "
        f"{g['callbacks']:.0f}, invalidations {g['invalidations']:.0f}, refusals "
        f"{g['refusals']:.0f}; cost {g['migration_ms']:.3f} ms migration, "
        f"{g['gpu_stall_ms']:.3f} ms GPU stall"
    )


def free_huge(free: Sequence[int]) -> int:
    """Free order-9 (2 MiB) blocks, counting each free order-10 block as two."""
    return sum(c << (o - PAGEBLOCK_ORDER) for o, c in enumerate(free) if o >= PAGEBLOCK_ORDER)


def compare_designs(results: Sequence[ReplayResult]) -> list[str]:
    """One row per design: the same trace, what the model ended with and what it paid."""
    lines = [
        "designs compared (same trace, model at the last sample; kernel: what the trace shows):",
        f"{'design':<18} {'2MiB free':>9} {'kernel':>6} {'mixed':>5} {'extfrag':>7} "
        f"{'choices differ':>14} {'gpu pinned':>10} {'re-pinned':>9} {'migr ms':>8} "
        f"{'stall ms':>8}",
    ]
    for r in results:
        f = r.final
        g = r.gpu
        kern = str(free_huge(f.kernel_free)) if f.kernel_known else "-"
        differ = f"{sum(c.differs for c in r.choices)}/{len(r.choices)}"
        lines.append(
            f"{r.design:<18} {free_huge(f.model_free):>9} {kern:>6} {f.model_mixed:>5} "
            f"{f.model_extfrag:>7} {differ:>14} {g.get('pinned_at_end', 0):>10.0f} "
            f"{g.get('pages_moved_by_driver', 0):>9.0f} {g.get('migration_ms', 0):>8.3f} "
            f"{g.get('gpu_stall_ms', 0):>8.3f}"
        )
    if not any(r.gpu for r in results):
        lines.append(NO_GPU_EVENTS)
    lines.append("")
    return lines


def write_outputs(results: Sequence[ReplayResult], out: Path) -> list[Path]:
    """report.txt, replay.json and one plot per design (kernel against model over time)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.txt", out / "replay.json"]
    written[0].write_text(format_table(results))
    written[1].write_text(json.dumps([r.to_json() for r in results], indent=1))
    for r in results:
        written.append(plot(r, out / f"replay-{r.design}-{r.placement}.png"))
    return written


def plot(r: ReplayResult, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    t = [s.t for s in r.samples]
    ax = axes[0][0]
    for o, color in ((0, "C0"), (3, "C1"), (6, "C2"), (9, "C3"), (10, "C4")):
        ax.plot(t, [s.kernel_free[o] for s in r.samples], color=color, label=f"order {o} kernel")
        ax.plot(t, [s.model_free[o] for s in r.samples], color=color, ls="--", label="model")
    ax.set_title("free blocks per order (solid kernel, dashed model)")
    ax.set_yscale("symlog")
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    ax = axes[0][1]
    ax.plot(t, [s.divergence for s in r.samples], color="k")
    ax.set_ylim(0, 1)
    ax.set_title("divergence (mismatched free pages / free pages)")
    ax = axes[1][0]
    for i, name in enumerate(TYPE_NAMES):
        ax.plot(t, [s.kernel_blocks[name] for s in r.samples], color=f"C{i}", label=name)
        ax.plot(t, [s.model_blocks[name] for s in r.samples], color=f"C{i}", ls="--")
    ax.plot(t, [s.model_mixed for s in r.samples], color="C5", ls=":", label="mixed (model)")
    ax.set_title("pageblocks per type (solid kernel, dashed model)")
    ax.legend(fontsize=6, loc="upper left")
    ax = axes[1][1]
    ax.plot(t, [s.kernel_extfrag for s in r.samples], color="C0", label="extfrag kernel")
    ax.plot(t, [s.model_extfrag for s in r.samples], color="C0", ls="--", label="extfrag model")
    ax.plot(t, [s.kernel_compact["compact_stall"] for s in r.samples], color="C1", label="stall k")
    ax.plot(t, [s.model_compact["compact_stall"] for s in r.samples], color="C1", ls="--")
    ax.plot(t, [s.kernel_compact["compact_fail"] for s in r.samples], color="C3", label="fail k")
    ax.plot(t, [s.model_compact["compact_fail"] for s in r.samples], color="C3", ls="--")
    ax.set_title("events so far (solid kernel, dashed model)")
    ax.legend(fontsize=6, loc="upper left")
    for row in axes:
        for a in row:
            a.set_xlabel("trace time (s)")
    fig.suptitle(f"{Path(r.path).name}: zone {r.zone}, design {r.design}, placement {r.placement}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


__all__ = [
    "Placement",
    "ReplayError",
    "ReplayResult",
    "Replayer",
    "TraceFormatError",
    "compare_designs",
    "divergence",
    "format_table",
    "free_huge",
    "replay",
    "write_outputs",
]
