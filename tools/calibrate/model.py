"""The model side of ``gemfs calibrate``: each kernel scenario played on :mod:`gemfs.mm`.

:func:`run_model` does on a :class:`gemfs.mm.MemoryManager` what ``fragment.c`` does in the
guest, step for step: map ``fill`` × the free memory in chunks of ``chunk_kib`` of 4 KiB pages
(MOVABLE, as anonymous memory is), free every other chunk (odd indices), long-term pin none /
all / every other survivor (indices 0, 4, 8 ...), record the free lists, compact the whole pool
(``compact_memory``), record them again, then allocate order-9 blocks until one fails (the
``nr_hugepages`` probe; each failure compacts first, as the kernel's allocation does) and give
them back. It returns the same derived shape as :class:`tools.calibrate.guest.KernelResult`.

What the kernel has that the pool lacks, and what stands in for it (:class:`Knobs`):

- **Zones.** The guest has DMA (16 MiB, never touched by the fill: the lowmem reserve keeps user
  pages out of it) and DMA32. The pool is one zone; the DMA zone's free memory is simply part of
  the free memory the fill leaves alone, which is exactly what it is in the guest.
- **The kernel's own unmovable allocations.** Of the guest's 256 pageblocks ~41 are Unmovable
  and ~5 Reclaimable; the free pages inside them (1-6% of what is free after the fill) are never
  2 MiB blocks, before or after compaction. ``background_fraction`` puts that share of the free
  memory into Unmovable pageblocks at the bottom of the pool as order-``hole_order`` holes
  between unmovable kernel pages (every other one, so they cannot merge); the pool grows by the
  pages those blocks hold, so the free memory at the start is the guest's ``MemFree`` (within
  2 MiB: the pool is whole 4 MiB blocks).
- **Where the chunks start.** Anonymous pages come from the per-cpu lists, refilled from the
  buddy in ascending runs, so the guest's chunks are physically contiguous, one after the other,
  but the whole stream starts a few pages past an aligned boundary (the freed 1 MiB holes split
  into 2 order-1 blocks and one block of each order 2..7: a start 2 pages in; 1, 4, 8 and 64 in
  other boots). The program's own pages came first. ``offset_pages`` allocates that many pages
  before the first chunk. It is what made ``mixed`` bimodal in the kernel: with 1 MiB chunks
  each pageblock holds one kept chunk when the stream starts in the first half of a pageblock
  (offset mod 512 < 256), and parts of two (one of them pinned) when it starts in the second
  half; then nothing comes back.
- **The DMA zone.** Its free 2 MiB blocks cannot be used, but they keep the allocator retrying
  (``other_zone_blocks``, read from the before-state's buddyinfo of the smaller zones).
- **Per-cpu lists** (a few hundred pages that buddyinfo does not show) and reclaim (the guest has
  no swap; its page cache is an initramfs) are not modelled.

:func:`knobs_from_kernel` sets the knobs from a kernel result's "before" state (never from its
outcome): the free memory at the start, the share of free pages in non-movable pageblocks, and
where the chunk stream starts within a pageblock, as the guest read it from
``/proc/self/pagemap`` (older results without it: the offset modulo the chunk size that
reproduces the holes' split into orders, in the default's pageblock half).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gemfs.mm import MemoryManager, MigrateType, page_alloc
from gemfs.mm.buddy import largest_aligned_order
from gemfs.mm.types import (
    MAX_BLOCK_PAGES,
    NR_ORDERS,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    Design,
)
from tools.calibrate.guest import KernelResult, Order9Outcome, Order9Snapshot, Scenario
from tools.calibrate.procfs import blocks_of_order, pages_in

PAGE_KIB = PAGE_SIZE >> 10

DEFAULT_MEM_FREE_KIB = 436_052
"""The guest's MemFree at the start of a scenario (Debian 6.1, 512 MiB, TCG: 436-438 MB)."""
DEFAULT_BACKGROUND_FRACTION = 0.02
"""Free pages in non-movable pageblocks / MemFree at the start: 0.007-0.033 in the guest,
varying from boot to boot (so ``gemfs calibrate`` reads it from each scenario's kernel)."""
DEFAULT_OFFSET_PAGES = 2
"""Where the guest's chunk stream started: 2 pages past an aligned boundary for 1 MiB chunks
(1, 4, 8 and 64 pages in other boots), in the first half of a pageblock in every boot seen here
(``mixed`` recovered 0.59-0.62 of the missing blocks)."""
DEFAULT_OTHER_ZONE_BLOCKS = 7
"""Free 2 MiB blocks (order-9 units) in the guest's other zone (DMA, 16 MiB: one order-9 and
three order-10 blocks in every boot seen). The fill never reaches them (lowmem reserve), but
they make the allocator's should_reclaim_retry() say yes, so a failing huge page allocation
retries reclaim and compaction 16 times (the kernel's ~19 compact_stall per failure)."""
DEFAULT_HOLE_ORDER = 5
"""The guest's free pages in Unmovable pageblocks sit mostly at orders 5-7."""

