"""The zone's compaction memory and the allocator's slow path (gemfs.mm.compaction/page_alloc):
skip bits, cached scanners, deferral, priorities, retry rules — one test per mechanism."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from gemfs.mm import Design, MemoryManager, MigrateMode, MigrateType
from gemfs.mm import page_alloc as pa
from gemfs.mm.compaction import (
    COMPACT_MAX_DEFER_SHIFT,
    CompactionPolicy,
    CompactResult,
    ZoneCompactState,
)
from gemfs.mm.objects import GemObject
from gemfs.mm.page_alloc import CompactPriority
from gemfs.mm.types import PAGEBLOCK_NR_PAGES

POOL = "16MiB"  # 8 pageblocks


@pytest.fixture
def mm() -> Iterator[MemoryManager]:
    m = MemoryManager(POOL, design=Design.SHMEM_HOOK)
    yield m
    m.close()


def half_used(mm: MemoryManager) -> list[list[GemObject]]:
    """Every pageblock: 64-page objects at offsets 0, 128, 256, 384 (kept), 64-page holes
    between them; returns the kept objects per pageblock."""
    objs = [mm.create_object(64 * 4096) for _ in range(64)]
    for o in objs[1::2]:
        mm.destroy_object(o)
    kept = objs[0::2]
    blocks = [kept[i : i + 4] for i in range(0, 32, 4)]
    for b, objs_b in enumerate(blocks):
        assert {int(o.pages[0]) // PAGEBLOCK_NR_PAGES for o in objs_b} == {b}
    assert mm.free_blocks_per_order()[6] == 32
    return blocks


def pin_all(mm: MemoryManager, objs: list[GemObject]) -> None:
    for o in objs:
        mm.pin(o, 0, o.nr_pages)


def direct(mm: MemoryManager, mode: MigrateMode, **kw: object) -> CompactionPolicy:
    """A direct compaction for order 9, without the fast free-list searches (deterministic)."""
    args: dict[str, object] = {
        "order": 9,
        "mode": mode,
        "state": mm.compact_state,
        "direct": True,
        "whole_zone": False,
        "pins": mm.pool.pin if mm.compact_state.scanner_sees_pins else None,
    }
    args.update(kw)
    return CompactionPolicy(mm.pool.nr_pageblocks, **args)  # type: ignore[arg-type]


def test_failed_block_is_skipped_by_the_next_async_pass(mm: MemoryManager) -> None:
    kept = half_used(mm)
    pin_all(mm, kept[0])  # shmem-like: the pin shows when migration fails
    st = mm.compact_state
    first = direct(mm, MigrateMode.ASYNC)
    assert mm.run_policy(first) is CompactResult.SUCCESS
    assert first.stats.failed == 256  # block 0 tried and failed (-EAGAIN) ...
    assert first.stats.migrated == 256  # ... block 1 emptied
    assert st.skip[0]  # the failed block is marked
    assert st.cached_migrate_block == [2, 0]  # async cache moved (one block past: the kernel's)
    assert st.cached_migrate_block[1] == 0  # the sync cache did not

    mm.alloc_kernel(9, MigrateType.MOVABLE)  # take the block compaction made
    second = direct(mm, MigrateMode.ASYNC, whole_zone=True)
    assert mm.run_policy(second) is CompactResult.SUCCESS
    assert second.stats.failed == 0  # block 0 was not tried again
    assert second.stats.skipped_blocks == 2  # blocks 0 and 1 (marked when isolation started)
    assert second.stats.migrate_scanned == PAGEBLOCK_NR_PAGES  # only block 2 was scanned
    assert second.stats.migrate_blocks == 1

    mm.alloc_kernel(9, MigrateType.MOVABLE)
    full = direct(mm, MigrateMode.SYNC_LIGHT, whole_zone=True, ignore_skip_hint=True)
    mm.run_policy(full)
    assert full.stats.failed == 256  # SYNC_FULL's ignore_skip_hint tries block 0 again
    mm.check()


def test_skip_bits_cleared_by_reset_after_scanners_meet(mm: MemoryManager) -> None:
    for objs in half_used(mm):
        pin_all(mm, objs)
    st = mm.compact_state
    st.scanner_sees_pins = True  # anonymous-like: isolation itself fails
    p = direct(mm, MigrateMode.ASYNC)
    result = mm.run_policy(p)
    assert result is CompactResult.COMPLETE  # first pass starts at the zone start: whole zone
    assert p.stats.isolated == 0
    assert p.stats.failed == 0
    # Each block was given up at its first pinned page (its first page): 1 page scanned each.
    assert p.stats.migrate_scanned == p.stats.migrate_blocks
    assert st.blockskip_flush
    assert st.skip[: p.stats.migrate_blocks].all()
    assert st.cached_migrate_block == [0, 0]
    assert st.cached_free_block == 7
    assert st.reset_isolation_suitable(mm)  # kswapd going to sleep
    assert not st.skip.any()  # every block holds movable pages: all cleared
    assert st.resets == 1
    assert not st.blockskip_flush
    assert not st.reset_isolation_suitable(mm)  # nothing to flush any more


def test_cached_scanners_resume_where_they_stopped(mm: MemoryManager) -> None:
    kept = half_used(mm)
    for o in kept[0] + kept[1]:
        mm.destroy_object(o)
    for _ in range(2):  # blocks 0 and 1 become UNMOVABLE: no source for async direct
        mm.alloc_kernel(9, MigrateType.UNMOVABLE)
    assert mm.pageblock_mt[:2].tolist() == [MigrateType.UNMOVABLE] * 2
    st = mm.compact_state
    a = direct(mm, MigrateMode.ASYNC)
    batches = [b.src for b in mm.iter_policy(a)]
    assert a.result is CompactResult.SUCCESS
    assert [int(s[0]) // PAGEBLOCK_NR_PAGES for s in batches] == [2]
    assert st.cached_migrate_block == [3, 0]  # past blocks 0-1 (+1: pageblock_end_pfn)

    mm.alloc_kernel(9, MigrateType.MOVABLE)
    b = direct(mm, MigrateMode.ASYNC)
    batches = [x.src for x in mm.iter_policy(b)]
    assert b.result is CompactResult.SUCCESS
    assert [int(s[0]) // PAGEBLOCK_NR_PAGES for s in batches] == [3]  # resumed at block 3
    assert b.stats.migrate_blocks == 1
    assert b.stats.skipped_blocks == 0

    mm.alloc_kernel(9, MigrateType.MOVABLE)
    c = direct(mm, MigrateMode.SYNC_LIGHT)  # the sync scanner has its own cache: from 0
    assert mm.run_policy(c) is CompactResult.COMPLETE  # from the zone start: whole zone
    # Blocks 0-1 are scanned now (a sync pass takes any block type), 2-3 are passed over
    # (marked when isolation started in them), 4 is isolated but no target is left above it.
    assert (c.stats.migrate_blocks, c.stats.skipped_blocks) == (3, 2)
    assert st.blockskip_flush
    assert st.cached_migrate_block == [0, 0]
    mm.check()


def test_deferral_shifts_counts_and_resets() -> None:
    st = ZoneCompactState(8)
    assert not st.compaction_deferred(9)  # shift 0: never deferred
    for _ in range(3):
        st.defer_compaction(9)
    assert st.defer_shift == 3
    assert st.considered == 0
    assert [st.compaction_deferred(9) for _ in range(8)] == [True] * 7 + [False]
    assert st.considered == 8
    for _ in range(10):
        st.defer_compaction(9)
    assert st.defer_shift == COMPACT_MAX_DEFER_SHIFT  # capped at 64 skipped attempts
    assert sum(st.compaction_deferred(9) for _ in range(64)) == 63
    assert st.compaction_restarting(9)  # after the longest deferral: reset the skip bits
    st.compaction_defer_reset(9, alloc_success=False)  # compaction thinks it succeeded
    assert st.defer_shift == COMPACT_MAX_DEFER_SHIFT
    assert st.order_failed == 10
    assert not st.compaction_deferred(8)  # below compact_order_failed: not deferred
    st.compaction_defer_reset(9, alloc_success=True)
    assert (st.defer_shift, st.considered) == (0, 0)


def test_restarting_after_longest_deferral_clears_skip_bits(mm: MemoryManager) -> None:
    half_used(mm)
    st = mm.compact_state
    st.skip[:] = True
    st.blockskip_flush = True
    st.defer_shift = COMPACT_MAX_DEFER_SHIFT
    st.considered = 1 << COMPACT_MAX_DEFER_SHIFT
    p = direct(mm, MigrateMode.SYNC_LIGHT)
    mm.run_policy(p)
    assert st.resets == 1
    assert p.stats.skipped_blocks == 0


def run_slowpath(
    mm: MemoryManager, order: int, kind: str, mt: MigrateType = MigrateType.MOVABLE, **kw: object
) -> tuple[int | None, list[CompactionPolicy]]:
    """Drive the slow path by hand, recording every policy it asks for."""
    slow = pa.alloc_pages_slowpath(mm, order, mt, kind, **kw)  # type: ignore[arg-type]
    seen: list[CompactionPolicy] = []
    try:
        policy = next(slow)
        while True:
            seen.append(policy)
            policy = slow.send(mm.run_policy(policy))
    except StopIteration as done:
        return done.value, seen


def pinned_everywhere(mm: MemoryManager) -> None:
    for objs in half_used(mm):
        pin_all(mm, objs)


def test_costly_hugetlb_stops_at_sync_light_and_defers(mm: MemoryManager) -> None:
    pinned_everywhere(mm)
    pfn, seen = run_slowpath(mm, 9, "hugetlb", reclaim=lambda order: 32)
    assert pfn is None
    assert [p.mode for p in seen] == [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT]
    assert not any(p.ignore_skip_hint for p in seen)  # never SYNC_FULL for a costly order
    st = mm.compact_state
    assert st.defer_shift == 1  # the SYNC_LIGHT pass met the other scanner: deferred
    v = mm.vmstat
    assert (v["compact_stall"], v["compact_fail"], v["compact_success"]) == (2, 2, 0)
    assert v["htlb_buddy_alloc_fail"] == 1
    assert v["compact_defer_shift"] == 1  # the state, published as gauges
    # The next allocation: its async attempt is deferred (compact_considered 1 < 1 << 1: no
    # pass, but a stall), its SYNC_LIGHT attempt runs (2 >= 2), fails, and defers further.
    pfn, seen = run_slowpath(mm, 9, "hugetlb")
    assert pfn is None
    assert [p.mode for p in seen] == [MigrateMode.SYNC_LIGHT]
    assert (st.defer_shift, st.considered) == (2, 0)
    assert (v["compact_stall"], v["compact_fail"]) == (4, 4)


def test_non_costly_order_escalates_to_sync_full(mm: MemoryManager) -> None:
    objs = [mm.create_object(4 * 4096) for _ in range(1024)]  # 4-page objects, 4-page holes
    for o in objs[1::2]:
        mm.destroy_object(o)
    pin_all(mm, objs[0::2])
    assert mm.free_blocks_per_order()[2:4] == [512, 0]
    pfn, seen = run_slowpath(mm, 3, "kernel", MigrateType.UNMOVABLE, reclaim=lambda order: 1)
    assert pfn is None
    assert [(p.mode, p.ignore_skip_hint) for p in seen] == [
        (MigrateMode.ASYNC, False),  # INIT_COMPACT_PRIORITY (not movable: before reclaim)
        (MigrateMode.SYNC_LIGHT, False),  # DEF_COMPACT_PRIORITY
        (MigrateMode.SYNC_LIGHT, True),  # COMPACT_PRIO_SYNC_FULL: only for orders <= 3
    ]


def test_thp_fault_never_retries(mm: MemoryManager) -> None:
    pinned_everywhere(mm)
    pfn, seen = run_slowpath(mm, 9, "thp", reclaim=lambda order: 32)
    assert pfn is None
    assert [p.mode for p in seen] == [MigrateMode.ASYNC, MigrateMode.ASYNC]
    assert mm.compact_state.defer_shift == 0  # async compaction never defers
    assert mm.vmstat["thp_fault_fallback"] == 1


def test_thp_fault_gets_a_block_by_async_compaction(mm: MemoryManager) -> None:
    half_used(mm)
    pfn = mm.alloc_high_order(9, MigrateType.MOVABLE, kind="thp")
    assert pfn is not None
    assert pfn % PAGEBLOCK_NR_PAGES == 0
    v = mm.vmstat
    assert (v["compact_stall"], v["compact_success"], v["thp_fault_alloc"]) == (1, 1, 1)
    assert v["compact_migrate_scanned"] > 0
    mm.check()


def test_should_compact_retry_rules() -> None:
    r = pa.should_compact_retry
    sl, full = CompactPriority.SYNC_LIGHT, CompactPriority.SYNC_FULL
    assert r(9, CompactResult.COMPLETE, sl, 0) == (False, sl, 0)  # costly: SYNC_LIGHT is the end
    assert r(3, CompactResult.COMPLETE, sl, 5) == (True, full, 0)
    assert r(9, CompactResult.SUCCESS, sl, 3) == (True, sl, 4)  # costly: max 16 / 4 retries
    assert r(9, CompactResult.SUCCESS, sl, 4) == (False, sl, 5)
    assert r(3, CompactResult.SUCCESS, sl, 15) == (True, sl, 16)
    assert r(9, CompactResult.SKIPPED, sl, 0)[0]  # reclaim may help
    assert r(9, CompactResult.DEFERRED, CompactPriority.ASYNC, 0) == (True, sl, 0)
    assert r(0, CompactResult.COMPLETE, sl, 0) == (False, sl, 0)


def test_compaction_suitable_needs_free_pages_and_fragmentation(mm: MemoryManager) -> None:
    wm = pa.watermarks(mm.pool.nr_pages)
    assert (wm.min, wm.low, wm.high) == (128, 160, 192)  # sqrt(16 × 16384 KiB) = 512 KiB
    half_used(mm)
    assert pa.compaction_suitable(mm, 9)  # 2048 free in 32 order-6 blocks: fragmentation
    while mm.buddy.free_pages > wm.low + pa.compact_gap(9):
        mm.alloc_kernel(6, MigrateType.MOVABLE)
    assert not pa.compaction_suitable(mm, 9)  # too little free memory to compact
    pfn, seen = run_slowpath(mm, 9, "hugetlb")
    assert pfn is None
    assert seen == []
    assert mm.vmstat["compact_stall"] == 0


def test_compact_memory_ignores_skip_hints(mm: MemoryManager) -> None:
    half_used(mm)
    mm.compact_state.skip[:] = True
    mm.compact()
    assert mm.free_blocks_per_order()[9] + 2 * mm.free_blocks_per_order()[10] == 4
    mm.check()


def test_state_json_shows_pfns(mm: MemoryManager) -> None:
    st = mm.compact_state
    st.cached_migrate_block = [3, 1]
    st.skip[[1, 2]] = True
    j = st.to_json()
    assert j["compact_cached_migrate_pfn"] == [1536, 512]
    assert j["compact_cached_free_pfn"] == 7 * PAGEBLOCK_NR_PAGES
    assert j["pageblocks_skip"] == 2
    assert "compact_cached_migrate_pfn 1536 512\n" in st.format()
    assert np.count_nonzero(st.skip) == 2
