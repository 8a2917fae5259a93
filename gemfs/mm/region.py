"""Regions only some allocations may use: move-then-pin (longterm-pin) and confinement (confine).

Both designs split the pool at the buddy allocator's fence (:mod:`gemfs.mm.buddy`): frames below
it take any allocation, frames from it up only MOVABLE ones, and a page may be pinned for long
only below it. The designs differ in where the fence stands and whether it moves.

**longterm-pin** -- what Linux merged: ``pin_user_pages(FOLL_LONGTERM)`` (5.13) and
``memfd_pin_folios`` (6.11). Above the fence lies the movable region, ZONE_MOVABLE as
``movablecore=`` makes it (the top of memory; a CMA area behaves alike for pinning). The GEM
pages are MOVABLE (memfd / userptr memory), so they are placed there first, as the zonelist
tries ZONE_MOVABLE before ZONE_NORMAL. ``folio_is_longterm_pinnable()`` is false for a page in
ZONE_MOVABLE or CMA, so before pinning, ``check_and_migrate_movable_folios()`` /
``migrate_longterm_unpinnable_folios()`` (mm/gup.c) migrate those pages out -- targets from
``alloc_migration_target`` with ``GFP_USER`` (no ``__GFP_MOVABLE``: ZONE_NORMAL, an UNMOVABLE
pageblock), ``MIGRATE_SYNC``, reason ``MR_LONGTERM_PIN`` -- and pin the pages where they now
are. The region's size is ``movablecore`` (a size or a percentage of the pool, as the boot
parameter; default :data:`DEFAULT_MOVABLECORE`), rounded down to whole 4 MiB blocks.

**confine** -- Contiguitas (Zhao et al., ISCA 2023) and the 2026 superpageblocks RFC: the
unmovable and pinned memory lives in a region at the bottom of the pool that grows and shrinks
from its top end by a granule (the RFC's 1 GiB superpageblock). Every non-MOVABLE allocation is
steered into it (i915's RECLAIMABLE GEM pages among them), a page pinned outside it is moved in
first (the same move-then-pin as above), and MOVABLE allocations are placed outside it and
enter it only when the rest of the pool is full. When a non-movable allocation finds the region
full, the region grows by a granule and the movable pages in the span it claims are evacuated
(migrated out, above the new fence) -- unless the rest of the pool has no room for them: then
the request fails and the caller reclaims (page cache) before it tries again. When the top
granule holds nothing unmovable or pinned any more and the region below keeps a quarter
granule free, the span is returned. Compaction runs
over the whole pool as before; the mechanism refuses to move a non-movable page above the fence
(``pgmigrate_wrong_zone``), so an unpinned GEM page may move only within the region.

Both run every migration through the one mechanism (:meth:`MemoryManager.migrate_pages`, the
state machine of :mod:`gemfs.mm.migrate`) and charge it there (``copy_page_us`` per page moved);
the ledger keeps what pin-time migration and evacuation cost apart, and vmstat counts them:
``pgmigrate_longterm_pin`` / ``_fail``, ``confine_grow``, ``confine_shrink``,
``confine_evacuated`` / ``_fail``.

One deviation, counted: when no frame outside the movable region is free for a page about to be
pinned, the kernel fails the pin with -ENOMEM; the model pins the page where it is and counts it
in ``pgmigrate_longterm_pin_fail`` (a run does not die mid-batch; a non-zero count says the
non-movable part of the pool is too small for the workload's pins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gemfs.mm.costs import Task
from gemfs.mm.pool import (
    I64,
    PG_ALLOC,
    PG_FREE,
    PG_ISOLATED,
    PG_MT_MASK,
    PG_MT_SHIFT,
    PG_OBJECT,
    PG_TARGET,
)
from gemfs.mm.types import (
    MAX_BLOCK_PAGES,
    PAGE_SIZE,
    PAGEBLOCK_ORDER,
    Design,
    MigrateMode,
    MigrateType,
    format_size,
    parse_size,
)

if TYPE_CHECKING:
    from gemfs.mm.core import MemoryManager
    from gemfs.mm.objects import GemObject

DEFAULT_MOVABLECORE = "50%"
CONFINE_GRANULE = 1 << 30  # the RFC's superpageblock
CONFINE_GRANULE_FRACTION = 32  # small pools: a 32nd of the pool (at least one 4 MiB block)

_BLOCK_BYTES = MAX_BLOCK_PAGES * PAGE_SIZE


def movablecore_pages(spec: str | None, nr_pages: int) -> int:
    """Pages of the movable region for ``movablecore=`` SPEC: a size (``128MiB``) or a share of
    the pool (``50%``), rounded down to whole 4 MiB blocks; it must leave a block below it."""
    text = (DEFAULT_MOVABLECORE if spec is None else spec).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"bad movablecore {spec!r} (a size or a percentage)") from None
        if not 0 < pct < 100:
            raise ValueError(f"movablecore {spec!r} must be between 0% and 100%")
        pages = int(nr_pages * pct / 100)
    else:
        try:
            pages = parse_size(text) // PAGE_SIZE
        except ValueError:
            raise ValueError(f"bad movablecore {spec!r} (a size or a percentage)") from None
    pages -= pages % MAX_BLOCK_PAGES
    if pages < MAX_BLOCK_PAGES or pages > nr_pages - MAX_BLOCK_PAGES:
        raise ValueError(
            f"movablecore {spec!r} leaves no room: the movable region must be at least one "
            f"{format_size(_BLOCK_BYTES)} block and leave one below it"
        )
    return pages


def confine_granule_pages(spec: str | None, nr_pages: int) -> int:
    """Pages the confined region grows and shrinks by: ``spec`` (a multiple of 4 MiB no larger
    than the pool) or by default 1 GiB, scaled down on pools smaller than 32 GiB to a 32nd of
    the pool (rounded down to 4 MiB, at least 4 MiB)."""
    if spec is None:
        pages = min(CONFINE_GRANULE // PAGE_SIZE, nr_pages // CONFINE_GRANULE_FRACTION)
        return max(MAX_BLOCK_PAGES, pages - pages % MAX_BLOCK_PAGES)
    try:
        nbytes = parse_size(spec)
    except ValueError:
        raise ValueError(f"bad confine granule {spec!r} (a size, e.g. 8MiB)") from None
    if nbytes <= 0 or nbytes % _BLOCK_BYTES or nbytes > nr_pages * PAGE_SIZE:
        raise ValueError(
            f"confine granule {spec!r} must be a multiple of {format_size(_BLOCK_BYTES)} "
            "no larger than the pool"
        )
    return nbytes // PAGE_SIZE


@dataclass
class Region:
    """The fence's policy: fixed (longterm-pin) or moving by ``granule`` pages (confine)."""

    design: Design
    granule: int = 0  # confine: pages per grow/shrink step; 0: the fence never moves

    @property
    def confine(self) -> bool:
        return self.granule > 0


