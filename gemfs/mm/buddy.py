"""The buddy allocator (mm/page_alloc.c in miniature).

Free lists per (order, migrate type) are intrusive doubly linked lists threaded through the free
heads' ``owner`` (prev) and ``index`` (next) fields. Allocation takes the list head; freeing merges
with the buddy while it is free and of the same order. When a migrate type runs dry the allocator
falls back to other types in Linux's order and may steal the whole pageblock
(``steal_suitable_fallback``): that is how mixed pageblocks, and with them fragmentation, arise.

Zones: a ``fence`` (a multiple of the largest block) may split the pool in two, like
ZONE_NORMAL below ZONE_MOVABLE. Frames from the fence up are zone 1, which only MOVABLE requests
may use; zone 0 serves every type. Each zone has its own free lists (list slot ``mt + 3 * zone``);
``nr_free[order][mt]`` counts both zones. A MOVABLE request tries zone 1 first and then zone 0,
as the kernel's zonelist tries ZONE_MOVABLE before ZONE_NORMAL; fallback and pageblock stealing
stay within one zone. Without a fence (``fence == nr_pages``) everything is zone 0, as before.
The longterm-pin design puts its movable region above the fence; the confine design puts its
confined region below it and moves the fence (:meth:`BuddyAllocator.set_fence`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gemfs.mm.pool import (
    I64,
    OWNER_NONE,
    PG_ALLOC,
    PG_BUDDY,
    PG_FREE,
    PG_MT_MASK,
    PG_MT_SHIFT,
    PG_TARGET,
    PagePool,
)
from gemfs.mm.types import (
    FALLBACKS,
    MAX_BLOCK_PAGES,
    MAX_ORDER,
    NR_MIGRATETYPES,
    NR_ORDERS,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    MigrateType,
    OutOfMemory,
)

if TYPE_CHECKING:
    from gemfs.mm.trace import Tracer

NIL = -1


def can_steal_fallback(order: int, start_mt: MigrateType) -> bool:
    """mm/page_alloc.c can_steal_fallback(): may the request claim the whole pageblock?"""
    if order >= PAGEBLOCK_ORDER:
        return True
    return order >= PAGEBLOCK_ORDER // 2 or start_mt != MigrateType.MOVABLE


NR_ZONES = 2
_ZONES_ANY = (0,)
_ZONES_MOVABLE = (1, 0)  # ZONE_MOVABLE first, then ZONE_NORMAL


class BuddyAllocator:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        slots = NR_MIGRATETYPES * NR_ZONES
        self.head = [[NIL] * slots for _ in range(NR_ORDERS)]
        self.tail = [[NIL] * slots for _ in range(NR_ORDERS)]
        self.nr_free = [[0] * NR_MIGRATETYPES for _ in range(NR_ORDERS)]
        self.slot_free = [[0] * slots for _ in range(NR_ORDERS)]  # per zone
        self.fence = pool.nr_pages  # frames from here up: zone 1 (MOVABLE requests only)
        self.free_pages = 0
        self.steals = 0  # pageblocks whose type a fallback changed
        self.fallbacks = 0  # allocations served from another type's list
        self.tracer: Tracer | None = None  # kmem events (MemoryManager.tracer sets it)
        # Scalar access through memoryviews is several times cheaper than numpy indexing;
        # vectorized work still goes through the numpy arrays (the same memory).
        self._flags = pool.flags.data
        self._order = pool.order.data
        self._prev = pool.owner.data
        self._next = pool.index.data
        pool.flags[:] = PG_FREE
        for pfn in range(0, pool.nr_pages, 1 << MAX_ORDER):
            self._add(pfn, MAX_ORDER, pool.get_pageblock_migratetype(pfn), tail=True)
            self.free_pages += 1 << MAX_ORDER

    # -- free lists -------------------------------------------------------------------------
    def _add(self, pfn: int, order: int, mt: int, *, tail: bool = False) -> None:
        # The block's frames already carry PG_FREE (and no owner): whoever frees frames marks
        # them, so queueing a block touches its head only.
        prev_, next_ = self._prev, self._next
        self._flags[pfn] = PG_FREE | PG_BUDDY | (mt << PG_MT_SHIFT)
        self._order[pfn] = order
        slot = mt + NR_MIGRATETYPES if pfn >= self.fence else mt
        if tail and self.tail[order][slot] != NIL:
            last = self.tail[order][slot]
            next_[last] = pfn
            prev_[pfn] = last
            next_[pfn] = NIL
            self.tail[order][slot] = pfn
        else:
            first = self.head[order][slot]
            next_[pfn] = first
            prev_[pfn] = NIL
            if first != NIL:
                prev_[first] = pfn
            else:
                self.tail[order][slot] = pfn
            self.head[order][slot] = pfn
        self.nr_free[order][mt] += 1
        self.slot_free[order][slot] += 1

    def _del(self, pfn: int) -> tuple[int, int]:
        """Take a free head off its list; returns (order, mt). Frames keep PG_FREE."""
        prev_, next_ = self._prev, self._next
        order = self._order[pfn]
        mt = (self._flags[pfn] & PG_MT_MASK) >> PG_MT_SHIFT
        slot = mt + NR_MIGRATETYPES if pfn >= self.fence else mt
        prev, nxt = prev_[pfn], next_[pfn]
        if prev != NIL:
            next_[prev] = nxt
        else:
            self.head[order][slot] = nxt
        if nxt != NIL:
            prev_[nxt] = prev
        else:
            self.tail[order][slot] = prev
        self._flags[pfn] = PG_FREE
        prev_[pfn] = OWNER_NONE
        next_[pfn] = NIL
        self.nr_free[order][mt] -= 1
        self.slot_free[order][slot] -= 1
        return order, mt

    def _expand(self, pfn: int, low: int, high: int, mt: int) -> None:
        """Split a block of order ``high`` down to ``low``; upper halves go back on the lists."""
        while high > low:
            high -= 1
            self._add(pfn + (1 << high), high, mt)

    def _mark_allocated(self, pfn: int, n: int, mt: int) -> None:
        p = self.pool
        p.flags[pfn : pfn + n] = PG_ALLOC | (mt << PG_MT_SHIFT)
        p.order[pfn : pfn + n] = 0
        p.touch(pfn, n)
        self.free_pages -= n

    # -- allocation -------------------------------------------------------------------------
    def zones_for(self, mt: MigrateType) -> tuple[int, ...]:
        """The zones a request of this type may use, in the order it tries them."""
        if self.fence < self.pool.nr_pages and mt == MigrateType.MOVABLE:
            return _ZONES_MOVABLE
        return _ZONES_ANY

    def zone_free_pages(self, zone: int) -> int:
        base = NR_MIGRATETYPES * zone
        return sum(
            sum(self.slot_free[o][base : base + NR_MIGRATETYPES]) << o for o in range(NR_ORDERS)
        )

    def set_fence(self, fence: int) -> None:
        """Move the zone boundary to ``fence`` (a multiple of the largest block). The free
        blocks between the old and the new fence change lists; frames that become zone 1 have
        their pageblocks made MOVABLE (the caller makes sure no other type is allocated there)."""
        p = self.pool
        if fence % MAX_BLOCK_PAGES or not 0 <= fence <= p.nr_pages:
            raise ValueError(f"fence {fence} is not a multiple of {MAX_BLOCK_PAGES} in the pool")
        old = self.fence
        lo, hi = min(old, fence), max(old, fence)
        heads = (np.flatnonzero(p.flags[lo:hi] & PG_BUDDY) + lo).tolist()
        moved = [(h, *self._del(h)) for h in heads]
        self.fence = fence
        if fence < old:
            first, last = lo >> PAGEBLOCK_ORDER, hi >> PAGEBLOCK_ORDER
            p.pageblock_mt[first:last] = MigrateType.MOVABLE
            p.pb_dirty[first:last] = True
        for h, order, mt in moved:
            self._add(h, order, MigrateType.MOVABLE if fence < old else mt, tail=True)

    def _rmqueue_smallest(self, order: int, mt: int, zone: int = 0) -> int:
        slot = mt + NR_MIGRATETYPES * zone
        for o in range(order, NR_ORDERS):
            pfn = self.head[o][slot]
            if pfn != NIL:
                self._del(pfn)
                self._expand(pfn, order, o, mt)
                return pfn
        return NIL

    def _find_suitable_fallback(
        self, order: int, start_mt: MigrateType, zone: int = 0
    ) -> tuple[int, bool]:
        base = NR_MIGRATETYPES * zone
        for fmt in FALLBACKS[start_mt]:
            if self.head[order][fmt + base] != NIL:
                return int(fmt), can_steal_fallback(order, start_mt)
        return NIL, False

    def _rmqueue_fallback(
        self, order: int, start_mt: MigrateType, nofragment: bool = False, zone: int = 0
    ) -> bool:
        """__rmqueue_fallback(): move a block of another type to start_mt's lists.

        ``nofragment`` (ALLOC_NOFRAGMENT, always set under vm.defrag_mode): only a whole free
        pageblock of another type may be claimed (6.15 __rmqueue_claim's min_order), never
        part of one (no __rmqueue_steal)."""
        found = NIL
        can_steal = False
        current = MAX_ORDER
        lowest = max(order, PAGEBLOCK_ORDER) if nofragment else order
        while current >= lowest:
            found, can_steal = self._find_suitable_fallback(current, start_mt, zone)
            if found != NIL:
                if not can_steal and start_mt == MigrateType.MOVABLE and current > order:
                    found = NIL  # don't break up a large block for a movable request
                break
            current -= 1
        if found == NIL and nofragment:
            return False
        if found == NIL:  # find_smallest
            for current in range(order, NR_ORDERS):
                found, can_steal = self._find_suitable_fallback(current, start_mt, zone)
                if found != NIL:
                    break
        if found == NIL:
            return False
        pfn = self.head[current][found + NR_MIGRATETYPES * zone]
        self._steal_suitable_fallback(pfn, current, start_mt, can_steal)
        self.fallbacks += 1
        if self.tracer is not None:
            self.tracer.extfrag(pfn, order, current, start_mt, found, self.pool.pageblock_mt)
        return True

    def _steal_suitable_fallback(
        self, pfn: int, current: int, start_mt: MigrateType, whole_block: bool
    ) -> None:
        p = self.pool
        old_mt = p.get_pageblock_migratetype(pfn)
        if current >= PAGEBLOCK_ORDER:
            first = pfn >> PAGEBLOCK_ORDER
            nblocks = 1 << (current - PAGEBLOCK_ORDER)
            p.pageblock_mt[first : first + nblocks] = start_mt
            p.pb_dirty[first : first + nblocks] = True
            self.steals += nblocks
            self._del(pfn)
            self._add(pfn, current, start_mt)
            return
        if not whole_block:
            self._del(pfn)
            self._add(pfn, current, start_mt)
            return
        free_pages, movable_pages = self._move_freepages_block(pfn, start_mt)
        if start_mt == MigrateType.MOVABLE:
            alike = movable_pages
        elif old_mt == MigrateType.MOVABLE:
            alike = PAGEBLOCK_NR_PAGES - (free_pages + movable_pages)
        else:
            alike = 0
        if free_pages + alike >= PAGEBLOCK_NR_PAGES // 2:
            p.set_pageblock_migratetype(pfn, start_mt)
            self.steals += 1

    def _move_freepages_block(self, pfn: int, mt: MigrateType) -> tuple[int, int]:
        """Move every free block of the pageblock to mt's lists; count free and movable pages."""
        p = self.pool
        start = pfn & ~(PAGEBLOCK_NR_PAGES - 1)
        fl = p.flags[start : start + PAGEBLOCK_NR_PAGES]
        heads = np.flatnonzero(fl & PG_BUDDY) + start
        free_pages = 0
        for h in heads.tolist():
            order, _ = self._del(h)
            self._add(h, order, mt)
            free_pages += 1 << order
        movable_bits = PG_ALLOC | (int(MigrateType.MOVABLE) << PG_MT_SHIFT)
        movable = int(np.count_nonzero((fl & (PG_ALLOC | PG_MT_MASK)) == movable_bits))
        return free_pages, movable

    def alloc(
        self,
        order: int,
        mt: MigrateType,
        *,
        nofragment: bool = False,
        zones: tuple[int, ...] | None = None,
    ) -> int:
        """Allocate one block of 2**order frames (__rmqueue, zone by zone); raise OutOfMemory.

        ``zones``: the zones to try, in order (default: those the type may use)."""
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order {order} out of range 0..{MAX_ORDER}")
        pfn = NIL
        for zone in self.zones_for(mt) if zones is None else zones:
            pfn = self._rmqueue_smallest(order, mt, zone)
            while pfn == NIL:
                if not self._rmqueue_fallback(order, mt, nofragment, zone):
                    break
                pfn = self._rmqueue_smallest(order, mt, zone)
            if pfn != NIL:
                break
        if pfn == NIL:
            raise OutOfMemory(f"no free block of order {order}")
        self._mark_allocated(pfn, 1 << order, mt)
        if self.tracer is not None:
            self.tracer.mm_page_alloc(pfn, order, mt)
        return pfn

    def alloc_bulk(
        self,
        nr_pages: int,
        mt: MigrateType,
        *,
        nofragment: bool = False,
        zones: tuple[int, ...] | None = None,
    ) -> I64:
        """Allocate nr_pages order-0 pages as a run of single-page requests would get them.

        Repeated order-0 requests consume the smallest free block first and walk it upward;
        this takes those blocks whole, vectorized, with the same fallback and stealing rules,
        zone after zone (``zones`` as for :meth:`alloc`). On failure nothing stays allocated.
        """
        out: list[I64] = []
        got = 0
        zone_list = self.zones_for(mt) if zones is None else zones
        zi = 0
        try:
            while got < nr_pages:
                need = nr_pages - got
                pfn, order = NIL, 0
                zone = zone_list[zi]
                slot = int(mt) + NR_MIGRATETYPES * zone
                for o in range(NR_ORDERS):
                    if self.head[o][slot] != NIL:
                        pfn, order = self.head[o][slot], o
                        break
                if pfn == NIL:
                    if not self._rmqueue_fallback(0, mt, nofragment, zone):
                        zi += 1
                        if zi == len(zone_list):
                            raise OutOfMemory(f"pool full: {need} more pages wanted")
                    continue
                self._del(pfn)
                take = min(need, 1 << order)
                self._expand_bulk(pfn, take, order, int(mt))
                self._mark_allocated(pfn, take, int(mt))
                if self.tracer is not None:
                    self.tracer.page_alloc_run(pfn, take, mt)
                out.append(np.arange(pfn, pfn + take, dtype=np.int64))
                got += take
        except OutOfMemory:
            if out:
                self.free_pfns(np.concatenate(out))
            raise
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def _expand_bulk(self, pfn: int, take: int, order: int, mt: int) -> None:
        """Hand out the low ``take`` frames of a block; the rest goes back as aligned blocks."""
        rest, end = pfn + take, pfn + (1 << order)
        while rest < end:
            o = largest_aligned_order(rest, end - rest)
            self._add(rest, o, mt)
            rest += 1 << o

    # -- freeing ----------------------------------------------------------------------------
    def _free_one(self, pfn: int, order: int) -> None:
        """__free_one_page(): merge with free buddies, then queue the block."""
        flags, orders = self._flags, self._order
        mt = int(self.pool.pageblock_mt[pfn >> PAGEBLOCK_ORDER])
        size = 1 << order
        while order < MAX_ORDER:
            buddy = pfn ^ (1 << order)
            if not (flags[buddy] & PG_BUDDY) or orders[buddy] != order:
                break
            self._del(buddy)
            pfn &= ~(1 << order)
            order += 1
        # Linux queues at the tail when the next-higher buddy is free too (buddy_merge_likely),
        # so a block about to merge is less likely to be handed out again.
        tail = False
        if order < MAX_ORDER - 1:
            higher = (pfn ^ (1 << order)) & ~((1 << (order + 1)) - 1)
            hb = higher ^ (1 << (order + 1))
            tail = bool(flags[hb] & PG_BUDDY) and orders[hb] == order + 1
        self._add(pfn, order, mt, tail=tail)
        self.free_pages += size

    def free_block(self, pfn: int, order: int) -> None:
        """Free one allocated block (its frames must carry no owner)."""
        n = 1 << order
        self.pool.flags[pfn : pfn + n] = PG_FREE
        self.pool.touch(pfn, n)
        self._free_one(pfn, order)

    def free_pfns(self, pfns: I64) -> None:
        """Free a set of allocated (or isolated target) frames, merging runs into large blocks."""
        if len(pfns) == 0:
            return
        p = self.pool
        pfns = np.unique(pfns)
        p.flags[pfns] = PG_FREE
        p.touch_pfns(pfns)
        p.pin[pfns] = 0
        p.owner[pfns] = OWNER_NONE
        p.index[pfns] = NIL
        breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
        starts = pfns[np.concatenate(([0], breaks))]
        ends = pfns[np.concatenate((breaks - 1, [len(pfns) - 1]))] + 1
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            while s < e:
                o = largest_aligned_order(s, e - s)
                self._free_one(s, o)
                s += 1 << o

    # -- migration targets ------------------------------------------------------------------
    def isolate_free(self, pfns: I64) -> None:
        """Take specific free frames out of the buddy lists (isolate_freepages_block).

        Every frame must be free. The blocks containing them are split; frames not asked for
        go back to the lists. Taken frames are marked PG_TARGET until used or released.
        """
        p = self.pool
        if len(pfns) == 0:
            return
        if not np.all(p.flags[pfns] & PG_FREE) or np.any(p.flags[pfns] & PG_TARGET):
            raise ValueError("isolate_free: a frame is not free")
        heads = np.full(len(pfns), NIL, dtype=np.int64)
        for o in range(NR_ORDERS):
            cand = pfns & ~np.int64((1 << o) - 1)
            hit = (heads == NIL) & ((p.flags[cand] & PG_BUDDY) != 0) & (p.order[cand] == o)
            heads[hit] = cand[hit]
        blocks: list[I64] = []
        for h in np.unique(heads).tolist():
            order, _mt = self._del(h)
            n = 1 << order
            self.free_pages -= n
            p.flags[h : h + n] = 0
            blocks.append(np.arange(h, h + n, dtype=np.int64))
        p.flags[pfns] = PG_TARGET
        p.touch_pfns(pfns)
        frames = np.concatenate(blocks)
        back = frames[p.flags[frames] == 0]  # split off, not asked for: back to the lists
        if len(back):
            self.free_pfns(back)

    def release_targets(self, pfns: I64) -> None:
        """Give unused migration targets back to the buddy."""
        self.free_pfns(pfns)

    # -- queries ----------------------------------------------------------------------------
    def free_blocks_per_order(self) -> list[int]:
        return [sum(self.nr_free[o]) for o in range(NR_ORDERS)]

    def has_free_block(self, order: int) -> bool:
        return any(self.nr_free[o][m] for o in range(order, NR_ORDERS) for m in range(3))

    def count_free_units(self, order: int) -> int:
        """Free blocks of at least ``order``, counted in order-sized units."""
        return sum(sum(self.nr_free[o]) << (o - order) for o in range(order, NR_ORDERS))


def largest_aligned_order(pfn: int, length: int) -> int:
    """The largest buddy order of a block that starts at ``pfn`` and fits in ``length``."""
    o = min(MAX_ORDER, length.bit_length() - 1)
    if pfn:
        o = min(o, (pfn & -pfn).bit_length() - 1)
    return o
