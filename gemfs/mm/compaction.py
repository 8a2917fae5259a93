"""Compaction policy (mm/compaction.c), separate from the migration mechanism.

The policy is sans-IO: it looks at a :class:`PoolView` (the live pool in process, or a snapshot
a compactor process fetched over the socket), proposes batches of (source, target) frames, and is
told what happened. Whoever holds the mechanism executes the batches. A migrate scanner walks up
from the bottom pageblock by pageblock isolating movable pages; a free scanner walks down from
the top collecting free frames as targets. It stops at SUCCESS (a free block of the requested
order exists, or the proactive score fell to the low watermark) or COMPLETE (scanners met).
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from gemfs.mm.pool import I64, PG_ALLOC, PG_FREE, PG_ISOLATED, PG_OBJECT, PG_TARGET
from gemfs.mm.types import NR_ORDERS, PAGEBLOCK_NR_PAGES, MigrateMode, MigrateType
from gemfs.mm.vmstat import fragmentation_score, proactive_watermarks

# Linux isolates COMPACT_CLUSTER_MAX (32) pages at a time; one pageblock per batch keeps the
# round trips of an out-of-process compactor few while staying pageblock-granular.
BATCH_MAX = PAGEBLOCK_NR_PAGES


class CompactResult(enum.Enum):
    SKIPPED = "skipped"  # nothing to do (e.g. score already below the watermark)
    CONTINUE = "continue"
    SUCCESS = "success"  # a free block of the requested order exists
    COMPLETE = "complete"  # the scanners met


class PoolView(Protocol):
    """What the policy reads: per-frame flags, per-pageblock types, free blocks per order."""

    @property
    def flags(self) -> npt.NDArray[np.uint8]: ...

    @property
    def pageblock_mt(self) -> npt.NDArray[np.uint8]: ...

    def free_blocks_per_order(self) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Batch:
    src: I64
    dst: I64


@dataclass
class CompactStats:
    migrate_scanned: int = 0
    free_scanned: int = 0
    isolated: int = 0
    migrated: int = 0
    failed: int = 0
    batches: int = 0


@dataclass
class CompactionPolicy:
    """compact_zone() as a state machine. order=-1 compacts the whole pool (compact_memory)."""

    nr_pageblocks: int
    order: int = -1
    mode: MigrateMode = MigrateMode.SYNC
    proactiveness: int | None = None  # set: proactive compaction down to the low watermark
    ignore_block_suitable: bool = False
    migrate_block: int = 0
    free_block: int = -1
    result: CompactResult = CompactResult.CONTINUE
    stats: CompactStats = field(default_factory=CompactStats)
    _targets: deque[int] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not -1 <= self.order < NR_ORDERS:
            raise ValueError(f"compaction order {self.order} out of range -1..{NR_ORDERS - 1}")
        if self.free_block < 0:
            self.free_block = self.nr_pageblocks - 1

    # -- termination (__compact_finished) ---------------------------------------------------
    def finished(self, view: PoolView) -> CompactResult:
        if self.result in (CompactResult.SUCCESS, CompactResult.COMPLETE):
            return self.result
        if self.migrate_block >= self.free_block:
            return CompactResult.COMPLETE
        free = view.free_blocks_per_order()
        if self.proactiveness is not None:
            low, _ = proactive_watermarks(self.proactiveness)
            if fragmentation_score(free) <= low:
                return CompactResult.SUCCESS
        elif self.order >= 0 and any(free[o] for o in range(self.order, NR_ORDERS)):
            return CompactResult.SUCCESS
        return CompactResult.CONTINUE

    # -- scanners ---------------------------------------------------------------------------
    def _source_ok(self, mt: int) -> bool:
        # Async compaction only migrates out of MOVABLE pageblocks (suitable_migration_source).
        return self.mode != MigrateMode.ASYNC or mt == MigrateType.MOVABLE

    def _target_ok(self, mt: int) -> bool:
        return self.ignore_block_suitable or mt == MigrateType.MOVABLE

    def _isolate_migratepages(self, view: PoolView) -> I64:
        """Advance the migrate scanner to the next pageblock with candidates; return them."""
        flags = view.flags
        want = PG_ALLOC | PG_OBJECT
        while self.migrate_block < self.free_block:
            b = self.migrate_block
            self.migrate_block += 1
            if not self._source_ok(int(view.pageblock_mt[b])):
                continue
            start = b * PAGEBLOCK_NR_PAGES
            fl = flags[start : start + PAGEBLOCK_NR_PAGES]
            self.stats.migrate_scanned += PAGEBLOCK_NR_PAGES
            cand = np.flatnonzero(((fl & want) == want) & ((fl & PG_ISOLATED) == 0))
            if len(cand):
                return (cand + start).astype(np.int64)
        return np.empty(0, dtype=np.int64)

    def _isolate_freepages(self, view: PoolView, need: int) -> None:
        """Move the free scanner down until `need` targets are queued or it meets the other."""
        flags = view.flags
        while len(self._targets) < need and self.free_block > self.migrate_block:
            b = self.free_block
            self.free_block -= 1
            if not self._target_ok(int(view.pageblock_mt[b])):
                continue
            start = b * PAGEBLOCK_NR_PAGES
            fl = flags[start : start + PAGEBLOCK_NR_PAGES]
            self.stats.free_scanned += PAGEBLOCK_NR_PAGES
            free = (fl & PG_FREE) != 0
            n = int(np.count_nonzero(free))
            if n == 0 or n == PAGEBLOCK_NR_PAGES:
                continue  # nothing free, or a whole free pageblock: don't break it up
            free &= (fl & PG_TARGET) == 0
            self._targets.extend((np.flatnonzero(free) + start).tolist())

    def next_batch(self, view: PoolView) -> Batch | None:
        """The next (src, dst) batch to migrate, or None when compaction has finished."""
        while True:
            self.result = self.finished(view)
            if self.result is not CompactResult.CONTINUE:
                return None
            src = self._isolate_migratepages(view)
            if len(src) == 0:
                continue
            src = src[:BATCH_MAX]
            self._drop_stale_targets(view)
            self._isolate_freepages(view, len(src))
            n = min(len(src), len(self._targets))
            if n == 0:
                self.result = CompactResult.COMPLETE
                return None
            dst = np.array([self._targets.popleft() for _ in range(n)], dtype=np.int64)
            self.stats.isolated += n
            self.stats.batches += 1
            return Batch(src[:n], dst)

    def _drop_stale_targets(self, view: PoolView) -> None:
        """Queued targets someone allocated since the free scanner saw them are dropped."""
        if not self._targets:
            return
        q = np.fromiter(self._targets, dtype=np.int64, count=len(self._targets))
        fl = view.flags[q]
        keep = q[((fl & PG_FREE) != 0) & ((fl & PG_TARGET) == 0)]
        if len(keep) != len(q):
            self._targets = deque(keep.tolist())

    def forget_targets(self) -> None:
        """Drop queued targets (the view they came from is stale); the free scanner goes on."""
        self._targets.clear()

    def batch_done(self, batch: Batch, results: npt.NDArray[np.int32]) -> None:
        """Record the outcome. Targets that were not used are free again and may be reused."""
        ok = results == 0
        self.stats.migrated += int(np.count_nonzero(ok))
        self.stats.failed += int(np.count_nonzero(~ok))
        # A target the core refused (-EBUSY: no longer free) is dropped; an unused one returns.
        unused = batch.dst[(~ok) & (results != -errno.EBUSY)]
        self._targets.extendleft(reversed(unused.tolist()))
