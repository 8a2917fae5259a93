"""Every design's signature on a small in-process workload (issue 13).

Each test plays one small desktop-like workload (``DESKTOP``: page cache, slab noise, a pinned
scanout, browser buffers that the GPU renders into at 60 Hz, huge-page faults, then an idle
spell and a huge-page drain) under the designs it compares and asserts the figures that tell
them apart, as values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from gemfs.cmd_mount import DESIGNS
from gemfs.mm import MemoryManager
from gemfs.mm.types import PAGEBLOCK_ORDER, Design, MigrateType
from tools.inproc_backend import InprocBackend
from tools.player import Player, RunRecord
from tools.workload import Workload, parse_workload

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


def play(design: Design, w: Workload | None = None, *, ttm_pool_limit: int | None = None) -> Played:
    w = w or parse_workload(DESKTOP, "desktop-small.toml")
    b = InprocBackend(w, design)
    if ttm_pool_limit is not None:
        assert b.mm.ttm is not None
        b.mm.ttm.limit = ttm_pool_limit
    try:
        record = Player(w, b, design.value).run().record
        b.mm.check()
        polluted, mib = _polluted(b.mm)
        return Played(record, polluted, mib, b.mm.mixed_pageblocks())
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
    """Highest order first keeps a GEM object in few pageblocks: with the pools off (limit 0)
    TTM pollutes fewer pageblocks per pinned MiB than drm_gem_shmem's page-at-a-time
    allocation. The pools undo it: blocks kept for reuse stay UNMOVABLE and allocated, where
    a freed page would have merged back, so with TTM's default limit (half of memory) more
    pageblocks hold a pinned or pooled page than under pinned-unmovable."""
    w = parse_workload(DESKTOP.replace("fill = 0.9", "fill = 0.7"), "desktop-small.toml")
    shmem = play(Design.PINNED_UNMOVABLE, w)
    ttm = play(Design.PINNED_TTM, w)
    no_pool = play(Design.PINNED_TTM, w, ttm_pool_limit=0)
    assert shmem.pinned_mib == ttm.pinned_mib == no_pool.pinned_mib > 10
    assert no_pool.polluted_per_pinned_mib < 0.9 * shmem.polluted_per_pinned_mib
    assert ttm.polluted_per_pinned_mib > shmem.polluted_per_pinned_mib
