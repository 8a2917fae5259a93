"""Compaction (mm/compaction.c): a sans-IO policy over the migration mechanism, and the zone's
compaction memory that outlives one pass.

The policy is sans-IO: it looks at a :class:`PoolView` (the live pool in process, or a snapshot
a compactor process fetched over the socket), proposes batches of (source, target) frames, and is
told what happened. Whoever holds the mechanism executes the batches. A migrate scanner walks up
from the bottom pageblock by pageblock isolating movable pages; a free scanner walks down from
the top collecting free frames as targets. It stops at SUCCESS (a free block of the requested
order exists, or the proactive score fell to the low watermark) or COMPLETE (scanners met).

:class:`ZoneCompactState` is what the kernel keeps per zone between passes (``struct zone``'s
``compact_cached_migrate_pfn[2]``, ``compact_cached_free_pfn``, ``compact_considered``,
``compact_defer_shift``, ``compact_order_failed``, ``compact_blockskip_flush`` and the
``PB_migrate_skip`` bit of every pageblock). A policy given a state resumes from the cached
scanner positions (unless it compacts the whole zone), honours and sets skip bits (unless told to
ignore them), and may jump with ``fast_find_migrateblock`` / ``fast_isolate_freepages`` when it
is also given the buddy allocator. Without a state a policy is one fresh pass over the whole pool,
as an out-of-process compactor runs it.

The model works a pageblock at a time where the kernel works ``COMPACT_CLUSTER_MAX`` pages at a
time; where that changes what is touched, the difference is written next to the code. The
kernel followed is the one ``gemfs calibrate`` boots (6.1); later changes are noted.
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from gemfs.mm.pool import I64, PG_ALLOC, PG_BUDDY, PG_FREE, PG_ISOLATED, PG_OBJECT, PG_TARGET
from gemfs.mm.types import (
    NR_ORDERS,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    MigrateMode,
    MigrateType,
)
from gemfs.mm.vmstat import fragmentation_score, proactive_watermarks

if TYPE_CHECKING:
    from gemfs.mm.buddy import BuddyAllocator

# Linux isolates COMPACT_CLUSTER_MAX (32) pages at a time; one pageblock per batch keeps the
# round trips of an out-of-process compactor few while staying pageblock-granular.
BATCH_MAX = PAGEBLOCK_NR_PAGES
COMPACT_CLUSTER_MAX = 32  # include/linux/swap.h (SWAP_CLUSTER_MAX)
COMPACT_MAX_DEFER_SHIFT = 6  # mm/compaction.c: "Do not skip compaction more than 64 times"
PAGE_ALLOC_COSTLY_ORDER = 3  # include/linux/mmzone.h
_RESET_SAMPLE_STRIDE = 1 << PAGE_ALLOC_COSTLY_ORDER  # __reset_isolation_pfn samples every 8


class CompactResult(enum.Enum):
    """enum compact_result (include/linux/compaction.h), the values the model produces."""

    SKIPPED = "skipped"  # not run: nothing to do, or compaction_suitable() said no
    DEFERRED = "deferred"  # not run: compaction_deferred()
    CONTINUE = "continue"
    SUCCESS = "success"  # a free block of the requested order exists
    COMPLETE = "complete"  # the scanners met after a pass over the whole zone
    PARTIAL_SKIPPED = "partial_skipped"  # the scanners met, the pass started from cached ones


class PoolView(Protocol):
    """What the policy reads: per-frame flags, per-pageblock types, free blocks per order."""

    @property
    def flags(self) -> npt.NDArray[np.uint8]: ...

    @property
    def pageblock_mt(self) -> npt.NDArray[np.uint8]: ...

    def free_blocks_per_order(self) -> list[int]: ...

    def hopeless_pageblocks(self) -> npt.NDArray[np.bool_] | None:
        """Illuminator: pageblocks holding a page that cannot move (None: not tracked)."""
        ...


@dataclass(frozen=True, slots=True)
class Batch:
    src: I64
    dst: I64


@dataclass
class CompactStats:
    """What one pass touched. ``migrate_scanned`` / ``free_scanned`` count pages the scanners
    looked at (``cc->total_migrate_scanned`` / ``total_free_scanned``, free-list entries of the
    fast searches included); a pageblock passed over by its skip bit or its type is not scanned."""

    migrate_scanned: int = 0
    free_scanned: int = 0
    isolated: int = 0
    migrated: int = 0
    failed: int = 0
    batches: int = 0
    migrate_blocks: int = 0  # pageblocks the migrate scanner scanned
    free_blocks: int = 0  # pageblocks the free scanner scanned
    skipped_blocks: int = 0  # pageblocks passed over because of their skip bit
    hopeless_blocks: int = 0  # pageblocks passed over because they cannot be emptied
    fast_migrate_found: int = 0  # fast_find_migrateblock jumps
    fast_free_found: int = 0  # fast_isolate_freepages hits
    free_isolated: int = 0  # free pages taken as targets (part of compact_isolated)


class ZoneCompactState:
    """The zone's compaction memory (``struct zone``, mm/compaction.c), per pool.

    Positions are kept as pageblock indices; :meth:`to_json` shows them as pfns as the kernel
    does. ``scanner_sees_pins``: pinned pages fail isolation in the migrate scanner itself, as a
    long-term pinned *anonymous* page does (isolate_migratepages_block's refcount > mapcount
    check); otherwise a pin shows only when migration fails (-EAGAIN), as for shmem/GEM pages.
    """

    def __init__(self, nr_pageblocks: int) -> None:
        if nr_pageblocks < 1:
            raise ValueError("a zone has at least one pageblock")
        self.nr_pageblocks = nr_pageblocks
        self.skip = np.zeros(nr_pageblocks, dtype=np.bool_)  # PB_migrate_skip
        self.cached_migrate_block = [0, 0]  # compact_cached_migrate_pfn[async, sync]
        self.cached_free_block = nr_pageblocks - 1  # compact_cached_free_pfn
        self.init_migrate_block = 0  # compact_init_migrate_pfn
        self.init_free_block = 0  # compact_init_free_pfn
        self.blockskip_flush = False  # compact_blockskip_flush
        self.considered = 0  # compact_considered
        self.defer_shift = 0  # compact_defer_shift
        self.order_failed = 0  # compact_order_failed
        self.resets = 0  # times __reset_isolation_suitable cleared the hints
        self.scanner_sees_pins = False
        self.kcompactd_max_order = 0  # pgdat->kcompactd_max_order: order work kswapd left

    # -- a pass run elsewhere (the compactor process) ----------------------------------------
    _PASS_FIELDS = (
        "cached_migrate_block",
        "cached_free_block",
        "init_migrate_block",
        "init_free_block",
        "blockskip_flush",
        "considered",
        "defer_shift",
        "order_failed",
        "resets",
        "scanner_sees_pins",
    )

    def export(self) -> dict[str, Any]:
        """Everything a pass reads and writes, for a pass run in another process."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self._PASS_FIELDS}
        out["cached_migrate_block"] = list(self.cached_migrate_block)
        out["skip"] = np.packbits(self.skip).tobytes()
        return out

    @classmethod
    def imported(cls, nr_pageblocks: int, data: dict[str, Any]) -> ZoneCompactState:
        """The state :meth:`export` sent; ValueError when it does not fit ``nr_pageblocks``."""
        st = cls(nr_pageblocks)
        try:
            raw = np.frombuffer(data["skip"], dtype=np.uint8)
            if len(raw) != (nr_pageblocks + 7) // 8:
                raise ValueError("skip bits of the wrong length")
            st.skip = np.unpackbits(raw)[:nr_pageblocks].astype(np.bool_)
            cm = [int(x) for x in data["cached_migrate_block"]]
            if len(cm) != 2:
                raise ValueError("cached_migrate_block needs two positions")
            st.cached_migrate_block = cm
            for k in cls._PASS_FIELDS[1:]:
                v = data[k]
                if not isinstance(v, bool | int):
                    raise ValueError(f"{k} is not a number")
                setattr(st, k, type(getattr(st, k))(v))
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad compaction state: {e}") from None
        return st

    def absorb(self, other: ZoneCompactState) -> None:
        """Take what a pass run on ``other`` (an :meth:`imported` copy) left: skip bits, cached
        and initial scanner positions, the flush flag. The deferral stays: only this zone's own
        callers (direct compaction, kcompactd's order work) change it."""
        if other.nr_pageblocks != self.nr_pageblocks:
            raise ValueError("the state is of another zone")
        self.skip = other.skip.copy()
        self.cached_migrate_block = list(other.cached_migrate_block)
        for k in ("cached_free_block", "init_migrate_block", "init_free_block"):
            setattr(self, k, getattr(other, k))
        self.blockskip_flush = other.blockskip_flush
        self.resets = other.resets

    # -- deferral (defer_compaction, compaction_deferred, compaction_defer_reset) -------------
    def defer_compaction(self, order: int) -> None:
        self.considered = 0
        self.defer_shift = min(self.defer_shift + 1, COMPACT_MAX_DEFER_SHIFT)
        self.order_failed = min(self.order_failed, order)

    def compaction_deferred(self, order: int) -> bool:
        """True when this attempt is to be skipped; counts the attempt (compact_considered)."""
        if order < self.order_failed:
            return False
        limit = 1 << self.defer_shift
        self.considered += 1
        if self.considered >= limit:
            self.considered = limit
            return False
        return True

    def compaction_defer_reset(self, order: int, alloc_success: bool) -> None:
        if alloc_success:
            self.considered = 0
            self.defer_shift = 0
        if order >= self.order_failed:
            self.order_failed = order + 1

    def compaction_restarting(self, order: int) -> bool:
        """After the longest deferral the skip hints are cleared before trying again."""
        if order < self.order_failed:
            return False
        return (
            self.defer_shift == COMPACT_MAX_DEFER_SHIFT and self.considered >= 1 << self.defer_shift
        )

    # -- cached scanners and skip hints -------------------------------------------------------
    def reset_cached_positions(self) -> None:
        self.cached_migrate_block = [0, 0]
        self.cached_free_block = self.nr_pageblocks - 1

    def update_cached_migrate(self, end_block: int, mode: MigrateMode) -> None:
        """update_cached_migrate(cc, pfn) with pfn = the end of the block just done: the kernel
        rounds it up with pageblock_end_pfn(), so the cached position lands one pageblock past
        (end_block + 1) — a quirk the model keeps, as it decides what the next pass skips."""
        pos = min(end_block + 1, self.nr_pageblocks)
        self.cached_migrate_block[0] = max(self.cached_migrate_block[0], pos)
        if mode != MigrateMode.ASYNC:
            self.cached_migrate_block[1] = max(self.cached_migrate_block[1], pos)

    def update_pageblock_skip(self, block: int) -> None:
        """The free scanner scanned a whole block: skip it, and restart below it next time."""
        self.skip[block] = True
        self.cached_free_block = min(self.cached_free_block, block - 1)

    def reset_isolation_suitable(self, view: PoolView) -> bool:
        """reset_isolation_suitable(): kswapd (and kcompactd) going to sleep; acts only when a
        direct compaction's scanners met since (compact_blockskip_flush). True if it ran."""
        if not self.blockskip_flush:
            return False
        self._reset(view)
        return True

    def _reset(self, view: PoolView) -> None:
        """__reset_isolation_suitable(): walk in from both ends; clear the skip bit of a block
        whose sampled pages (every 8th) include a movable page (source side) or a free buddy
        head (target side; before the first target, MOVABLE blocks only), and restart the
        cached scanners at the first source and the last target found."""
        self.blockskip_flush = False
        self.resets += 1
        n = self.nr_pageblocks
        sampled = view.flags.reshape(n, -1)[:, ::_RESET_SAMPLE_STRIDE]
        want = PG_ALLOC | PG_OBJECT
        lru = np.any((sampled & want) == want, axis=1).tolist()
        buddy = np.any((sampled & PG_BUDDY) != 0, axis=1).tolist()
        movable = (view.pageblock_mt == MigrateType.MOVABLE).tolist()
        skip = self.skip
        m, f = 0, n - 1
        reset_migrate, reset_free = f, m
        source_set = free_set = False

        def suitable(b: int, check_source: bool, check_target: bool) -> bool:
            if check_source and check_target and not skip[b]:
                return True
            if not check_source and check_target and not movable[b]:
                return False
            if (check_source and lru[b]) or (check_target and buddy[b]):
                skip[b] = False
                return True
            return False

        while m < f:
            if suitable(m, True, source_set) and m < reset_migrate:
                source_set = True
                reset_migrate = m
                self.init_migrate_block = m
                self.cached_migrate_block = [m, m]
            if suitable(f, free_set, True) and f > reset_free:
                free_set = True
                reset_free = f
                self.init_free_block = f
                self.cached_free_block = f
            m += 1
            f -= 1
        if reset_migrate >= reset_free:  # no suitable block was found: leave no distance
            self.cached_migrate_block = [m, m]
            self.cached_free_block = f

    def to_json(self) -> dict[str, Any]:
        return {
            "compact_cached_migrate_pfn": [
                b * PAGEBLOCK_NR_PAGES for b in self.cached_migrate_block
            ],
            "compact_cached_free_pfn": self.cached_free_block * PAGEBLOCK_NR_PAGES,
            "compact_init_migrate_pfn": self.init_migrate_block * PAGEBLOCK_NR_PAGES,
            "compact_init_free_pfn": self.init_free_block * PAGEBLOCK_NR_PAGES,
            "compact_blockskip_flush": self.blockskip_flush,
            "compact_considered": self.considered,
            "compact_defer_shift": self.defer_shift,
            "compact_order_failed": self.order_failed,
            "pageblocks_skip": int(np.count_nonzero(self.skip)),
            "skip_resets": self.resets,
            "kcompactd_max_order": self.kcompactd_max_order,
        }

    def format(self) -> str:
        """The state as ``key value`` lines (``.gemfs/compaction_state``)."""
        lines = []
        for k, v in self.to_json().items():
            if isinstance(v, list):
                v = " ".join(str(x) for x in v)
            elif isinstance(v, bool):
                v = int(v)
            lines.append(f"{k} {v}\n")
        return "".join(lines)


