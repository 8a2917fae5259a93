"""The in-process backend: the memory model, the driver's logic and kcompactd on one clock.

Everything runs in this process: :class:`gemfs.mm.MemoryManager` is the kernel,
:class:`driver.inproc.InprocDriver` is i915 (a simulated GPU; waiting for it advances the
simulated clock and counts as GPU stall), and :class:`Kcompactd` below wakes every
``interval`` of simulated time to run the model's proactive compaction policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from driver.gem import DriverObject
from driver.inproc import InprocDriver, SimClock
from gemfs.mm import CompactionPolicy, GemObject, MemoryManager, MigrateMode, OutOfMemory
from gemfs.mm.ops import SHMEM_OPS
from gemfs.mm.pool import I64, PG_ALLOC, PG_MT_MASK, PG_MT_SHIFT
from gemfs.mm.types import PAGE_SIZE, Design, MigrateType
from tools.backend import GpuSample, Handle, Sample
from tools.workload import Compactor, Workload

# Wakes to skip after a pass that did not lower the score (doubling from 1; as tools/compactor.py).
MAX_DEFER = 32


class Kcompactd:
    """kcompactd in miniature, on the simulated clock; the same rules as tools/compactor.py.

    Every wake counts ``compact_daemon_wake``. Proactive compaction: when the fragmentation score
    is above the proactiveness high watermark, compact (SYNC_LIGHT) down to the low one; a pass
    that does not lower the score defers the next 1, 2, 4 ... 32 wakes. ``order`` >= 0 adds
    kswapd's kind of wake-up: when no free block of that order exists, compact for it (with the
    same back-off of its own).
    """

    def __init__(self, mm: MemoryManager, settings: Compactor) -> None:
        self.mm = mm
        self.settings = settings
        self.next_wake = settings.interval_s
        self.defer = 0
        self.backoff = 1
        self.order_defer = 0
        self.order_backoff = 1
        mm.compaction_proactiveness = settings.proactiveness

    def _run(self, policy: CompactionPolicy) -> None:
        self.mm.run_policy(policy)
        v = self.mm.vmstat
        v.inc("compact_daemon_migrate_scanned", policy.stats.migrate_scanned)
        v.inc("compact_daemon_free_scanned", policy.stats.free_scanned)

    def wake(self) -> None:
        mm, s = self.mm, self.settings
        mm.vmstat.inc("compact_daemon_wake")
        if s.order >= 0 and not mm.buddy.has_free_block(s.order):
            if self.order_defer:
                self.order_defer -= 1
            else:
                policy = CompactionPolicy(
                    mm.pool.nr_pageblocks, order=s.order, mode=MigrateMode.SYNC_LIGHT
                )
                self._run(policy)
                if mm.buddy.has_free_block(s.order):
                    self.order_backoff = 1
                else:
                    self.order_defer = self.order_backoff
                    self.order_backoff = min(self.order_backoff * 2, MAX_DEFER)
        if self.defer:
            self.defer -= 1
            return
        if s.proactiveness <= 0:
            return
        if not mm.should_proactive_compact(s.proactiveness):
            self.backoff = 1
            return
        mm.vmstat.inc("proactive_compact_trigger")
        before = mm.fragmentation_score()
        self._run(mm.proactive_policy(s.proactiveness))
        if mm.fragmentation_score() >= before:  # no progress: don't hammer the owners
            self.defer = self.backoff
            self.backoff = min(self.backoff * 2, MAX_DEFER)
        else:
            self.backoff = 1


class InprocBackend:
    """:class:`tools.backend.Backend` on the model, in this process (``gemfs run --inproc``)."""

    def __init__(self, workload: Workload, design: Design) -> None:
        self.design = design
        self.clock = SimClock()
        self.mm = MemoryManager(workload.pool, design=design)
        self.driver = InprocDriver(self.mm, design, self.clock)
        self.kcompactd = Kcompactd(self.mm, workload.compactor)
        self._next = 1
        self._objects: dict[Handle, DriverObject] = {}
        self._files: dict[Handle, GemObject] = {}
        self._noise: dict[Handle, int] = {}  # handle -> first frame
        self._probes: list[int] = []
        self._closed = False

    def _handle(self) -> Handle:
        h = Handle(self._next)
        self._next += 1
        return h

    # -- objects ----------------------------------------------------------------------------
    def create(self, size: int, tag: str, bind: bool) -> Handle:
        h = self._handle()
        o = self.driver.create(size, path=f"{tag}/{int(h)}")
        self._objects[h] = o
        if bind:
            try:
                self.driver.execute([o], 0.0, True)
            except OutOfMemory:  # cannot happen (pages exist), but never leak the object
                self.close(h)
                raise
        return h

    def close(self, handle: Handle) -> None:
        if (o := self._objects.pop(handle, None)) is not None:
            self.driver.close(o)
        elif (f := self._files.pop(handle, None)) is not None:
            self.mm.destroy_object(f)
        else:
            raise KeyError(f"no object or file with handle {handle}")

    def execute(self, handles: Sequence[Handle], duration_s: float, write: bool) -> None:
        self.driver.execute([self._objects[h] for h in handles], duration_s, write)

    def page_cache(self, size: int) -> Handle:
        h = self._handle()
        obj = self.mm.create_object(size, migratetype=MigrateType.MOVABLE, path=f"cache/{int(h)}")
        obj.ops = SHMEM_OPS  # a file elsewhere (not on the driver's mount): plain shmem
        idx, pfns = obj.resident()
        self.mm.pool.frames[pfns, :8] = _stamps(obj.id, idx).view(np.uint8).reshape(-1, 8)
        self._files[h] = obj
        return h

    # -- kernel allocations -----------------------------------------------------------------
    def alloc_noise(self, order: int, mt: MigrateType) -> Handle | None:
        try:
            pfn = self.mm.alloc_kernel(order, mt)
        except OutOfMemory:
            return None
        h = self._handle()
        self._noise[h] = pfn
        return h

    def free_noise(self, handle: Handle) -> None:
        self.mm.free_kernel(self._noise.pop(handle))

    def probe(self, order: int) -> bool:
        pfn = self.mm.alloc_high_order(order, MigrateType.MOVABLE)
        if pfn is None:
            return False
        self._probes.append(pfn)
        return True

    def release_probes(self) -> None:
        for pfn in self._probes:
            self.mm.free_kernel(pfn)
        self._probes.clear()

    # -- compaction and time ----------------------------------------------------------------
    def compact(self) -> None:
        self.mm.compact()

    def advance(self, seconds: float) -> None:
        k = self.kcompactd
        interval = k.settings.interval_s
        end = self.clock.now + max(0.0, seconds)
        while k.next_wake <= end:
            self.clock.now = max(self.clock.now, k.next_wake)
            k.wake()
            k.next_wake += interval
            if k.next_wake <= self.clock.now:  # the clock jumped (a long GPU wait)
                k.next_wake = self.clock.now + interval
        self.clock.now = max(self.clock.now, end)

    # -- statistics -------------------------------------------------------------------------
    def sample(self) -> Sample:
        mm = self.mm
        vm = mm.refresh_gauges()
        lat = np.asarray(mm.callback_latency_us, dtype=np.float64)
        p50, p99 = (np.percentile(lat, [50, 99]).tolist()) if len(lat) else (0.0, 0.0)
        st = self.driver.gem.stats
        gpu: GpuSample = {
            "batches": st.batches,
            "stall_s": st.stall_s,
            "data_errors": st.data_errors,
            "migrate_calls": st.migrate_calls,
            "migrate_eagain": st.migrate_eagain,
            "invalidations": st.invalidations,
            "refaults": st.refaults,
        }
        blocks = mm.pageblocks_per_type()
        return {
            "time_s": self.clock.now,
            "pool_pages": mm.pool.nr_pages,
            "free_pages": mm.buddy.free_pages,
            "buddyinfo": mm.free_blocks_per_order(),
            "score": mm.fragmentation_score(),
            "vmstat": dict(vm),
            "pageblocks": {mt.name.lower(): blocks[mt] for mt in MigrateType},
            "mixed_pageblocks": mm.mixed_pageblocks(),
            "pageblock_types": mm.pageblock_mt.astype(np.int64).tolist(),
            "pageblock_states": mm.pageblock_states().astype(np.int64).tolist(),
            "callbacks": vm.get("gem_migrate_callbacks", 0) + vm.get("gem_invalidate_callbacks", 0),
            "callback_p50_us": float(p50),
            "callback_p99_us": float(p99),
            "gpu": gpu,
            "pageblock_mixed": self._mixed_blocks().tolist(),
        }

    def _mixed_blocks(self) -> I64:
        p = self.mm.pool
        fl = p.flags.reshape(p.nr_pageblocks, -1)
        foreign = ((fl & PG_ALLOC) != 0) & (
            ((fl & PG_MT_MASK) >> PG_MT_SHIFT) != p.pageblock_mt[:, None]
        )
        return np.flatnonzero(foreign.any(axis=1)).astype(np.int64)

    def verify(self) -> int:
        seen = self.driver.gem.stats.data_errors
        bad = self.driver.verify_all()
        frames = self.mm.pool.frames
        for f in self._files.values():
            idx, pfns = f.resident()
            got = np.ascontiguousarray(frames[pfns, :8]).view(np.int64).reshape(-1)
            if not np.array_equal(got, _stamps(f.id, idx)):
                bad += 1
        return seen + bad

    def teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._objects.clear()
        self._files.clear()
        self.driver.gem.frames = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self.mm.close()


def _stamps(obj_id: int, idx: I64) -> I64:
    """What the first 8 bytes of each page of a page-cache file hold: (file id, page index)."""
    return (np.int64(obj_id) << np.int64(32)) | idx.astype(np.int64)
