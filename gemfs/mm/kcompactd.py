"""kcompactd's rules, once, for both backends: when it wakes and what it compacts.

:class:`WakeSchedule` says when kcompactd wakes on the modelled clock (every ``interval_s``, the
kernel's HPAGE_FRAG_CHECK_INTERVAL_MSEC is 500 ms; after a long jump of the clock it wakes once
and goes on from there). At each wake-up, as kcompactd() in mm/compaction.c does:

- **Order work first** (``kcompactd_work_requested``): an order kswapd left pending after a
  failed high-order allocation that may wake it (hugetlb, GFP_KERNEL; not a THP fault), or the
  order a compactor asks for at every wake. It runs in the zone's own state —
  :func:`gemfs.mm.page_alloc.kcompactd_wake`: kswapd's sleep flushes the skip hints, then
  kcompactd_do_work() (SYNC_LIGHT, skip hints and cached scanners honoured, the zone's deferral).
  A wake-up that did order work does nothing else and forgets the proactive deferral
  (``timeout = default_timeout; continue``).
- Otherwise **proactive compaction** (``compaction_proactiveness``, Linux 5.9;
  proactive_compact_node()): when the fragmentation score is above the high watermark, compact
  (SYNC_LIGHT, whole zone, skip hints ignored but set, as compact_node() does) down to the low
  one; a pass that does not lower the score makes kcompactd sleep 64 intervals
  (``default_timeout << COMPACT_MAX_DEFER_SHIFT``): the next 63 wake-ups do nothing proactive.
- ``reserve`` > 0 (vm.defrag_mode, 6.15: kswapd and kcompactd keep the high watermark in whole
  free pageblocks): when fewer free pageblocks exist, compact for pageblock order until that
  many do (SYNC_LIGHT); a pass that gains nothing defers the next 1, 2, 4 ... 32 such wakes.

:meth:`Kcompactd.wake` yields the passes (:class:`CompactionPolicy`, without a zone state: the
caller attaches the zone's, or a copy of it in the compactor process) for the caller to run
through its mechanism; counters go to :attr:`Kcompactd.counters` (vmstat names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gemfs.mm.compaction import COMPACT_MAX_DEFER_SHIFT, CompactionPolicy
from gemfs.mm.types import NR_ORDERS, PAGEBLOCK_ORDER, MigrateMode
from gemfs.mm.vmstat import fragmentation_score, proactive_watermarks

MAX_DEFER = 32  # reserve wakes to skip at most after a pass that made no progress
PROACTIVE_DEFER = (1 << COMPACT_MAX_DEFER_SHIFT) - 1  # wakes skipped: timeout << 6

FreeBlocks = Callable[[], list[int]]  # free blocks per order, now


@dataclass
class WakeSchedule:
    interval_s: float
    next_wake: float = -1.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("kcompactd's interval must be > 0")
        if self.next_wake < 0:
            self.next_wake = self.interval_s

    def due(self, now: float, until: float) -> Iterator[float]:
        """The wake instants in (.., until], in order; ``now`` is the clock before each."""
        while self.next_wake <= until:
            at = max(now, self.next_wake)
            yield at
            now = at
            self.next_wake += self.interval_s
            if self.next_wake <= at:  # the clock jumped (a long wait): go on from here
                self.next_wake = at + self.interval_s


def _units(free: list[int], order: int) -> int:
    """Free blocks of at least ``order``, counted in order-sized units."""
    return sum(free[o] << (o - order) for o in range(order, NR_ORDERS))


@dataclass
class Kcompactd:
    nr_pageblocks: int
    order: int = -1  # order work at every wake (a compactor's --order); -1: only kswapd's
    counters: dict[str, int] = field(default_factory=dict)
    defer: int = 0  # proactive wake-ups still to skip
    reserve: int = 0  # defrag_mode: free pageblocks to keep (0: off)
    reserve_defer: int = 0
    reserve_backoff: int = 1

    def _inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def take_counters(self) -> dict[str, int]:
        out, self.counters = self.counters, {}
        return out

    def wake(
        self, free_blocks: FreeBlocks, proactiveness: int, *, worked: bool = False
    ) -> Iterator[CompactionPolicy]:
        """One wake-up after its order work (``worked``: some was done, see the module doc):
        yields each pass to run; the caller runs it before resuming."""
        if self.reserve and _units(free_blocks(), PAGEBLOCK_ORDER) < self.reserve:
            if self.reserve_defer:
                self.reserve_defer -= 1
            else:
                before = _units(free_blocks(), PAGEBLOCK_ORDER)
                self._inc("compact_daemon_defrag_reserve")
                policy = CompactionPolicy(
                    self.nr_pageblocks,
                    order=PAGEBLOCK_ORDER,
                    mode=MigrateMode.SYNC_LIGHT,
                    target_blocks=self.reserve,
                    ignore_skip_hint=True,
                )
                yield policy
                self._daemon_scanned(policy)
                if _units(free_blocks(), PAGEBLOCK_ORDER) > before:
                    self.reserve_backoff = 1
                else:
                    self.reserve_defer = self.reserve_backoff
                    self.reserve_backoff = min(self.reserve_backoff * 2, MAX_DEFER)
        if worked:
            self.defer = 0
            return
        if self.defer:
            self.defer -= 1
            return
        if proactiveness <= 0:
            return
        before = fragmentation_score(free_blocks())
        _low, high = proactive_watermarks(proactiveness)
        if before <= high:
            return
        self._inc("proactive_compact_trigger")
        policy = CompactionPolicy(
            self.nr_pageblocks,
            mode=MigrateMode.SYNC_LIGHT,
            proactiveness=proactiveness,
            ignore_skip_hint=True,
        )
        yield policy
        self._daemon_scanned(policy)
        if fragmentation_score(free_blocks()) >= before:  # no progress: sleep 64 intervals
            self.defer = PROACTIVE_DEFER

    def _daemon_scanned(self, policy: CompactionPolicy) -> None:
        self._inc("compact_daemon_migrate_scanned", policy.stats.migrate_scanned)
        self._inc("compact_daemon_free_scanned", policy.stats.free_scanned)
