"""Every design's signature on a small in-process workload (issue 13).

Each test plays one small desktop-like workload (``DESKTOP``: page cache, slab noise, a pinned
scanout, browser buffers that the GPU renders into at 60 Hz, huge-page faults, then an idle
spell and a huge-page drain) under the designs it compares and asserts the figures that tell
them apart, as values.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

import numpy as np
import pytest

from driver.gem import (
    I915_GT_PARK_S,
    I915_SUBMIT_LOCK_S,
    I915_TRYLOCK_TRIES,
    JIFFY_S,
    MALI_FLUSH_PAGE_US,
    DriverPolicy,
    MigrateDecision,
)
from gemfs.mm import MemoryManager
from gemfs.mm.pool import PG_ALLOC, PG_MT_MASK, PG_MT_SHIFT
from gemfs.mm.ttm import ttm_pool_pages
from gemfs.mm.types import (
    PAGE_SIZE,
    PAGEBLOCK_ORDER,
    Design,
    MigrateMode,
    MigrateType,
    OutOfMemory,
)
from gemfs_cli.cmd_mount import DESIGNS
from tools.inproc_backend import InprocBackend
from tools.player import Player, RunRecord
from tools.workload import Workload, WorkloadError, parse_workload

DESKTOP = """\
name = "desktop-small"
description = "a compositor and a browser on 128 MiB"
pool = "128MiB"
seed = 7

[compactor]
proactiveness = 20
interval_ms = 500

[[phase]]
kind = "page-cache"
tag = "cache"
fill = 0.9
size = { dist = "lognormal", median = "256KiB", sigma = 1.0, max = "4MiB" }

[[phase]]
kind = "noise"
tag = "slab"
type = "unmovable"
pages = 128

[[phase]]
kind = "create"
tag = "scanout"
count = 1
size = "4MiB"
bind = true

[[phase]]
kind = "repeat"
times = 6

  [[phase.do]]
  kind = "create"
  tag = "browser"
  count = 50
  size = { dist = "mesa", median = "64KiB", sigma = 1.5, max = "4MiB" }

  [[phase.do]]
  kind = "noise"
  tag = "slab"
  type = "unmovable"
  count = 8

  [[phase.do]]
  kind = "gpu"
  tag = "browser"
  fraction = 0.2
  duration_ms = 20
  access = "write"
  repeat = 6
  interval_ms = 16.7

  [[phase.do]]
  kind = "probe"
  order = 9
  count = 2

  [[phase.do]]
  kind = "free"
  tag = "browser"
  fraction = 0.5

  [[phase.do]]
  kind = "free"
  tag = "slab"
  fraction = 0.3

  [[phase.do]]
  kind = "page-cache"
  tag = "cache"
  count = 4
  size = { dist = "uniform", min = "64KiB", max = "2MiB" }

  [[phase.do]]
  kind = "free"
  tag = "cache"
  fraction = 0.15

[[phase]]
kind = "wait"
ms = 2000

[[phase]]
kind = "probe"
order = 9
count = "all"
"""


@dataclass
class Played:
    """A run's record and the pool as the run left it (before teardown)."""

    record: RunRecord
    polluted: int  # pageblocks holding a page the driver keeps unmovable (pinned or pooled)
    pinned_mib: float
    mixed: int
    fence: int  # longterm-pin, confine: the buddy's zone fence (else the pool's size)
    pins_above_fence: int  # pinned frames at or above the fence
    nonmovable_above_fence: int  # allocated frames of another type than MOVABLE there
    pins_top_half: int  # pinned frames in the top half of the pool (any design)

    @property
    def polluted_per_pinned_mib(self) -> float:
        return self.polluted / self.pinned_mib


def _polluted(mm: MemoryManager) -> tuple[int, float]:
    p = mm.pool
    held = p.pin > 0
    pinned_mib = float(np.count_nonzero(held)) * 4096 / 2**20
    if mm.ttm is not None:
        for pfn, order in mm.ttm.pooled():
            held[pfn : pfn + (1 << order)] = True
    return len(np.unique(np.flatnonzero(held) >> PAGEBLOCK_ORDER)), pinned_mib


def _above_fence(mm: MemoryManager) -> tuple[int, int, int]:
    f = mm.buddy.fence
    fl = mm.pool.flags[f:]
    other = (fl & PG_MT_MASK) != (int(MigrateType.MOVABLE) << PG_MT_SHIFT)
    nonmovable = int(np.count_nonzero(((fl & PG_ALLOC) != 0) & other))
    return f, int(np.count_nonzero(mm.pool.pin[f:])), nonmovable