KSWAPD_SLEEP_CHANCE = 0.5
"""At each retry of the slow path (kswapd was woken on entry and has had the first attempt's
time): the chance that kswapd has gone back to sleep — flushing the skip hints, waking
kcompactd — before the allocation goes on. Unknown and timing-dependent: an even chance."""

BLOCKED_BELOW = 0.25
"""Recovery is "blocked" when compaction wins back less than a quarter of the missing 2 MiB
blocks: the kernel selftest compaction_test's own pass mark, turned around."""


@dataclass(frozen=True)
class Knobs:
    """What the model is told about the kernel it stands in for (see the module doc)."""

    mem_free_kib: int = DEFAULT_MEM_FREE_KIB
    background_fraction: float = DEFAULT_BACKGROUND_FRACTION
    offset_pages: int = DEFAULT_OFFSET_PAGES
    hole_order: int = DEFAULT_HOLE_ORDER
    other_zone_blocks: int = DEFAULT_OTHER_ZONE_BLOCKS
    source: str = "defaults measured on Debian 6.1 / 512 MiB / TCG"

    def __post_init__(self) -> None:
        if self.mem_free_kib < 16 * 1024:
            raise ValueError(f"mem_free_kib {self.mem_free_kib} is below 16 MiB")
        if not 0.0 <= self.background_fraction < 0.5:
            raise ValueError(f"background_fraction {self.background_fraction} not in [0, 0.5)")
        if not 0 <= self.offset_pages < PAGEBLOCK_NR_PAGES:
            raise ValueError(f"offset_pages {self.offset_pages} not in [0, 512)")
        if not 0 <= self.hole_order < PAGEBLOCK_ORDER:
            raise ValueError(f"hole_order {self.hole_order} not in [0, 9)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -----------------------------------------------------------------------------------------------
# Knobs from what the kernel showed before compaction


def interval_orders(start: int, length: int) -> list[int]:
    """Free blocks per order that the pages [start, start+length) split into in a buddy allocator
    (largest naturally aligned blocks first), as a list indexed by order."""
    out = [0] * NR_ORDERS
    pos, end = start, start + length
    while pos < end:
        o = largest_aligned_order(pos, end - pos)
        out[o] += 1
        pos += 1 << o
    return out


def infer_offset(chunk_pages: int, movable_free: Sequence[int], holes: int) -> int:
    """The start offset (mod ``chunk_pages``, at most half a chunk: s and chunk − s split alike)
    whose holes, ``holes`` of them, best explain the free MOVABLE blocks below order 9."""
    if chunk_pages >= PAGEBLOCK_NR_PAGES or holes <= 0:
        return 0
    seen = list(movable_free[:PAGEBLOCK_ORDER]) + [0] * (PAGEBLOCK_ORDER - len(movable_free))
    best, best_cost = 0, float("inf")
    for s in range(chunk_pages // 2 + 1):
        want = interval_orders(s, chunk_pages)
        cost = sum(abs(seen[o] - holes * want[o]) for o in range(PAGEBLOCK_ORDER))
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def knobs_from_kernel(result: KernelResult, base: Knobs | None = None) -> Knobs:
    """Knobs from a kernel result's start and "before" state: MemFree at the start, the share of
    it lying free in non-movable pageblocks, the chunk stream's offset (mod the chunk size)."""
    base = base or Knobs()
    free_start_pages = result.mem_free_start_kib // PAGE_KIB
    by_type = result.before.pagetypeinfo.free_by_type()
    trapped = sum(pages_in(row) for mt, row in by_type.items() if mt != "Movable")
    movable = by_type.get("Movable", ())
    chunk_pages = result.chunk_bytes // PAGE_SIZE
    if result.phase_pages is not None:  # measured: the guest read its own frame numbers
        offset = result.phase_pages
    elif chunk_pages < PAGEBLOCK_NR_PAGES:
        offset = infer_offset(chunk_pages, movable, result.chunks_freed)
        # Keep the pageblock half the default (or the given base) says the stream starts in.
        offset += base.offset_pages - base.offset_pages % chunk_pages
    else:  # the holes are whole pageblocks whatever the offset: nothing to read
        offset = base.offset_pages
    zones = result.before.buddyinfo.zone_names()
    main = max(zones, key=result.before.buddyinfo.free_pages) if zones else None
    other = sum(result.before.buddyinfo.huge_blocks(z) for z in zones if z != main)
    return replace(
        base,
        other_zone_blocks=other,
        mem_free_kib=result.mem_free_start_kib,
        background_fraction=round(min(0.45, trapped / max(1, free_start_pages)), 4),
        offset_pages=offset % PAGEBLOCK_NR_PAGES,
        source=f"kernel before-state of {result.scenario.name}"
        + (" (phase from pagemap)" if result.phase_pages is not None else ""),
    )


# -----------------------------------------------------------------------------------------------
# The model's result


@dataclass(frozen=True)
class ModelSnapshot:
    """The pool's free lists at one moment: per order, and per (migrate type, order)."""

    buddyinfo: tuple[int, ...]
    free_by_type: Mapping[str, tuple[int, ...]]
    pageblocks: Mapping[str, int]

    @property
    def free_pages(self) -> int:
        return pages_in(self.buddyinfo)

    @property
    def order9_blocks(self) -> int:
        return blocks_of_order(self.buddyinfo, PAGEBLOCK_ORDER)

    @property
    def ideal_order9(self) -> int:
        return self.free_pages >> PAGEBLOCK_ORDER

    @property
    def order9_fraction(self) -> float:
        return self.order9_blocks / self.ideal_order9 if self.ideal_order9 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "buddyinfo": list(self.buddyinfo),
            "free_by_type": {k: list(v) for k, v in self.free_by_type.items()},
            "pageblocks": dict(self.pageblocks),
            "free_pages": self.free_pages,
            "order9_blocks": self.order9_blocks,
        }


@dataclass(frozen=True)
class ModelResult(Order9Outcome):
    """One scenario as the model played it; the derived properties match KernelResult's."""

    scenario: Scenario
    knobs: Knobs
    pool_pages: int
    free_start_pages: int
    background_pages: int
    chunk_bytes: int
    chunks_allocated: int
    chunks_freed: int
    chunks_kept: int
    chunks_pinned: int
    before: ModelSnapshot
    after: ModelSnapshot
    hugepages_obtained: int
    migrated: int
    migrate_failed: int
    elapsed_s: float
    vmstat: Mapping[str, int] = field(default_factory=dict)
    seed: int = 0
    huge_vmstat: Mapping[str, int] = field(default_factory=dict)
    compact_state: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pinned_bytes(self) -> int:
        return self.chunks_pinned * self.chunk_bytes

    def _sides(self) -> tuple[Order9Snapshot, Order9Snapshot, int]:
        return self.before, self.after, self.hugepages_obtained

    @property
    def recovery_blocked(self) -> bool:
        return self.recovered_fraction < BLOCKED_BELOW

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": asdict(self.scenario),
            "knobs": self.knobs.to_json(),
            "pool_pages": self.pool_pages,
            "free_start_pages": self.free_start_pages,
            "background_pages": self.background_pages,
            "chunk_bytes": self.chunk_bytes,
            "chunks": {
                "allocated": self.chunks_allocated,
                "freed": self.chunks_freed,
                "kept": self.chunks_kept,
                "pinned": self.chunks_pinned,
            },
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "hugepages_obtained": self.hugepages_obtained,
            "migrated": self.migrated,
            "migrate_failed": self.migrate_failed,
            "elapsed_s": round(self.elapsed_s, 3),
            "vmstat": dict(self.vmstat),
            "seed": self.seed,
            "hugepage_loop_vmstat": dict(self.huge_vmstat),
            "compact_state": dict(self.compact_state),
        }


