"""The memory manager: pool + buddy allocator + objects + migration mechanism + compaction.

This is the typed facade everything above ``gemfs.mm`` talks to. It is pure (no I/O besides the
pool's memfd) and single-threaded: callers serialize access.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gemfs.mm import page_alloc
from gemfs.mm.buddy import BuddyAllocator
from gemfs.mm.compaction import (
    Batch,
    CompactionPolicy,
    CompactResult,
    CompactStats,
    ZoneCompactState,
)
from gemfs.mm.objects import GemObject
from gemfs.mm.ops import SHMEM_OPS, AddressSpaceOps, Results
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
from gemfs.mm.types import (
    NR_MIGRATETYPES,
    NR_ORDERS,
    PAGE_SIZE,
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

ContentListener = Callable[[GemObject, int, int], None]  # (object, first page, page count)


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


class MemoryManager:
    def __init__(self, size: int | str, *, design: Design | str = Design.SHMEM_HOOK) -> None:
        self.design = Design.parse(design) if isinstance(design, str) else design
        self.pool = PagePool(size)
        self.buddy = BuddyAllocator(self.pool)
        self.objects: dict[ObjId, GemObject] = {}
        self._next_id = 1
        self.mount_ops: AddressSpaceOps | None = None  # gemfs design: the driver's, for all
        self.vmstat = Vmstat()
        self.compaction_proactiveness = 20
        self.extfrag_threshold = 500
        self.callback_latency_us: list[float] = []
        self.kernel_pages: dict[int, int] = {}  # pfn -> order of kernel (non-object) blocks
        self.compact_state = ZoneCompactState(self.pool.nr_pageblocks)

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
        self, size: int = 0, *, migratetype: MigrateType | None = None, path: str = ""
    ) -> GemObject:
        mt = self.design.gem_migratetype if migratetype is None else migratetype
        obj = GemObject(id=ObjId(self._next_id), migratetype=mt, path=path)
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
        if len(pfns):
            self._release_frames(pfns)
        obj.pages = np.empty(0, dtype=np.int64)
        obj.size = 0
        self.objects.pop(obj.id, None)

    def _release_frames(self, pfns: I64) -> None:
        self.pool.pin[pfns] = 0
        self.buddy.free_pfns(pfns)
        self.vmstat.inc("pgfree", len(pfns))

    def populate(self, obj: GemObject, start: int, count: int, *, zero: bool = True) -> I64:
        """Give pages [start, start+count) frames (zeroed) where they have none; return frames.

        ``zero=False`` skips clearing the new frames: for a caller that overwrites them whole.
        """
        end = start + count
        if end > len(obj.pages):
            _grow_page_table(obj, end)
        seg = obj.pages[start:end]
        holes = np.flatnonzero(seg < 0)
        if len(holes):
            pfns = self.buddy.alloc_bulk(len(holes), obj.migratetype)
            self.vmstat.inc("pgalloc", len(pfns))
            p = self.pool
            if zero:
                p.frames[pfns] = 0
            p.flags[pfns] |= PG_OBJECT
            p.owner[pfns] = obj.id
            p.index[pfns] = holes + start
            seg[holes] = pfns
        return seg.copy()

    def truncate(self, obj: GemObject, size: int) -> None:
        """Set the file size; shrinking frees the frames past the end (pinned: EBUSY)."""
        if size < 0:
            raise ObjectError(errno.EINVAL, "negative size")
        npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        if npages < len(obj.pages):
            tail = obj.pages[npages:]
            res = tail[tail >= 0]
            if len(res) and np.any(self.pool.pin[res] > 0):
                raise ObjectError(errno.EBUSY, "pages past the new end are pinned")
            if len(res) and np.any(self.pool.flags[res] & PG_ISOLATED):
                raise ObjectError(errno.EAGAIN, "pages past the new end are being migrated")
            if len(res):
                self._release_frames(res)
            obj.pages = obj.pages[:npages].copy()
        if size % PAGE_SIZE and npages <= len(obj.pages) and npages > 0:
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
        frames = self.pool.frames
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
        """Write bytes, growing the file; ENOSPC (OutOfMemory) leaves the object unchanged."""
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
                obj.pages = obj.pages[:old_len].copy()
            raise
        frames = self.pool.frames
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
        self.pin_pages(pfns)
        return pfns

    def unpin(self, obj: GemObject, start: int, count: int) -> None:
        seg = obj.pages[start : start + count]
        self.unpin_pages(seg[seg >= 0])

    def pin_pages(self, pfns: I64) -> None:
        np.add.at(self.pool.pin, pfns, 1)

    def unpin_pages(self, pfns: I64) -> None:
        pin = self.pool.pin
        if len(pfns) and np.any(pin[pfns] == 0):
            raise ObjectError(errno.EINVAL, "unpin of a page that is not pinned")
        np.subtract.at(pin, pfns, 1)

    def pinned_pages(self, obj: GemObject) -> int:
        _, pfns = obj.resident()
        return int(np.count_nonzero(self.pool.pin[pfns]))

    # -- kernel allocations (noise, high-order probes) ----------------------------------------
    def alloc_kernel(self, order: int, mt: MigrateType) -> int:
        pfn = self.buddy.alloc(order, mt)
        self.pool.owner[pfn : pfn + (1 << order)] = OWNER_KERNEL
        self.kernel_pages[pfn] = order
        self.vmstat.inc("pgalloc", 1 << order)
        return pfn

    def free_kernel(self, pfn: int) -> None:
        order = self.kernel_pages.pop(pfn)
        self.buddy.free_pfns(np.arange(pfn, pfn + (1 << order), dtype=np.int64))
        self.vmstat.inc("pgfree", 1 << order)

    # -- migration mechanism ----------------------------------------------------------------
    def ops_for(self, obj: GemObject) -> AddressSpaceOps:
        if obj.ops is not None:
            return obj.ops
        if self.mount_ops is not None:
            return self.mount_ops
        return SHMEM_OPS

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
        self, src: I64, dst: I64, mode: MigrateMode = MigrateMode.SYNC
    ) -> MigrateOutcome:
        """Move src[i] -> dst[i] for object pages, through each owner's address-space ops.

        dst frames must be free (they are isolated here). Per page: 0 moved, -EAGAIN (owner
        busy, retry later), -EBUSY (frame no longer suitable), other -errno (permanent).
        Nothing is ever lost: a page that does not move keeps its frame and content.
        """
        batch = self.migrate_begin(src, dst, mode)
        for req in batch.requests:
            self.migrate_finish_request(batch, req, self.migrate_request_local(req, mode))
        return self.migrate_end(batch)

    def migrate_begin(self, src: I64, dst: I64, mode: MigrateMode) -> MigrationBatch:
        """Validate a batch, isolate its targets and split it by owner object.

        The caller runs each request (through the owner's ops, in process or over a socket),
        reports it with :meth:`migrate_finish_request`, then calls :meth:`migrate_end`.
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

    def migrate_finish_request(
        self, batch: MigrationBatch, req: MigrationRequest, results: Results
    ) -> None:
        batch.results[req.sel] = results

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
        return MigrateOutcome(res, success, eagain, permanent)

    def isolate_request(self, req: MigrationRequest, ops: AddressSpaceOps) -> Bools:
        """Ask the owner which pages may be taken off; mark them isolated."""
        ok = np.asarray(ops.isolate(self, req.obj, req.idx), dtype=np.bool_)
        self.pool.flags[req.src[ok]] |= PG_ISOLATED
        return ok

    def settle_request(
        self, req: MigrationRequest, isolated: Bools, out: Results, ops: AddressSpaceOps | None
    ) -> Results:
        """Check an owner's answers against the page table, put back what did not move."""
        p = self.pool
        obj = req.obj
        res = np.full(len(req.src), -EAGAIN, dtype=np.int32)
        ii = np.flatnonzero(isolated)
        alive = self.objects.get(obj.id) is obj
        # An owner that says 0 must really have remapped through migrate_folio, and vice versa.
        if alive and len(ii):
            really = obj.pages[req.idx[ii]] == req.dst[ii]
            out = np.where(really, 0, np.where(out == 0, -errno.EIO, out)).astype(np.int32)
        elif len(ii):
            out = np.full(len(ii), -EBUSY, dtype=np.int32)
        res[ii] = out
        failed = res != 0
        back = isolated & failed
        if np.any(back):
            p.flags[req.src[back]] &= ~np.uint8(PG_ISOLATED)
            if ops is not None and alive:
                ops.putback(self, obj, req.idx[back])
        return res

    def migrate_request_local(self, req: MigrationRequest, mode: MigrateMode) -> Results:
        """Run one object's share of a batch through in-process ops."""
        part, live = self.narrow_request(req)
        if part is req:
            return self._migrate_request_local(req, mode)
        res = np.full(len(req.src), -EBUSY, dtype=np.int32)
        if len(part.src):
            res[live] = self._migrate_request_local(part, mode)
        return res

    def _migrate_request_local(self, req: MigrationRequest, mode: MigrateMode) -> Results:
        obj = req.obj
        ops = self.ops_for(obj)
        if obj.notifier is not None:
            lo, hi = int(req.idx.min()), int(req.idx.max()) + 1
            t0 = time.perf_counter()
            rc = obj.notifier.invalidate(self, obj, lo, hi - lo)
            self.vmstat.inc("gem_invalidate_callbacks")
            self._record_latency(t0)
            if rc != 0:
                return np.full(len(req.src), -abs(rc), dtype=np.int32)
        isolated = self.isolate_request(req, ops)
        ii = np.flatnonzero(isolated)
        callback = ops is not SHMEM_OPS
        try:
            t0 = time.perf_counter()
            out = np.asarray(
                ops.migrate(self, obj, req.idx[ii], req.src[ii], req.dst[ii], mode), np.int32
            )
            if callback:
                self.vmstat.inc("gem_migrate_callbacks")
                self.vmstat.inc("gem_migrate_callback_pages", len(ii))
                self._record_latency(t0)
            if out.shape != ii.shape:
                raise ValueError(f"{ops.name}.migrate answered {out.shape} for {ii.shape} pages")
        except Exception:
            out = np.full(len(ii), -errno.EIO, dtype=np.int32)
            self.vmstat.inc("pgmigrate_aborted", len(ii))
        res = self.settle_request(req, isolated, out, ops)
        if callback:
            self.vmstat.inc("gem_migrate_callback_eagain", int(np.count_nonzero(res == -EAGAIN)))
            self.vmstat.inc("gem_migrate_callback_ebusy", int(np.count_nonzero(res == -EBUSY)))
        return res

    def _record_latency(self, t0: float) -> None:
        us = (time.perf_counter() - t0) * 1e6
        self.callback_latency_us.append(us)
        self.vmstat.inc("gem_migrate_callback_us_total", int(us))

    # -- compaction -------------------------------------------------------------------------
    def free_blocks_per_order(self) -> list[int]:
        return self.buddy.free_blocks_per_order()

    @property
    def flags(self) -> npt.NDArray[np.uint8]:
        return self.pool.flags

    @property
    def pageblock_mt(self) -> npt.NDArray[np.uint8]:
        return self.pool.pageblock_mt

    def run_policy(self, policy: CompactionPolicy) -> CompactResult:
        """Drive a compaction policy against this pool's own mechanism (in-process)."""
        for _ in self.iter_policy(policy):
            pass
        return policy.result

    def iter_policy(self, policy: CompactionPolicy) -> Iterator[Batch]:
        """Like run_policy, yielding after each batch so an event loop can interleave."""
        while (batch := policy.next_batch(self)) is not None:
            out = self.migrate_pages(batch.src, batch.dst, policy.mode)
            policy.batch_done(batch, out.results)
            yield batch
        self._account_compaction(policy.stats)

    def _account_compaction(self, stats: CompactStats) -> None:
        self.vmstat.inc("compact_migrate_scanned", stats.migrate_scanned)
        self.vmstat.inc("compact_free_scanned", stats.free_scanned)

    def compact(self, order: int = -1, mode: MigrateMode = MigrateMode.SYNC) -> CompactResult:
        """compact_memory (order -1, whole pool) or compaction for one order.

        compact_memory is compact_node(): the whole zone, skip hints ignored (it still sets them
        and moves the cached scanners, as the kernel's does)."""
        state = self.compact_state if order < 0 else None
        policy = CompactionPolicy(
            self.pool.nr_pageblocks, order=order, mode=mode, state=state, ignore_skip_hint=True
        )
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
        p = self.pool
        fl = p.flags.reshape(p.nr_pageblocks, -1)
        alloc = (fl & PG_ALLOC) != 0
        mt = (fl & PG_MT_MASK) >> PG_MT_SHIFT
        foreign = alloc & (mt != p.pageblock_mt[:, None])
        return int(np.count_nonzero(foreign.any(axis=1)))

    def pageblock_states(self) -> npt.NDArray[np.uint8]:
        """Per pageblock: 0 free, 1 partly used, 2 full; for the pool map plot."""
        fl = self.pool.flags.reshape(self.pool.nr_pageblocks, -1)
        nfree = np.count_nonzero(fl & PG_FREE, axis=1)
        out = np.ones(self.pool.nr_pageblocks, dtype=np.uint8)
        out[nfree == fl.shape[1]] = 0
        out[nfree == 0] = 2
        return out

    def refresh_gauges(self) -> dict[str, int]:
        p = self.pool
        v = self.vmstat
        v.counters["nr_free_pages"] = self.buddy.free_pages
        obj_pages = (p.flags & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT)
        v.counters["nr_gem_pages"] = int(np.count_nonzero(obj_pages))
        v.counters["nr_gem_pinned"] = int(np.count_nonzero(obj_pages & (p.pin > 0)))
        v.counters["nr_kernel_pages"] = sum(1 << o for o in self.kernel_pages.values())
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
        assert not np.any(target), "migration target left isolated"


def _grow_page_table(obj: GemObject, end: int) -> None:
    """Extend obj.pages to ``end`` entries (new ones holes), with room to spare.

    obj.pages is a prefix view of a larger buffer, so a file written front to back (one request
    after the other) does not copy its whole page table on every request.
    """
    old = obj.pages
    n = len(old)
    buf = old.base
    if (
        isinstance(buf, np.ndarray)
        and buf.dtype == np.int64
        and buf.ndim == 1
        and len(buf) >= end
        and old.flags.c_contiguous
        and n > 0
        and old.ctypes.data == buf.ctypes.data
    ):
        buf[n:end] = -1
    else:
        buf = np.full(max(end, 2 * n), -1, dtype=np.int64)
        buf[:n] = old
    obj.pages = buf[:end]


def _first_occurrence(a: I64) -> npt.NDArray[np.bool_]:
    out = np.zeros(len(a), dtype=np.bool_)
    _, first = np.unique(a, return_index=True)
    out[first] = True
    return out
