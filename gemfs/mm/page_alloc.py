"""The allocator's slow path for high orders (mm/page_alloc.c), with direct compaction.

:func:`alloc_pages_slowpath` is written once as a generator so that the same rules run in
process and on the control server: it yields every :class:`CompactionPolicy` it wants run, the
caller runs it through its migration mechanism (``mm.run_policy(policy)`` in process, ``await
server.run_policy(policy)`` on the server) and sends back the policy's result; the generator
returns the allocated pfn or None. :func:`drive` is the synchronous driver.

What is modelled, after ``__alloc_pages_slowpath()`` / ``__alloc_pages_direct_compact()`` /
``should_compact_retry()`` (mm/page_alloc.c), ``try_to_compact_pages()`` /
``compact_zone_order()`` / ``compaction_suitable()`` (mm/compaction.c):

- Priorities COMPACT_PRIO_ASYNC (the first attempt, INIT_COMPACT_PRIORITY), SYNC_LIGHT
  (DEF_COMPACT_PRIORITY, the retry loop's start) and SYNC_FULL (MIN_COMPACT_PRIORITY: whole zone,
  skip hints and block suitability ignored). Costly orders (> PAGE_ALLOC_COSTLY_ORDER) stop at
  SYNC_LIGHT (MIN_COMPACT_COSTLY_PRIORITY).
- Deferral: every attempt above SYNC_FULL first asks compaction_deferred(); a SYNC_LIGHT or
  SYNC_FULL pass whose scanners met defers; an allocation that succeeds after compaction
  resets the deferral.
- compact_zone()'s pre-checks: the allocation can already succeed (SUCCESS without a pass);
  compaction_suitable(): order-0 free pages above the low (costly) or min watermark plus
  compact_gap(order) = 2 << order, and for costly orders a fragmentation index outside
  [0, extfrag_threshold] (else the failure is lack of memory, not fragmentation: SKIPPED).
- ``kind``: ``thp`` is a THP fault (GFP_TRANSHUGE with __GFP_NORETRY: one async attempt, and
  after direct reclaim one more at the same priority, never a retry); ``hugetlb`` is one
  allocation of a ``nr_hugepages`` write (__GFP_RETRY_MAYFAIL: async, then SYNC_LIGHT with the
  retry rules; the caller's loop stops at its first failure); ``kernel`` is a plain
  GFP_KERNEL-like request (no NORETRY, no RETRY_MAYFAIL).
- Reclaim: the pool's only reclaimable memory is what its shrinkers hold (TTM's page pools
  under ``pinned-ttm``): direct reclaim calls ``mm.shrink_slab`` for compact_gap(order) pages
  (reclaim for a costly order with compaction goes on until that many are free:
  should_continue_reclaim()). A caller may pass ``reclaim`` instead (pages direct reclaim
  freed); when reclaim makes no progress
  ``should_compact_retry()`` is not reached (the kernel only asks it after progress) and
  ``should_reclaim_retry()`` is false (a high-order watermark needs a free block of the order).
  The model's allocations themselves ignore watermarks, as the rest of the model does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from gemfs.mm.compaction import (
    PAGE_ALLOC_COSTLY_ORDER,
    CompactionPolicy,
    CompactResult,
    ZoneCompactState,
)
from gemfs.mm.types import PAGE_SIZE, MigrateMode, MigrateType, OutOfMemory
from gemfs.mm.vmstat import fragmentation_index

if TYPE_CHECKING:
    from gemfs.mm.core import MemoryManager

R = TypeVar("R")

MAX_COMPACT_RETRIES = 16  # mm/page_alloc.c
MAX_RECLAIM_RETRIES = 16  # mm/internal.h; here also a bound on the whole retry loop
WATERMARK_SCALE_FACTOR = 10  # vm.watermark_scale_factor default, in 1/10000 of the zone


class CompactPriority(enum.IntEnum):
    """enum compact_priority (include/linux/compaction.h): lower is harder."""

    SYNC_FULL = 0
    SYNC_LIGHT = 1
    ASYNC = 2


MIN_COMPACT_PRIORITY = CompactPriority.SYNC_FULL
MIN_COMPACT_COSTLY_PRIORITY = CompactPriority.SYNC_LIGHT
DEF_COMPACT_PRIORITY = CompactPriority.SYNC_LIGHT
INIT_COMPACT_PRIORITY = CompactPriority.ASYNC


class AllocKind(enum.StrEnum):
    THP = "thp"
    HUGETLB = "hugetlb"
    KERNEL = "kernel"

    @classmethod
    def parse(cls, text: str) -> AllocKind:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise ValueError(f"unknown allocation kind {text!r} (expected {names})") from None


@dataclass(frozen=True, slots=True)
class Gfp:
    """The GFP bits the slow path's compaction decisions read."""

    noretry: bool = False  # __GFP_NORETRY
    retry_mayfail: bool = False  # __GFP_RETRY_MAYFAIL
    kswapd: bool = True  # __GFP_KSWAPD_RECLAIM: the slow path wakes kswapd (and so kcompactd)


