"""Big machines on a small one: content-free frames give the same answers as bytes, catch bad
data exactly, and keep a pool's memory to 16 bytes a frame."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver.inproc import InprocDriver
from gemfs.mm import MemoryManager, MigrateMode, MigrateType
from gemfs.mm.costs import LatencySketch
from gemfs.mm.pool import PagePool, PoolTooLarge, check_memory, pool_memory
from gemfs.mm.types import PAGE_SIZE, Design
from tools.inproc_backend import InprocBackend
from tools.player import NONDETERMINISTIC, play
from tools.workload import parse_workload


def _workload(cache: float, count: int, frac: float, dur: int, probes: int, seed: int) -> str:
    return f"""
pool = "16MiB"
seed = {seed}
[compactor]
proactiveness = 40
interval_ms = 20
order = 9
[[phase]]
kind = "page-cache"
tag = "cache"
fill = {cache}
size = {{ dist = "uniform", min = "8KiB", max = "256KiB" }}
[[phase]]
kind = "repeat"
times = 3
  [[phase.do]]
  kind = "create"
  tag = "buf"
  count = {count}
  size = {{ dist = "mesa", median = "24KiB", sigma = 1.0, max = "512KiB" }}
  [[phase.do]]
  kind = "gpu"
  tag = "buf"
  fraction = {frac}
  duration_ms = {dur}
  access = "write"
  repeat = 3
  interval_ms = 7
  [[phase.do]]
  kind = "probe"
  order = 9
  count = {probes}
  [[phase.do]]
  kind = "free"
  tag = "buf"
  fraction = 0.5