def setup(mm: MemoryManager, movablecore: str | None, confine_granule: str | None) -> Region | None:
    """Place the fence for the design (None when it has no region)."""
    n = mm.pool.nr_pages
    if mm.design is Design.LONGTERM_PIN:
        mm.buddy.set_fence(n - movablecore_pages(movablecore, n))
        return Region(mm.design)
    if mm.design is Design.CONFINE:
        g = confine_granule_pages(confine_granule, n)
        mm.buddy.set_fence(min(n, g))
        return Region(mm.design, granule=g)
    return None


def _targets(mm: MemoryManager, n: int, zone: int, *, grow: bool) -> I64:
    """Up to ``n`` free frames of ``zone`` for migration targets, as the allocator would hand
    them out (zone 0: ``GFP_USER``, UNMOVABLE, stealing a pageblock when it must; zone 1:
    MOVABLE). They are given back at once: the mechanism isolates exactly these frames.
    ``grow``: under confine, grow the region until zone 0 has room (or cannot grow)."""
    b = mm.buddy
    while grow and b.zone_free_pages(zone) < n and confine_grow(mm):
        pass
    k = min(n, b.zone_free_pages(zone))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    mt = MigrateType.UNMOVABLE if zone == 0 else MigrateType.MOVABLE
    t = b.alloc_bulk(k, mt, zones=(zone,))
    b.free_pfns(t)
    return t