def play(design: Design, w: Workload | None = None) -> Played:
    w = w or parse_workload(DESKTOP, "desktop-small.toml")
    b = InprocBackend(w, design)
    try:
        record = Player(w, b, design.value).run().record
        b.mm.check()
        polluted, mib = _polluted(b.mm)
        fence, pins, nonmovable = _above_fence(b.mm)
        top = int(np.count_nonzero(b.mm.pool.pin[b.mm.pool.nr_pages // 2 :]))
        return Played(record, polluted, mib, b.mm.mixed_pageblocks(), fence, pins, nonmovable, top)
    finally:
        b.teardown()


# -- the enum is the list -----------------------------------------------------------------------
def test_every_place_that_lists_designs_follows_the_enum() -> None:
    assert DESIGNS == tuple(d.value for d in Design)
    assert Design.parse(" Pinned-TTM ") is Design.PINNED_TTM
    assert [d.gem_migratetype for d in Design] == [
        MigrateType.RECLAIMABLE,  # pinned: i915
        MigrateType.UNMOVABLE,  # pinned-unmovable: drm_gem_shmem
        MigrateType.UNMOVABLE,  # pinned-ttm
        MigrateType.MOVABLE,  # pinned-in-movable
        MigrateType.RECLAIMABLE,  # illuminator: i915's pages, compaction changed
        MigrateType.RECLAIMABLE,  # defrag-mode: i915's pages, the allocator changed
        MigrateType.MOVABLE,  # longterm-pin: memfd/userptr pages, moved out before pinning
        MigrateType.RECLAIMABLE,  # confine: i915's pages, steered into the region
        MigrateType.MOVABLE,
        MigrateType.MOVABLE,
        MigrateType.MOVABLE,
    ]
    assert [d for d in Design if d.asks_owner] == [Design.SHMEM_HOOK, Design.GEMFS, Design.NOTIFIER]


# -- the status quo in its flavours ---------------------------------------------------------------
@pytest.fixture(scope="module")
def status_quo() -> dict[Design, Played]:
    flavours = (
        Design.PINNED,
        Design.PINNED_UNMOVABLE,
        Design.PINNED_TTM,
        Design.PINNED_IN_MOVABLE,
    )
    return {d: play(d) for d in flavours}


def test_status_quo_flavours_put_the_pins_in_their_migrate_type(
    status_quo: dict[Design, Played],
) -> None:
    blocks = {d: p.record.pageblocks for d, p in status_quo.items()}
    # i915 RECLAIMABLE, drm_gem_shmem and TTM UNMOVABLE: the GEM pages claim blocks of their own
    # type (one UNMOVABLE block holds the slab noise under every flavour)
    assert blocks[Design.PINNED]["reclaimable"] > 10
    assert blocks[Design.PINNED]["unmovable"] == 1
    assert blocks[Design.PINNED_UNMOVABLE]["unmovable"] > 10
    assert blocks[Design.PINNED_UNMOVABLE]["reclaimable"] == 0
    assert blocks[Design.PINNED_TTM]["unmovable"] > 10
    # pins in MOVABLE blocks: no block of another type, hardly a mixed one -- and the pins sit
    # scattered among movable pages: more than twice the pageblocks hold a pin, and the drain
    # after the idle spell gets the fewest huge pages of all
    iim = status_quo[Design.PINNED_IN_MOVABLE]
    assert blocks[Design.PINNED_IN_MOVABLE] == {"unmovable": 1, "movable": 63, "reclaimable": 0}
    assert iim.mixed <= 1
    for d in (Design.PINNED, Design.PINNED_UNMOVABLE):
        assert iim.polluted > 2 * status_quo[d].polluted
        assert iim.record.drain["blocks"] < status_quo[d].record.drain["blocks"] / 2
    # every flavour is "pinned": nobody is asked, no page of the driver moves with consent
    for p in status_quo.values():
        assert p.record.callbacks == 0
        assert p.record.costs["gpu_stall_ms"] == 0
        assert p.record.data_errors == 0


def test_pinned_ttm_allocates_high_orders_first_and_reuses_its_pools(
    status_quo: dict[Design, Played],
) -> None:
    vm = status_quo[Design.PINNED_TTM].record.vmstat
    assert vm["ttm_alloc_pages"] > 0
    assert vm["ttm_pool_hit_pages"] > vm["ttm_alloc_pages"] / 4  # freed blocks come back
    assert vm["ttm_pool_pages"] > 0
    assert "ttm_alloc_pages" not in status_quo[Design.PINNED_UNMOVABLE].record.vmstat


def test_pinned_ttm_pollution_per_pinned_mib() -> None:
    """Highest order first alone (``ttm_pool = "0"``: cached BOs on x86, arm64) pollutes fewer
    pageblocks per pinned MiB than drm_gem_shmem's page-at-a-time allocation. TTM's
    write-combined page pools at the default half of memory undo it: blocks kept for reuse stay
    UNMOVABLE and allocated, where a freed page would have merged back, so more pageblocks hold
    a pinned or pooled page than under pinned-unmovable."""
    text = DESKTOP.replace("fill = 0.9", "fill = 0.7")
    w = parse_workload(text, "desktop-small.toml")
    w0 = parse_workload(
        text.replace("[compactor]", '[design]\nttm_pool = "0"\n\n[compactor]'), "desktop-small.toml"
    )
    assert (w.ttm_pool, w0.ttm_pool) == (None, "0")
    shmem = play(Design.PINNED_UNMOVABLE, w)
    ttm = play(Design.PINNED_TTM, w)
    no_pool = play(Design.PINNED_TTM, w0)
    assert shmem.pinned_mib == ttm.pinned_mib == no_pool.pinned_mib > 10
    assert no_pool.polluted_per_pinned_mib < 0.9 * shmem.polluted_per_pinned_mib
    assert ttm.polluted_per_pinned_mib > shmem.polluted_per_pinned_mib
    # the pools are really off with "0", and used at the default
    assert no_pool.record.vmstat.get("ttm_pool_hit_pages", 0) == 0
    assert no_pool.record.vmstat.get("ttm_pool_pages", 0) == 0
    assert ttm.record.vmstat.get("ttm_pool_hit_pages", 0) > 0
    assert no_pool.record.provenance["design_options"]["ttm_pool"] == "0"


# -- research: Illuminator ----------------------------------------------------------------------
def test_illuminator_keeps_the_recovery_without_wasted_attempts_on_pinned_blocks(
    status_quo: dict[Design, Played],
) -> None:
    """Illuminator is i915's status quo with one change to compaction: the migrate scanner
    passes over pageblocks the model counts pinned or kernel pages in. Against plain
    compaction (``pinned``) on the same workload: the same huge pages during the session and
    in the drain, and not one migration attempt refused by a pin (pinned: hundreds)."""
    plain = status_quo[Design.PINNED].record
    ill = play(Design.ILLUMINATOR)
    r = ill.record
    assert plain.costs["refusals"] > 100  # plain compaction keeps trying pinned pages
    assert plain.vmstat["pgmigrate_fail"] > 100
    assert r.costs["refusals"] == 0
    assert r.vmstat["pgmigrate_fail"] == 0
    assert r.drain["blocks"] >= plain.drain["blocks"] > 5
    assert r.alloc["successes"] >= plain.alloc["successes"]
    # and it moves fewer pages: none out of blocks that could never be emptied
    assert r.costs["pages_migrated"] < plain.costs["pages_migrated"]
    assert r.data_errors == 0


# -- what the kernel merged instead: vm.defrag_mode ----------------------------------------------
def test_defrag_mode_makes_fewer_mixed_pageblocks_than_pinned(
    status_quo: dict[Design, Played],
) -> None:
    """vm.defrag_mode (6.15) on i915's status quo: no allocation below pageblock order takes
    part of another type's pageblock until reclaim and compaction had their turn, and
    kcompactd keeps the high watermark in free pageblocks. Same workload as ``pinned``: half
    the mixed pageblocks or fewer, a drain at least as good, paid for in pages migrated by
    the compaction turns; a few requests still fall back when compaction cannot help."""
    plain = status_quo[Design.PINNED]
    dm = play(Design.DEFRAG_MODE)
    v = dm.record.vmstat
    assert plain.mixed >= 10
    assert dm.mixed <= plain.mixed / 2
    assert dm.record.drain["blocks"] >= plain.record.drain["blocks"]
    assert v["defrag_mode_compact"] > 0  # compaction had its turn ...
    assert 0 < v["defrag_mode_fallback"] < v["defrag_mode_compact"]  # ... and mostly helped
    assert v["compact_daemon_defrag_reserve"] > 0  # kcompactd worked for the reserve
    assert dm.record.costs["pages_migrated"] > plain.record.costs["pages_migrated"]
    assert dm.record.data_errors == 0


# -- what the kernel merged instead: move-then-pin (FOLL_LONGTERM) ---------------------------------
def test_longterm_pin_moves_pages_out_of_the_movable_region_before_pinning(
    status_quo: dict[Design, Played],
) -> None:
    """pin_user_pages(FOLL_LONGTERM) / memfd_pin_folios: the same movable GEM pages as
    pinned-in-movable, but a page about to be pinned in the movable region (the top half,
    movablecore=50%) is migrated below it first (MR_LONGTERM_PIN). At the end no pinned page
    lies in the movable region; every pin-time migration was charged (copy_page_us each, as
    GPU stall: the object waits for it); the pins sit in half the pageblocks or fewer, and the
    huge-page faults during the session succeed where pinned-in-movable's fail."""
    iim = status_quo[Design.PINNED_IN_MOVABLE]
    lp = play(Design.LONGTERM_PIN)
    r, c = lp.record, lp.record.costs
    assert lp.fence == 64 * 256  # 128 MiB pool: the movable region is the top 64 MiB
    assert lp.pinned_mib == iim.pinned_mib > 10  # the same pins ...
    assert lp.pins_above_fence == lp.nonmovable_above_fence == 0  # ... none in the region
    assert iim.pins_top_half > 1000  # where pinned-in-movable keeps thousands
    assert c["pin_migrated_pages"] == r.vmstat["pgmigrate_longterm_pin"] > 5000
    assert "pgmigrate_longterm_pin_fail" not in r.vmstat
    copy_us = r.provenance["cost_table"]["copy_page_us"]
    assert c["pin_migration_ms"] == pytest.approx(c["pin_migrated_pages"] * copy_us / 1000)
    assert c["gpu_stall_ms"] == pytest.approx(c["pin_migration_ms"])
    assert c["pages_migrated"] >= c["pin_migrated_pages"]
    assert iim.record.costs["pin_migrated_pages"] == 0
    assert lp.polluted <= iim.polluted / 2
    assert r.alloc["successes"] > 2 * iim.record.alloc["successes"]
    assert r.data_errors == 0


def test_longterm_pin_keeps_unmovable_allocations_below_the_fence() -> None:
    """The zones of the buddy: MOVABLE requests go to the movable region first (ZONE_MOVABLE
    before ZONE_NORMAL), anything else never goes there, even when only it has room."""
    mm = MemoryManager("64MiB", design=Design.LONGTERM_PIN, movablecore="16MiB", content=False)
    try:
        fence = mm.buddy.fence
        assert fence == mm.pool.nr_pages - 16 * 256
        movable = mm.alloc_kernel(0, MigrateType.MOVABLE)
        assert movable >= fence
        got = [mm.alloc_kernel(0, MigrateType.UNMOVABLE) for _ in range(fence)]
        with pytest.raises(OutOfMemory):
            mm.alloc_kernel(0, MigrateType.UNMOVABLE)
        assert len(set(got)) == fence  # all of ZONE_NORMAL, nothing of the region
        assert max(got) < fence
        assert mm.buddy.zone_free_pages(1) == 16 * 256 - 1
        mm.check()
    finally:
        mm.close()


def test_ttm_pool_is_a_share_a_size_or_none() -> None:
    n = 64 * 256  # a 64 MiB pool
    assert ttm_pool_pages(None, n) == ttm_pool_pages("50%", n) == n // 2  # page_pool_size
    assert ttm_pool_pages("0", n) == ttm_pool_pages("0%", n) == 0
    assert ttm_pool_pages("64MiB", n) == ttm_pool_pages("100%", n) == n
    assert ttm_pool_pages(" 8MiB ", n) == 2048
    assert ttm_pool_pages("10000", n) == 2  # bytes, rounded down to whole pages
    bad = "(a size, a percentage, or 0 for no pooling)"
    for spec, message in (
        ("bogus", f"bad ttm_pool 'bogus' {bad}"),
        ("x%", f"bad ttm_pool 'x%' {bad}"),
        ("-1MiB", f"bad ttm_pool '-1MiB' {bad}"),
        ("", f"bad ttm_pool '' {bad}"),
        ("101%", "ttm_pool '101%' must be between 0% and 100%"),
        ("-5%", "ttm_pool '-5%' must be between 0% and 100%"),
        ("nan%", "ttm_pool 'nan%' must be between 0% and 100%"),
        ("65MiB", "ttm_pool '65MiB' is larger than the pool"),
    ):
        with pytest.raises(ValueError, match="ttm_pool") as info:
            ttm_pool_pages(spec, n)
        assert str(info.value) == message
    # the MemoryManager's TTM pool takes its limit from the knob; other designs have no pool
    knobs: list[tuple[str | None, int]] = [
        (None, n // 2),
        ("0", 0),
        ("16MiB", 4096),
        ("25%", n // 4),
    ]
    for knob, limit in knobs:
        mm = MemoryManager("64MiB", design=Design.PINNED_TTM, ttm_pool=knob, content=False)
        assert mm.ttm is not None
        assert mm.ttm.limit == limit
        mm.close()
    with pytest.raises(ValueError, match=r"^bad ttm_pool 'lots'"):
        MemoryManager("64MiB", design=Design.PINNED_TTM, ttm_pool="lots", content=False)
    mm = MemoryManager("64MiB", design=Design.PINNED, ttm_pool="0", content=False)
    assert mm.ttm is None
    mm.close()


def test_region_options_are_checked_with_one_line() -> None:
    with pytest.raises(ValueError, match=r"movablecore '150%' must be between 0% and 100%"):
        MemoryManager("64MiB", design=Design.LONGTERM_PIN, movablecore="150%")
    with pytest.raises(ValueError, match="multiple of 4MiB"):
        MemoryManager("64MiB", design=Design.CONFINE, confine_granule="3MiB")
    text = DESKTOP.replace("[compactor]", '[design]\nmovablecore = "2MiB"\n\n[compactor]')
    with pytest.raises(WorkloadError, match=r"desktop-small.toml:\d+: \[design\]: movablecore"):
        parse_workload(text, "desktop-small.toml")
    w = parse_workload(
        DESKTOP.replace(
            "[compactor]", '[design]\nmovablecore = "25%"\nconfine_granule = "8MiB"\n\n[compactor]'
        ),
        "w",
    )
    assert (w.movablecore, w.confine_granule) == ("25%", "8MiB")
    mm = MemoryManager(w.pool, design=Design.LONGTERM_PIN, movablecore=w.movablecore)
    assert mm.pool.nr_pages - mm.buddy.fence == mm.pool.nr_pages // 4
    mm.close()


# -- research: confinement (Contiguitas, superpageblocks) ----------------------------------------
def test_confine_keeps_unmovable_and_pinned_pages_in_its_region(
    status_quo: dict[Design, Played],
) -> None:
    """Every non-movable allocation (i915's RECLAIMABLE GEM pages, the slab noise) goes into
    the region at the bottom; when it is full the region grows by a granule (128 MiB / 32 =
    4 MiB) and the page cache in the span is evacuated (migrated up, charged copy_page_us
    each). Against i915's status quo on the same workload: no non-movable or pinned frame
    above the region, and half the mixed pageblocks or fewer."""
    plain = status_quo[Design.PINNED]
    cf = play(Design.CONFINE)
    r, c = cf.record, cf.record.costs
    assert cf.nonmovable_above_fence == cf.pins_above_fence == 0
    assert cf.pinned_mib == plain.pinned_mib > 10
    assert c["region_grows"] == r.vmstat["confine_grow"] > 3
    assert cf.fence == (1 + c["region_grows"] - c["region_shrinks"]) * 1024
    assert c["evacuated_pages"] == r.vmstat["confine_evacuated"] > 1000
    copy_us = r.provenance["cost_table"]["copy_page_us"]
    assert c["evacuation_ms"] == pytest.approx(c["evacuated_pages"] * copy_us / 1000)
    assert c["gpu_stall_ms"] == 0  # nothing the GPU uses was moved
    assert cf.mixed <= plain.mixed / 2
    assert cf.polluted <= plain.polluted
    assert r.data_errors == 0


def test_confine_moves_pins_into_its_region() -> None:
    """With movable GEM pages ([driver] migratetype = "movable"), pages pinned outside the
    region are moved into it first (the move-then-pin of longterm-pin, the other way round)."""
    w = parse_workload(
        DESKTOP.replace("[compactor]", '[driver]\nmigratetype = "movable"\n\n[compactor]'),
        "desktop-small-movable.toml",
    )
    cf = play(Design.CONFINE, w)
    c = cf.record.costs
    assert cf.pins_above_fence <= cf.record.vmstat.get("pgmigrate_longterm_pin_fail", 0) < 50
    assert c["pin_migrated_pages"] > 5000
    assert c["pin_migration_ms"] > 0
    assert c["gpu_stall_ms"] == pytest.approx(c["pin_migration_ms"])
    assert cf.record.data_errors == 0


def test_confine_region_grows_with_evacuation_and_shrinks_when_emptied() -> None:
    mm = MemoryManager("64MiB", design=Design.CONFINE, confine_granule="8MiB", content=False)
    try:
        g = 8 * 256
        assert mm.buddy.fence == g  # one granule to start with
        movable = MigrateType.MOVABLE
        cache = [mm.create_object(4 << 20, migratetype=movable) for _ in range(10)]  # page cache
        assert all(int(o.resident()[1].min()) >= g for o in cache)
        gem = [mm.create_object(1 << 20, private=True) for _ in range(20)]  # RECLAIMABLE
        owner = object()
        for o in gem:
            mm.hold(owner, o, 0, o.nr_pages)
        grows = mm.ledger.region_grows
        assert grows >= 2
        assert mm.buddy.fence == (1 + grows) * g
        assert mm.ledger.evacuated_pages > 0  # page cache was in the way
        assert all(int(o.resident()[1].max()) < mm.buddy.fence for o in gem)
        assert not np.any(mm.pool.pin[mm.buddy.fence :])
        mm.check()
        for o in gem:
            mm.release(owner, o, 0, o.nr_pages)
            mm.destroy_object(o)
        assert mm.buddy.fence == g  # returned granule by granule
        assert mm.ledger.region_shrinks == grows
        mm.check()
    finally:
        mm.close()


# -- driver policies (combinable with the hook designs) -------------------------------------------
# The browser keeps the GPU busy (40 ms batches submitted every 16.7 ms: GPU-bound) while
# huge-page faults come and kcompactd (proactiveness 60, every 50 ms) compacts; the drain at the
# end runs while the last batches are still in flight.
GPU_LOAD = """
[[phase]]
kind = "repeat"
times = 8

  [[phase.do]]
  kind = "gpu"
  tag = "browser"
  fraction = 0.3
  duration_ms = 40
  access = "write"
  repeat = 3
  interval_ms = 16.7

  # hugetlb-like requests wake kswapd, whose sleep flushes the skip hints kcompactd's passes
  # leave (THP faults do not wake it: on this full pool they would find every block skipped).
  [[phase.do]]
  kind = "probe"
  order = 9
  count = 3
  gfp = "hugetlb"
"""


def _under_gpu_load() -> Workload:
    text = (
        DESKTOP.replace('[[phase]]\nkind = "wait"\nms = 2000\n', GPU_LOAD)
        .replace("proactiveness = 20", "proactiveness = 60")
        .replace("interval_ms = 500", "interval_ms = 50")
    )
    assert text.count("duration_ms = 40") == 1
    return parse_workload(text, "desktop-small-gpu-load.toml")


def test_workload_driver_policy_key_and_its_costs() -> None:
    w = parse_workload(
        DESKTOP.replace("[compactor]", '[driver]\npolicy = "i915-2016"\n\n[compactor]'), "w"
    )
    assert w.driver_policy is DriverPolicy.I915_2016
    assert w.costs == ()
    flush = w.with_driver_policy(DriverPolicy.PER_PAGE_FLUSH)
    assert dict(flush.costs) == {"flush_page_us": MALI_FLUSH_PAGE_US}
    assert flush.with_driver_policy(DriverPolicy.WAIT_IDLE).costs == ()
    own = parse_workload(
        DESKTOP.replace(
            "[compactor]",
            '[costs]\nflush_page_us = 9.0\n\n[driver]\npolicy = "per-page-flush"\n\n[compactor]',
        ),
        "w",
    )
    assert dict(own.costs) == {"flush_page_us": 9.0}  # the workload's own figure wins


def test_workload_display_key() -> None:
    assert parse_workload(DESKTOP, "w").display_on
    dark = DESKTOP.replace("[compactor]", '[driver]\ndisplay = "off"\n\n[compactor]')
    assert not parse_workload(dark, "w").display_on
    bad = dark.replace('display = "off"', 'display = "dim"')
    msg = r"^w:\d+: \[driver\]: display must be one of on \| off"
    with pytest.raises(WorkloadError, match=msg) as e:
        parse_workload(bad, "w")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("design", [Design.SHMEM_HOOK, Design.GEMFS])
def test_i915_2016_drops_whole_objects_and_refaults_them(design: Design) -> None:
    """The posted 2016 callback never waits for the GPU: -EBUSY when the object is active
    (or struct_mutex stays taken through its ~10 ms of tries); otherwise it unbinds the object
    and drops its whole backing store, so every page of it is re-faulted on its next use.
    Against wait-idle on the same workload under GPU load: no -EAGAIN answers but -EBUSY ones,
    objects dropped, hundreds of pages re-faulted where wait-idle re-faults none.

    Here the load comes in bursts (three batches, then the huge-page faults with the GPU left
    to drain): an object dropped while idle is unpinned as a whole, so compaction may move
    every page of it, and the drain is not smaller than wait-idle's; under a steady frame loop
    it is (test_i915_2016_recovers_less_than_wait_idle_under_a_steady_frame_loop)."""
    w = _under_gpu_load()
    wait = play(design, w).record
    old = play(design, w.with_driver_policy(DriverPolicy.I915_2016)).record
    v, c = old.vmstat, old.costs
    assert wait.costs["refaulted_pages"] == 0
    assert wait.costs["refusals"] > 100  # wait-idle: busy objects answer -EAGAIN
    assert wait.vmstat["gem_migrate_callback_ebusy"] == 0
    assert c["refusals"] == 0  # the 2016 callback never answers -EAGAIN ...
    assert v["gem_migrate_callback_ebusy"] > 0  # ... but -EBUSY
    assert v["gem_objects_dropped"] > 10
    assert c["refaulted_pages"] > 500  # whole objects come back page by page
    assert "gem_objects_dropped" not in wait.vmstat
    assert old.drain["blocks"] >= wait.drain["blocks"]  # bursts: see the docstring
    assert (old.provenance["driver_policy"], wait.provenance["driver_policy"]) == (
        "i915-2016",
        "wait-idle",
    )
    assert old.data_errors == wait.data_errors == 0


def test_i915_2016_a_page_still_referenced_after_the_drop_is_refused_ebusy() -> None:
    """After dropping the backing store the patch lets the page move only if nobody else
    holds it (page_count <= 2), else -EBUSY (not the -EAGAIN migrate_page() would give, which
    migrate_pages retries). Here another holder pins page 5 of an idle object."""
    from driver.inproc import InprocDriver

    mm = MemoryManager("16MiB", design=Design.SHMEM_HOOK)
    drv = InprocDriver(mm, Design.SHMEM_HOOK, policy=DriverPolicy.I915_2016)
    o = drv.create(64 * PAGE_SIZE)
    drv.execute([o], 0.0, True)
    obj = mm.get(o.id)
    other = object()
    mm.hold(other, obj, 5, 1)
    targets = mm.buddy.alloc_bulk(64, MigrateType.MOVABLE)
    mm.buddy.free_pfns(targets)
    old = obj.pages[:64].copy()
    res = mm.migrate_pages(old, targets, MigrateMode.SYNC).results
    assert res[5] == -errno.EBUSY
    assert np.count_nonzero(res == 0) == 63
    assert drv.gem.stats.dropped_objects == 1
    assert obj.pages[5] == old[5]  # it stayed, still pinned by the other holder
    assert mm.pool.pin[old[5]] == 1
    drv.execute([o], 0.0, False)  # the next use re-faults the object: its content is intact
    assert drv.verify_all() == 0
    assert drv.gem.stats.data_errors == 0
    mm.check()


def _under_a_frame_loop() -> Workload:
    """The GPU load above as a steady frame loop (each burst's last batch goes on every 16.7 ms
    for a second: the game keeps rendering), and a full compaction (compact_memory,
    MIGRATE_SYNC) while it runs, before the drain."""
    text = (
        DESKTOP.replace(
            '[[phase]]\nkind = "wait"\nms = 2000\n',
            GPU_LOAD.replace("interval_ms = 16.7\n", "interval_ms = 16.7\n  keep_ms = 1000\n")
            + '\n[[phase]]\nkind = "compact"\n',
        )
        .replace("proactiveness = 20", "proactiveness = 60")
        .replace("interval_ms = 500", "interval_ms = 50")
    )
    assert text.count("keep_ms = 1000") == 1
    return parse_workload(text, "desktop-small-frame-loop.toml")


@pytest.mark.parametrize("design", [Design.SHMEM_HOOK, Design.GEMFS])
def test_i915_2016_recovers_less_than_wait_idle_under_a_steady_frame_loop(design: Design) -> None:
    """While a frame loop keeps its objects busy (batches of 40 ms every 16.7 ms overlap, so
    they are never idle), the 2016 callback gets struct_mutex (held only while a submission is
    made) but answers -EBUSY for every page of an active object, whatever the mode; it drops
    the idle objects whole, and their next use re-faults them. A full compaction recovers about
    half what wait-idle's callback does: that one waits, in MIGRATE_SYNC, for each busy
    object's current batch and moves its pages, and the GPU pays in stall time."""
    w = _under_a_frame_loop()
    wait = play(design, w).record
    old = play(design, w.with_driver_policy(DriverPolicy.I915_2016)).record
    gained = {
        p: r.order9_after - r.order9_before for p, r in (("wait-idle", wait), ("i915-2016", old))
    }
    assert gained["wait-idle"] >= 15
    assert 3 <= gained["i915-2016"] <= 0.6 * gained["wait-idle"]
    assert old.drain["blocks"] <= 0.6 * wait.drain["blocks"]
    v = old.vmstat
    assert v["gem_migrate_callback_ebusy"] > 500  # the loop's objects' pages
    assert wait.vmstat["gem_migrate_callback_ebusy"] == 0
    # the idle objects were dropped whole and re-faulted on their next batch
    assert old.costs["refaulted_pages"] > 500
    assert wait.costs["refaulted_pages"] == 0
    # the lock is free between submissions: far less than a jiffy per callback on average
    assert 0 < v["gem_callback_lock_us"] < 0.25 * JIFFY_S * 1e6 * v["gem_migrate_callbacks"]
    assert wait.costs["gpu_stall_ms"] > 10 * max(old.costs["gpu_stall_ms"], 1.0)
    assert old.data_errors == wait.data_errors == 0


def test_i915_2016_with_the_display_off_refuses_once_the_gpu_has_parked() -> None:
    """The patch unbinds only when intel_runtime_pm_get_if_in_use() succeeds. A lit display
    holds a wakeref all along; without one the GPU is in use only while it works and for the
    idle worker's 100 ms after. On the small desktop (compaction mostly finds the GPU idle) the
    callback then answers -EBUSY where it dropped objects, and recovers far less. wait-idle
    does not look at runtime PM: the same record either way."""
    w = parse_workload(DESKTOP, "desktop-small.toml")
    old = w.with_driver_policy(DriverPolicy.I915_2016)
    lit = play(Design.SHMEM_HOOK, old).record
    dark = play(Design.SHMEM_HOOK, replace(old, display_on=False)).record
    assert (lit.provenance["display"], dark.provenance["display"]) == ("on", "off")
    assert lit.vmstat["gem_objects_dropped"] > 20
    assert dark.vmstat["gem_objects_dropped"] < lit.vmstat["gem_objects_dropped"] / 3
    assert (
        dark.vmstat["gem_migrate_callback_ebusy"]
        > 1000
        > 10 * lit.vmstat.get("gem_migrate_callback_ebusy", 0)
    )
    assert dark.drain["blocks"] < lit.drain["blocks"] / 3
    assert dark.data_errors == lit.data_errors == 0
    a = play(Design.SHMEM_HOOK, w).record.to_json()
    b = play(Design.SHMEM_HOOK, replace(w, display_on=False)).record.to_json()
    for r in (a, b):
        for wall in ("provenance", "harness", "elapsed_s"):  # (elapsed_s: the wall clock)
            r.pop(wall, None)
    assert a == b


def test_rpm_in_use() -> None:
    from driver.gem import GemDriver

    g = GemDriver(np.zeros((8, 1), np.uint32), policy=DriverPolicy.I915_2016)
    a, b = g.add_object(1, 2, 0), g.add_object(2, 2, 0)
    for o, pfns in ((a, [0, 1]), (b, [2, 3])):
        g.bind(o, np.array(pfns))
    assert g.rpm_in_use(0.0)  # the display is lit: always
    g.display_on = False
    assert not g.rpm_in_use(0.0)  # nothing ever ran
    g.execute([a], 1.0, 0.040, False)
    assert g.rpm_in_use(1.02)  # working
    assert g.rpm_in_use(1.04 + 0.9 * I915_GT_PARK_S)  # idle, not parked yet
    assert not g.rpm_in_use(1.04 + 1.1 * I915_GT_PARK_S)  # parked
    d = g.migrate_decide(b, 2, MigrateMode.SYNC, 1.1)  # b idle, the GT not parked: dropped
    assert (d.rc, d.drop) == (0, True)
    g.bind(b, np.array([2, 3]))
    d = g.migrate_decide(b, 2, MigrateMode.SYNC, 1.5)  # parked: -EBUSY, b stays bound
    assert (d.rc, d.drop) == (-errno.EBUSY, False)
    assert b.bound
    g.execute([a], 2.0, 0.040, False, keep=1.0, interval=0.0167)  # a frame loop keeps it awake
    assert g.rpm_in_use(2.9)
    assert g.migrate_decide(b, 2, MigrateMode.SYNC, 2.9).drop
    assert not g.rpm_in_use(3.0 + 0.040 + 1.1 * I915_GT_PARK_S)  # the loop ended


def test_frame_loop_keeps_objects_busy_and_takes_struct_mutex() -> None:
    """The loop's arithmetic: after the last explicit batch at t0, submissions every interval
    until t0 + keep; an object's current batch ends at its last submission + duration. Each
    submission holds i915's struct_mutex briefly; the 2016 trylock sleeps a jiffy when it finds
    it held and gives up after its ~10 ms of tries."""
    from driver.gem import FrameLoop, GemDriver

    loop = FrameLoop(start=1.0, interval=0.0167, duration=0.040, until=2.0)
    assert loop.busy_until(0.5) == 0.0
    assert loop.busy_until(1.0) == pytest.approx(1.040)
    assert loop.busy_until(1.020) == pytest.approx(1.0167 + 0.040)
    assert loop.busy_until(5.0) == pytest.approx(1.0 + 59 * 0.0167 + 0.040)  # the last one
    g = GemDriver(np.zeros((8, 1), np.uint32))
    a, b = g.add_object(1, 2, 0), g.add_object(2, 2, 0)
    for o, pfns in ((a, [0, 1]), (b, [2, 3])):
        g.bind(o, np.array(pfns))
    g.execute([a], 1.0, 0.040, False, keep=1.0, interval=0.0167)
    assert g.object_busy_until(a, 1.5) > 1.5
    assert g.object_busy_until(b, 1.5) == 0.0
    # wait-idle: ASYNC -EAGAIN, SYNC waits for the current batch only (< 40 ms)
    assert g.migrate_decide(a, 2, MigrateMode.ASYNC, 1.5).rc == -errno.EAGAIN
    d = g.migrate_decide(a, 2, MigrateMode.SYNC, 1.5)
    assert d.rc == 0
    assert 0 < d.wait_s <= 0.040
    assert g.migrate_decide(b, 2, MigrateMode.ASYNC, 1.5) == MigrateDecision(0)
    # i915-2016: struct_mutex is held only while a submission is made (0.3 ms each)
    g.policy = DriverPolicy.I915_2016
    sub = 1.0 + 30 * 0.0167  # a loop submission
    assert not g.struct_mutex_free(sub)
    assert not g.struct_mutex_free(sub + 0.9 * I915_SUBMIT_LOCK_S)
    assert g.struct_mutex_free(sub + 1.1 * I915_SUBMIT_LOCK_S)
    assert g.struct_mutex_free(1.5)  # 15.7 ms after the last one
    assert g.i915_trylock(1.5) == (True, 0.0)
    got, spent = g.i915_trylock(sub)  # held: a jiffy's sleep, then free
    assert got
    assert spent == pytest.approx(JIFFY_S)
    # the loop's object is active: -EBUSY whatever the mode; b is idle: dropped
    d = g.migrate_decide(a, 2, MigrateMode.SYNC, 1.5)
    assert (d.rc, d.drop, d.wait_s) == (-errno.EBUSY, False, 0.0)
    d = g.migrate_decide(b, 2, MigrateMode.ASYNC, sub)
    assert (d.rc, d.drop) == (0, True)
    assert d.lock_s == pytest.approx(JIFFY_S)
    assert not b.bound
    assert g.stats.dropped_objects == 1
    # dropped, not used since: its pages carry no driver reference and migrate at once
    assert g.migrate_decide(b, 2, MigrateMode.SYNC, sub) == MigrateDecision(0)
    assert g.stats.dropped_objects == 1
    g.bind(b, np.array([2, 3]))  # its next use re-faults it
    # submissions one jiffy apart keep the lock taken at every try: -EBUSY after ~16 ms
    g.execute([a], 3.0, 0.001, False, keep=1.0, interval=JIFFY_S)
    d = g.migrate_decide(b, 2, MigrateMode.SYNC, 3.0 + 10 * JIFFY_S)
    assert (d.rc, d.drop) == (-errno.EBUSY, False)
    assert d.lock_s == pytest.approx(I915_TRYLOCK_TRIES * JIFFY_S)
    assert I915_TRYLOCK_TRIES * JIFFY_S == pytest.approx(0.016)
    g.unbind(a)  # a leaves the loop: its submissions no longer take the lock
    assert g.struct_mutex_free(3.0 + 10 * JIFFY_S)
    with pytest.raises(ValueError, match="frame loop needs"):
        g.execute([b], 2.0, 0.01, False, keep=1.0)  # a loop needs its interval


def test_a_frame_loop_refaults_the_objects_it_lost() -> None:
    """An object of the loop that loses its GTT (an i915-2016 drop, a notifier invalidation)
    leaves it; the loop's next submission re-faults it: loop_due names it once the loop has
    submitted after the loss, and binding it puts it back in the loop. A new loop forgets the
    old one's losses; a closed object is forgotten."""
    from driver.gem import GemDriver

    g = GemDriver(np.zeros((8, 1), np.uint32), policy=DriverPolicy.I915_2016)
    a, b = g.add_object(1, 2, 0), g.add_object(2, 2, 0)
    for o, pfns in ((a, [0, 1]), (b, [2, 3])):
        g.bind(o, np.array(pfns))
    g.execute([a, b], 1.0, 0.005, False, keep=1.0, interval=0.0167)  # idle between frames
    t = 1.0 + 3 * 0.0167 + 0.008  # after a frame's 5 ms, before the next submission
    assert g.migrate_decide(a, 2, MigrateMode.SYNC, t).drop
    assert g.loop_ids == {b.id}
    assert g.loop_due(t + 0.001) == []  # no submission since the drop
    assert g.loop_due(t + 0.0167) == [a]
    assert g.loop_due(3.0) == [a]  # (the loop ended; its last submissions came after)
    g.invalidate(b, 0, 1, at=t)  # the notifier's way: part of the GTT goes
    assert g.loop_due(t + 0.0167) == [a, b]
    g.bind(a, np.array([4, 5]))  # re-faulted: back in the loop
    assert g.loop_ids == {a.id}
    assert g.loop_due(t + 0.0167) == [b]
    g.bind(b, np.array([2, 3]))
    assert g.loop_ids == {a.id, b.id}
    assert g.loop_lost == {}
    assert g.stats.refaults == 1  # b was still bound (partly): a re-fault the driver counts
    g.unbind(a, at=1.5)
    g.remove_object(a.id)  # closed: forgotten
    assert g.loop_due(1.6) == []
    g.unbind(b, at=1.5)
    assert g.loop_due(1.6) == [b]
    c = g.add_object(3, 2, 0)
    g.bind(c, np.array([6, 7]))
    g.execute([c], 2.0, 0.005, False, keep=1.0, interval=0.0167)  # a new loop
    assert g.loop_due(2.5) == []


def _gapped_loop() -> Workload:
    """The frame loop above with 5 ms frames: its objects are idle between submissions."""
    text = (
        DESKTOP.replace(
            '[[phase]]\nkind = "wait"\nms = 2000\n',
            GPU_LOAD.replace(
                "interval_ms = 16.7\n", "interval_ms = 16.7\n  keep_ms = 1000\n"
            ).replace("duration_ms = 40", "duration_ms = 5")
            + '\n[[phase]]\nkind = "compact"\n\n[[phase]]\nkind = "wait"\nms = 100\n',
        )
        .replace("proactiveness = 20", "proactiveness = 60")
        .replace("interval_ms = 500", "interval_ms = 50")
    )
    assert text.count("duration_ms = 5\n") == 1
    return parse_workload(text, "desktop-small-gapped-loop.toml")


def test_loop_objects_dropped_between_frames_are_refaulted_by_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With 5 ms frames every 16.7 ms the loop's objects are idle between submissions: the
    2016 callback drops them and the notifier invalidates them, and the loop's next
    submission re-faults them (asked at each phase: InprocBackend.loop_tick). Without that
    step (the tick silenced) those re-faults would wait for the objects' next explicit batch
    and the run would count far fewer."""
    w = _gapped_loop()
    old = w.with_driver_policy(DriverPolicy.I915_2016)
    runs = {name: play(d, wl).record for name, d, wl in (
        ("i915", Design.SHMEM_HOOK, old), ("notifier", Design.NOTIFIER, w))}  # fmt: skip
    monkeypatch.setattr(InprocBackend, "loop_tick", lambda self: 0)
    silent = {name: play(d, wl).record for name, d, wl in (
        ("i915", Design.SHMEM_HOOK, old), ("notifier", Design.NOTIFIER, w))}  # fmt: skip
    assert runs["i915"].vmstat["gem_objects_dropped"] > 20
    # i915-2016: 3,342 pages re-faulted against 2,133; notifier: 1,058 against 377
    assert runs["i915"].costs["refaulted_pages"] > 1.3 * silent["i915"].costs["refaulted_pages"]
    assert (
        runs["notifier"].costs["refaulted_pages"] > 2 * silent["notifier"].costs["refaulted_pages"]
    )
    assert all(r.data_errors == 0 for r in (*runs.values(), *silent.values()))


def test_per_page_flush_costs_a_flush_per_moved_pinned_page() -> None:
    w = parse_workload(DESKTOP, "desktop-small.toml")
    wait = play(Design.SHMEM_HOOK, w).record
    flush = play(Design.SHMEM_HOOK, w.with_driver_policy(DriverPolicy.PER_PAGE_FLUSH)).record
    # the same pages move (the policy decides like wait-idle) ...
    assert flush.costs["pages_migrated"] == wait.costs["pages_migrated"] > 1000
    assert flush.costs["repinned_pages"] == wait.costs["repinned_pages"] > 100
    # ... and every pinned page that moved costs one Mali-like flush more of GPU stall
    extra_ms = flush.costs["gpu_stall_ms"] - wait.costs["gpu_stall_ms"]
    assert extra_ms == pytest.approx(MALI_FLUSH_PAGE_US * wait.costs["repinned_pages"] / 1000)


@pytest.mark.e2e
@pytest.mark.mount
@pytest.mark.parametrize(
    ("policy", "loop", "display"),
    [(DriverPolicy.I915_2016, "", "on"), (DriverPolicy.PER_PAGE_FLUSH, "", "on"),
     (DriverPolicy.I915_2016, "steady", "on"), (DriverPolicy.WAIT_IDLE, "steady", "on"),
     (DriverPolicy.I915_2016, "gaps", "on"), (DriverPolicy.I915_2016, "", "off")],
)  # fmt: skip
def test_driver_policy_same_record_in_process_and_on_the_stack(
    policy: DriverPolicy, loop: str, display: str
) -> None:
    """The policy's decisions live once (GemDriver.migrate_decide): the driver process
    (``gemfs driver --policy --display``) and the in-process driver give the same record, with
    a frame loop too (``exec``'s keep_ms, the driver's FrameLoop). With the display off, each
    round waits 300 ms before compact_memory, so the GPU has parked when it asks."""
    from tests.test_parity import _comparable, _diff
    from tests.workloads import BUSY
    from tools.player import play as play_record
    from tools.stack_backend import StackBackend

    text = (
        BUSY.replace("interval_ms = 16\n", "interval_ms = 16\n  keep_ms = 300\n") if loop else BUSY
    )
    if loop == "gaps":  # 5 ms frames every 16 ms: objects dropped between frames, re-faulted
        text = text.replace("duration_ms = 40", "duration_ms = 5")  # by the loop's (loop_tick)
    assert (text != BUSY) == bool(loop)
    if display == "off":
        compact = '  [[phase.do]]\n  kind = "compact"\n'
        text = text.replace(compact, '  [[phase.do]]\n  kind = "wait"\n  ms = 300\n\n' + compact)
        assert "ms = 300" in text
    w = parse_workload(text, "busy.toml").with_driver_policy(policy)
    w = replace(w, display_on=display == "on")
    a = play_record(w, InprocBackend(w, Design.SHMEM_HOOK), Design.SHMEM_HOOK).record
    b = play_record(w, StackBackend(w, Design.SHMEM_HOOK), Design.SHMEM_HOOK).record
    assert _diff(_comparable(a.to_json()), _comparable(b.to_json())) == []
    assert a.costs["callbacks"] > 0
    if policy is DriverPolicy.I915_2016 and display == "off":
        # parked when compact_memory asks: with the display lit the same workload drops 106
        # objects, -EBUSY 12 pages and re-faults 514
        assert a.vmstat["gem_migrate_callback_ebusy"] > 1000
        assert a.costs["refaulted_pages"] == 0
        assert b.provenance["display"] == "off"
    elif policy is DriverPolicy.I915_2016 and not loop:
        assert a.vmstat["gem_objects_dropped"] > 0
        assert a.costs["refaulted_pages"] > 0
    if loop == "gaps":  # the loop re-faults what it lost: 838 pages (408 without loop_tick)
        assert a.costs["refaulted_pages"] > 600
    elif loop:  # the loop's busy objects show in the decisions: without it, i915 -EBUSY 689
        # pages (with it 1,547) and wait-idle -EAGAIN 12 asks (with it 469) on this workload
        refused = a.vmstat.get("gem_migrate_callback_ebusy", 0) + a.costs["refusals"]
        assert refused > (1000 if policy is DriverPolicy.I915_2016 else 400)