# -----------------------------------------------------------------------------------------------
# Playing a scenario


def _snapshot(mm: MemoryManager) -> ModelSnapshot:
    per_type = mm.free_per_type_order()
    blocks = mm.pageblocks_per_type()
    return ModelSnapshot(
        buddyinfo=tuple(mm.free_blocks_per_order()),
        free_by_type={mt.title: tuple(per_type[mt]) for mt in MigrateType},
        pageblocks={mt.title: blocks[mt] for mt in MigrateType},
    )


def pool_layout(knobs: Knobs) -> tuple[int, int]:
    """(order-10 blocks of background at the bottom, pool pages) for these knobs.

    The background is whole order-10 blocks, so no stolen block leaves free pages of its own on
    the unmovable lists: every other piece in it is free, half its pages, the nearest to
    ``background_fraction`` of the free memory. The rest of the pool is the remaining free memory
    plus the program's pages, rounded to whole order-10 blocks: the free memory at the start is
    ``mem_free_kib`` within 2 MiB."""
    free = knobs.mem_free_kib // PAGE_KIB
    half = MAX_BLOCK_PAGES // 2
    blocks = round(free * knobs.background_fraction / half)
    rest = free - blocks * half + knobs.offset_pages
    rest = max(MAX_BLOCK_PAGES, round(rest / MAX_BLOCK_PAGES) * MAX_BLOCK_PAGES)
    return blocks, blocks * MAX_BLOCK_PAGES + rest