[[phase]]
kind = "compact"
[[phase]]
kind = "probe"
order = 9
count = "all"
"""


def _deterministic(data: dict[str, Any]) -> dict[str, Any]:
    for key in NONDETERMINISTIC:
        data.pop(key)
    return data


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cache=st.sampled_from([0.3, 0.6]),
    count=st.integers(20, 90),
    frac=st.sampled_from([0.2, 0.6]),
    dur=st.sampled_from([2, 12, 40]),
    probes=st.integers(1, 3),
    seed=st.integers(0, 1000),
    design=st.sampled_from(list(Design)),
)
def test_content_free_and_byte_pools_give_identical_records(
    cache: float, count: int, frac: float, dur: int, probes: int, seed: int, design: Design
) -> None:
    w = parse_workload(_workload(cache, count, frac, dur, probes, seed), "random.toml")
    stamps = play(w, InprocBackend(w, design), design).record
    data = play(w, InprocBackend(w, design, content=True), design).record
    assert _deterministic(stamps.to_json()) == _deterministic(data.to_json())
    assert stamps.data_errors == 0


def _bound(content: bool) -> tuple[MemoryManager, InprocDriver, Any]:
    mm = MemoryManager("8MiB", design=Design.PINNED, content=content)
    drv = InprocDriver(mm, Design.PINNED)
    o = drv.create(16 * PAGE_SIZE)
    drv.execute([o], 0.0, True)
    return mm, drv, o


@pytest.mark.parametrize("content", [False, True])
def test_a_stale_frame_is_caught(content: bool) -> None:
    """The GPU reads through a GTT entry that still names the old frame after a move."""
    mm, drv, o = _bound(content)
    obj = mm.get(o.id)
    drv.mm.release(drv, obj, 0, o.nr_pages)  # unpin behind the driver's back
    t = mm.buddy.alloc_bulk(16, MigrateType.MOVABLE)
    mm.buddy.free_pfns(t)
    assert np.all(mm.migrate_pages(obj.pages[:16].copy(), t, MigrateMode.SYNC).results == 0)
    drv.gem.execute([o], 0.0, 0.0, True)  # the GTT still names the old frames: writes there
    assert drv.gem.stats.data_errors == 0  # their old content still matched the last write
    assert drv.verify_all() == 1  # but the object (the core's pages) no longer holds it


@pytest.mark.parametrize("content", [False, True])
def test_a_duplicated_page_is_caught(content: bool) -> None:
    _mm, drv, o = _bound(content)
    o.gtt[3] = o.gtt[2]  # two pages on one frame
    drv.gem.execute([o], 0.0, 0.0, False)
    assert drv.gem.stats.data_errors == 1


def test_sixteen_bytes_a_frame_without_content() -> None:
    pool = PagePool("64MiB", content=False)
    assert pool.bytes_per_frame < 16.1  # 16 a frame, and a few bytes per 512-frame pageblock
    assert pool.frames.shape == (pool.nr_pages, 1)
    with pytest.raises(ValueError, match="stamps"):
        _ = pool.data
    assert pool_memory(128 << 30, content=False) <= 2 << 30  # 128 GiB in well under 2 GiB


def test_admission_counts_what_the_pool_needs() -> None:
    with pytest.raises(PoolTooLarge, match="needs"):
        check_memory(1 << 50, content=False)  # 1 PiB of pool: 4 TiB of metadata
    check_memory(64 << 20, content=False)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.5, 1e7, allow_nan=False), min_size=1, max_size=400))
def test_latency_sketch_is_within_its_accuracy(values: list[float]) -> None:
    sk = LatencySketch(accuracy=0.01)
    for v in values:
        sk.add(v)
    a = np.asarray(values)
    assert sk.count == len(values)
    assert sk.max == a.max()
    for q in (0.5, 0.99):
        true = float(np.quantile(a, q, method="lower"))
        true_hi = float(np.quantile(a, q, method="higher"))
        got = sk.quantile(q)
        assert true * 0.98 <= got <= true_hi * 1.02


def test_latency_sketch_memory_does_not_grow_with_the_count() -> None:
    sk = LatencySketch()
    rng = np.random.default_rng(1)
    for v in rng.lognormal(5, 2, size=100_000):
        sk.add(float(v))
    assert sk.count == 100_000
    assert len(sk.buckets) < 2000  # log-spaced: a few hundred buckets for 8 decades


def test_a_thinned_timeline_keeps_the_time_weighted_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    import tools.player as player

    w = parse_workload(_workload(0.5, 60, 0.5, 12, 2, 3), "t.toml")
    full = play(w, InprocBackend(w, Design.SHMEM_HOOK), Design.SHMEM_HOOK)
    monkeypatch.setattr(player, "MAX_TIMELINE", 8)
    thin = play(w, InprocBackend(w, Design.SHMEM_HOOK), Design.SHMEM_HOOK)
    assert len(full.timeline) > 16 >= len(thin.timeline)
    assert thin.timeline[0].step == 0
    assert thin.timeline[-1].step == full.timeline[-1].step
    assert thin.record.order9_free_mean == full.record.order9_free_mean
    assert thin.record.fragmentation_score_peak == full.record.fragmentation_score_peak


def test_a_1gib_allocation_fails_on_a_pinned_page_and_succeeds_once_unpinned() -> None:
    """2 GiB: two 1 GiB ranges, each with a bound (pinned) GEM object in it; page cache fills
    a good part of the first. Unpinning the first object lets its range be cleared."""
    mm = MemoryManager("2GiB", design=Design.PINNED, content=False)
    drv = InprocDriver(mm, Design.PINNED, MigrateType.MOVABLE)  # laid out in order
    half = 1 << 18  # frames in 1 GiB
    first = drv.create(16 * PAGE_SIZE)
    cache = mm.create_object(100_000 * PAGE_SIZE, migratetype=MigrateType.MOVABLE)
    filler = mm.create_object((half - 100_016) * PAGE_SIZE, migratetype=MigrateType.MOVABLE)
    second = drv.create(16 * PAGE_SIZE)
    mm.destroy_object(filler)
    drv.execute([first, second], 0.0, True)  # bound: pinned, one in each range
    assert mm.get(first.id).pages[0] < half <= mm.get(second.id).pages[0]
    assert mm.allocate_huge(18) is None
    assert mm.vmstat["contig_alloc_fail"] == 1
    assert mm.vmstat["contig_range_hopeless"] == 2  # each range holds a page pinned for good
    assert mm.ledger.pages_migrated == 0
    mm.release(drv, mm.get(first.id), 0, first.nr_pages)  # the first object's owner unpins
    first.gtt[:] = -1
    first.bound = False
    pfn = mm.allocate_huge(18)
    assert pfn == 0
    assert mm.vmstat["contig_alloc_success"] == 1
    assert np.all(mm.get(first.id).pages >= half)  # moved out of the range
    assert np.all(cache.pages >= half)
    assert mm.allocs.last_latency_us > mm.costs.copy_page_us * 100_000  # it paid the copies
    assert drv.verify_all() == 0
    mm.free_kernel(pfn)
    mm.check()


def test_probe_sizes_above_a_buddy_block_are_reported_per_size() -> None:
    text = _workload(0.5, 40, 0.3, 5, 1, 9).replace(
        '[[phase]]\nkind = "compact"',
        '[[phase]]\nkind = "probe"\nsize = "16MiB"\ncount = 2\n\n[[phase]]\nkind = "compact"',
    )
    w = parse_workload(text, "sizes.toml")
    r = play(w, InprocBackend(w, Design.SHMEM_HOOK), Design.SHMEM_HOOK).record
    assert set(r.alloc_sizes) == {"2MiB", "16MiB"}
    assert r.alloc_sizes["16MiB"]["order"] == 12
    assert r.alloc_sizes["16MiB"]["attempts"] == 2
    assert r.alloc_sizes["2MiB"]["attempts"] == 3
    assert r.alloc["attempts"] == 5


def test_the_report_shows_each_allocation_size() -> None:
    from tools.report import table_rows

    text = _workload(0.5, 40, 0.3, 5, 1, 9).replace(
        '[[phase]]\nkind = "compact"',
        '[[phase]]\nkind = "probe"\nsize = "16MiB"\ncount = 2\n\n[[phase]]\nkind = "compact"',
    )
    w = parse_workload(text, "sizes.toml")
    recs = [play(w, InprocBackend(w, d), d).record for d in (Design.PINNED, Design.GEMFS)]
    rows = {r.label: r for r in table_rows(recs)}
    assert [c.text(False) for c in rows["16MiB: tried"].cells] == ["2", "2"]
    got = [recs[0].alloc_sizes["16MiB"]["successes"], recs[1].alloc_sizes["16MiB"]["successes"]]
    assert [c.text(False) for c in rows["16MiB: succeeded"].cells] == [str(g) for g in got]
