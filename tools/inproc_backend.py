"""The in-process backend: the memory model, the driver's logic and kcompactd on one clock.

Everything runs in this process: :class:`gemfs.mm.MemoryManager` is the kernel,
:class:`driver.inproc.InprocDriver` is i915 (a simulated GPU; the mechanism asks it directly),
and :class:`gemfs.mm.kcompactd.Kcompactd` -- the same rules the compactor process runs -- wakes
on the modelled clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from driver.gem import DriverObject
from driver.inproc import InprocDriver
from gemfs.mm import GemObject, MemoryManager, OutOfMemory
from gemfs.mm.costs import CostTable
from gemfs.mm.kcompactd import Kcompactd, WakeSchedule
from gemfs.mm.page_alloc import drive, kcompactd_wake
from gemfs.mm.pool import I64
from gemfs.mm.trace import Sink, Tracer, task_of
from gemfs.mm.types import PAGE_SIZE, Design, MigrateType
from tools.backend import GpuSample, Handle, ProbeResult, Sample
from tools.workload import Workload


class InprocBackend:
    """:class:`tools.backend.Backend` on the model, in this process (``gemfs run --inproc``)."""

    name = "inproc"

    def __init__(self, workload: Workload, design: Design, *, content: bool = False) -> None:
        """``content``: frames of real bytes instead of content stamps (the same metrics;
        for tests that show it)."""
        self.design = design
        costs = CostTable.from_mapping(dict(workload.costs))
        self.mm = MemoryManager(
            workload.pool,
            design=design,
            costs=costs,
            content=content,
            movablecore=workload.movablecore,
            confine_granule=workload.confine_granule,
            ttm_pool=workload.ttm_pool,
        )
        self.clock = self.mm.clock
        self._cost_table = self.mm.costs.to_json()
        self.driver = InprocDriver(
            self.mm, design, workload.gem_migratetype, workload.driver_policy, workload.display_on
        )
        c = workload.compactor
        self.mm.compaction_proactiveness = c.proactiveness
        self.kcompactd = Kcompactd(
            self.mm.pool.nr_pageblocks, order=c.order, reserve=self.mm.defrag_reserve
        )
        self.schedule = WakeSchedule(c.interval_s)
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

    def execute(
        self,
        handles: Sequence[Handle],
        duration_s: float,
        write: bool,
        *,
        keep_s: float = 0.0,
        interval_s: float = 0.0,
    ) -> None:
        objs = [self._objects[h] for h in handles]
        self.driver.execute(objs, duration_s, write, keep=keep_s, interval=interval_s)

    def loop_tick(self) -> int:
        return self.driver.loop_tick()

    def page_cache(self, size: int) -> Handle:
        h = self._handle()
        # The rest of the system's page cache: no owner, plain shmem under every design.
        obj = self.mm.create_object(size, migratetype=MigrateType.MOVABLE, path=f"cache/{int(h)}")
        idx, pfns = obj.resident()
        _put_stamps(self.mm.pool.frames, pfns, _stamps(obj.id, idx))
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

    def probe(self, order: int, gfp: str = "thp") -> ProbeResult:
        a = self.mm.allocs
        compacted = a.compacted
        pfn = self.mm.allocate_huge(order, MigrateType.MOVABLE, kind=gfp)
        latency = a.last_latency_us
        if pfn is None:
            return False, latency, False
        self._probes.append(pfn)
        return True, latency, a.compacted > compacted

    def kswapd_sleep(self) -> None:
        self.mm.kswapd_sleep()

    def release_probes(self) -> None:
        for pfn in self._probes:
            self.mm.free_kernel(pfn)
        self._probes.clear()

    # -- compaction and time ----------------------------------------------------------------
    def compact(self) -> None:
        self.mm.compact()

    def advance(self, seconds: float) -> None:
        mm = self.mm
        end = self.clock.now + max(0.0, seconds)
        for at in self.schedule.due(self.clock.now, end):
            self.clock.advance_to(at)
            worked = drive(mm, kcompactd_wake(mm, self.kcompactd.order)) is not None
            for policy in self.kcompactd.wake(
                mm.free_blocks_per_order, mm.compaction_proactiveness, worked=worked
            ):
                policy.state = mm.compact_state
                mm.run_policy(policy)
            for k, v in self.kcompactd.take_counters().items():
                mm.vmstat.inc(k, v)
        self.clock.advance_to(end)

    # -- statistics -------------------------------------------------------------------------
    def sample(self, *, full: bool = True) -> Sample:
        mm = self.mm
        vm = mm.refresh_gauges()
        st = self.driver.gem.stats
        gpu: GpuSample = {
            "batches": st.batches,
            "stall_s": mm.ledger.gpu_stall_us / 1e6,
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
            "pageblock_types": mm.pageblock_mt.astype(np.int64).tolist() if full else [],
            "pageblock_states": mm.pageblock_states().astype(np.int64).tolist() if full else [],
            "callbacks": mm.ledger.callbacks,
            "callback_p50_us": 0.0,  # no wall-clock callbacks in process
            "callback_p99_us": 0.0,
            "gpu": gpu,
            "costs": mm.ledger.to_json(),
            "cost_table": self._cost_table,
            "pageblock_mixed": mm.mixed_pageblock_indices().tolist() if full else [],
        }

    def verify(self) -> int:
        seen = self.driver.gem.stats.data_errors
        bad = self.driver.verify_all()
        frames = self.mm.pool.frames
        for f in self._files.values():
            idx, pfns = f.resident()
            want = _stamps(f.id, idx)
            if frames.shape[1] == 1:
                want = _fold(want).astype(np.int64)
            if not np.array_equal(_get_stamps(frames, pfns), want):
                bad += 1
        return seen + bad

    def trace(self, seed: int, sink: Sink) -> None:
        """The model's tracepoints from now on, labelled for the run of ``seed``, to ``sink``."""
        mm = self.mm
        comm, pid = task_of(self.design, seed)
        tracer = Tracer(lambda: mm.clock.now, comm=comm, pid=pid, capacity=1)  # sink: all
        tracer.sinks.append(sink)
        mm.tracer = tracer

    def teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._objects.clear()
        self._files.clear()
        self.driver.gem.frames = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self.mm.close()


def _stamps(obj_id: int, idx: I64) -> I64:
    """What each page of a page-cache file holds: (file id, page index) in 64 bits (the first
    8 bytes of a byte frame; folded to 32 bits in a content-free frame's stamp)."""
    return (np.int64(obj_id) << np.int64(32)) | idx.astype(np.int64)


def _fold(stamps: I64) -> npt.NDArray[np.uint32]:
    # Page-cache stamps live in the top half of the 32-bit space (a GPU write's counter starts
    # at 1 and counts up), so a page of a file never equals a page a GPU wrote.
    u = stamps.astype(np.uint64)
    return ((u ^ (u >> np.uint64(32))) | np.uint64(1 << 31)).astype(np.uint32)


def _put_stamps(frames: npt.NDArray[Any], pfns: I64, stamps: I64) -> None:
    if frames.shape[1] == 1:
        frames[pfns, 0] = _fold(stamps)
    else:
        frames[pfns, :8] = stamps.view(np.uint8).reshape(-1, 8)


def _get_stamps(frames: npt.NDArray[Any], pfns: I64) -> I64:
    if frames.shape[1] == 1:
        out: I64 = frames[pfns, 0].astype(np.int64)
        return out
    return np.ascontiguousarray(frames[pfns, :8]).view(np.int64).reshape(-1)
