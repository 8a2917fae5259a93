"""kcompactd's rules, once, for both backends: when it wakes and what it compacts.

:class:`WakeSchedule` says when kcompactd wakes on the modelled clock (every ``interval_s``;
after a long jump of the clock it wakes once and goes on from there). :class:`Kcompactd`
decides at each wake what to run, as a generator of :class:`CompactionPolicy` objects that the
caller executes through its mechanism (in process: the model; the compactor process: the
control socket) before asking for the next:

- ``order`` >= 0 (kswapd's kind of wake-up, ``wakeup_kcompactd``): when no free block of that
  order exists, compact for it (SYNC_LIGHT); a pass that does not produce one defers the next
  1, 2, 4 ... 32 wakes of this kind.
- Proactive compaction (``compaction_proactiveness``, Linux 5.9): when the fragmentation score
  is above the high watermark, compact (SYNC_LIGHT) down to the low one; a pass that does not
  lower the score defers the next 1, 2, 4 ... 32 wakes (kcompactd's ``proactive_defer``).

- ``reserve`` > 0 (vm.defrag_mode, 6.15: kswapd and kcompactd keep the high watermark in whole
  free pageblocks): when fewer free pageblocks exist, compact for pageblock order until that
  many do (SYNC_LIGHT); deferred like the ``order`` wake.

Counters go to :attr:`Kcompactd.counters` (vmstat names) for the caller to add to the pool's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gemfs.mm.compaction import CompactionPolicy
from gemfs.mm.types import NR_ORDERS, PAGEBLOCK_ORDER, MigrateMode
from gemfs.mm.vmstat import fragmentation_score, proactive_watermarks

MAX_DEFER = 32  # wakes to skip at most after a pass that made no progress

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


def _has_block(free: list[int], order: int) -> bool:
    return any(free[o] for o in range(order, NR_ORDERS))


@dataclass
class Kcompactd:
    nr_pageblocks: int
    order: int = -1
    counters: dict[str, int] = field(default_factory=dict)
    defer: int = 0
    backoff: int = 1
    order_defer: int = 0
    order_backoff: int = 1
    reserve: int = 0  # defrag_mode: free pageblocks to keep (0: off)
    reserve_defer: int = 0
    reserve_backoff: int = 1

    def _inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def take_counters(self) -> dict[str, int]:
        out, self.counters = self.counters, {}
        return out

    def wake(self, free_blocks: FreeBlocks, proactiveness: int) -> Iterator[CompactionPolicy]:
        """One wake-up: yields each pass to run; the caller runs it before resuming."""
        self._inc("compact_daemon_wake")
        if self.order >= 0 and not _has_block(free_blocks(), self.order):
            if self.order_defer:
                self.order_defer -= 1
            else:
                policy = CompactionPolicy(
                    self.nr_pageblocks, order=self.order, mode=MigrateMode.SYNC_LIGHT
                )
                yield policy
                self._daemon_scanned(policy)
                if _has_block(free_blocks(), self.order):
                    self.order_backoff = 1
                else:
                    self.order_defer = self.order_backoff
                    self.order_backoff = min(self.order_backoff * 2, MAX_DEFER)
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
                )
                yield policy
                self._daemon_scanned(policy)
                if _units(free_blocks(), PAGEBLOCK_ORDER) > before:
                    self.reserve_backoff = 1
                else:
                    self.reserve_defer = self.reserve_backoff
                    self.reserve_backoff = min(self.reserve_backoff * 2, MAX_DEFER)
        if self.defer:
            self.defer -= 1
            return
        if proactiveness <= 0:
            return
        before = fragmentation_score(free_blocks())
        _low, high = proactive_watermarks(proactiveness)
        if before <= high:
            self.backoff = 1
            return
        self._inc("proactive_compact_trigger")
        policy = CompactionPolicy(
            self.nr_pageblocks, mode=MigrateMode.SYNC_LIGHT, proactiveness=proactiveness
        )
        yield policy
        self._daemon_scanned(policy)
        if fragmentation_score(free_blocks()) >= before:  # no progress: don't hammer owners
            self.defer = self.backoff
            self.backoff = min(self.backoff * 2, MAX_DEFER)
        else:
            self.backoff = 1

    def _daemon_scanned(self, policy: CompactionPolicy) -> None:
        self._inc("compact_daemon_migrate_scanned", policy.stats.migrate_scanned)
        self._inc("compact_daemon_free_scanned", policy.stats.free_scanned)
