"""kcompactd in the zone's compaction state (gemfs.mm.kcompactd, gemfs.mm.page_alloc): the order
work kswapd leaves, its deferral shared with direct compaction, the skip hints kswapd's sleep
flushes, the proactive deferral of 64 intervals, and the state a compactor process's pass
hands back. Parity of the in-process and compactor-process paths is tests/test_parity.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gemfs.mm import Design, MemoryManager, MigrateType
from gemfs.mm import page_alloc as pa
from gemfs.mm.compaction import CompactResult, ZoneCompactState
from gemfs.mm.kcompactd import PROACTIVE_DEFER, Kcompactd
from tests.test_compaction_state import half_used, pin_all, pinned_everywhere, run_slowpath


@pytest.fixture
def mm() -> Iterator[MemoryManager]:
    m = MemoryManager("16MiB", design=Design.SHMEM_HOOK)
    yield m
    m.close()


def wake(mm: MemoryManager, order: int = -1) -> CompactResult | None:
    return pa.drive(mm, pa.kcompactd_wake(mm, order))


def test_a_failed_hugetlb_allocation_leaves_order_work_a_thp_fault_does_not(
    mm: MemoryManager,
) -> None:
    pinned_everywhere(mm)
    run_slowpath(mm, 9, "thp", reclaim=lambda order: 0)
    assert mm.compact_state.kcompactd_max_order == 0  # GFP_TRANSHUGE: no kswapd
    assert wake(mm) is None  # nothing requested: the wake-up is for proactive work only
    assert mm.vmstat["compact_daemon_wake"] == 0
    run_slowpath(mm, 9, "hugetlb", reclaim=lambda order: 0)
    assert mm.compact_state.kcompactd_max_order == 9
    assert mm.vmstat["kcompactd_max_order"] == 9  # published with the state


def test_order_work_runs_in_the_zone_state_and_shares_its_deferral(mm: MemoryManager) -> None:
    pinned_everywhere(mm)
    st = mm.compact_state
    run_slowpath(mm, 9, "hugetlb", reclaim=lambda order: 32)
    assert st.defer_shift == 1
    assert st.kcompactd_max_order == 9
    # compaction_deferred() counts this attempt (1 < 1 << 1): kcompactd does no pass
    assert wake(mm) is CompactResult.DEFERRED
    assert mm.vmstat["compact_daemon_wake"] == 1
    assert mm.vmstat["compact_daemon_migrate_scanned"] == 0
    assert st.kcompactd_max_order == 0  # the pending order is taken
    # --order 9 at every wake: the next one passes the deferral, scans, fails and defers
    assert wake(mm, 9) in (CompactResult.COMPLETE, CompactResult.PARTIAL_SKIPPED)
    assert mm.vmstat["compact_daemon_wake"] == 2
    assert mm.vmstat["compact_daemon_migrate_scanned"] > 0
    assert st.defer_shift == 2  # kcompactd defers like sync direct compaction


def test_kswapd_sleep_flushes_the_skip_hints_before_kcompactd_works(mm: MemoryManager) -> None:
    blocks = half_used(mm)
    for objs in blocks:
        pin_all(mm, objs)
    st = mm.compact_state
    run_slowpath(mm, 9, "hugetlb", reclaim=lambda order: 32)
    assert st.blockskip_flush  # a direct compaction's scanners met
    assert st.skip.any()
    for o in blocks[3]:  # block 3 can be emptied now
        mm.unpin(o, 0, o.nr_pages)
    resets = st.resets
    st.considered = 1 << st.defer_shift  # past the deferral
    result = wake(mm, 9)
    assert st.resets == resets + 1  # kswapd_try_to_sleep(): __reset_isolation_suitable
    assert result is CompactResult.SUCCESS
    assert mm.buddy.has_free_block(9)
    # the watermark holds now: wakeup_kcompactd() would not wake it, no pass
    scanned = mm.vmstat["compact_daemon_migrate_scanned"]
    assert wake(mm, 9) is None
    assert mm.vmstat["compact_daemon_migrate_scanned"] == scanned
    mm.check()


def test_proactive_no_progress_sleeps_64_intervals_and_order_work_ends_it() -> None:
    kc = Kcompactd(8)
    free = [100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # all order-0: score 100, nothing moves it
    ran = list(kc.wake(lambda: free, 90))
    assert len(ran) == 1
    assert ran[0].ignore_skip_hint
    assert ran[0].whole_zone
    assert kc.defer == PROACTIVE_DEFER == 63
    for _ in range(PROACTIVE_DEFER):
        assert list(kc.wake(lambda: free, 90)) == []
    assert len(list(kc.wake(lambda: free, 90))) == 1  # the 64th interval
    assert kc.defer == PROACTIVE_DEFER
    assert list(kc.wake(lambda: free, 90, worked=True)) == []  # order work: timeout reset
    assert kc.defer == 0
    assert len(list(kc.wake(lambda: free, 90))) == 1
    assert kc.take_counters()["proactive_compact_trigger"] == 3


def test_a_pass_run_elsewhere_hands_back_what_it_left(mm: MemoryManager) -> None:
    half_used(mm)
    st = mm.compact_state
    st.skip[2] = True
    st.defer_shift, st.considered = 3, 5
    copy = ZoneCompactState.imported(st.nr_pageblocks, st.export())
    assert copy.skip.tolist() == st.skip.tolist()
    assert (copy.defer_shift, copy.considered) == (3, 5)
    policy = mm.compact_policy()  # compact_memory's kind: skip hints ignored, and set
    policy.state = copy
    mm.run_policy(policy)
    st.defer_shift = 4  # the zone's own deferral moved meanwhile: absorb keeps it
    st.absorb(copy)
    assert st.skip.tolist() == copy.skip.tolist()
    assert st.cached_free_block == copy.cached_free_block
    assert st.defer_shift == 4
    with pytest.raises(ValueError, match="skip bits"):
        ZoneCompactState.imported(st.nr_pageblocks + 8, st.export())
    with pytest.raises(ValueError, match="bad compaction state"):
        ZoneCompactState.imported(st.nr_pageblocks, {"skip": b"\0"})


def test_alloc_kind_reaches_the_slow_path_from_a_workload(mm: MemoryManager) -> None:
    pinned_everywhere(mm)
    assert mm.allocate_huge(9, MigrateType.MOVABLE, kind="hugetlb") is None
    assert mm.vmstat["htlb_buddy_alloc_fail"] == 1
    assert mm.compact_state.kcompactd_max_order == 9


def test_probe_gfp_key_is_checked() -> None:
    from tests.workloads import SMALL
    from tools.workload import WorkloadError, parse_workload

    text = SMALL.replace('kind = "probe"\n', 'kind = "probe"\ngfp = "atomic"\n', 1)
    assert text != SMALL
    with pytest.raises(WorkloadError, match=r"small.toml:\d+: .*gfp.*thp \| hugetlb \| kernel"):
        parse_workload(text, "small.toml")


def test_reclaim_lets_kswapd_sleep_and_flush_the_hints(mm: MemoryManager) -> None:
    """The player's page-cache reclaim is kswapd's work: when it goes back to sleep, the skip
    hints a met direct compaction left are flushed (only then)."""
    from tools.inproc_backend import InprocBackend
    from tools.workload import parse_workload

    pinned_everywhere(mm)
    st = mm.compact_state
    assert not mm.kswapd_sleep()  # no direct compaction met its other scanner yet
    run_slowpath(mm, 9, "thp", reclaim=lambda order: 0)
    st.skip[:] = True
    st.blockskip_flush = True
    resets = st.resets
    assert mm.kswapd_sleep()
    assert st.resets == resets + 1
    assert not st.skip.all()  # blocks with movable pages or free buddies are scanned again
    assert not mm.kswapd_sleep()  # once per met pass
    w = parse_workload('pool = "16MiB"\n\n[[phase]]\nkind = "wait"\nms = 1\n', "w.toml")
    b = InprocBackend(w, Design.PINNED)
    try:
        b.mm.compact_state.blockskip_flush = True
        b.kswapd_sleep()  # what the player calls after dropping page cache
        assert b.mm.compact_state.resets == 1
    finally:
        b.teardown()
