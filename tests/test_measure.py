"""Honest measurement: the modelled clock, the costs each design pays, the migration
mechanism's contract (modes, notifier races), and the metrics of a run -- asserted as values.

Each cost test is built so that the figure it checks could not come out right by accident: the
same setup run two ways (SYNC against ASYNC, pinned against notifier), with the expected value
computed from the cost table.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from driver.gem import SYNC_LIGHT_WAIT_S
from driver.inproc import InprocDriver
from gemfs.mm import MemoryManager, MigrateMode, MigrateType, ObjectError, OutOfMemory
from gemfs.mm.costs import CostTable, Task
from gemfs.mm.migrate import Answer, Ask, AskInvalidate, Migrated
from gemfs.mm.types import PAGE_SIZE, Design
from tests.workloads import BUSY, SMALL
from tools.inproc_backend import InprocBackend
from tools.player import play
from tools.workload import parse_workload

OWNED = [Design.SHMEM_HOOK, Design.GEMFS, Design.NOTIFIER]


def _setup(design: Design, busy_s: float) -> tuple[MemoryManager, InprocDriver, np.ndarray]:
    """One bound 64-page object, busy on the GPU for ``busy_s``; free targets to move it to."""
    mm = MemoryManager("16MiB", design=design)
    drv = InprocDriver(mm, design)
    o = drv.create(64 * PAGE_SIZE)
    drv.execute([o], busy_s, True)
    mm.get(o.id)
    targets = mm.buddy.alloc_bulk(64, MigrateType.MOVABLE)
    mm.buddy.free_pfns(targets)  # free again: the migration isolates them
    return mm, drv, targets


def _move(mm: MemoryManager, mode: MigrateMode, targets: np.ndarray) -> np.ndarray:
    obj = next(iter(mm.objects.values()))
    return mm.migrate_pages(obj.pages[:64].copy(), targets, mode).results


@pytest.mark.parametrize("design", OWNED)
def test_sync_waits_and_stalls_async_refuses(design: Design) -> None:
    busy = 0.050
    sync_mm, _d, t = _setup(design, busy)
    res = _move(sync_mm, MigrateMode.SYNC, t)
    assert np.all(res == 0)
    led = sync_mm.ledger
    assert led.waits_us == pytest.approx(busy * 1e6)  # the remaining busy time, exactly
    assert led.gpu_stall_us > busy * 1e6
    assert led.pages_migrated == 64
    assert led.refusals == 0
    async_mm, _d, t = _setup(design, busy)
    res = _move(async_mm, MigrateMode.ASYNC, t)
    assert np.all(res == -errno.EAGAIN)  # ASYNC never waits, the notifier included
    assert async_mm.ledger.gpu_stall_us == 0
    assert async_mm.ledger.waits_us == 0
    assert async_mm.ledger.refusals == async_mm.ledger.pages_refused == 64
    # The design that must wait pays more stall than the one that refuses.
    assert led.gpu_stall_us > async_mm.ledger.gpu_stall_us
    sync_mm.check()
    async_mm.check()


@pytest.mark.parametrize("design", OWNED)
def test_sync_light_waits_only_a_bounded_time(design: Design) -> None:
    short_mm, _d, t = _setup(design, SYNC_LIGHT_WAIT_S / 2)
    assert np.all(_move(short_mm, MigrateMode.SYNC_LIGHT, t) == 0)
    assert short_mm.ledger.waits_us == pytest.approx(SYNC_LIGHT_WAIT_S / 2 * 1e6)
    long_mm, _d, t = _setup(design, SYNC_LIGHT_WAIT_S * 5)
    assert np.all(_move(long_mm, MigrateMode.SYNC_LIGHT, t) == -errno.EAGAIN)
    assert long_mm.ledger.waits_us == 0


def test_pinned_refuses_pinned_pages_without_asking_anyone() -> None:
    mm, _d, t = _setup(Design.PINNED, 0.050)
    assert np.all(_move(mm, MigrateMode.SYNC, t) == -errno.EAGAIN)
    led = mm.ledger
    assert led.callbacks == 0
    assert led.gpu_stall_us == 0
    assert led.repinned_pages == led.refaulted_pages == 0
    assert led.refusals == 64
    _move(mm, MigrateMode.SYNC, t)  # asked again: twice the attempts, the same pages
    assert led.refusals == 128
    assert led.pages_refused == 64


def test_hook_costs_follow_the_cost_table() -> None:
    """One callback for 64 held pages that move: every term of the table, summed by hand."""
    costs = CostTable(copy_page_us=3.0, pin_call_us=50.0, flush_page_us=1.0)
    mm = MemoryManager("16MiB", design=Design.SHMEM_HOOK, costs=costs)
    drv = InprocDriver(mm, Design.SHMEM_HOOK)
    o = drv.create(64 * PAGE_SIZE)
    drv.execute([o], 0.0, True)  # bound (pinned), idle
    t = mm.buddy.alloc_bulk(64, MigrateType.MOVABLE)
    mm.buddy.free_pfns(t)
    task = Task(0.0)
    obj = mm.get(o.id)
    res = mm.migrate_pages(obj.pages[:64].copy(), t, MigrateMode.SYNC, task)
    assert np.all(res.results == 0)
    c = costs
    n = 64
    held = c.unpin_call_us + c.unpin_page_us * n + c.pin_call_us + c.pin_page_us * n
    held += (c.gtt_pte_us + c.flush_page_us) * n
    expect_task = c.callback_us + held + c.copy_page_us * n
    assert task.us == pytest.approx(expect_task)
    assert mm.ledger.gpu_stall_us == pytest.approx(held + c.copy_page_us * n)
    assert mm.ledger.callbacks == 1
    assert mm.ledger.repinned_pages == n
    # The GPU sees the moved pages through its GTT: the next batch reads what it wrote.
    drv.execute([o], 0.0, False)
    assert drv.gem.stats.data_errors == 0
    assert drv.verify_all() == 0


def test_notifier_refaults_on_next_use_and_pinned_never_does() -> None:
    mm, drv, t = _setup(Design.NOTIFIER, 0.0)
    _move(mm, MigrateMode.SYNC, t)
    led = mm.ledger
    assert led.refaulted_pages == 0  # not yet: the re-fault comes with the next use
    o = next(iter(drv.gem.objects.values()))
    drv.execute([o], 0.0, True)
    assert led.refaulted_pages == led.repinned_pages == 64
    c = mm.costs
    refault = c.pin_call_us + (c.pin_page_us + c.refault_page_us + c.gtt_pte_us) * 64
    unpin = c.unpin_call_us + c.unpin_page_us * 64
    assert led.gpu_stall_us == pytest.approx(unpin + refault)
    assert drv.verify_all() == 0
    pinned, pdrv, pt = _setup(Design.PINNED, 0.0)
    _move(pinned, MigrateMode.SYNC, pt)
    pdrv.execute(list(pdrv.gem.objects.values()), 0.0, True)
    assert pinned.ledger.refaulted_pages == pinned.ledger.repinned_pages == 0


class RacingNotifier(InprocDriver):
    """A driver that, while its invalidation is in flight, tries to pin the range again."""

    pin_error: int = 0

    def answer(self, ask: Ask) -> Answer:
        if isinstance(ask, AskInvalidate):
            try:
                self.mm.hold(self, ask.part.obj, ask.start, ask.count)
            except ObjectError as e:
                self.pin_error = e.errno
        return super().answer(ask)

    def migrated(self, notice: Migrated) -> None:
        super().migrated(notice)


def test_no_pin_is_granted_on_a_range_being_invalidated() -> None:
    mm = MemoryManager("16MiB", design=Design.NOTIFIER)
    drv = RacingNotifier(mm, Design.NOTIFIER)
    o = drv.create(64 * PAGE_SIZE)
    drv.execute([o], 0.0, True)
    obj = mm.get(o.id)
    t = mm.buddy.alloc_bulk(64, MigrateType.MOVABLE)
    mm.buddy.free_pfns(t)
    old = obj.pages[:64].copy()
    res = mm.migrate_pages(old, t, MigrateMode.SYNC)
    assert drv.pin_error == errno.EAGAIN  # refused while the invalidation was in flight
    assert np.all(res.results == 0)
    drv.execute([o], 0.0, False)  # re-faults onto the new frames
    assert np.array_equal(o.gtt, t)
    assert drv.verify_all() == 0
    mm.check()


def test_allocation_latency_is_the_direct_compaction_it_ran() -> None:
    w = parse_workload(SMALL, "small.toml")
    b = InprocBackend(w, Design.SHMEM_HOOK)
    mm = b.mm
    ok, fast, compacted = b.probe(9)  # a fresh pool: served from the free lists
    assert ok
    assert not compacted
    assert fast == mm.costs.alloc_fast_us
    # Fill the pool with movable pages, one in four freed: no free order-9 block is left.
    cache = []
    while True:
        try:
            cache.append(b.page_cache(16 * PAGE_SIZE))
        except OutOfMemory:
            break
    assert mm.buddy.free_pages == 0
    for h in cache[::4]:
        b.close(h)
    before = mm.clock.now
    ok, slow, compacted = b.probe(9)
    assert ok
    assert compacted
    led = mm.ledger
    scanned_us = led.scanned_pages * mm.costs.scan_page_us
    copies_us = led.pages_migrated * mm.costs.copy_page_us
    assert slow == pytest.approx(mm.costs.alloc_fast_us + scanned_us + copies_us)
    assert mm.clock.now == pytest.approx(before + slow / 1e6)  # the task waited that long
    b.teardown()


def test_run_record_metrics_are_values() -> None:
    w = parse_workload(BUSY, "busy.toml")
    hook = play(w, InprocBackend(w, Design.SHMEM_HOOK), Design.SHMEM_HOOK).record
    pinned = play(w, InprocBackend(w, Design.PINNED), Design.PINNED).record
    note = play(w, InprocBackend(w, Design.NOTIFIER), Design.NOTIFIER).record
    for r in (hook, pinned, note):
        assert r.backend == "inproc"
        assert r.sim_time_s > 0
        assert r.alloc["attempts"] == 11  # 4 x 2 + 3 probes while the workload runs
        assert r.drain["order"] == 9
        assert r.drain["tried"] == r.drain["blocks"] + 1  # stopped at its first failure
        assert r.drain["stopped_at_failure"] is True
        lat = r.alloc["latency_us"]
        assert lat["max"] >= lat["p99"] >= lat["p50"] >= 1.0
        assert 0 <= r.order9_free_mean <= r.pool_pages // 512
        assert r.provenance["cost_table"] == CostTable().to_json()
        assert r.data_errors == 0
    assert pinned.costs["callbacks"] == 0
    assert pinned.costs["gpu_stall_ms"] == 0
    assert pinned.costs["repinned_pages"] == pinned.costs["refaulted_pages"] == 0
    assert pinned.costs["refusals"] >= pinned.costs["pages_refused"] > 0
    assert hook.alloc["successes"] > pinned.alloc["successes"]
    assert hook.order9_free_mean > pinned.order9_free_mean
    assert hook.costs["callbacks"] > 0
    assert hook.costs["gpu_stall_ms"] > 0
    assert note.costs["refaulted_pages"] > 0
    assert note.costs["callbacks"] > hook.costs["callbacks"]  # one per object range
    for r in (hook, note):
        e = r.efficiency
        if e["hugepages_recovered"]:
            assert e["stall_ms_per_hugepage"] == pytest.approx(
                r.costs["gpu_stall_ms"] / e["hugepages_recovered"], rel=1e-3
            )


def test_costs_table_in_a_workload_changes_what_is_charged() -> None:
    base = parse_workload(SMALL, "small.toml")
    dear = parse_workload(
        SMALL.replace("[compactor]", "[costs]\ncopy_page_us = 20.0\n\n[compactor]"), "d.toml"
    )
    a = play(base, InprocBackend(base, Design.SHMEM_HOOK), "shmem-hook").record
    b = play(dear, InprocBackend(dear, Design.SHMEM_HOOK), "shmem-hook").record
    assert b.provenance["cost_table"]["copy_page_us"] == 20.0
    assert a.costs["pages_migrated"] > 0
    assert b.costs["migration_ms"] > a.costs["migration_ms"]