GFP = {
    # GFP_TRANSHUGE (defrag "always" or a madvised range) has no __GFP_KSWAPD_RECLAIM.
    AllocKind.THP: Gfp(noretry=True, kswapd=False),
    AllocKind.HUGETLB: Gfp(retry_mayfail=True),  # htlb_alloc_mask: GFP_HIGHUSER_MOVABLE
    AllocKind.KERNEL: Gfp(),
}


@dataclass(frozen=True, slots=True)
class Watermarks:
    min: int
    low: int
    high: int


def watermarks(nr_pages: int) -> Watermarks:
    """The zone watermarks in pages for a zone of ``nr_pages`` (init_per_zone_wmark_min():
    min_free_kbytes = sqrt(16 × lowmem KiB), clamped to [128, 262144];
    __setup_per_zone_wmarks(): low = min + max(min/4, pages × scale/10000), high the same again).
    """
    kib = nr_pages * (PAGE_SIZE >> 10)
    min_free_kbytes = min(max(math.isqrt(kib * 16), 128), 262144)
    wmin = min_free_kbytes // (PAGE_SIZE >> 10)
    step = max(wmin // 4, nr_pages * WATERMARK_SCALE_FACTOR // 10000)
    return Watermarks(wmin, wmin + step, wmin + 2 * step)


def compact_gap(order: int) -> int:
    """Free pages compaction needs beyond the watermark: twice the request."""
    return 2 << order


def zone_watermark_ok(mm: MemoryManager, order: int, mark: int) -> bool:
    """__zone_watermark_ok() on the pool: free pages above the mark after the request, and for
    order > 0 a free block of at least that order."""
    free = mm.buddy.free_pages
    if free - (1 << order) + 1 <= mark:
        return False
    return order == 0 or mm.buddy.has_free_block(order)


def compaction_suitable(mm: MemoryManager, order: int) -> bool:
    """compaction_suitable(): enough order-0 pages to work with, and (costly orders) a failure
    caused by fragmentation rather than lack of memory."""
    wm = watermarks(mm.pool.nr_pages)
    mark = (wm.low if order > PAGE_ALLOC_COSTLY_ORDER else wm.min) + compact_gap(order)
    if not zone_watermark_ok(mm, 0, mark):
        return False
    if order > PAGE_ALLOC_COSTLY_ORDER:
        fragindex = round(fragmentation_index(mm.free_blocks_per_order(), order) * 1000)
        if 0 <= fragindex <= mm.extfrag_threshold:
            return False
    return True


def compaction_policy(
    mm: MemoryManager, order: int, mt: MigrateType, prio: int
) -> CompactionPolicy:
    """compact_zone_order()'s compact_control for a direct compaction at ``prio``."""
    state = mm.compact_state
    full = prio == MIN_COMPACT_PRIORITY
    return CompactionPolicy(
        mm.pool.nr_pageblocks,
        order=order,
        mode=MigrateMode.ASYNC if prio == CompactPriority.ASYNC else MigrateMode.SYNC_LIGHT,
        state=state,
        direct=True,
        whole_zone=full,
        ignore_skip_hint=full,
        ignore_block_suitable=full,
        migratetype=mt,
        buddy=mm.buddy,
        pins=mm.pool.pin if state.scanner_sees_pins else None,
    )


SlowPath = Generator[CompactionPolicy, CompactResult, "int | None"]
Compacting = Generator[CompactionPolicy, CompactResult, CompactResult]


def compact_zone_order(mm: MemoryManager, order: int, mt: MigrateType, prio: int) -> Compacting:
    """compact_zone() for the direct compactor: pre-checks, then one policy pass (yielded)."""
    if zone_watermark_ok(mm, order, watermarks(mm.pool.nr_pages).min):
        return CompactResult.SUCCESS  # the allocation can already succeed
    if not compaction_suitable(mm, order):
        return CompactResult.SKIPPED
    return (yield compaction_policy(mm, order, mt, prio))


def try_to_compact_pages(mm: MemoryManager, order: int, mt: MigrateType, prio: int) -> Compacting:
    """try_to_compact_pages() for the pool's one zone."""
    st = mm.compact_state
    if prio > MIN_COMPACT_PRIORITY and st.compaction_deferred(order):
        return CompactResult.DEFERRED
    status = yield from compact_zone_order(mm, order, mt, prio)
    if status is CompactResult.SUCCESS:
        st.compaction_defer_reset(order, False)
    elif prio != CompactPriority.ASYNC and status in (
        CompactResult.COMPLETE,
        CompactResult.PARTIAL_SKIPPED,
    ):
        st.defer_compaction(order)
    return status


def _try_alloc(mm: MemoryManager, order: int, mt: MigrateType) -> int | None:
    """get_page_from_freelist()."""
    try:
        return mm.alloc_kernel(order, mt)
    except OutOfMemory:
        return None


def alloc_pages_direct_compact(
    mm: MemoryManager, order: int, mt: MigrateType, prio: int
) -> Generator[CompactionPolicy, CompactResult, tuple[int | None, CompactResult]]:
    """__alloc_pages_direct_compact(): compact, then try the free lists; count the stall."""
    result = yield from try_to_compact_pages(mm, order, mt, prio)
    if result is CompactResult.SKIPPED:
        return None, result
    v = mm.vmstat
    v.inc("compact_stall")
    pfn = _try_alloc(mm, order, mt)
    if pfn is not None:
        mm.compact_state.blockskip_flush = False
        mm.compact_state.compaction_defer_reset(order, True)
        v.inc("compact_success")
        return pfn, result
    v.inc("compact_fail")
    return None, result


def should_compact_retry(
    order: int, result: CompactResult, prio: int, retries: int
) -> tuple[bool, int, int]:
    """should_compact_retry() as 6.1 has it: (retry?, new priority, new retry count)."""
    if order == 0:
        return False, prio, retries
    if result is CompactResult.SUCCESS:  # compaction_made_progress()
        retries += 1
    if result is not CompactResult.COMPLETE:  # not compaction_failed()
        if result is CompactResult.SKIPPED:  # compaction_needs_reclaim(): reclaim may help
            return True, prio, retries
        if result is CompactResult.SUCCESS:
            max_retries = MAX_COMPACT_RETRIES
            if order > PAGE_ALLOC_COSTLY_ORDER:
                max_retries //= 4
            if retries <= max_retries:
                return True, prio, retries
    # check_priority: a harder priority if one is left for this order
    floor = MIN_COMPACT_COSTLY_PRIORITY if order > PAGE_ALLOC_COSTLY_ORDER else MIN_COMPACT_PRIORITY
    if prio > floor:
        return True, prio - 1, 0
    return False, prio, retries


def alloc_pages_slowpath(
    mm: MemoryManager,
    order: int,
    mt: MigrateType = MigrateType.MOVABLE,
    kind: AllocKind | str = AllocKind.THP,
    *,
    reclaim: Callable[[int], int] | None = None,
    kswapd: Callable[[], bool] | None = None,
    other_zone_ok: bool = False,
) -> SlowPath:
    """__alloc_pages_slowpath() for one high-order request; see the module doc.

    ``kswapd``: asked at each retry (kswapd, woken on entry, has had the first attempt's time to
    work); True means it has gone back to sleep by now (:func:`kswapd_sleep` runs: skip hints
    flushed, kcompactd woken). Without it kswapd is never seen to sleep.

    ``other_zone_ok``: another zone of the node passes should_reclaim_retry()'s order watermark
    check though the allocation cannot use it (a DMA zone with free 2 MiB blocks behind its
    lowmem reserve): the slow path then retries reclaim and compaction up to
    MAX_RECLAIM_RETRIES times before giving up, as the kernel does."""
    kind = AllocKind.parse(kind) if isinstance(kind, str) else kind
    gfp = GFP[kind]
    pfn = yield from _slowpath(mm, order, mt, gfp, reclaim, kswapd, other_zone_ok)
    v = mm.vmstat
    if kind is AllocKind.THP:
        v.inc("thp_fault_alloc" if pfn is not None else "thp_fault_fallback")
    elif kind is AllocKind.HUGETLB:
        v.inc("htlb_buddy_alloc_success" if pfn is not None else "htlb_buddy_alloc_fail")
    publish_state(mm)
    return pfn


def _slowpath(
    mm: MemoryManager,
    order: int,
    mt: MigrateType,
    gfp: Gfp,
    reclaim: Callable[[int], int] | None,
    kswapd: Callable[[], bool] | None,
    other_zone_ok: bool,
) -> SlowPath:
    pfn = _try_alloc(mm, order, mt)
    if pfn is not None or order == 0:
        return pfn
    if gfp.kswapd:
        wake_all_kswapds(mm, order)
    costly = order > PAGE_ALLOC_COSTLY_ORDER
    prio: int = DEF_COMPACT_PRIORITY
    if costly or mt != MigrateType.MOVABLE:
        pfn, result = yield from alloc_pages_direct_compact(mm, order, mt, INIT_COMPACT_PRIORITY)
        if pfn is not None:
            return pfn
        if costly and gfp.noretry:
            if result in (CompactResult.SKIPPED, CompactResult.DEFERRED):
                return None
            prio = INIT_COMPACT_PRIORITY
    retries = 0
    no_progress_loops = 0
    for _ in range(4 * MAX_RECLAIM_RETRIES):  # retry: (bounded: reclaim progress is a stub)
        if kswapd is not None and kswapd():
            yield from kswapd_sleep(mm, order)
        pfn = _try_alloc(mm, order, mt)
        if pfn is not None:
            return pfn
        progress = reclaim(order) if reclaim is not None else mm.shrink_slab(compact_gap(order))
        if progress:
            pfn = _try_alloc(mm, order, mt)
            if pfn is not None:
                return pfn
        pfn, result = yield from alloc_pages_direct_compact(mm, order, mt, prio)
        if pfn is not None:
            return pfn
        if gfp.noretry:
            return None
        if costly and not gfp.retry_mayfail:
            return None
        # should_reclaim_retry(): costly orders count every loop as one without progress; go on
        # while some zone passes the order's watermark with what reclaim could free. Here
        # that needs a free block of the order, which a failed allocation says this zone has
        # not — but another zone of the node may (``other_zone_ok``).
        if progress <= 0 or costly:
            no_progress_loops += 1
        else:
            no_progress_loops = 0
        if no_progress_loops <= MAX_RECLAIM_RETRIES and (
            other_zone_ok or zone_watermark_ok(mm, order, watermarks(mm.pool.nr_pages).min)
        ):
            continue
        if progress <= 0:
            return None  # no reclaim progress: no compaction retry; costly orders never OOM
        again, prio, retries = should_compact_retry(order, result, prio, retries)
        if result is CompactResult.SKIPPED:  # compaction_zonelist_suitable() after reclaim
            again = compaction_suitable(mm, order)
        if not again:
            return None
    return None


def drive(mm: MemoryManager, slow: Generator[CompactionPolicy, CompactResult, R]) -> R:
    """Run a slow path (or kcompactd's work) in process: each policy through ``mm.run_policy``."""
    try:
        policy = next(slow)
        while True:
            policy = slow.send(mm.run_policy(policy))
    except StopIteration as done:
        value: R = done.value
        return value


def wake_all_kswapds(mm: MemoryManager, order: int) -> None:
    """wake_all_kswapds() on the slow path's entry: kswapd is woken for ``order``. The pool has
    nothing for kswapd to reclaim beyond its shrinkers, so it goes back to sleep at once and
    wakes kcompactd for the order (kswapd_try_to_sleep → wakeup_kcompactd): the order is kept
    as pending work (``pgdat->kcompactd_max_order``) that kcompactd's next wake-up takes
    (:func:`kcompactd_wake`), after kswapd's sleep has flushed the skip hints."""
    st = mm.compact_state
    st.kcompactd_max_order = max(st.kcompactd_max_order, order)


def kcompactd_do_work(mm: MemoryManager, order: int) -> Compacting:
    """kcompactd_do_work() for one order: SYNC_LIGHT, skip hints honoured, the cached scanners
    used, the zone's deferral applies; compact_daemon_wake and compact_daemon_*_scanned counted.
    SKIPPED/DEFERRED/SUCCESS without a pass when there is nothing to do. The pending order is
    cleared when it is no higher than the one done."""
    st = mm.compact_state
    mm.vmstat.inc("compact_daemon_wake")
    try:
        if st.compaction_deferred(order):
            return CompactResult.DEFERRED
        if zone_watermark_ok(mm, order, watermarks(mm.pool.nr_pages).min):
            return CompactResult.SUCCESS
        if not compaction_suitable(mm, order):
            return CompactResult.SKIPPED
        policy = CompactionPolicy(
            mm.pool.nr_pageblocks,
            order=order,
            mode=MigrateMode.SYNC_LIGHT,
            state=st,
            whole_zone=False,
            buddy=mm.buddy,
            pins=mm.pool.pin if st.scanner_sees_pins else None,
        )
        status = yield policy
        if status is CompactResult.SUCCESS:
            st.compaction_defer_reset(order, False)
        elif status in (CompactResult.COMPLETE, CompactResult.PARTIAL_SKIPPED):
            st.defer_compaction(order)
        mm.vmstat.inc("compact_daemon_migrate_scanned", policy.stats.migrate_scanned)
        mm.vmstat.inc("compact_daemon_free_scanned", policy.stats.free_scanned)
        return status
    finally:
        if st.kcompactd_max_order <= order:
            st.kcompactd_max_order = 0


def kswapd_sleep(mm: MemoryManager, order: int) -> Compacting:
    """kswapd going to sleep after a high-order wake-up (kswapd_try_to_sleep): the skip hints
    are flushed if a direct compaction's scanners met (reset_isolation_suitable), then kcompactd
    is woken for the order (wakeup_kcompactd)."""
    mm.compact_state.reset_isolation_suitable(mm)
    return (yield from kcompactd_do_work(mm, order))


def kcompactd_node_suitable(mm: MemoryManager, order: int) -> bool:
    """kcompactd_node_suitable(): the allocation cannot succeed yet and compaction can help."""
    ok = zone_watermark_ok(mm, order, watermarks(mm.pool.nr_pages).min)
    return not ok and compaction_suitable(mm, order)


def kcompactd_wake(
    mm: MemoryManager, order: int = -1
) -> Generator[CompactionPolicy, CompactResult, CompactResult | None]:
    """One scheduled wake-up of kcompactd, its order work (``kcompactd_work_requested``): the
    order kswapd left pending (:func:`wake_all_kswapds`), or ``order`` when the caller asks for
    one at every wake (a compactor started with ``--order``), if wakeup_kcompactd() would wake
    kcompactd for it (:func:`kcompactd_node_suitable`). kswapd's sleep comes first (skip hints
    flushed), then :func:`kcompactd_do_work`. None when no order work was requested: the
    wake-up is then for proactive compaction (:class:`gemfs.mm.kcompactd.Kcompactd`)."""
    st = mm.compact_state
    want = max(st.kcompactd_max_order, order)
    if want <= 0:
        return None
    st.reset_isolation_suitable(mm)  # kswapd_try_to_sleep(), before it wakes kcompactd
    if not kcompactd_node_suitable(mm, want):  # wakeup_kcompactd() would not wake it
        st.kcompactd_max_order = 0
        publish_state(mm)
        return None
    status = yield from kcompactd_do_work(mm, want)
    publish_state(mm)
    return status


STATE_GAUGES = (
    "compact_defer_shift",
    "compact_considered",
    "compact_order_failed",
    "compact_cached_migrate_pfn_async",
    "compact_cached_migrate_pfn_sync",
    "compact_cached_free_pfn",
    "compact_pageblocks_skip",
    "kcompactd_max_order",
)


def publish_state(mm: MemoryManager) -> None:
    """Copy the zone's compaction state into vmstat gauges (so ``.gemfs/vmstat`` and every
    JSON that carries vmstat show it); ``.gemfs/compaction_state`` shows it whole."""
    st: ZoneCompactState = mm.compact_state
    c = mm.vmstat.counters
    j = st.to_json()
    c["compact_defer_shift"] = st.defer_shift
    c["compact_considered"] = st.considered
    c["compact_order_failed"] = st.order_failed
    c["compact_cached_migrate_pfn_async"] = j["compact_cached_migrate_pfn"][0]
    c["compact_cached_migrate_pfn_sync"] = j["compact_cached_migrate_pfn"][1]
    c["compact_cached_free_pfn"] = j["compact_cached_free_pfn"]
    c["compact_pageblocks_skip"] = j["pageblocks_skip"]
    c["kcompactd_max_order"] = st.kcompactd_max_order
