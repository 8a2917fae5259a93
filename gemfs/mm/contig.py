"""Allocations larger than a buddy block, as the kernel serves them (mm/page_alloc.c
``alloc_contig_pages`` / ``alloc_contig_range``): 16 MiB, 32 MiB, 1 GiB.

The kernel walks the zone for an aligned range of the requested size whose pages could all be
moved (``pfn_range_valid_contig``: no reserved or unmovable pages), isolates it, migrates every
page in use out of it (``MIGRATE_SYNC``, reason ``MR_CONTIG_RANGE``), and fails the range with
-EBUSY if some page would not move (a pinned page does not); then it tries the next range.

:class:`ContigPolicy` is that walk as a policy with the same shape as
:class:`gemfs.mm.compaction.CompactionPolicy` -- ``next_batch(view)`` / ``batch_done`` /
``result`` / ``stats`` -- so both backends run it through the one migration mechanism (owners
asked, costs charged) exactly as they run compaction. Targets come from a free scanner walking
down from the top of the pool, skipping the range being cleared, one pageblock at a time (the
work is proportional to what it scans, not to the pool).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np

from gemfs.mm.compaction import Batch, CompactResult, CompactStats, PoolView
from gemfs.mm.pool import I64, PG_ALLOC, PG_FREE, PG_ISOLATED, PG_OBJECT, PG_TARGET
from gemfs.mm.types import MAX_ORDER, PAGEBLOCK_NR_PAGES, MigrateMode

MAX_CONTIG_ORDER = 18  # 1 GiB of 4 KiB pages
BATCH = PAGEBLOCK_NR_PAGES


@dataclass
class ContigPolicy:
    """Find and clear one aligned range of ``2**order`` frames (order > MAX_ORDER)."""

    nr_pages: int
    order: int
    mode: MigrateMode = MigrateMode.SYNC
    # Frames pinned by nobody the mechanism could ask (no owner, or one that never lets go):
    # a range holding one fails. The kernel finds that out by migrating the range's other
    # pages first and then failing with -EBUSY; the model skips such a range after scanning
    # it (the pages the kernel would move in vain are not moved: a cost it leaves out).
    unaskable: I64 = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    ranges_hopeless: int = 0
    result: CompactResult = CompactResult.CONTINUE
    stats: CompactStats = field(default_factory=CompactStats)
    start: int = -1  # the range being cleared (its first frame), then the one that was cleared
    ranges_tried: int = 0
    _queue: list[int] | None = None  # candidate ranges left to try
    _todo: I64 = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _failed: bool = False
    _free_block: int = -2  # the free scanner's next pageblock (walking down; -2: not started)
    _targets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not MAX_ORDER < self.order <= MAX_CONTIG_ORDER:
            raise ValueError(
                f"contiguous order {self.order} out of {MAX_ORDER + 1}..{MAX_CONTIG_ORDER}"
            )
        self.size = 1 << self.order
        if self.size > self.nr_pages:
            self.result = CompactResult.COMPLETE  # no range that large in this pool

    # -- ranges ---------------------------------------------------------------------------
    def _candidates(self, view: PoolView) -> I64:
        """Range starts whose pages could all be moved (pfn_range_valid_contig), in pfn order:
        no kernel (unmovable) allocation, no migration under way. One vectorized look at the
        pool per allocation; the ranges then tried are scanned again, page by page."""
        n = self.nr_pages // self.size
        fl = view.flags[: n * self.size].reshape(n, self.size)
        used = (fl & PG_ALLOC) != 0
        movable = (fl & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT)
        bad = (used & ~movable).any(axis=1) | ((fl & (PG_TARGET | PG_ISOLATED)) != 0).any(axis=1)
        hopeless = np.zeros(n, dtype=np.bool_)
        pinned = self.unaskable[self.unaskable < n * self.size]
        hopeless[pinned // self.size] = True
        self.ranges_hopeless = int(np.count_nonzero(hopeless & ~bad))
        self.stats.migrate_scanned += self.ranges_hopeless * self.size
        return (np.flatnonzero(~bad & ~hopeless) * self.size).astype(np.int64)

    def _open_next_range(self, view: PoolView) -> bool:
        """Move on to the next range whose pages could all be moved; False at the end."""
        if self._queue is None:
            self._queue = self._candidates(view).tolist()
        flags = view.flags
        while self._queue:
            s = self._queue.pop(0)
            fl = flags[s : s + self.size]
            self.stats.migrate_scanned += self.size
            used = (fl & PG_ALLOC) != 0
            movable = (fl & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT)
            if np.any(used & ~movable) or np.any(fl & (PG_TARGET | PG_ISOLATED)):
                continue  # changed since the first look
            self.start = s
            self.ranges_tried += 1
            self._todo = (np.flatnonzero(movable) + s).astype(np.int64)
            self._failed = False
            if self._free_block == -2:  # one free scanner for all the ranges tried
                self._free_block = self.nr_pages // PAGEBLOCK_NR_PAGES - 1
            return True
        return False

    def _in_range(self, pfn: int) -> bool:
        return self.start <= pfn < self.start + self.size

    def _fill_targets(self, view: PoolView, need: int) -> None:
        flags = view.flags
        lo_block = self.start // PAGEBLOCK_NR_PAGES
        hi_block = (self.start + self.size) // PAGEBLOCK_NR_PAGES
        lo, hi = self.start, self.start + self.size
        self._targets = [
            t
            for t in self._targets
            if flags[t] & PG_FREE and not flags[t] & PG_TARGET and not lo <= t < hi
        ]
        while len(self._targets) < need and self._free_block >= 0:
            b = self._free_block
            self._free_block -= 1
            if lo_block <= b < hi_block:
                continue
            base = b * PAGEBLOCK_NR_PAGES
            fl = flags[base : base + PAGEBLOCK_NR_PAGES]
            self.stats.free_scanned += PAGEBLOCK_NR_PAGES
            free = np.flatnonzero(((fl & PG_FREE) != 0) & ((fl & PG_TARGET) == 0)) + base
            self._targets.extend(free.tolist())

    # -- the policy interface ---------------------------------------------------------------
    def next_batch(self, view: PoolView) -> Batch | None:
        while self.result is CompactResult.CONTINUE:
            if self.start < 0 or self._failed:
                if not self._open_next_range(view):
                    self.result = CompactResult.COMPLETE
                    self.start = -1
                    return None
            flags = view.flags
            todo = self._todo
            todo = todo[(flags[todo] & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT)]
            if len(todo) == 0:
                fl = flags[self.start : self.start + self.size]
                if np.all(fl & PG_FREE) and not np.any(fl & PG_TARGET):
                    self.result = CompactResult.SUCCESS
                    return None
                self._failed = True  # something else holds a frame of it now
                continue
            src = todo[:BATCH]
            self._todo = todo[BATCH:]
            self._fill_targets(view, len(src))
            n = min(len(src), len(self._targets))
            if n == 0:
                self.result = CompactResult.COMPLETE  # nowhere to move the pages to
                self.start = -1
                return None
            dst = np.asarray(self._targets[:n], dtype=np.int64)
            del self._targets[:n]
            self._todo = np.concatenate((src[n:], self._todo))
            self.stats.isolated += n
            self.stats.batches += 1
            return Batch(src[:n], dst)
        return None

    def batch_done(self, batch: Batch, results: np.ndarray) -> None:
        ok = results == 0
        self.stats.migrated += int(np.count_nonzero(ok))
        self.stats.failed += int(np.count_nonzero(~ok))
        if np.any(~ok & (results != -errno.EBUSY)):
            # A page that would not move (pinned, owner busy): -EBUSY for the whole range.
            self._failed = True
        else:
            stale = batch.src[results == -errno.EBUSY]
            self._todo = np.concatenate((self._todo, stale))  # looked at again