@dataclass(frozen=True)
class Carry:
    """What the zone remembers from the scenarios played before in the same boot: the deferral
    (compact_considered, compact_defer_shift, compact_order_failed) and whether a direct
    compaction's scanners met since kswapd last slept (compact_blockskip_flush). The pool is
    rebuilt, and /init's compact_memory between scenarios does not touch these."""

    considered: int = 0
    defer_shift: int = 0
    order_failed: int = 0
    blockskip_flush: bool = False

    @classmethod
    def after(cls, result: ModelResult) -> Carry:
        st = result.compact_state
        return cls(
            int(st["compact_considered"]),
            int(st["compact_defer_shift"]),
            int(st["compact_order_failed"]),
            bool(st["compact_blockskip_flush"]),
        )


def run_model(
    scenario: Scenario, knobs: Knobs | None = None, seed: int = 0, carry: Carry | None = None
) -> ModelResult:
    """Play one scenario on a fresh pool (see the module doc); deterministic for given knobs,
    seed (it draws only when kswapd sleeps during the hugepage loop) and ``carry`` (the zone's
    deferral from the scenarios before it in the same boot; none: the boot's first)."""
    knobs = knobs or Knobs()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    bg_blocks, pool_pages = pool_layout(knobs)
    mm = MemoryManager(pool_pages * PAGE_SIZE, design=Design.PINNED)
    try:
        # The kernel's own memory: unmovable pageblocks at the bottom, every other
        # order-hole_order piece in them free (no two free pieces are buddies: none merge).
        pieces = [
            mm.alloc_kernel(knobs.hole_order, MigrateType.UNMOVABLE)
            for _ in range(bg_blocks * MAX_BLOCK_PAGES >> knobs.hole_order)
        ]
        for piece in pieces[1::2]:
            mm.free_kernel(piece)
        background_pages = pool_pages - mm.buddy.free_pages
        mm.compact()  # /init compacts before every scenario
        if carry is not None:
            st = mm.compact_state
            st.considered, st.defer_shift = carry.considered, carry.defer_shift
            st.order_failed, st.blockskip_flush = carry.order_failed, carry.blockskip_flush
        mm.compact_state.scanner_sees_pins = True  # FOLL_LONGTERM pins of anonymous memory
        # The program's own pages, handed out just before its first chunk.
        for _ in range(knobs.offset_pages):
            mm.alloc_kernel(0, MigrateType.MOVABLE)
        free_start = mm.buddy.free_pages

        chunk_pages = scenario.chunk_kib * 1024 // PAGE_SIZE
        nchunks = int(free_start * PAGE_SIZE * scenario.fill) // (chunk_pages * PAGE_SIZE)
        if nchunks < 4:
            raise ValueError(f"only {nchunks} chunks fit in the model's free memory")
        chunks = []
        for _ in range(nchunks):
            obj = mm.create_object(0, migratetype=MigrateType.MOVABLE)
            mm.truncate(obj, chunk_pages * PAGE_SIZE)
            mm.populate(obj, 0, chunk_pages, zero=False)
            chunks.append(obj)
        free = scenario.free
        kept = []
        for i, obj in enumerate(chunks):
            if free[i % len(free)] == "1":
                mm.destroy_object(obj)
            else:
                kept.append(obj)
        pins = scenario.pins
        to_pin = [obj for j, obj in enumerate(kept) if pins[j % len(pins)] == "1"]
        for obj in to_pin:
            mm.pin_pages(obj.pages.copy())

        before = _snapshot(mm)
        vm0 = dict(mm.refresh_gauges())
        if scenario.compact:
            mm.compact()
        after = _snapshot(mm)
        vm1 = dict(mm.refresh_gauges())

        def kswapd_slept() -> bool:
            return rng.random() < KSWAPD_SLEEP_CHANCE

        huge: list[int] = []
        while True:
            slow = page_alloc.alloc_pages_slowpath(
                mm,
                PAGEBLOCK_ORDER,
                MigrateType.MOVABLE,
                "hugetlb",
                kswapd=kswapd_slept,
                other_zone_ok=knobs.other_zone_blocks > 0,
            )
            block = page_alloc.drive(mm, slow)
            if block is None:
                break
            huge.append(block)
        vm2 = dict(mm.refresh_gauges())
        state = mm.compact_state.to_json()
        for block in huge:
            mm.free_kernel(block)
        delta = {k: v - vm0.get(k, 0) for k, v in vm1.items()}
        huge_delta = {
            k: v - vm1.get(k, 0) for k, v in vm2.items() if k.startswith(("compact_", "htlb_"))
        }
        return ModelResult(
            scenario=scenario,
            knobs=knobs,
            pool_pages=pool_pages,
            free_start_pages=free_start,
            background_pages=background_pages,
            chunk_bytes=chunk_pages * PAGE_SIZE,
            chunks_allocated=nchunks,
            chunks_freed=nchunks - len(kept),
            chunks_kept=len(kept),
            chunks_pinned=len(to_pin),
            before=before,
            after=after,
            hugepages_obtained=len(huge),
            migrated=delta.get("pgmigrate_success", 0),
            migrate_failed=delta.get("pgmigrate_fail", 0),
            elapsed_s=time.perf_counter() - t0,
            vmstat=delta,
            seed=seed,
            huge_vmstat=huge_delta,
            compact_state=state,
        )
    finally:
        mm.close()