def free_list(buddy: BuddyAllocator, order: int, mt: int, limit: int) -> list[int]:
    """The first ``limit`` block heads on the buddy's free list (order, mt), head first."""
    out: list[int] = []
    nxt = buddy.pool.index
    pfn = buddy.head[order][mt]
    while pfn >= 0 and len(out) < limit:
        out.append(pfn)
        pfn = int(nxt[pfn])
    return out


def free_list_reverse(buddy: BuddyAllocator, order: int, mt: int, limit: int) -> list[int]:
    """The last ``limit`` block heads on the list, tail first (list_for_each_entry_reverse)."""
    out: list[int] = []
    prv = buddy.pool.owner
    pfn = buddy.tail[order][mt]
    while pfn >= 0 and len(out) < limit:
        out.append(pfn)
        pfn = int(prv[pfn])
    return out


@dataclass
class CompactionPolicy:
    """compact_zone() as a state machine. order=-1 compacts the whole pool (compact_memory).

    Direct compaction (``direct=True``, built by :mod:`gemfs.mm.page_alloc`) passes the zone's
    ``state``: unless ``whole_zone``, the scanners start where the last pass left them;
    ``ignore_skip_hint`` is set only at COMPACT_PRIO_SYNC_FULL and for compact_memory/proactive
    compaction, as in the kernel. ``buddy`` enables the fast free-list searches.
    """

    nr_pageblocks: int
    order: int = -1
    mode: MigrateMode = MigrateMode.SYNC
    proactiveness: int | None = None  # set: proactive compaction down to the low watermark
    target_blocks: int = 1  # SUCCESS when this many free blocks of ``order`` exist (defrag_mode)
    ignore_block_suitable: bool = False
    migrate_block: int = 0
    free_block: int = -1
    result: CompactResult = CompactResult.CONTINUE
    stats: CompactStats = field(default_factory=CompactStats)
    state: ZoneCompactState | None = None
    direct: bool = False  # cc->direct_compaction
    whole_zone: bool = True  # cc->whole_zone: start at the zone's ends, not the cached scanners
    ignore_skip_hint: bool = False
    migratetype: MigrateType = MigrateType.MOVABLE  # of the allocation compacted for
    buddy: BuddyAllocator | None = None
    pins: npt.NDArray[np.uint16] | None = None  # per-frame pins the migrate scanner can see
    _targets: deque[int] = field(default_factory=deque)
    _pending: I64 = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _started: bool = False
    _finished: bool = False
    _fast_search_fail: int = 0
    _fast_start_block: int | None = None  # cc->fast_start_pfn; -1 once used (ULONG_MAX)
    _search_order: int = 0
    _finish_block: int = -1  # a block a failed migration asks to finish (cc->finish_pageblock)
    _update_cached: bool = False

    def __post_init__(self) -> None:
        if not -1 <= self.order < NR_ORDERS:
            raise ValueError(f"compaction order {self.order} out of range -1..{NR_ORDERS - 1}")
        if self.free_block < 0:
            self.free_block = self.nr_pageblocks - 1
        self._search_order = self.order

    @property
    def _sync(self) -> int:
        return int(self.mode != MigrateMode.ASYNC)

    def _start(self, view: PoolView) -> None:
        """compact_zone()'s set-up: restart after the longest deferral, pick the scanners."""
        self._started = True
        st = self.state
        if st is None:
            return
        if self.order >= 0 and st.compaction_restarting(self.order) and st.blockskip_flush:
            st._reset(view)
        if self.whole_zone:
            self.migrate_block, self.free_block = 0, self.nr_pageblocks - 1
        else:
            self.migrate_block = st.cached_migrate_block[self._sync]
            self.free_block = st.cached_free_block
            if not 0 <= self.free_block < self.nr_pageblocks:
                self.free_block = st.cached_free_block = self.nr_pageblocks - 1
            if not 0 <= self.migrate_block < self.nr_pageblocks:
                self.migrate_block = 0
                st.cached_migrate_block = [0, 0]
            if self.migrate_block <= st.init_migrate_block:
                self.whole_zone = True
        self._update_cached = (
            not self._sync and st.cached_migrate_block[0] == st.cached_migrate_block[1]
        )

    # -- termination (__compact_finished) ---------------------------------------------------
    def finished(self, view: PoolView) -> CompactResult:
        if self.result not in (CompactResult.CONTINUE,):
            return self.result
        if self.free_block <= self.migrate_block:  # compact_scanners_met()
            st = self.state
            if st is not None:
                st.reset_cached_positions()  # let the next compaction start anew
                if self.direct:
                    st.blockskip_flush = True
            return CompactResult.COMPLETE if self.whole_zone else CompactResult.PARTIAL_SKIPPED
        free = view.free_blocks_per_order()
        if self.proactiveness is not None:
            low, _ = proactive_watermarks(self.proactiveness)
            if fragmentation_score(free) <= low:
                return CompactResult.SUCCESS
        elif self.order >= 0 and self.target_blocks <= 1:
            if any(free[o] for o in range(self.order, NR_ORDERS)):
                return CompactResult.SUCCESS
        elif self.order >= 0:
            units = sum(free[o] << (o - self.order) for o in range(self.order, NR_ORDERS))
            if units >= self.target_blocks:
                return CompactResult.SUCCESS
        return CompactResult.CONTINUE

    def _finish(self) -> None:
        """The end of compact_zone(): unused targets go back, and the cached free scanner moves
        back up to the highest of them (only back, never forward)."""
        if self._finished:
            return
        self._finished = True
        st = self.state
        if st is not None and self._targets:
            top = max(self._targets) // PAGEBLOCK_NR_PAGES
            st.cached_free_block = max(st.cached_free_block, top)

    # -- the migrate scanner ----------------------------------------------------------------
    def _isolation_suitable(self, block: int) -> bool:
        st = self.state
        return self.ignore_skip_hint or st is None or not st.skip[block]

    def _source_ok(self, mt: int) -> bool:
        # suitable_migration_source(): async *direct* compaction only migrates out of pageblocks
        # of the allocation's own type (MOVABLE for a movable request).
        if self.mode != MigrateMode.ASYNC:
            return True
        if self.state is not None and not self.direct:
            return True
        return mt == self.migratetype

    def _target_ok(self, mt: int) -> bool:
        return self.ignore_block_suitable or mt == MigrateType.MOVABLE

    def _fast_find_migrateblock(self, view: PoolView) -> int:
        """fast_find_migrateblock(): look on the MOVABLE free lists of orders order-1 .. 3 for a
        block low in the search space that is already partly free and not marked skip."""
        pfn_block = self.migrate_block
        buddy, st = self.buddy, self.state
        if buddy is None or st is None or self.ignore_skip_hint or self._finish_block >= 0:
            return pfn_block
        if self.order <= PAGE_ALLOC_COSTLY_ORDER:
            return pfn_block
        if self.direct and self.migratetype != MigrateType.MOVABLE:
            return pfn_block
        limit = (COMPACT_CLUSTER_MAX >> min(63, self._fast_search_fail)) + 1
        distance = (self.free_block - self.migrate_block) * PAGEBLOCK_NR_PAGES >> 1
        if self.migrate_block != 0:
            distance >>= 2
        high_block = (self.migrate_block * PAGEBLOCK_NR_PAGES + distance) // PAGEBLOCK_NR_PAGES
        scanned = 0
        found = -1
        for order in range(self.order - 1, PAGE_ALLOC_COSTLY_ORDER - 1, -1):
            if found >= 0 or scanned >= limit:
                break
            for pfn in free_list(buddy, order, MigrateType.MOVABLE, limit - scanned + 1):
                if scanned >= limit:
                    break
                scanned += 1
                b = pfn // PAGEBLOCK_NR_PAGES
                if b < high_block and not st.skip[b]:
                    if self._fast_start_block is None:
                        self._fast_start_block = b
                    elif self._fast_start_block >= 0:
                        self._fast_start_block = min(self._fast_start_block, b)
                    self._fast_search_fail = 0
                    found = b
                    break
        self.stats.migrate_scanned += scanned
        if found >= 0:
            self.stats.fast_migrate_found += 1
            return found
        self._fast_search_fail += 1
        if self._fast_start_block is not None and self._fast_start_block >= 0:
            pfn_block = self._fast_start_block  # reinit_migrate_pfn()
            self._fast_start_block = -1
        return pfn_block

    def _scan_migrate_block(self, view: PoolView, b: int) -> tuple[I64, int, bool]:
        """isolate_migratepages_block() over block b: (candidates, pages scanned, failed).

        Async direct compaction gives up an order-aligned part of the block at its first page
        that cannot be isolated (skip_on_failure), putting back what it took there; the kernel
        has by then migrated the complete clusters of 32 before it, and so does the model."""
        start = b * PAGEBLOCK_NR_PAGES
        fl = view.flags[start : start + PAGEBLOCK_NR_PAGES]
        want = PG_ALLOC | PG_OBJECT
        movable = ((fl & want) == want) & ((fl & PG_ISOLATED) == 0)
        pins = self.pins
        if pins is None:
            return np.flatnonzero(movable) + start, PAGEBLOCK_NR_PAGES, False
        pinned = movable & (pins[start : start + PAGEBLOCK_NR_PAGES] > 0)
        cand = movable & ~pinned
        if not (self.direct and self.mode == MigrateMode.ASYNC) or not pinned.any():
            return np.flatnonzero(cand) + start, PAGEBLOCK_NR_PAGES, False
        chunk = 1 << min(max(self.order, 0), PAGEBLOCK_ORDER)
        keep = np.zeros(PAGEBLOCK_NR_PAGES, dtype=np.bool_)
        scanned = 0
        for c in range(0, PAGEBLOCK_NR_PAGES, chunk):
            p = pinned[c : c + chunk]
            if not p.any():
                keep[c : c + chunk] = cand[c : c + chunk]
                scanned += chunk
                continue
            first = int(np.argmax(p))
            scanned += first + 1
            before = np.flatnonzero(cand[c : c + first]) + c
            keep[before[: len(before) // COMPACT_CLUSTER_MAX * COMPACT_CLUSTER_MAX]] = True
        return np.flatnonzero(keep) + start, scanned, True

    def _next_source_block(self, view: PoolView, fast_found: bool) -> int:
        """The next block from ``migrate_block`` the migrate scanner would isolate from, or -1.

        The blocks passed on the way cost no scan, as in the kernel: those marked skip are
        counted, those of an unsuitable type move the cached scanner past them. Vectorized: a
        pass over many unsuitable blocks must not cost per-block Python work."""
        lo, hi = self.migrate_block, self.free_block
        if lo >= hi:
            return -1
        st = self.state
        mts = view.pageblock_mt[lo:hi]
        if self.mode != MigrateMode.ASYNC or (st is not None and not self.direct):
            src_ok = np.ones(hi - lo, dtype=np.bool_)
        else:
            src_ok = mts == self.migratetype
        if st is None or self.ignore_skip_hint:
            skipped = np.zeros(hi - lo, dtype=np.bool_)
        else:
            skipped = st.skip[lo:hi].copy()
            if fast_found:
                skipped[0] = False  # fast_find_migrateblock checked it already
        eligible = src_ok & ~skipped
        hopeless = view.hopeless_pageblocks()  # Illuminator: blocks that cannot be emptied
        passed_hopeless = np.zeros(hi - lo, dtype=np.bool_)
        if hopeless is not None:
            passed_hopeless = eligible & hopeless[lo:hi]
            eligible &= ~passed_hopeless
        n = int(np.argmax(eligible)) if eligible.any() else hi - lo
        self.stats.skipped_blocks += int(np.count_nonzero(skipped[:n]))
        self.stats.hopeless_blocks += int(np.count_nonzero(passed_hopeless[:n]))
        unsuitable = np.flatnonzero(~skipped[:n] & ~src_ok[:n])
        if st is not None and len(unsuitable):
            st.update_cached_migrate(lo + int(unsuitable[-1]) + 1, self.mode)
        return lo + n if n < hi - lo else -1

    def _isolate_migratepages(self, view: PoolView) -> I64:
        """isolate_migratepages(): advance to the next block with candidates; return them."""
        first = self._fast_find_migrateblock(view)
        fast_found = first != self.migrate_block and self._fast_search_fail == 0
        self.migrate_block = first
        st = self.state
        while (b := self._next_source_block(view, fast_found)) >= 0:
            fast_found = False
            self.migrate_block = b + 1
            cand, scanned, failed = self._scan_migrate_block(view, b)
            self.stats.migrate_scanned += scanned
            self.stats.migrate_blocks += 1
            if st is not None and not self.ignore_skip_hint and len(cand):
                # 6.1's test_and_set_skip(): marked when the first page isolated is the block's
                # first (mainline since 6.4 marks every block an isolation starts in).
                if cand[0] == b * PAGEBLOCK_NR_PAGES:
                    st.skip[b] = True
            if st is not None and (failed or len(cand) == 0):
                # Nothing isolated by the call that reached the block's end: skip it next
                # time, and restart after it (isolate_migratepages_block's epilogue).
                st.skip[b] = True
                st.update_cached_migrate(b + 1, self.mode)
            if len(cand):
                return cand.astype(np.int64)
            if self._update_cached and st is not None:
                st.cached_migrate_block[1] = st.cached_migrate_block[0]
        self.migrate_block = max(self.migrate_block, self.free_block)
        return np.empty(0, dtype=np.int64)

    # -- the free scanner -------------------------------------------------------------------
    def _fast_isolate_freepages(self, view: PoolView, need: int) -> None:
        """fast_isolate_freepages(): take a free block from the MOVABLE lists (orders below the
        request, tail first) lying in the top quarter of the space between the scanners."""
        buddy, st = self.buddy, self.state
        if buddy is None or st is None or self.order <= 0:
            return
        limit = max(1, ((COMPACT_CLUSTER_MAX >> min(63, self._fast_search_fail)) + 1) >> 1)
        scan_start = self.free_block >= st.init_free_block
        if scan_start:
            limit = PAGEBLOCK_NR_PAGES >> 1
        distance = (self.free_block - self.migrate_block) * PAGEBLOCK_NR_PAGES
        top = self.free_block * PAGEBLOCK_NR_PAGES
        low_pfn = (top - (distance >> 2)) // PAGEBLOCK_NR_PAGES * PAGEBLOCK_NR_PAGES
        min_pfn = (top - (distance >> 1)) // PAGEBLOCK_NR_PAGES * PAGEBLOCK_NR_PAGES
        flags = view.flags
        queued = set(self._targets)
        self._search_order = min(self.order - 1, self._search_order)
        scanned = 0
        highest = -1
        got = -1
        got_order = 0
        for order in range(self._search_order, -1, -1):
            if not buddy.nr_free[order][MigrateType.MOVABLE]:
                continue
            high_pfn = -1
            order_limit = limit
            for pfn in free_list_reverse(buddy, order, MigrateType.MOVABLE, order_limit):
                scanned += 1
                if flags[pfn] & PG_TARGET or pfn in queued:
                    continue  # taken already (the kernel has it off the list)
                if pfn >= highest:
                    highest = pfn // PAGEBLOCK_NR_PAGES * PAGEBLOCK_NR_PAGES
                if pfn >= low_pfn:
                    got, got_order = pfn, order
                    self._search_order = order
                    break
                if pfn >= min_pfn and pfn > high_pfn:
                    high_pfn = pfn
                    order_limit >>= 1
            if got < 0 and high_pfn >= 0:
                got, got_order = high_pfn, order
            if got >= 0:
                break
            limit = max(1, limit >> 1)
        self.stats.free_scanned += scanned
        if got >= 0:
            self._fast_search_fail = 0
            self.stats.fast_free_found += 1
            self._targets.extend(range(got, got + (1 << got_order)))
            self.stats.free_scanned += (1 << got_order) - 1
            if len(self._targets) < need and not (self.direct and self.mode == MigrateMode.ASYNC):
                self._isolate_block_free(view, got // PAGEBLOCK_NR_PAGES, around=True)
        else:
            self._fast_search_fail += 1
            if scan_start and highest >= min_pfn and highest >= 0:
                self.free_block = min(self.free_block, highest // PAGEBLOCK_NR_PAGES)
            elif scan_start and self.direct:
                self.free_block = min(self.free_block, min_pfn // PAGEBLOCK_NR_PAGES)
        if highest >= 0 and highest // PAGEBLOCK_NR_PAGES >= st.cached_free_block:
            st.cached_free_block = highest // PAGEBLOCK_NR_PAGES - 1

    def _isolate_block_free(self, view: PoolView, b: int, *, around: bool = False) -> int:
        """isolate_freepages_block() over a whole block: queue its free frames; returns them."""
        start = b * PAGEBLOCK_NR_PAGES
        fl = view.flags[start : start + PAGEBLOCK_NR_PAGES]
        self.stats.free_scanned += PAGEBLOCK_NR_PAGES
        self.stats.free_blocks += 1
        free = ((fl & PG_FREE) != 0) & ((fl & PG_TARGET) == 0)
        pfns = (np.flatnonzero(free) + start).tolist()
        if around:
            queued = set(self._targets)
            pfns = [p for p in pfns if p not in queued]
        self._targets.extend(pfns)
        return len(pfns)

    def _isolate_freepages(self, view: PoolView, need: int) -> None:
        """Move the free scanner down until `need` targets are queued or it meets the other."""
        # compaction_alloc() calls isolate_freepages() whenever its list runs dry, and each call
        # tries the fast free-list search first.
        while len(self._targets) < need:
            before = len(self._targets)
            self._fast_isolate_freepages(view, need)
            if len(self._targets) == before:
                break
        flags = view.flags
        st = self.state
        # The kernel's free scanner stops at the end of the block the migrate scanner is in
        # (pageblock_end_pfn(cc->migrate_pfn)): the block after the one being isolated from.
        while len(self._targets) < need and self.free_block >= self.migrate_block:
            b = self.free_block
            self.free_block -= 1
            if not self._target_ok(int(view.pageblock_mt[b])):
                continue
            if not self._isolation_suitable(b):
                self.stats.skipped_blocks += 1
                continue
            start = b * PAGEBLOCK_NR_PAGES
            fl = flags[start : start + PAGEBLOCK_NR_PAGES]
            free = (fl & PG_FREE) != 0
            n = int(np.count_nonzero(free))
            if n == PAGEBLOCK_NR_PAGES:
                continue  # a whole free pageblock: not a target (suitable_migration_target)
            self.stats.free_scanned += PAGEBLOCK_NR_PAGES
            self.stats.free_blocks += 1
            if n == 0:
                if st is not None:
                    st.update_pageblock_skip(b)  # scanned whole, nothing to take
                continue
            free &= (fl & PG_TARGET) == 0
            self._targets.extend((np.flatnonzero(free) + start).tolist())

    def next_batch(self, view: PoolView) -> Batch | None:
        """The next (src, dst) batch to migrate, or None when compaction has finished."""
        if not self._started:
            self._start(view)
        while True:
            self.result = self.finished(view)
            if self.result is not CompactResult.CONTINUE:
                self._finish()
                return None
            if len(self._pending):
                src, self._pending = self._pending, np.empty(0, dtype=np.int64)
            else:
                src = self._isolate_migratepages(view)
            if len(src) == 0:
                continue
            src, self._pending = src[:BATCH_MAX], src[BATCH_MAX:]
            self._drop_stale_targets(view)
            self._isolate_freepages(view, len(src))
            n = min(len(src), len(self._targets))
            if n == 0:  # no target left below the free scanner: the scanners have met
                self.free_block = self.migrate_block
                self.result = self.finished(view)
                self._finish()
                return None
            if n < len(src):  # the rest of the block's pages wait for more targets
                self._pending = np.concatenate((src[n:], self._pending))
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

    def batch_done(self, batch: Batch, results: npt.NDArray[np.int32]) -> None:
        """Record the outcome. Targets that were not used are free again and may be reused.

        A failed migration in ASYNC or SYNC_LIGHT mode finishes the pageblock and marks it skip
        (compact_zone's finish_pageblock rescan), unless skip hints are ignored."""
        ok = results == 0
        self.stats.migrated += int(np.count_nonzero(ok))
        self.stats.failed += int(np.count_nonzero(~ok))
        # A target the core refused (-EBUSY: no longer free) is dropped; an unused one returns.
        unused = batch.dst[(~ok) & (results != -errno.EBUSY)]
        self._targets.extendleft(reversed(unused.tolist()))
        st = self.state
        if (
            st is not None
            and not ok.all()
            and not self.ignore_skip_hint
            and self.mode < MigrateMode.SYNC
            and len(batch.src)
        ):
            b = int(batch.src[0]) // PAGEBLOCK_NR_PAGES
            st.skip[b] = True
            st.update_cached_migrate(b + 1, self.mode)
