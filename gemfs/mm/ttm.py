"""TTM's page pool (drivers/gpu/drm/ttm/ttm_pool.c) in miniature: how amdgpu, xe and nouveau
get the pages of a buffer object.

- :meth:`TtmPool.alloc` is ``ttm_pool_alloc()``: for ``n`` pages it starts at the highest order
  that fits (``min(TTM_MAX_ORDER, fls(n) - 1)``; here at most order 9, a pageblock), takes a block
  of that order from the pool's list for the order if it has one, else from the buddy allocator
  (``alloc_pages(GFP_HIGHUSER | __GFP_NORETRY | __GFP_NOWARN, order)``: UNMOVABLE, no reclaim or
  compaction for order > 0), and falls back one order at a time when that fails. Only order 0
  may enter reclaim, which here is the pool's own shrinker.
- :meth:`TtmPool.give_back` is ``ttm_pool_free()``: the blocks of a destroyed object go on the
  per-order lists (they stay allocated, UNMOVABLE, as kernel memory) for the next object, as long
  as the pool holds at most ``limit`` pages (``page_pool_size``: by default half of memory;
  :func:`ttm_pool_pages` reads the design knob ``ttm_pool``); beyond it blocks go back to the
  buddy (``ttm_pool_shrink()``).
- :meth:`TtmPool.shrink` is the shrinker (``ttm_pool_shrinker_scan()``): under memory pressure
  (direct reclaim in the allocator's slow path, or an allocation that found no page) it frees
  pooled blocks to the buddy allocator, one pool after another. Every pool is a stack, as
  TTM's lists are (``ttm_pool_type_give()`` adds at the head, ``ttm_pool_type_take()`` and the
  shrinker take from the head): the block freed last is reused or freed first.

On x86 TTM pools write-combined and uncached pages (amdgpu's GTT buffers, by default
write-combined); cached pages are pooled only with DMA allocation or a NUMA-node pool
(``ttm_pool_select_type()``); on arm64 without DMA allocation nothing is pooled. The model
pools every block of the design's objects up to ``limit``: ``ttm_pool = "50%"`` (the default)
models amdgpu's write-combined buffers, ``ttm_pool = "0"`` cached BOs (xe on integrated GPUs,
most BOs) and arm64, whose freed pages go straight back to the buddy allocator.

The pool does its bookkeeping on the :class:`~gemfs.mm.core.MemoryManager`'s arrays: pooled
frames are kernel frames (``OWNER_KERNEL``) counted in ``nr_kernel_pages``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gemfs.mm.pool import I64, OWNER_KERNEL, PG_ALLOC, PG_MT_SHIFT
from gemfs.mm.types import PAGE_SIZE, PAGEBLOCK_ORDER, MigrateType, OutOfMemory, parse_size

if TYPE_CHECKING:
    from gemfs.mm.core import MemoryManager

TTM_MAX_ORDER = PAGEBLOCK_ORDER  # the largest block a TTM object takes here (2 MiB)
SWAP_CLUSTER_MAX = 32  # include/linux/swap.h: pages direct reclaim tries to free per pass
DEFAULT_TTM_POOL = "50%"  # ttm_pool_mgr_init(): page_pool_size defaults to half of memory


def ttm_pool_pages(spec: str | None, nr_pages: int) -> int:
    """Pages TTM's pools may hold for ``ttm_pool`` SPEC (``ttm.page_pool_size=``): a share of
    the pool (``50%``, the default), a size (``64MiB``, rounded down to whole pages) or ``0``
    (no pooling: cached BOs on x86, every BO on arm64); at most the whole pool."""
    text = (DEFAULT_TTM_POOL if spec is None else spec).strip()
    bad = f"bad ttm_pool {spec!r} (a size, a percentage, or 0 for no pooling)"
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(bad) from None
        if not 0 <= pct <= 100:
            raise ValueError(f"ttm_pool {spec!r} must be between 0% and 100%")
        return int(nr_pages * pct / 100)
    try:
        pages = parse_size(text) // PAGE_SIZE
    except ValueError:
        raise ValueError(bad) from None
    if pages > nr_pages:
        raise ValueError(f"ttm_pool {spec!r} is larger than the pool")
    return pages


@dataclass
class TtmStats:
    """What the pool did (``ttm_*`` in vmstat)."""

    alloc_blocks: list[int] = field(default_factory=lambda: [0] * (TTM_MAX_ORDER + 1))
    pool_hits: int = 0  # blocks taken from the pool instead of the buddy allocator
    pool_returns: int = 0  # blocks a freed object gave to the pool
    shrunk_pages: int = 0  # pages the shrinker (or the pool limit) gave back to the buddy


@dataclass
class TtmPool:
    """The per-order page pools of one device, with their shrinker."""

    mm: MemoryManager
    limit: int  # pages the pool may hold (page_pool_size)
    mt: MigrateType = MigrateType.UNMOVABLE
    pools: list[deque[int]] = field(
        default_factory=lambda: [deque() for _ in range(TTM_MAX_ORDER + 1)]
    )
    pooled_pages: int = 0
    _next_order: int = 0  # the shrinker takes from the pools in turn
    stats: TtmStats = field(default_factory=TtmStats)
    blocks: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # obj id -> blocks

    # -- ttm_pool_alloc -------------------------------------------------------------------------
    def alloc(self, obj_id: int, nr_pages: int) -> I64:
        """Frames for ``nr_pages`` pages of object ``obj_id``, highest order first; allocated
        (flags PG_ALLOC, the pool's type), the caller makes them the object's. On failure
        nothing stays taken (the blocks go back to the pool) and OutOfMemory is raised."""
        got: list[tuple[int, int]] = []
        left = nr_pages
        order = min(TTM_MAX_ORDER, left.bit_length() - 1)
        try:
            while left:
                order = min(order, left.bit_length() - 1)
                pfn = self._take(order)
                if pfn is None:
                    pfn = self._alloc_buddy(order)
                if pfn is None:
                    order -= 1  # fall back one order
                    if order < 0:
                        raise OutOfMemory(f"TTM: no page for {left} more of {nr_pages}")
                    continue
                self.stats.alloc_blocks[order] += 1
                self.mm.vmstat.inc("ttm_alloc_pages", 1 << order)
                got.append((pfn, order))
                left -= 1 << order
        except OutOfMemory:
            for pfn, o in got:
                if self.limit:
                    self._pool(pfn, o)
                else:
                    self._free(pfn, o)
            self._trim()
            raise
        self.blocks.setdefault(obj_id, []).extend(got)
        return np.concatenate([np.arange(p, p + (1 << o), dtype=np.int64) for p, o in got])

    def _take(self, order: int) -> int | None:
        if not self.pools[order]:
            return None
        pfn = self.pools[order].pop()
        n = 1 << order
        self.pooled_pages -= n
        self.mm.nr_kernel_pages -= n
        self.stats.pool_hits += 1
        self.mm.vmstat.inc("ttm_pool_hit_pages", n)
        return pfn

    def _alloc_buddy(self, order: int) -> int | None:
        buddy = self.mm.buddy
        for attempt in range(2):
            try:
                pfn = buddy.alloc(order, self.mt)
            except OutOfMemory:
                # order > 0: __GFP_NORETRY without direct reclaim. Order 0 may reclaim once:
                # the shrinker frees pooled blocks (the pools had none of order 0).
                if order > 0 or attempt or self.shrink(SWAP_CLUSTER_MAX) == 0:
                    return None
                continue
            self.mm.vmstat.inc("pgalloc", 1 << order)
            return pfn
        return None

    # -- ttm_pool_free ----------------------------------------------------------------------------
    def give_back(self, obj_id: int) -> I64:
        """The object is being destroyed: its intact blocks go to the pool (the frames are no
        longer the object's); returns the frames that were pooled. A block the object no longer
        holds whole (a page moved or was truncated) is left to the caller to free page by page,
        and so is every block when nothing is pooled (``limit`` 0: ``ttm_pool_select_type()``
        found no pool for the pages, ``ttm_pool_free_page()`` frees them to the buddy).
        """
        if not self.limit:
            self.blocks.pop(obj_id, None)
            return np.empty(0, dtype=np.int64)
        p = self.mm.pool
        pooled: list[I64] = []
        for pfn, order in self.blocks.pop(obj_id, []):
            n = 1 << order
            if not np.all(p.owner[pfn : pfn + n] == obj_id):
                continue
            self._pool(pfn, order)
            self.mm.vmstat.inc("ttm_pool_pages", n)
            pooled.append(np.arange(pfn, pfn + n, dtype=np.int64))
        self.stats.pool_returns += len(pooled)
        self._trim()
        return np.concatenate(pooled) if pooled else np.empty(0, dtype=np.int64)

    def _pool(self, pfn: int, order: int) -> None:
        p = self.mm.pool
        n = 1 << order
        p.flags[pfn : pfn + n] = PG_ALLOC | (int(self.mt) << PG_MT_SHIFT)
        p.owner[pfn : pfn + n] = OWNER_KERNEL
        p.index[pfn : pfn + n] = -1
        p.pin[pfn : pfn + n] = 0
        p.touch(pfn, n)
        self.pools[order].append(pfn)
        self.pooled_pages += n
        self.mm.nr_kernel_pages += n

    def _trim(self) -> None:
        while self.pooled_pages > self.limit:
            self._shrink_one()

    # -- the shrinker -----------------------------------------------------------------------------
    def shrink(self, nr_to_scan: int) -> int:
        """ttm_pool_shrinker_scan(): free pooled blocks until ``nr_to_scan`` pages are freed or
        the pool is empty; the pages freed."""
        freed = 0
        while freed < nr_to_scan and self.pooled_pages:
            freed += self._shrink_one()
        return freed

    def _shrink_one(self) -> int:
        """ttm_pool_shrink(): free the block on top of the next non-empty pool."""
        for k in range(TTM_MAX_ORDER + 1):
            order = (self._next_order + k) % (TTM_MAX_ORDER + 1)
            if self.pools[order]:
                self._next_order = (order + 1) % (TTM_MAX_ORDER + 1)
                pfn = self.pools[order].pop()
                n = 1 << order
                self.pooled_pages -= n
                self.mm.nr_kernel_pages -= n
                self.stats.shrunk_pages += n
                self.mm.vmstat.inc("ttm_shrink_pages", n)
                self._free(pfn, order)
                return n
        return 0

    def _free(self, pfn: int, order: int) -> None:
        """ttm_pool_free_page(): the block goes back to the buddy allocator."""
        self.mm.pool.owner[pfn : pfn + (1 << order)] = -1
        self.mm.buddy.free_block(pfn, order)
        self.mm.vmstat.inc("pgfree", 1 << order)

    def pooled(self) -> list[tuple[int, int]]:
        """Every pooled block as (pfn, order) (check())."""
        return [(pfn, o) for o in range(TTM_MAX_ORDER + 1) for pfn in self.pools[o]]
