"""Plays a workload against a :class:`tools.backend.Backend` and records what happened.

The player owns the workload's randomness (one ``numpy`` generator seeded from the file), keeps
the live allocations per tag in creation order, samples the pool after every step (the
timeline), and turns the run into one :class:`RunRecord` per design.

Where the record's "before" and "after" are taken: around the first ``compact`` phase when the
workload has one (``free_pages`` and ``order9_ideal`` are those right after it); otherwise at
the start and the end of the run.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import gemfs
from gemfs.mm import OutOfMemory
from gemfs.mm.costs import COST_SOURCES, LatencySketch
from gemfs.mm.types import PAGE_SIZE, PAGEBLOCK_NR_PAGES, PAGEBLOCK_ORDER, Design, format_size
from tools.backend import Backend, Handle, Sample
from tools.inproc_backend import InprocBackend
from tools.workload import (
    Compact,
    Create,
    Free,
    Gpu,
    Noise,
    PageCache,
    Phase,
    Probe,
    Repeat,
    SizeDist,
    Wait,
    Workload,
)

__all__ = ["InprocBackend", "Player", "RunRecord", "RunResult", "TimelinePoint", "play"]

Progress = Callable[[str], None]  # called once per tick with the phase's name

# A run keeps at most about this many timeline points (twice as many before it thins them).
MAX_TIMELINE = 4096
# Reclaim drops at least this much page cache at a time (kswapd reclaims in batches too).
RECLAIM_MIN = 4 << 20


class Kind(enum.Enum):
    OBJECT = "object"
    FILE = "page-cache"
    NOISE = "noise"


@dataclass(frozen=True, slots=True)
class Item:
    kind: Kind
    handle: Handle


def order_units(buddyinfo: list[int], order: int = PAGEBLOCK_ORDER) -> int:
    """Free blocks of at least ``order``, counted in order-sized units."""
    return sum(n << (o - order) for o, n in enumerate(buddyinfo) if o >= order)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimelinePoint:
    design: str
    step: int
    phase: str
    time_s: float
    score: int
    free_pages: int
    order9_free: int
    unusable_order9_pages: int
    mixed_pageblocks: int
    pinned_pages: int
    migrate_success: int
    migrate_fail: int
    callbacks: int
    gpu_stall_ms: float

    @classmethod
    def of(cls, design: str, step: int, phase: str, s: Sample) -> TimelinePoint:
        units = order_units(s["buddyinfo"])
        vm = s["vmstat"]
        return cls(
            design=design,
            step=step,
            phase=phase,
            time_s=round(s["time_s"], 6),
            score=s["score"],
            free_pages=s["free_pages"],
            order9_free=units,
            unusable_order9_pages=s["free_pages"] - units * PAGEBLOCK_NR_PAGES,
            mixed_pageblocks=s["mixed_pageblocks"],
            pinned_pages=vm.get("nr_gem_pinned", 0),
            migrate_success=vm.get("pgmigrate_success", 0),
            migrate_fail=vm.get("pgmigrate_fail", 0),
            callbacks=s["callbacks"],
            gpu_stall_ms=round(s["gpu"]["stall_s"] * 1000, 3),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One design's result: what ``--json`` writes (one per design) and the report shows."""

    design: str
    workload: str
    seed: int
    pool_pages: int
    free_pages: int  # free pages at the "after" point
    order9_ideal: int  # free_pages // 512
    order9_before: int  # free order>=9 blocks, in order-9 units
    order9_after: int
    fragmentation_score: int  # at the end
    fragmentation_score_peak: int
    migrations: dict[str, int]  # success, fail, eagain
    data_errors: int
    probes: dict[str, int]  # tried, succeeded
    free_pages_end: int
    unusable_free_order9_pages: int  # free pages at the end not in any free order>=9 block
    pageblocks: dict[str, int]  # per migrate type, at the end
    mixed_pageblocks: int
    callbacks: int
    callback_p50_us: float  # wall-clock latency of the owner's callbacks (not deterministic)
    callback_p99_us: float
    gpu_stall_ms: float
    gpu_batches: int
    alloc_failures: int  # creates, page-cache files and noise the pool could not hold
    reclaimed_pages: int  # page cache dropped to make room (memory pressure)
    sim_time_s: float
    elapsed_s: float  # wall time of the run (not deterministic)
    buddyinfo: list[int]  # at the end
    pageblock_types: list[int]  # at the end, per pageblock (the pool map)
    pageblock_states: list[int]
    pageblock_mixed: list[int]
    vmstat: dict[str, int] = field(default_factory=dict)
    # -- the honest-measurement contract (all times are modelled time) -----------------------
    backend: str = "inproc"  # "inproc" | "stack"
    # High-order allocations made while the workload runs (probe phases other than a drain):
    # {"attempts", "successes", "compacted" (successes that needed direct compaction),
    #  "latency_us": {"p50", "p99", "max"}} -- modelled µs each allocation waited.
    alloc: dict[str, Any] = field(default_factory=dict)
    order9_free_mean: float = 0.0  # free order-9 units, time-weighted over the run
    # What the designs cost, in modelled time and pages: {"gpu_stall_ms", "repinned_pages",
    # "refaulted_pages", "callbacks", "pages_migrated", "pages_refused" (distinct pages),
    # "refusals" (EAGAIN answers, attempts), "scanned_pages", "migration_ms", "waits_ms",
    # "pin_migrated_pages", "pin_migration_ms" (moved before a long-term pin: longterm-pin,
    # confine), "evacuated_pages", "evacuation_ms" (confine's region grew over them),
    # "region_grows", "region_shrinks" (confine's region, by a granule each)}
    costs: dict[str, float] = field(default_factory=dict)
    # {"hugepages_recovered" (successful high-order allocations, run and drain, that needed
    #  direct compaction), "stall_ms_per_hugepage", "migrated_per_hugepage"}
    efficiency: dict[str, float | None] = field(default_factory=dict)
    # The end-of-run "drain after idle" (a count = "all" probe): {"order", "blocks", "tried",
    # "stopped_at_failure"}; blocks = 0 and tried = 0 when the workload has none.
    drain: dict[str, Any] = field(default_factory=dict)
    # Per allocation size while the workload runs ("2MiB", "16MiB", "1GiB", ...): {"order",
    # "attempts", "successes", "latency_us": {"p50", "p99", "max"}}
    alloc_sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {"gemfs_version", "cost_table": {name: value}, "workload_file"}
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        return cls(**data)


