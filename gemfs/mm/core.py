"""The memory manager: pool + buddy allocator + objects + migration mechanism + compaction.

This is the typed facade everything above ``gemfs.mm`` talks to. It is pure (no I/O besides the
pool's memfd) and single-threaded: callers serialize access.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from gemfs.mm import page_alloc, region
from gemfs.mm.buddy import BuddyAllocator
from gemfs.mm.compaction import (
    Batch,
    CompactionPolicy,
    CompactResult,
    CompactStats,
    PoolView,
    ZoneCompactState,
)
from gemfs.mm.contig import ContigPolicy
from gemfs.mm.costs import Clock, CostTable, LatencySketch, Ledger, Task
from gemfs.mm.illuminator import PageblockCounts
from gemfs.mm.migrate import Answer, Ask, Migrated, Migration
from gemfs.mm.objects import GemObject
from gemfs.mm.ops import Owner, Results
from gemfs.mm.pins import PinRegistry
from gemfs.mm.pool import (
    I64,
    OWNER_KERNEL,
    PG_ALLOC,
    PG_FREE,
    PG_ISOLATED,
    PG_MT_MASK,
    PG_MT_SHIFT,
    PG_OBJECT,
    PG_TARGET,
    Bools,
    PagePool,
)
from gemfs.mm.trace import Tracer
from gemfs.mm.ttm import TtmPool, ttm_pool_pages
from gemfs.mm.types import (
    MAX_ORDER,
    NR_MIGRATETYPES,
    NR_ORDERS,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    Design,
    MigrateMode,
    MigrateType,
    ObjId,
    OutOfMemory,
)
from gemfs.mm.vmstat import (
    Vmstat,
    format_buddyinfo,
    format_extfrag_index,
    format_pagetypeinfo,
    format_unusable_index,
    format_vmstat,
    fragmentation_score,
    proactive_watermarks,
)

EAGAIN = errno.EAGAIN
EBUSY = errno.EBUSY
_MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14

ContentListener = Callable[[GemObject, int, int], None]
T = TypeVar("T")  # (object, first page, page count)


class ObjectError(Exception):
    """An operation on an object failed with an errno (ENOENT, EBUSY, ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(eq=False)
class MigrationRequest:
    """One object's share of a migration batch."""

    obj: GemObject
    sel: I64  # positions in the batch
    idx: I64  # page indices in the object
    src: I64
    dst: I64


@dataclass(eq=False)
class MigrationBatch:
    src: I64
    dst: I64
    mode: MigrateMode
    results: Results
    valid: Bools = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    requests: list[MigrationRequest] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MigrateOutcome:
    results: Results
    success: int
    eagain: int
    permanent: int


class Policy(Protocol):
    """What the mechanism drives: compaction (CompactionPolicy) or clearing a contiguous range
    (ContigPolicy). It proposes batches of (source, target) frames and is told the results."""

    mode: MigrateMode
    result: CompactResult
    stats: CompactStats

    def next_batch(self, view: PoolView) -> Batch | None: ...

    def batch_done(self, batch: Batch, results: npt.NDArray[np.int32]) -> None: ...


class SyncOwner(Owner, Protocol):
    """An owner the mechanism can ask directly (the in-process driver)."""

    def answer(self, ask: Ask) -> Answer: ...

    def migrated(self, notice: Migrated) -> None: ...


@dataclass
class AllocStats:
    """High-order allocations (huge-page faults, probes) and the modelled latency each saw."""

    attempts: int = 0
    successes: int = 0
    compacted: int = 0  # successes that needed direct compaction
    latency_us: LatencySketch = field(default_factory=LatencySketch)
    last_latency_us: float = 0.0


class MemoryManager:
    def __init__(
        self,
        size: int | str,
        *,
        design: Design | str = Design.SHMEM_HOOK,
        costs: CostTable | None = None,
        content: bool = True,
        movablecore: str | None = None,
        confine_granule: str | None = None,
        ttm_pool: str | None = None,
    ) -> None:
        """``movablecore``: longterm-pin's movable region (a size or a share of the pool);
        ``confine_granule``: the step confine's region grows and shrinks by (see
        :mod:`gemfs.mm.region` for both defaults); ``ttm_pool``: the pages pinned-ttm's page
        pools may hold (:func:`gemfs.mm.ttm.ttm_pool_pages`; default half of memory). Bad
        values: ValueError."""
        self.design = Design.parse(design) if isinstance(design, str) else design
        self.pool = PagePool(size, content=content)
        self.buddy = BuddyAllocator(self.pool)
        self.objects: dict[ObjId, GemObject] = {}
        self._next_id = 1
        # gemfs design: the driver's ops, for every object of the driver's on the mount
        self.mount_ops: Owner | None = None
        self.vmstat = Vmstat()
        self.compaction_proactiveness = 20
        self.extfrag_threshold = 500
        self.kernel_pages: dict[int, int] = {}  # pfn -> order of kernel (non-object) blocks
        self.clock = Clock()  # modelled time (seconds)
        self.costs = costs or CostTable()
        self.ledger = Ledger()
        self.pins = PinRegistry()
        self.allocs = AllocStats()
        self._task: Task | None = None  # the task a direct compaction is charged to
        # Gauges kept as things happen (a sample must not walk the pool): object frames,
        # pinned object frames, kernel frames. check() recounts them.
        self.nr_gem_pages = 0
        self.nr_gem_pinned = 0
        self.nr_kernel_pages = 0
        self.compact_state = ZoneCompactState(self.pool.nr_pageblocks)
        # pinned-ttm: the driver's objects get their pages through TTM's pools (page_pool_size
        # defaults to half of memory, ttm_pool_mgr_init(); "0": nothing pooled)
        self.ttm: TtmPool | None = None
        if self.design is Design.PINNED_TTM:
            try:
                limit = ttm_pool_pages(ttm_pool, self.pool.nr_pages)
            except ValueError:
                self.pool.close()
                raise
            self.ttm = TtmPool(self, limit=limit)
        self.watermarks = page_alloc.watermarks(self.pool.nr_pages)
        # defrag-mode (vm.defrag_mode, 6.15): no allocation takes part of another type's
        # pageblock until reclaim and compaction have had their turn; kcompactd keeps the high
        # watermark in whole free pageblocks (defrag_reserve)
        self.defrag_mode = self.design is Design.DEFRAG_MODE
        self.defrag_reserve = (
            -(-self.watermarks.high // PAGEBLOCK_NR_PAGES) if self.defrag_mode else 0
        )
        # illuminator: per-pageblock counts of pages compaction cannot move
        self.pb_counts: PageblockCounts | None = None
        if self.design is Design.ILLUMINATOR:
            self.pb_counts = PageblockCounts(self.pool.nr_pageblocks)
        # longterm-pin and confine: a fence in the buddy, moved pages at pin time (region.py)
        try:
            self.region = region.setup(self, movablecore, confine_granule)
        except ValueError:
            self.pool.close()
            raise

    @property
    def tracer(self) -> Tracer | None:
        """Where the model's tracepoints go (None: off); see gemfs.mm.trace."""
        return self.buddy.tracer

    @tracer.setter
    def tracer(self, tracer: Tracer | None) -> None:
        self.buddy.tracer = tracer

    def close(self) -> None:
        self.pool.close()

    def prefault(self) -> None:
        """Back every frame with memory now, as physical frames are.

        A fresh memfd page costs a page fault on first touch (file I/O into new frames then
        runs near 1 GB/s); a mount that serves I/O from the pool faults it all in at start.
        """
        m = self.pool._map
        if m is None:
            return
        try:
            m.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # kernel before 5.14: touch every frame instead
            self.pool.frames[:, 0] = self.pool.frames[:, 0]

    # -- objects ----------------------------------------------------------------------------
    def create_object(
        self,
        size: int = 0,
        *,
        migratetype: MigrateType | None = None,
        path: str = "",
        private: bool = False,
    ) -> GemObject:
        """A new object of ``size`` bytes, populated; ``private``: a driver's (GEM) object."""
        mt = self.design.gem_migratetype if migratetype is None else migratetype
        obj = GemObject(id=ObjId(self._next_id), migratetype=mt, path=path, private=private)
        self._next_id += 1
        self.objects[obj.id] = obj
        if size:
            try:
                self.truncate(obj, size)
                self.populate(obj, 0, obj.nr_pages)
            except OutOfMemory:
                self.destroy_object(obj)
                raise
        return obj

    def get(self, oid: int) -> GemObject:
        obj = self.objects.get(ObjId(oid))
        if obj is None:
            raise ObjectError(errno.ENOENT, f"no object {oid}")
        return obj

    def destroy_object(self, obj: GemObject) -> None:
        """Free every frame of the object (pins are dropped: the owner is gone)."""
        _idx, pfns = obj.resident()
        if len(pfns) and self.ttm is not None and obj.private:
            # TTM: the object's intact blocks go to the page pools, the rest to the buddy
            self._pins_gone(pfns)
            self.nr_gem_pages -= len(pfns)
            pooled = self.ttm.give_back(obj.id)
            rest = np.setdiff1d(pfns, pooled, assume_unique=True)
            if len(rest):
                self.pool.pin[rest] = 0
                self.buddy.free_pfns(rest)
                self.vmstat.inc("pgfree", len(rest))
        elif len(pfns):
            self._release_frames(pfns)
        obj.pages = np.empty(0, dtype=np.int64)
        obj.size = 0
        self.objects.pop(obj.id, None)
        self.pins.drop_object(obj.id)

    def _pins_gone(self, pfns: I64) -> None:
        """These object frames are being freed with whatever pins they had."""
        pinned = pfns[self.pool.pin[pfns] > 0]
        self.nr_gem_pinned -= len(pinned)
        if self.pb_counts is not None:
            self.pb_counts.pins(pinned, -1)

    def _release_frames(self, pfns: I64) -> None:
        self._pins_gone(pfns)
        self.nr_gem_pages -= len(pfns)
        if self.tracer is not None:
            self.tracer.page_free_run(pfns.tolist())
        self.pool.pin[pfns] = 0
        self.buddy.free_pfns(pfns)
        self.vmstat.inc("pgfree", len(pfns))
        if self.region is not None and len(pfns):
            region.confine_maybe_shrink(self, int(pfns.min()), int(pfns.max()) + 1)

    def current_task(self) -> Task:
        """The task costs go to now: the allocating task inside an allocation, else a new one."""
        return self._task or Task(self.clock.now)

    def populate(self, obj: GemObject, start: int, count: int, *, zero: bool = True) -> I64:
        """Give pages [start, start+count) frames (zeroed) where they have none; return frames.

        ``zero=False`` skips clearing the new frames: for a caller that overwrites them whole.
        Pages past the largest file (``s_maxbytes``) are refused with EFBIG.
        """
        end = start + count
        if start < 0 or count < 0:
            raise ObjectError(errno.EINVAL, "negative page range")
        if end * PAGE_SIZE > self.pool.s_maxbytes:
            raise ObjectError(errno.EFBIG, "past the largest file size of this pool")
        if end > len(obj.pages):
            _grow_page_table(obj, end)
        seg = obj.pages[start:end]
        holes = np.flatnonzero(seg < 0)
        if len(holes):
            if self.ttm is not None and obj.private:
                pfns = self.ttm.alloc(obj.id, len(holes))  # counts its own pgalloc
            else:
                pfns = self._alloc_bulk(len(holes), obj.migratetype)
                self.vmstat.inc("pgalloc", len(pfns))
            self.kswapd_shrink()
            p = self.pool
            if zero:
                p.frames[pfns] = 0
            p.flags[pfns] |= PG_OBJECT
            self.nr_gem_pages += len(pfns)
            p.owner[pfns] = obj.id
            p.index[pfns] = holes + start
            seg[holes] = pfns
            obj.pages[start:end] = seg
        return seg

    def _alloc_bulk(self, nr_pages: int, mt: MigrateType) -> I64:
        """Order-0 pages from the buddy; when it has too few, reclaim (the shrinkers) once.
        Under confine a non-movable request that finds the region full grows it first."""
        if self.region is not None and self.region.confine and mt != MigrateType.MOVABLE:
            return self._confined(lambda: self.buddy.alloc_bulk(nr_pages, mt))
        if self.defrag_mode:
            return self._defrag_alloc(lambda nf: self.buddy.alloc_bulk(nr_pages, mt, nofragment=nf))
        try:
            return self.buddy.alloc_bulk(nr_pages, mt)
        except OutOfMemory:
            if self.shrink_slab(nr_pages - self.buddy.free_pages) == 0:
                raise
        return self.buddy.alloc_bulk(nr_pages, mt)

    def _confined(self, alloc: Callable[[], T]) -> T:
        """confine: a non-movable allocation; while the region is full, grow it."""
        while True:
            try:
                return alloc()
            except OutOfMemory:
                if not region.confine_grow(self):
                    raise

    def _defrag_alloc(self, alloc: Callable[[bool], T]) -> T:
        """vm.defrag_mode's slow path for a request below pageblock order: ALLOC_NOFRAGMENT
        first (a whole free pageblock of another type may be claimed, none split); when that
        fails, reclaim (the shrinkers) and direct compaction for a free pageblock (SYNC_LIGHT,
        the zone's deferral and suitability rules) have their turn; only then the request
        falls back as without defrag_mode ("reclaim/compaction failed to prevent the
        fallback", counted in defrag_mode_fallback)."""
        try:
            return alloc(True)
        except OutOfMemory:
            pass
        self.shrink_slab(page_alloc.compact_gap(PAGEBLOCK_ORDER))
        self.vmstat.inc("defrag_mode_compact")
        compacting = page_alloc.try_to_compact_pages(
            self, PAGEBLOCK_ORDER, MigrateType.MOVABLE, page_alloc.DEF_COMPACT_PRIORITY
        )
        try:
            policy = next(compacting)
            while True:
                policy = compacting.send(self.run_policy(policy))
        except StopIteration:
            pass
        try:
            return alloc(True)
        except OutOfMemory:
            self.vmstat.inc("defrag_mode_fallback")
        return alloc(False)

    def kswapd_shrink(self) -> int:
        """Memory pressure without a failure: below the low watermark kswapd wakes and
        reclaims up to the high one (the model's only reclaimable memory is the shrinkers'),
        then goes back to sleep: kswapd_try_to_sleep() flushes the skip hints if a direct
        compaction's scanners met since (reset_isolation_suitable)."""
        free, wm = self.buddy.free_pages, self.watermarks
        if free >= wm.low:
            return 0
        freed = self.shrink_slab(wm.high - free)
        self.kswapd_sleep()
        return freed

    def kswapd_sleep(self) -> bool:
        """kswapd goes back to sleep after reclaiming (kswapd_try_to_sleep()): the skip hints
        are flushed if a direct compaction's scanners met since (reset_isolation_suitable);
        True if they were (counted in the state's ``skip_resets``). It wakes kcompactd for
        order work only after a high-order wake-up (gemfs.mm.page_alloc.wake_all_kswapds)."""
        return self.compact_state.reset_isolation_suitable(self)

    def shrink_slab(self, nr_pages: int) -> int:
        """Reclaim's call to the shrinkers (shrink_slab()): ask them to free at least
        ``nr_pages`` pages; the pages freed. The only shrinker modelled is TTM's page pool."""
        if self.ttm is None or nr_pages <= 0:
            return 0
        return self.ttm.shrink(nr_pages)

    def truncate(self, obj: GemObject, size: int) -> None:
        """Set the file size; shrinking frees the frames past the end (pinned: EBUSY).

        Beyond the largest file (``pool.s_maxbytes``): EFBIG, as truncate(2)."""
        if size < 0:
            raise ObjectError(errno.EINVAL, "negative size")
        if size > self.pool.s_maxbytes:
            raise ObjectError(errno.EFBIG, "larger than the largest file size of this pool")
        npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        if npages < len(obj.pages):
            idx, pfns = obj.resident()
            res = pfns[idx >= npages]
            if len(res) and np.any(self.pool.pin[res] > 0):
                raise ObjectError(errno.EBUSY, "pages past the new end are pinned")
            if len(res) and np.any(self.pool.flags[res] & PG_ISOLATED):
                raise ObjectError(errno.EAGAIN, "pages past the new end are being migrated")
            if len(res):
                self._release_frames(res)
            obj.pages.resize(npages)
        if self.pool.content and size % PAGE_SIZE and npages <= len(obj.pages) and npages > 0:
            last = int(obj.pages[npages - 1])
            if last >= 0:  # zero the tail of the last page so a later grow reads zeros
                self.pool.frames[last, size % PAGE_SIZE :] = 0
        obj.size = size

    def read(self, obj: GemObject, offset: int, length: int) -> bytes:
        return self.read_view(obj, offset, length).tobytes()

    def read_view(self, obj: GemObject, offset: int, length: int) -> npt.NDArray[np.uint8]:
        """The bytes of read(), as a flat uint8 array, without copying when it can.

        When the range lies in one run of consecutive resident frames the result is a view
        into the pool (valid until the model next changes: consume it at once); otherwise the
        frames are gathered into a new array, holes reading as zeros.
        """
        if offset >= obj.size or length <= 0:
            return np.empty(0, dtype=np.uint8)
        end = min(obj.size, offset + length)
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        lo = offset - first * PAGE_SIZE
        n = end - offset
        count = last - first + 1
        pt = obj.pages[first : last + 1]
        frames = self.pool.data
        if len(pt) < count:  # past the page table (grown by truncate): holes
            pt = np.concatenate((pt, np.full(count - len(pt), -1, dtype=np.int64)))
        elif pt[0] >= 0 and pt[-1] - pt[0] == count - 1:
            head = int(pt[0])
            run = np.arange(head, head + count, dtype=np.int64)
            if pt.tobytes() == run.tobytes():  # one run of frames (bytes compare: fastest)
                return frames[head : head + count].reshape(-1)[lo : lo + n]
        if pt.min() >= 0:
            buf = frames[pt]
        else:
            buf = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
            have = pt >= 0
            buf[have] = frames[pt[have]]
        return buf.reshape(-1)[lo : lo + n]

    def write(self, obj: GemObject, offset: int, data: bytes | memoryview) -> int:
        """Write bytes, growing the file; ENOSPC (OutOfMemory) leaves the object unchanged.

        Like write(2) at the file size limit: what lies past ``s_maxbytes`` is cut off (a short
        write), and a write that starts there fails with EFBIG."""
        limit = self.pool.s_maxbytes
        if offset < 0:
            raise ObjectError(errno.EINVAL, "negative offset")
        if len(data) and offset >= limit:
            raise ObjectError(errno.EFBIG, "past the largest file size of this pool")
        if offset + len(data) > limit:
            data = memoryview(data)[: limit - offset]
        n = len(data)
        if n == 0:
            return 0
        end = offset + n
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        lo = offset - first * PAGE_SIZE
        old_len = len(obj.pages)
        # Only the first and the last page can be partly written: a new frame there must be
        # cleared; frames the write covers whole need no zeroing first.
        partial = ([first] if lo else []) + ([last] if end % PAGE_SIZE else [])
        fresh = {i for i in partial if i >= old_len or obj.pages[i] < 0}
        try:
            pt = self.populate(obj, first, last - first + 1, zero=False)
        except OutOfMemory:
            if len(obj.pages) > old_len:
                obj.pages.resize(old_len)
            raise
        frames = self.pool.data
        for i in fresh:
            frames[pt[i - first]] = 0
        src = np.frombuffer(data, dtype=np.uint8)
        if lo == 0 and n % PAGE_SIZE == 0:
            frames[pt] = src.reshape(-1, PAGE_SIZE)
        else:
            # Whole pages in one vectorized step; the partial head and tail page by slice.
            head = min(n, PAGE_SIZE - lo) if lo else 0
            if head:
                frames[pt[0], lo : lo + head] = src[:head]
            mid = (n - head) // PAGE_SIZE
            if mid:
                body = src[head : head + mid * PAGE_SIZE].reshape(mid, PAGE_SIZE)
                frames[pt[1 if head else 0 :][:mid]] = body
            rest = n - head - mid * PAGE_SIZE
            if rest:
                frames[pt[-1], :rest] = src[n - rest :]
        if end > obj.size:
            obj.size = end
        return n

    # -- pins -------------------------------------------------------------------------------
    def pin(self, obj: GemObject, start: int, count: int) -> I64:
        """Pin pages [start, start+count) (allocating missing ones); returns their frames."""
        pfns = self.populate(obj, start, count)
        if self.region is not None:  # move-then-pin, as hold()
            region.pin_migrate(self, obj, start, np.ones(len(pfns), dtype=np.bool_))
            pfns = obj.pages[start : start + count]
        self.pin_pages(pfns)
        return pfns

    def unpin(self, obj: GemObject, start: int, count: int) -> None:
        seg = obj.pages[start : start + count]
        self.unpin_pages(seg[seg >= 0])

    def pin_pages(self, pfns: I64) -> None:
        if len(pfns) == 0:
            return
        pin = self.pool.pin
        u = np.unique(pfns)
        fresh = u[pin[u] == 0]
        self.nr_gem_pinned += len(fresh)
        if self.pb_counts is not None:
            self.pb_counts.pins(fresh, 1)
        np.add.at(pin, pfns, 1)

    def unpin_pages(self, pfns: I64) -> None:
        if len(pfns) == 0:
            return
        pin = self.pool.pin
        if np.any(pin[pfns] == 0):
            raise ObjectError(errno.EINVAL, "unpin of a page that is not pinned")
        np.subtract.at(pin, pfns, 1)
        u = np.unique(pfns)
        gone = u[pin[u] == 0]
        self.nr_gem_pinned -= len(gone)
        if self.pb_counts is not None:
            self.pb_counts.pins(gone, -1)

    def pinned_pages(self, obj: GemObject) -> int:
        _, pfns = obj.resident()
        return int(np.count_nonzero(self.pool.pin[pfns]))

    # -- an owner's pins (the registry both backends pin through) -----------------------------
    def hold(self, owner: object, obj: GemObject, start: int, count: int) -> I64:
        """The owner pins pages [start, start+count) (allocating missing ones); their frames.

        Pages the owner already holds are not pinned twice. Pages an invalidation took from it
        come back as a re-fault: counted, and charged (re-pin and re-fault) as GPU stall.
        Pages mid-migration are refused with EAGAIN: no pin on a range being moved.
        """
        end = start + count
        seg = obj.pages[start:end]
        res = seg[seg >= 0]
        if len(res) and np.any(self.pool.flags[res] & PG_ISOLATED):
            raise ObjectError(errno.EAGAIN, "pages of the range are being migrated")
        pfns = self.populate(obj, start, count)
        h = self.pins.holds(owner, obj.id, max(end, len(obj.pages)))
        new = ~h.held[start:end]
        if self.region is not None:  # move-then-pin (FOLL_LONGTERM): out of the movable part
            region.pin_migrate(self, obj, start, new)
            pfns = obj.pages[start:end]
        self.pin_pages(pfns[new])
        h.held[start:end] = True
        back = new & h.invalidated[start:end]
        n = int(np.count_nonzero(back))
        if n:
            h.invalidated[start:end][back] = False
            c = self.costs
            us = c.pin_call_us + (c.pin_page_us + c.refault_page_us + c.gtt_pte_us) * n
            led = self.ledger
            led.refaulted_pages += n
            led.repinned_pages += n
            led.migration_us += us
            led.gpu_stall_us += us
        return pfns

    def release(self, owner: object, obj: GemObject, start: int, count: int) -> None:
        """The owner unpins pages [start, start+count) it holds."""
        h = self.pins.objects_of(owner).get(obj.id)
        if h is None:
            return
        seg = h.held[start : start + count]
        n = min(len(seg), max(0, len(obj.pages) - start))
        pfns = obj.pages[start : start + n][seg[:n]]
        self.unpin_pages(pfns[pfns >= 0])
        seg[:] = False

    def drop_holds(self, owner: object, obj: GemObject, start: int, count: int) -> int:
        """An invalidation: the owner's pins in the range go (remembered for the re-fault)."""
        h = self.pins.objects_of(owner).get(obj.id)
        if h is None:
            return 0
        h.grow(start + count)
        seg = h.held[start : start + count]
        n = min(len(seg), max(0, len(obj.pages) - start))
        pfns = obj.pages[start : start + n][seg[:n]]
        pfns = pfns[pfns >= 0]
        self.unpin_pages(pfns)
        h.invalidated[start : start + count] |= seg
        seg[:] = False
        return len(pfns)

    def release_owner(self, owner: object) -> None:
        """An owner went away: every pin it held is released."""
        for oid, h in self.pins.drop_owner(owner).items():
            obj = self.objects.get(ObjId(oid))
            if obj is None:
                continue
            n = min(len(h.held), len(obj.pages))
            pfns = obj.pages[:n][h.held[:n]]
            self.unpin_pages(pfns[pfns >= 0])

    # -- kernel allocations (noise, high-order probes) ----------------------------------------
    def alloc_kernel(self, order: int, mt: MigrateType) -> int:
        if self.defrag_mode and order < PAGEBLOCK_ORDER:
            pfn = self._defrag_alloc(lambda nf: self.buddy.alloc(order, mt, nofragment=nf))
        elif self.region is not None and self.region.confine and mt != MigrateType.MOVABLE:
            pfn = self._confined(lambda: self.buddy.alloc(order, mt))
        else:
            pfn = self.buddy.alloc(order, mt)
        self.pool.owner[pfn : pfn + (1 << order)] = OWNER_KERNEL
        self.kernel_pages[pfn] = order
        self.nr_kernel_pages += 1 << order
        if self.pb_counts is not None:
            self.pb_counts.kernel(pfn, 1 << order, 1)
        self.vmstat.inc("pgalloc", 1 << order)
        self.kswapd_shrink()
        return pfn

    def free_kernel(self, pfn: int) -> None:
        order = self.kernel_pages.pop(pfn)
        self.nr_kernel_pages -= 1 << order
        if self.pb_counts is not None:
            self.pb_counts.kernel(pfn, 1 << order, -1)
        if self.tracer is not None:
            self.tracer.mm_page_free(pfn, order)
        self.buddy.free_pfns(np.arange(pfn, pfn + (1 << order), dtype=np.int64))
        self.vmstat.inc("pgfree", 1 << order)
        if self.region is not None:
            region.confine_maybe_shrink(self, pfn, pfn + (1 << order))

    # -- migration mechanism ----------------------------------------------------------------
    def owner_of(self, obj: GemObject) -> tuple[Owner | None, bool]:
        """Who must be asked before the object's pages move: (owner, is a notifier).

        (None, False): nobody -- plain shmem, pinned pages are refused. The mount-wide ops of
        the gemfs design belong to the driver's own objects only; the rest of the system's
        page cache keeps plain shmem ops under every design.
        """
        if obj.notifier is not None:
            return obj.notifier, True
        if obj.ops is not None:
            return obj.ops, False
        if self.mount_ops is not None and obj.private:
            return self.mount_ops, False
        return None, False

    def migrate_folio(self, obj: GemObject, idx: I64, src: I64, dst: I64) -> Results:
        """Copy and remap (migrate_folio): the library step an owner's migrate calls.

        Pinned source pages are refused with -EAGAIN: the core never moves a pinned frame.
        """
        p = self.pool
        res = np.zeros(len(src), dtype=np.int32)
        if len(src) == 0:
            return res
        inside = idx < len(obj.pages)
        mapped = np.zeros(len(idx), dtype=np.bool_)
        mapped[inside] = obj.pages[idx[inside]] == src[inside]
        stale = ~mapped | ((p.flags[dst] & PG_TARGET) == 0)
        pinned = p.pin[src] > 0
        res[pinned] = -EAGAIN
        res[stale & ~pinned] = -EBUSY
        ok = res == 0
        s, d, i = src[ok], dst[ok], idx[ok]
        if len(s):
            p.touch_pfns(s)
            p.touch_pfns(d)
            p.frames[d] = p.frames[s]
            mtbits = int(obj.migratetype) << PG_MT_SHIFT
            p.flags[d] = PG_ALLOC | PG_OBJECT | PG_ISOLATED | mtbits
            p.owner[d] = obj.id
            p.index[d] = i
            p.pin[d] = 0
            obj.pages[i] = d
            # The old frame is now an orphan the mechanism frees once the batch is over.
            p.owner[s] = OWNER_KERNEL
            p.flags[s] = PG_ALLOC | PG_ISOLATED
        return res

    def migrate_pages(
        self,
        src: I64,
        dst: I64,
        mode: MigrateMode = MigrateMode.SYNC,
        task: Task | None = None,
    ) -> MigrateOutcome:
        """Move src[i] -> dst[i] for object pages, asking each page's owner first.

        The mechanism of :mod:`gemfs.mm.migrate`, driven synchronously: owners here are
        in-process (:class:`SyncOwner`); an owner that cannot be asked directly (a driver
        over a socket, reachable only by the control server) keeps its pages where they are.
        Per page: 0 moved, -EAGAIN (owner busy, retry later), -EBUSY (frame no longer
        suitable), other -errno (permanent). Nothing is ever lost.
        """
        m = Migration(self, src, dst, mode, task or self._task or Task(self.clock.now))
        for ask in m.start():
            owner = ask.owner
            answer = getattr(owner, "answer", None)
            if answer is None:
                m.answer(ask, Answer.failure("unreachable"))
                continue
            notice = m.answer(ask, answer(ask))
            if notice is not None:
                owner.migrated(notice)  # type: ignore[attr-defined]
        return m.finish()

    def migrate_begin(self, src: I64, dst: I64, mode: MigrateMode) -> MigrationBatch:
        """Validate a batch, isolate its targets and split it by owner object.

        :class:`gemfs.mm.migrate.Migration` runs the requests (asking their owners) and then
        calls :meth:`migrate_end`.
        """
        p = self.pool
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if src.shape != dst.shape or src.ndim != 1:
            raise ValueError("src and dst must be 1-d and of the same length")
        n = len(src)
        res = np.full(n, -EBUSY, dtype=np.int32)
        batch = MigrationBatch(src, dst, mode, res)
        if n == 0:
            return batch
        inrange = (src >= 0) & (src < p.nr_pages) & (dst >= 0) & (dst < p.nr_pages)
        s_c, d_c = np.clip(src, 0, p.nr_pages - 1), np.clip(dst, 0, p.nr_pages - 1)
        want = PG_ALLOC | PG_OBJECT
        src_ok = inrange & ((p.flags[s_c] & (want | PG_ISOLATED)) == want)
        dst_ok = inrange & ((p.flags[d_c] & (PG_FREE | PG_TARGET)) == PG_FREE)
        self.vmstat.inc("pgmigrate_stale_src", int(np.count_nonzero(~src_ok)))
        self.vmstat.inc("pgmigrate_stale_dst", int(np.count_nonzero(src_ok & ~dst_ok)))
        if self.region is not None:  # above the fence only MOVABLE pages may live
            movable = (p.flags[s_c] & PG_MT_MASK) == (int(MigrateType.MOVABLE) << PG_MT_SHIFT)
            zone_ok = (d_c < self.buddy.fence) | movable
            self.vmstat.inc("pgmigrate_wrong_zone", int(np.count_nonzero(src_ok & ~zone_ok)))
            dst_ok &= zone_ok
        valid = src_ok & dst_ok & _first_occurrence(s_c) & _first_occurrence(d_c)
        self.buddy.isolate_free(dst[valid])
        self.vmstat.inc("compact_isolated", int(np.count_nonzero(valid)))
        batch.valid = valid
        positions = np.flatnonzero(valid)
        owners = p.owner[src[positions]]
        for oid in np.unique(owners).tolist():
            sel = positions[owners == oid]
            obj = self.objects[ObjId(oid)]
            ssel = src[sel]
            idx = p.index[ssel].astype(np.int64)
            batch.requests.append(MigrationRequest(obj, sel, idx, ssel, dst[sel]))
        return batch

    def narrow_request(self, req: MigrationRequest) -> tuple[MigrationRequest, Bools]:
        """The part of a request still valid now (an earlier request of the batch may have
        awaited an owner while the file was truncated or removed): (live part, live mask)."""
        obj = req.obj
        if self.objects.get(obj.id) is not obj:
            live = np.zeros(len(req.src), dtype=np.bool_)
        else:
            inside = req.idx < len(obj.pages)
            live = inside.copy()
            live[inside] = obj.pages[req.idx[inside]] == req.src[inside]
            live &= (self.pool.flags[req.src] & PG_ISOLATED) == 0
        if np.all(live):
            return req, live
        part = MigrationRequest(obj, req.sel[live], req.idx[live], req.src[live], req.dst[live])
        return part, live

    def migrate_end(self, batch: MigrationBatch) -> MigrateOutcome:
        """Free the old frames of moved pages, release unused targets, count."""
        p = self.pool
        res, src, dst, valid = batch.results, batch.src, batch.dst, batch.valid
        n = len(src)
        if n == 0:
            return MigrateOutcome(res, 0, 0, 0)
        moved = valid & (res == 0)
        unused = dst[valid & ~moved]
        if len(unused):
            self.buddy.release_targets(unused)
        old = src[moved]
        if self.tracer is not None:
            self.tracer.page_free_run(old.tolist())
        if len(old):
            p.flags[old] = PG_ALLOC
            self.buddy.free_pfns(old)
        p.flags[dst[moved]] &= ~np.uint8(PG_ISOLATED)
        success = int(np.count_nonzero(moved))
        eagain = int(np.count_nonzero(res == -EAGAIN))
        permanent = int(np.count_nonzero((res != 0) & (res != -EAGAIN) & (res != -EBUSY)))
        v = self.vmstat
        v.inc("pgmigrate_success", success)
        # Like Linux, only pages that were isolated and did not move count as failures; a
        # page freed (or a target taken) before we got to it is counted as stale instead.
        v.inc("pgmigrate_fail", int(np.count_nonzero(valid)) - success)
        v.inc("pgmigrate_eagain", eagain)
        v.inc("pgmigrate_permanent", permanent)
        if self.tracer is not None:
            self.tracer.migrate_batch(success, int(np.count_nonzero(valid)) - success, batch.mode)
        return MigrateOutcome(res, success, eagain, permanent)

    # -- compaction -------------------------------------------------------------------------
    def free_blocks_per_order(self) -> list[int]:
        return self.buddy.free_blocks_per_order()

    def hopeless_pageblocks(self) -> npt.NDArray[np.bool_] | None:
        """illuminator: the pageblocks compaction passes over (None under other designs)."""
        return self.pb_counts.hopeless() if self.pb_counts is not None else None

    @property
    def flags(self) -> npt.NDArray[np.uint8]:
        return self.pool.flags

    @property
    def pageblock_mt(self) -> npt.NDArray[np.uint8]:
        return self.pool.pageblock_mt

    def run_policy(self, policy: Policy, task: Task | None = None) -> CompactResult:
        """Drive a compaction policy against this pool's own mechanism (in-process)."""
        for _ in self.iter_policy(policy, task):
            pass
        return policy.result

    def iter_policy(self, policy: Policy, task: Task | None = None) -> Iterator[Batch]:
        """Like run_policy, yielding after each batch so an event loop can interleave.

        Costs (scanning, migration, waits) go to ``task``: the allocating task inside a
        direct compaction, else a task of its own starting now (kcompactd, compact_memory).
        """
        task = task or self._task or Task(self.clock.now)
        scanned = 0
        self.policy_started(policy)
        while (batch := policy.next_batch(self)) is not None:
            scanned = self.charge_scan(policy.stats, scanned, task)
            out = self.migrate_pages(batch.src, batch.dst, policy.mode, task)
            policy.batch_done(batch, out.results)
            yield batch
        self.policy_finished(policy, scanned, task)

    def policy_started(self, policy: Policy) -> None:
        """Whoever drives a policy (in process, the control server) calls this first..."""
        if self.tracer is not None and isinstance(policy, CompactionPolicy):
            self.tracer.compaction_begin(policy, self.pool.nr_pages)

    def policy_finished(self, policy: Policy, scanned: int, task: Task) -> None:
        """...and this last: the scanning not yet charged, the counters, the tracepoint."""
        self.charge_scan(policy.stats, scanned, task)
        self._account_compaction(policy.stats)
        if self.tracer is not None and isinstance(policy, CompactionPolicy):
            self.tracer.compaction_end(policy, self.pool.nr_pages)

    def charge_scan(self, stats: CompactStats, already: int, task: Task) -> int:
        """Charge the pages the scanners looked at since ``already``; the new total."""
        total = stats.migrate_scanned + stats.free_scanned
        n = total - already
        if n > 0:
            us = n * self.costs.scan_page_us
            self.ledger.scanned_pages += n
            self.ledger.scan_us += us
            task.charge(us)
        return total

    def charge_scan_pages(self, n: int, task: Task | None = None) -> None:
        """Scanning reported by a compactor process (its own task: it does not move the clock)."""
        us = n * self.costs.scan_page_us
        self.ledger.scanned_pages += n
        self.ledger.scan_us += us
        if task is not None:
            task.charge(us)

    def _account_compaction(self, stats: CompactStats) -> None:
        self.vmstat.inc("compact_migrate_scanned", stats.migrate_scanned)
        self.vmstat.inc("compact_free_scanned", stats.free_scanned)

    def compact_policy(
        self, order: int = -1, mode: MigrateMode = MigrateMode.SYNC
    ) -> CompactionPolicy:
        """The policy of an explicit compaction (compact_memory for order -1), for whoever
        drives it: in process, the control server, the mount's .gemfs/compact_memory."""
        state = self.compact_state if order < 0 else None
        return CompactionPolicy(
            self.pool.nr_pageblocks, order=order, mode=mode, state=state, ignore_skip_hint=True
        )

    def compact(self, order: int = -1, mode: MigrateMode = MigrateMode.SYNC) -> CompactResult:
        """compact_memory (order -1, whole pool) or compaction for one order.

        compact_memory is compact_node(): the whole zone, skip hints ignored (it still sets them
        and moves the cached scanners, as the kernel's does)."""
        policy = self.compact_policy(order, mode)
        if order >= 0:
            self.vmstat.inc("compact_stall")
        result = self.run_policy(policy)
        if order >= 0:
            ok = self.buddy.has_free_block(order)
            self.vmstat.inc("compact_success" if ok else "compact_fail")
        return result

    def should_proactive_compact(self, proactiveness: int | None = None) -> bool:
        p = self.compaction_proactiveness if proactiveness is None else proactiveness
        if p <= 0:
            return False
        _, high = proactive_watermarks(p)
        return self.fragmentation_score() > high

    def proactive_policy(self, proactiveness: int | None = None) -> CompactionPolicy:
        p = self.compaction_proactiveness if proactiveness is None else proactiveness
        return CompactionPolicy(
            self.pool.nr_pageblocks, mode=MigrateMode.SYNC_LIGHT, proactiveness=p
        )

    def alloc_high_order(
        self, order: int, mt: MigrateType = MigrateType.MOVABLE, *, kind: str = "thp"
    ) -> int | None:
        """A high-order allocation through the slow path (direct compaction as the kernel's
        allocator does it for ``kind``: thp, hugetlb or kernel); None when it fails."""
        return page_alloc.drive(self, page_alloc.alloc_pages_slowpath(self, order, mt, kind))

    def begin_alloc(self) -> Task:
        """Start timing a high-order allocation: direct compaction inside it charges this task."""
        task = Task(self.clock.now)
        self._task = task
        return task

    def end_alloc(
        self, task: Task, pfn: int | None, compacted_before: int, moved: bool | None = None
    ) -> float:
        """Finish timing: record the attempt and its modelled latency (µs); the clock moves on
        by what the allocating task waited. ``compacted_before``: compact_stall before;
        ``moved``: for a contiguous range, whether pages had to be moved out of it."""
        self._task = None
        a = self.allocs
        a.attempts += 1
        us = self.costs.alloc_fast_us + task.us
        a.latency_us.add(us)
        a.last_latency_us = us
        if pfn is not None:
            a.successes += 1
            if moved if moved is not None else self.vmstat["compact_stall"] > compacted_before:
                a.compacted += 1
        self.clock.advance_to(task.t + self.costs.alloc_fast_us / 1e6)
        return us

    def allocate_huge(
        self, order: int, mt: MigrateType = MigrateType.MOVABLE, *, kind: str = "thp"
    ) -> int | None:
        """A high-order allocation as a task sees it (a THP fault, a probe): timed, counted.
        ``kind``: the slow path's rules (gemfs.mm.page_alloc.AllocKind)."""
        task = self.begin_alloc()
        stalls = self.vmstat["compact_stall"]
        pfn: int | None = None
        moved: bool | None = None
        try:
            if order > MAX_ORDER:  # larger than a buddy block: alloc_contig_pages
                policy = ContigPolicy(self.pool.nr_pages, order, unaskable=self.unaskable_pins())
                pfn = self.alloc_contig(policy, self.run_policy(policy, task))
                moved = policy.stats.migrated > 0
            else:
                pfn = self.alloc_high_order(order, mt, kind=kind)
        finally:
            self.end_alloc(task, pfn, stalls, moved)
        return pfn

    def unaskable_pins(self) -> I64:
        """Frames pinned with nobody to ask to let go (no owner registered for the object)."""
        p = self.pool
        pinned = np.flatnonzero(p.pin).astype(np.int64)
        if len(pinned) == 0:
            return pinned
        owners = p.owner[pinned].astype(np.int64)
        askable = np.zeros(self._next_id + 1, dtype=np.bool_)  # by object id
        for oid, obj in self.objects.items():
            askable[oid] = self.owner_of(obj)[0] is not None  # its owner may unpin on request
        ok = (owners > 0) & (owners < len(askable))
        keep = np.ones(len(pinned), dtype=np.bool_)
        keep[ok] = ~askable[owners[ok]]
        return pinned[keep]

    def alloc_contig(self, policy: ContigPolicy, result: CompactResult) -> int | None:
        """Take the range a :class:`ContigPolicy` cleared (None if it found none, or the range
        is no longer all free): a kernel allocation of ``2**order`` frames."""
        v = self.vmstat
        v.inc("contig_range_hopeless", policy.ranges_hopeless)
        start, n = policy.start, policy.size
        fl = self.pool.flags[start : start + n] if start >= 0 else None
        if result is not CompactResult.SUCCESS or fl is None or not np.all(fl & PG_FREE):
            v.inc("contig_alloc_fail")
            return None
        pfns = np.arange(start, start + n, dtype=np.int64)
        self.buddy.isolate_free(pfns)
        p = self.pool
        p.flags[start : start + n] = PG_ALLOC | (int(MigrateType.MOVABLE) << PG_MT_SHIFT)
        p.owner[start : start + n] = OWNER_KERNEL
        p.touch(start, n)
        self.kernel_pages[start] = policy.order
        self.nr_kernel_pages += n
        if self.pb_counts is not None:
            self.pb_counts.kernel(start, n, 1)
        v.inc("pgalloc", n)
        v.inc("contig_alloc_success")
        return start

    # -- statistics -------------------------------------------------------------------------
    def fragmentation_score(self) -> int:
        return fragmentation_score(self.free_blocks_per_order())

    def free_per_type_order(self) -> list[list[int]]:
        return [[self.buddy.nr_free[o][mt] for o in range(NR_ORDERS)] for mt in MigrateType]

    def pageblocks_per_type(self) -> list[int]:
        counts = np.bincount(self.pool.pageblock_mt, minlength=NR_MIGRATETYPES)
        return [int(c) for c in counts[:NR_MIGRATETYPES]]

    def mixed_pageblocks(self) -> int:
        """Pageblocks holding allocated pages of a type other than the block's own."""
        self.pool.refresh_pageblocks()
        return int(np.count_nonzero(self.pool.pb_mixed))

    def mixed_pageblock_indices(self) -> I64:
        """The mixed pageblocks themselves (for the pool map)."""
        self.pool.refresh_pageblocks()
        return np.flatnonzero(self.pool.pb_mixed).astype(np.int64)

    def pageblock_states(self) -> npt.NDArray[np.uint8]:
        """Per pageblock: 0 free, 1 partly used, 2 full; for the pool map plot."""
        p = self.pool
        p.refresh_pageblocks()
        out = np.ones(p.nr_pageblocks, dtype=np.uint8)
        out[p.pb_nfree == PAGEBLOCK_NR_PAGES] = 0
        out[p.pb_nfree == 0] = 2
        return out

    def refresh_gauges(self) -> dict[str, int]:
        v = self.vmstat
        v.counters["nr_free_pages"] = self.buddy.free_pages
        v.counters["nr_gem_pages"] = self.nr_gem_pages
        v.counters["nr_gem_pinned"] = self.nr_gem_pinned
        v.counters["nr_kernel_pages"] = self.nr_kernel_pages
        v.counters["alloc_fallback"] = self.buddy.fallbacks
        v.counters["pageblock_steal"] = self.buddy.steals
        return v.counters

    def order_free_units(self, order: int = PAGEBLOCK_ORDER) -> int:
        return self.buddy.count_free_units(order)

    def buddyinfo(self) -> str:
        return format_buddyinfo(self.free_blocks_per_order())

    def pagetypeinfo(self) -> str:
        return format_pagetypeinfo(self.free_per_type_order(), self.pageblocks_per_type())

    def extfrag_index(self) -> str:
        return format_extfrag_index(self.free_blocks_per_order())

    def unusable_index(self) -> str:
        return format_unusable_index(self.free_blocks_per_order())

    def vmstat_text(self) -> str:
        return format_vmstat(self.refresh_gauges())

    def check(self) -> None:
        """Invariants (tests): every frame free xor allocated; pages owned at most once."""
        p = self.pool
        free = (p.flags & PG_FREE) != 0
        alloc = (p.flags & PG_ALLOC) != 0
        target = (p.flags & PG_TARGET) != 0
        assert not np.any(free & alloc), "frame both free and allocated"
        assert np.all(free | alloc | target), "frame neither free nor allocated"
        assert int(np.count_nonzero(free)) == self.buddy.free_pages, "free page count drifted"
        seen = np.zeros(p.nr_pages, dtype=np.int32)
        for obj in self.objects.values():
            idx, pfns = obj.resident()
            np.add.at(seen, pfns, 1)
            assert np.all(p.owner[pfns] == obj.id), f"object {obj.id}: frame owner mismatch"
            assert np.all(p.index[pfns] == idx), f"object {obj.id}: frame index mismatch"
        assert seen.max(initial=0) <= 1, "a frame is owned twice"
        obj_frames = (p.flags & PG_OBJECT) != 0
        assert int(np.count_nonzero(obj_frames)) == int(seen.sum()), "orphan object frames"
        assert not np.any(p.flags & PG_ISOLATED), "page left isolated"
        obj_pages = (p.flags & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT)
        assert self.nr_gem_pages == int(np.count_nonzero(obj_pages)), "nr_gem_pages drifted"
        pinned = int(np.count_nonzero(obj_pages & (p.pin > 0)))
        assert self.nr_gem_pinned == pinned, "nr_gem_pinned drifted"
        kernel = sum(1 << o for o in self.kernel_pages.values())
        if self.pb_counts is not None:
            want_pinned = np.bincount(
                np.flatnonzero(obj_pages & (p.pin > 0)) >> PAGEBLOCK_ORDER,
                minlength=p.nr_pageblocks,
            )
            assert np.array_equal(self.pb_counts.pinned, want_pinned), "pinned counts drifted"
            want_kernel = np.zeros(p.nr_pageblocks, dtype=np.int64)
            for pfn, o in self.kernel_pages.items():
                np.add.at(want_kernel, np.arange(pfn, pfn + (1 << o)) >> PAGEBLOCK_ORDER, 1)
            assert np.array_equal(self.pb_counts.unmovable, want_kernel), "kernel counts drifted"

        if self.region is not None:
            region.check(self)
        if self.ttm is not None:
            pooled = self.ttm.pooled()
            assert sum(1 << o for _, o in pooled) == self.ttm.pooled_pages, "TTM pool drifted"
            for pfn, o in pooled:
                assert np.all(p.owner[pfn : pfn + (1 << o)] == OWNER_KERNEL), "TTM frame owned"
            kernel += self.ttm.pooled_pages
        assert self.nr_kernel_pages == kernel, "nr_kernel_pages drifted"
        stale = p.pb_dirty.copy()
        p.pb_dirty[:] = True  # recompute every pageblock and compare with what was kept
        kept_free, kept_mixed = p.pb_nfree.copy(), p.pb_mixed.copy()
        p.refresh_pageblocks()
        fresh = ~stale
        assert np.array_equal(kept_free[fresh], p.pb_nfree[fresh]), "pageblock free counts drifted"
        assert np.array_equal(kept_mixed[fresh], p.pb_mixed[fresh]), "mixed pageblocks drifted"
        assert not np.any(target), "migration target left isolated"


def _grow_page_table(obj: GemObject, end: int) -> None:
    """Extend obj.pages to ``end`` slots; new ones are holes, which cost nothing (the table is
    sparse: memory follows the pages that have frames, not the offset of the last one)."""
    if end > len(obj.pages):
        obj.pages.resize(end)


def _first_occurrence(a: I64) -> npt.NDArray[np.bool_]:
    out = np.zeros(len(a), dtype=np.bool_)
    _, first = np.unique(a, return_index=True)
    out[first] = True
    return out