def pin_migrate(mm: MemoryManager, obj: GemObject, start: int, new: np.ndarray) -> None:
    """Move-then-pin: of the pages [start, start+len(new)) about to be pinned (``new``), move
    those above the fence below it first (``migrate_longterm_unpinnable_folios``). Pages
    already pinned by someone stay (they are pinned already)."""
    b, p = mm.buddy, mm.pool
    idx = start + np.flatnonzero(new)
    pfns = obj.pages[idx]
    out = (pfns >= b.fence) & (p.pin[pfns] == 0)
    if not np.any(out):
        return
    src = pfns[out]
    dst = _targets(mm, len(src), 0, grow=True)
    task = Task(mm.clock.now)
    moved = 0
    if len(dst):
        moved = mm.migrate_pages(src[: len(dst)], dst, MigrateMode.SYNC, task).success
    failed = len(src) - moved
    _count(mm, "pgmigrate_longterm_pin", moved)
    _count(mm, "pgmigrate_longterm_pin_fail", failed)
    led = mm.ledger
    led.pin_migrated_pages += moved
    led.pin_migration_us += task.us
    # the object cannot be bound for the GPU until its pages have moved: a stall
    led.gpu_stall_us += task.us


def _count(mm: MemoryManager, name: str, n: int) -> None:
    if n:
        mm.vmstat.inc(name, n)


def confine_grow(mm: MemoryManager) -> bool:
    """Grow the confined region by a granule, evacuating the movable pages in the span it
    claims (to free frames above the new fence); False when it cannot grow."""
    r, b, p = mm.region, mm.buddy, mm.pool
    if r is None or not r.confine or b.fence >= p.nr_pages:
        return False
    old = b.fence
    new = min(p.nr_pages, old + r.granule)
    fl = p.flags[old:new]
    want = PG_ALLOC | PG_OBJECT
    movable = (fl & (want | PG_ISOLATED)) == want
    cand = (np.flatnonzero(movable & (p.pin[old:new] == 0)) + old).astype(np.int64)
    room = b.zone_free_pages(1) - int(np.count_nonzero(fl & PG_FREE))
    if len(cand) > room:
        # the rest of the pool cannot take the span's movable pages: no growth (the request
        # fails, and reclaim runs before it is tried again, as the kernel reclaims first)
        mm.vmstat.inc("confine_grow_blocked")
        return False
    b.set_fence(new)
    mm.vmstat.inc("confine_grow")
    mm.ledger.region_grows += 1
    if len(cand) == 0:
        return True
    task = mm.current_task()
    before = task.us
    dst = _targets(mm, len(cand), 1, grow=False)
    moved = 0
    if len(dst):
        moved = mm.migrate_pages(cand[: len(dst)], dst, MigrateMode.SYNC, task).success
    _count(mm, "confine_evacuated", moved)
    _count(mm, "confine_evacuate_fail", len(cand) - moved)
    mm.ledger.evacuated_pages += moved
    mm.ledger.evacuation_us += task.us - before
    return True


def confine_maybe_shrink(mm: MemoryManager, lo: int, hi: int) -> None:
    """Frames in [lo, hi) were freed: return the region's top granule while it holds nothing
    unmovable, pinned or mid-migration and the region below keeps a quarter granule free."""
    r, b, p = mm.region, mm.buddy, mm.pool
    if r is None or not r.confine:
        return
    g = r.granule
    if hi <= b.fence - g or lo >= b.fence:
        return
    while b.fence - g >= g:
        top, end = b.fence - g, b.fence
        fl = p.flags[top:end]
        mt = (fl & PG_MT_MASK) >> PG_MT_SHIFT
        busy = ((fl & PG_ALLOC) != 0) & (mt != MigrateType.MOVABLE)
        busy |= (p.pin[top:end] > 0) | ((fl & (PG_ISOLATED | PG_TARGET)) != 0)
        if np.any(busy):
            return
        free_span = int(np.count_nonzero(fl & PG_FREE))
        if b.zone_free_pages(0) - free_span < g // 4:
            return
        b.set_fence(top)
        mm.vmstat.inc("confine_shrink")
        mm.ledger.region_shrinks += 1


def check(mm: MemoryManager) -> None:
    """Invariants (tests): nothing but MOVABLE allocations above the fence; no pin there
    unless a pin-time migration failed."""
    p, fence = mm.pool, mm.buddy.fence
    fl = p.flags[fence:]
    mt = (fl & PG_MT_MASK) >> PG_MT_SHIFT
    assert not np.any(((fl & PG_ALLOC) != 0) & (mt != MigrateType.MOVABLE)), (
        "a non-movable allocation above the fence"
    )
    assert np.all(p.pageblock_mt[fence >> PAGEBLOCK_ORDER :] == MigrateType.MOVABLE), (
        "a pageblock of another type above the fence"
    )
    if not mm.vmstat["pgmigrate_longterm_pin_fail"]:
        assert not np.any(p.pin[fence:] > 0), "a long-term pin above the fence"