# Record fields measured on the wall clock: they differ between two runs of the same seed.
NONDETERMINISTIC = ("callback_p50_us", "callback_p99_us", "elapsed_s")


@dataclass(frozen=True, slots=True)
class RunResult:
    record: RunRecord
    timeline: list[TimelinePoint]


class Player:
    """Plays one workload on one backend."""

    def __init__(
        self, workload: Workload, backend: Backend, design: str, progress: Progress | None = None
    ) -> None:
        self.w = workload
        self.b = backend
        self.design = design
        self.progress = progress
        self.rng = np.random.default_rng(workload.seed)
        self.live: dict[str, list[Item]] = {}
        self.timeline: list[TimelinePoint] = []
        self.step = 0
        self.probes_tried = 0
        self.probes_ok = 0
        # High-order allocations while the workload runs (not the drain): modelled latency each.
        self.alloc_latency = LatencySketch()
        # The same per allocation size (order): attempts, successes, latency sketch.
        self.by_order: dict[int, tuple[list[int], LatencySketch]] = {}
        self.alloc_ok = 0
        self.alloc_compacted = 0
        self.recovered = 0  # huge pages that needed direct compaction to exist (run + drain)
        self.drain = {"order": 0, "blocks": 0, "tried": 0, "stopped_at_failure": False}
        self.alloc_failures = 0
        self.before: Sample | None = None
        self.after: Sample | None = None
        # Page-cache files, oldest first (the LRU reclaim takes from), with their sizes.
        self.lru: dict[Handle, tuple[str, int]] = {}
        self.reclaimed_pages = 0
        self._last: TimelinePoint | None = None
        self._first_t = 0.0
        self._weighted = 0.0
        self._sum9 = 0
        self._n9 = 0
        self._peak = 0

    # -- bookkeeping ------------------------------------------------------------------------
    def _sample(self, phase: str, *, full: bool = False) -> Sample:
        s = self.b.sample(full=full)
        p = TimelinePoint.of(self.design, self.step, phase, s)
        # Time-weighted free order-9 blocks, accumulated over every sample (the timeline kept
        # may be thinned; this mean never is).
        if self._last is not None:
            self._weighted += self._last.order9_free * (p.time_s - self._last.time_s)
        self._last = p
        self._sum9 += p.order9_free
        self._n9 += 1
        self._peak = max(self._peak, p.score)
        self.timeline.append(p)
        if len(self.timeline) >= 2 * MAX_TIMELINE:
            # Decimate: keep every other point (the first and the newest always), so a long
            # run keeps a bounded timeline with its shape.
            self.timeline = [*self.timeline[:-1:2], self.timeline[-1]]
        self.step += 1
        return s

    def _tick(self, phase: str) -> Sample:
        s = self._sample(phase)
        if self.progress is not None:
            self.progress(phase)
        return s

    def _sizes(self, dist: SizeDist, count: int | None, fill: float | None) -> list[int]:
        """Object sizes for a create phase: ``count`` of them, or as many as fill the budget."""
        if count is not None:
            return [int(x) for x in dist.sample(self.rng, count)]
        assert fill is not None
        budget = int(fill * self.b.sample()["free_pages"]) * PAGE_SIZE
        out: list[int] = []
        total = 0
        while True:
            for size in dist.sample(self.rng, 256).tolist():
                if total + size > budget:
                    return out
                out.append(size)
                total += size

    def _add(self, tag: str, item: Item) -> None:
        self.live.setdefault(tag, []).append(item)

    def _release(self, item: Item) -> None:
        if item.kind is Kind.NOISE:
            self.b.free_noise(item.handle)
        else:
            self.lru.pop(item.handle, None)
            self.b.close(item.handle)

    def _reclaim(self, nbytes: int) -> bool:
        """Memory pressure: drop the oldest page-cache files until ``nbytes`` are free again.

        Page cache is clean and reclaimable, so an allocation that does not fit first makes room
        by dropping it, as kswapd/direct reclaim would. False when there was nothing to drop.
        """
        want = max(nbytes, RECLAIM_MIN)
        freed = 0
        dropped: dict[str, set[Handle]] = {}
        while freed < want and self.lru:
            h = next(iter(self.lru))
            tag, size = self.lru.pop(h)
            self.b.close(h)
            dropped.setdefault(tag, set()).add(h)
            freed += size
        for tag, hs in dropped.items():
            self.live[tag] = [i for i in self.live.get(tag, []) if i.handle not in hs]
        self.reclaimed_pages += freed // PAGE_SIZE
        if freed:
            self.b.kswapd_sleep()  # the pressure woke kswapd; it sleeps once memory is back
        return freed > 0

    def _allocate(self, kind: Kind, tag: str, size: int, bind: bool = False) -> bool:
        """Create an object or a page-cache file, reclaiming page cache once if it does not fit."""
        for attempt in range(2):
            try:
                if kind is Kind.OBJECT:
                    h = self.b.create(size, tag, bind)
                else:
                    h = self.b.page_cache(size)
                    self.lru[h] = (tag, size)
            except OutOfMemory:
                if attempt == 0 and self._reclaim(size):
                    continue
                self.alloc_failures += 1
                return False
            self._add(tag, Item(kind, h))
            return True
        return False

    # -- phases -----------------------------------------------------------------------------
    def run_phase(self, phase: Phase) -> None:
        # A frame loop's submissions since the last phase re-fault the objects it lost.
        self.b.loop_tick()
        match phase:
            case Create():
                for size in self._sizes(phase.size, phase.amount.count, phase.amount.fill):
                    if not self._allocate(Kind.OBJECT, phase.tag, size, phase.bind):
                        break
                self._tick(phase.name)
            case PageCache():
                for size in self._sizes(phase.size, phase.amount.count, phase.amount.fill):
                    if not self._allocate(Kind.FILE, phase.tag, size):
                        break
                self._tick(phase.name)
            case Gpu():
                objs = [
                    i.handle
                    for tag in phase.tags
                    for i in self.live.get(tag, [])
                    if i.kind is Kind.OBJECT
                ]
                for r in range(phase.repeat):
                    if objs:
                        n = phase.count if phase.count is not None else phase.fraction * len(objs)
                        k = min(len(objs), max(1, round(n)))
                        pick = np.sort(self.rng.choice(len(objs), size=k, replace=False))
                        last = r == phase.repeat - 1  # a frame loop goes on from the last batch
                        self.b.execute(
                            [objs[i] for i in pick.tolist()],
                            phase.duration_s,
                            phase.write,
                            keep_s=phase.keep_s if last else 0.0,
                            interval_s=phase.interval_s if last and phase.keep_s else 0.0,
                        )
                    if phase.interval_s:
                        self.b.advance(phase.interval_s)
                    self._tick(phase.name)
            case Free():
                items = self.live.get(phase.tag, [])
                n = len(items)
                if phase.every is not None:
                    chosen = set(range(phase.offset, n, phase.every))
                elif phase.fraction is not None:
                    k = round(phase.fraction * n)
                    chosen = set(self.rng.choice(n, size=k, replace=False).tolist()) if k else set()
                elif phase.count is not None:
                    chosen = set(range(min(n, phase.count)))
                else:
                    chosen = set(range(n))
                for i in sorted(chosen):
                    self._release(items[i])
                self.live[phase.tag] = [it for i, it in enumerate(items) if i not in chosen]
                self._tick(phase.name)
            case Noise():
                for _ in range(phase.count):
                    h = self.b.alloc_noise(phase.order, phase.migratetype)
                    if h is None and self._reclaim(PAGE_SIZE << phase.order):
                        h = self.b.alloc_noise(phase.order, phase.migratetype)
                    if h is None:
                        self.alloc_failures += 1
                        break
                    self._add(phase.tag, Item(Kind.NOISE, h))
                self._tick(phase.name)
            case Probe():
                limit = self.w.pool_pages >> phase.order
                drain = phase.count == "all"
                want = limit if phase.count == "all" else phase.count
                for _ in range(phase.repeat):
                    if not phase.hold:
                        self.b.release_probes()
                    got = tried = 0
                    for _ in range(want):
                        self.probes_tried += 1
                        tried += 1
                        ok, latency_us, compacted = self.b.probe(phase.order, phase.gfp)
                        if not drain:
                            self.alloc_latency.add(latency_us)
                            counts, sketch = self.by_order.setdefault(
                                phase.order, ([0, 0], LatencySketch())
                            )
                            counts[0] += 1
                            counts[1] += ok
                            sketch.add(latency_us)
                        if not ok:
                            if drain:
                                break
                            continue
                        got += 1
                        self.probes_ok += 1
                        self.recovered += compacted
                        if not drain:
                            self.alloc_ok += 1
                            self.alloc_compacted += compacted
                    if drain:  # "drain after idle": how many it got before the first failure
                        self.drain = {
                            "order": phase.order,
                            "blocks": got,
                            "tried": tried,
                            "stopped_at_failure": got < tried,
                        }
                    if not phase.hold:
                        self.b.release_probes()
                    if phase.interval_s:
                        self.b.advance(phase.interval_s)
                    self._tick(phase.name)
            case Compact():
                first = self.before is None
                s = self.b.sample()
                if first:
                    self.before = s
                self.b.compact()
                s = self._tick(phase.name)
                if first:
                    self.after = s
            case Wait():
                interval = self.w.compactor.interval_s
                left = phase.seconds
                while left > 1e-9:
                    dt = min(interval, left)
                    self.b.advance(dt)
                    left -= dt
                    if left > 1e-9:
                        self._sample(phase.name)
                self._tick(phase.name)
            case Repeat():
                for _ in range(phase.times):
                    for p in phase.phases:
                        self.run_phase(p)

    def run(self) -> RunResult:
        t0 = time.perf_counter()
        start = self._sample("start")
        self._first_t = start["time_s"]
        for phase in self.w.phases:
            self.run_phase(phase)
        self.b.release_probes()
        end = self._sample("end", full=True)
        data_errors = self.b.verify()
        elapsed = time.perf_counter() - t0
        before = self.before or start
        after = self.after or end
        vm = end["vmstat"]
        units_end = order_units(end["buddyinfo"])
        record = RunRecord(
            design=self.design,
            workload=self.w.name,
            seed=self.w.seed,
            pool_pages=end["pool_pages"],
            free_pages=after["free_pages"],
            order9_ideal=after["free_pages"] // PAGEBLOCK_NR_PAGES,
            order9_before=order_units(before["buddyinfo"]),
            order9_after=order_units(after["buddyinfo"]),
            fragmentation_score=end["score"],
            fragmentation_score_peak=self._peak,
            migrations={
                "success": vm.get("pgmigrate_success", 0),
                "fail": vm.get("pgmigrate_fail", 0),
                "eagain": vm.get("pgmigrate_eagain", 0),
            },
            data_errors=data_errors,
            probes={"tried": self.probes_tried, "succeeded": self.probes_ok},
            free_pages_end=end["free_pages"],
            unusable_free_order9_pages=end["free_pages"] - units_end * PAGEBLOCK_NR_PAGES,
            pageblocks=dict(end["pageblocks"]),
            mixed_pageblocks=end["mixed_pageblocks"],
            callbacks=end["callbacks"],
            callback_p50_us=round(end["callback_p50_us"], 1),
            callback_p99_us=round(end["callback_p99_us"], 1),
            gpu_stall_ms=round(end["gpu"]["stall_s"] * 1000, 3),
            gpu_batches=end["gpu"]["batches"],
            alloc_failures=self.alloc_failures,
            reclaimed_pages=self.reclaimed_pages,
            sim_time_s=round(end["time_s"], 6),
            elapsed_s=round(elapsed, 3),
            buddyinfo=list(end["buddyinfo"]),
            pageblock_types=list(end["pageblock_types"]),
            pageblock_states=list(end["pageblock_states"]),
            pageblock_mixed=list(end.get("pageblock_mixed", [])),
            vmstat=dict(vm),
            backend=getattr(self.b, "name", "inproc"),
            alloc=self._alloc_summary(),
            alloc_sizes={
                format_size(PAGE_SIZE << o): {
                    "order": o,
                    "attempts": c[0],
                    "successes": c[1],
                    "latency_us": sk.summary(),
                }
                for o, (c, sk) in sorted(self.by_order.items())
            },
            order9_free_mean=round(self._order9_free_mean(), 3),
            costs=self._costs(end),
            efficiency=self._efficiency(end),
            drain=dict(self.drain),
            provenance={
                "gemfs_version": gemfs.__version__,
                "cost_table": dict(end["cost_table"]),
                "cost_sources": dict(COST_SOURCES),
                "workload_file": self.w.path,
                # the driver's migrate callback (driver.gem.DriverPolicy) and the knobs of
                # longterm-pin / confine / pinned-ttm as the workload set them (None: the default)
                "driver_policy": self.w.driver_policy.value,
                "display": "on" if self.w.display_on else "off",
                "design_options": {
                    "movablecore": self.w.movablecore,
                    "confine_granule": self.w.confine_granule,
                    "ttm_pool": self.w.ttm_pool,
                },
            },
        )
        return RunResult(record, self.timeline)

    # -- the honest-measurement metrics ---------------------------------------------------------
    def _alloc_summary(self) -> dict[str, Any]:
        return {
            "attempts": self.alloc_latency.count,
            "successes": self.alloc_ok,
            "compacted": self.alloc_compacted,
            # percentiles within 1% (a bounded sketch); max exact
            "latency_us": self.alloc_latency.summary(),
        }

    def _order9_free_mean(self) -> float:
        """Free order-9 units weighted by how long (modelled time) each state lasted."""
        if self._last is None:
            return 0.0
        span = self._last.time_s - self._first_t
        if span <= 0:
            return self._sum9 / self._n9
        return self._weighted / span

    @staticmethod
    def _costs(end: Sample) -> dict[str, float]:
        c = dict(end["costs"])
        return {
            "gpu_stall_ms": c["gpu_stall_ms"],
            "waits_ms": c["waits_ms"],
            "migration_ms": c["migration_ms"],
            "scan_ms": c["scan_ms"],
            "scanned_pages": c["scanned_pages"],
            "repinned_pages": c["repinned_pages"],
            "refaulted_pages": c["refaulted_pages"],
            "callbacks": c["callbacks"],
            "pages_migrated": c["pages_migrated"],
            "pages_refused": c["pages_refused"],
            "refusals": c["refusals"],
            # longterm-pin / confine (gemfs.mm.region)
            "pin_migrated_pages": c["pin_migrated_pages"],
            "pin_migration_ms": c["pin_migration_ms"],
            "evacuated_pages": c["evacuated_pages"],
            "evacuation_ms": c["evacuation_ms"],
            "region_grows": c["region_grows"],
            "region_shrinks": c["region_shrinks"],
        }

    def _efficiency(self, end: Sample) -> dict[str, float | None]:
        """Cost per huge page recovered; None (not 0) when none was: a ratio with no meaning."""
        c = end["costs"]
        n = self.recovered
        return {
            "hugepages_recovered": n,
            "stall_ms_per_hugepage": round(c["gpu_stall_ms"] / n, 6) if n else None,
            "migrated_per_hugepage": round(c["pages_migrated"] / n, 3) if n else None,
        }


def play(
    workload: Workload, backend: Backend, design: Design | str, progress: Progress | None = None
) -> RunResult:
    """Play the workload on the backend, then tear the backend down (always)."""
    try:
        return Player(workload, backend, str(design), progress).run()
    finally:
        backend.teardown()
