"""i915's part, free of I/O: GEM objects, a GTT per object, a simulated GPU, migrate decisions.

The GPU reads and writes pool frames directly by frame number through each object's GTT
(page index -> frame), exactly as DMA would. A stale GTT entry after a move shows up as a
checksum mismatch: the driver keeps, per object, the checksum of what it last wrote.

This module holds state and rules only. Time is the pool's modelled clock: a batch keeps its
objects busy until ``now + duration``, and "waiting for the GPU" is a decision (how long, in
modelled seconds) that the wrappers report to the core: :mod:`driver.inproc` answers the core
directly, the daemon over the control socket with trio.
"""

from __future__ import annotations

import enum
import errno
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gemfs.mm.types import PAGE_SIZE, MigrateMode

I64 = npt.NDArray[np.int64]
Frames = npt.NDArray[Any]  # (n, PAGE_SIZE) bytes, or (n, 1) uint32 content stamps

EAGAIN = errno.EAGAIN
EBUSY = errno.EBUSY
# SYNC_LIGHT may wait for the GPU this long before giving up with -EAGAIN.
SYNC_LIGHT_WAIT_S = 0.010
# The 2016 patch's i915_gem_shrinker_migratepage() took struct_mutex through
# i915_gem_shrinker_lock_uninterruptible(dev_priv, &slu, 10). In the kernel the patch was
# posted against (4.6/4.7) that is a pure trylock loop: mutex_trylock, and on failure
# schedule_timeout_killable(1) (one jiffy) and again, msecs_to_jiffies(10) + 1 times, then
# -EBUSY. At HZ=250 (Debian's x86 kernels) a jiffy is 4 ms: tries at 0, 4, 8 and 12 ms, and
# -EBUSY after 16 ms.
JIFFY_S = 0.004
I915_TRYLOCK_S = 0.010
I915_TRYLOCK_TRIES = math.ceil(I915_TRYLOCK_S / JIFFY_S - 1e-9) + 1
# Who holds struct_mutex: the model counts execbuffer's critical section (reserving and binding
# the batch's objects, relocations, emitting the request) at each submission, explicit or a
# frame loop's. Estimate 0.3 ms for a desktop frame's few objects; the lock is free between
# submissions, whatever the GPU is still running (the lock guards the driver's state, not the
# engines).
I915_SUBMIT_LOCK_S = 0.0003
# The patch then unbinds only if intel_runtime_pm_get_if_in_use() succeeds: a runtime-PM wakeref
# is held. The lit display's power domains hold one; the GT holds one from its first request
# until it has been idle for the idle worker's delay (i915_gem_idle_work_handler, queued
# msecs_to_jiffies(100) after the last retirement in the 4.x driver). With the display off an
# idle GPU is not "in use": -EBUSY.
I915_GT_PARK_S = 0.100
# A Mali GPU's cache maintenance for one migrated page: an L2 clean + invalidate of the page's
# range issued through the MMU's address-space command register (AS_COMMAND FLUSH_MEM) and
# waited for by polling AS_STATUS (panfrost_mmu.c mmu_hw_do_operation; kbase
# kbase_mmu_flush_pa_range). The 2016 thread's Mali developer needed one per page ("batching
# pages isn't easily possible?"). No published per-page latency was found: estimate 5 µs (an
# uncached MMIO write, then polling until the flush of a 4 KiB range completes; kbase's
# timeout for these commands is in milliseconds).
MALI_FLUSH_PAGE_US = 5.0


class DriverPolicy(enum.StrEnum):
    """What the driver's migrate callback does when the core asks about an object's pages."""

    WAIT_IDLE = "wait-idle"  # wait for the GPU as the mode allows, move, keep the object bound
    I915_2016 = "i915-2016"  # the posted patch: -EBUSY when active, else drop the backing store
    PER_PAGE_FLUSH = "per-page-flush"  # wait-idle, plus a GPU cache flush per migrated page

    @classmethod
    def parse(cls, text: str) -> DriverPolicy:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown driver policy {text!r} (expected one of {names})") from None

    @property
    def costs(self) -> dict[str, float]:
        """Cost-table entries the policy implies (a workload's [costs] still overrides them)."""
        if self is DriverPolicy.PER_PAGE_FLUSH:
            return {"flush_page_us": MALI_FLUSH_PAGE_US}
        return {}


@dataclass(frozen=True, slots=True)
class MigrateDecision:
    """The callback's answer for one object: ``rc`` for every page asked about (0: stop using
    them, they may move; -EAGAIN busy, retry; -EBUSY refused), modelled seconds waited for the
    GPU (``wait_s``: GPU stall) and spent on the driver's lock (``lock_s``: the migrating
    task's time, not a stall), and whether the object's whole backing store was dropped."""

    rc: int
    wait_s: float = 0.0
    lock_s: float = 0.0
    drop: bool = False


@dataclass
class DriverObject:
    id: int  # the core's object id
    nr_pages: int
    gtt: I64  # page index -> frame; -1: not bound
    checksum: int = 0  # crc32 of the content the driver knows the object holds
    busy_until: float = 0.0  # clock time the last batch on this object completes
    bound: bool = False  # pages pinned and GTT valid (except entries dropped by invalidate)
    mapped: bool = False  # every GTT entry valid (an invalidation clears it)
    generation: int = 0  # GPU writes so far
    invalidations: int = 0  # notifier invalidations so far (a pin reply older than one is stale)

    def busy(self, now: float) -> bool:
        return now < self.busy_until


@dataclass(frozen=True, slots=True)
class FrameLoop:
    """A batch resubmitted every ``interval`` after ``start`` until ``until`` (modelled seconds):
    a frame loop that keeps running while the workload's next phases (huge-page faults,
    compaction) do. Compaction sees its objects and the device busy from one submission to the
    next, as a GPU under steady load is. Its resubmissions are busy time only: they read and
    write nothing and run no checks (the phase's explicit batches do)."""

    start: float
    interval: float
    duration: float
    until: float

    def last_submission(self, t: float) -> float | None:
        """The last submission at or before ``t`` (None: none yet)."""
        if t < self.start:
            return None
        k = math.floor((min(t, self.until) - self.start) / self.interval + 1e-9)
        return self.start + k * self.interval

    def busy_until(self, t: float) -> float:
        """When the last submission at or before ``t`` completes (0: none yet)."""
        s = self.last_submission(t)
        return 0.0 if s is None else s + self.duration


@dataclass
class GpuStats:
    batches: int = 0
    pages_read: int = 0
    pages_written: int = 0
    data_errors: int = 0
    refaults: int = 0  # binds after an invalidation dropped the GTT (notifier design)
    stall_s: float = 0.0  # time spent waiting for the GPU on behalf of migration
    migrate_calls: int = 0
    migrate_pages: int = 0
    migrate_eagain: int = 0
    migrate_ebusy: int = 0  # pages refused with -EBUSY (i915-2016: object active, lock timeout)
    dropped_objects: int = 0  # i915-2016: objects whose backing store a callback dropped
    invalidations: int = 0


def checksum_frames(frames: Frames, gtt: I64) -> int:
    """crc32 of an object's content read through its GTT (its bytes, or its pages' stamps)."""
    return zlib.crc32(np.ascontiguousarray(frames[gtt]).data)


def stamped(frames: Frames) -> bool:
    """A content-free pool: one uint32 stamp per frame instead of its bytes."""
    return bool(frames.shape[1] == 1)


def gpu_pattern(obj_id: int, generation: int, nr_pages: int) -> npt.NDArray[np.uint8]:
    """Deterministic bytes a batch writes: every page differs, every generation differs."""
    base = np.arange(nr_pages * PAGE_SIZE // 8, dtype=np.uint64)
    salt = np.uint64((obj_id * 0x9E3779B97F4A7C15 + generation * 0xBF58476D1CE4E5B9) % 2**64)
    return ((base * np.uint64(0x94D049BB133111EB)) ^ salt).view(np.uint8)


@dataclass
class GemDriver:
    """Objects, GTTs and the GPU. ``frames`` is the pool, mapped (shared) by this process."""

    frames: Frames
    objects: dict[int, DriverObject] = field(default_factory=dict)
    stats: GpuStats = field(default_factory=GpuStats)
    # Content-free pools: every page a GPU write touches gets a stamp never used before, so a
    # frame that does not hold the last write (stale, lost, duplicated) always mismatches.
    next_stamp: int = 1
    policy: DriverPolicy = DriverPolicy.WAIT_IDLE
    busy_until: float = 0.0  # the device: when its last batch completes
    last_submit: float = -math.inf  # when the last explicit batch was submitted
    loop: FrameLoop | None = None  # the frame loop running in the background, if any
    loop_ids: set[int] = field(default_factory=set)  # its objects still bound and mapped
    # The loop's objects that lost their GTT (an i915-2016 drop, a notifier invalidation), and
    # when: the loop's next submission re-faults them (loop_due, then bind puts them back).
    loop_lost: dict[int, float] = field(default_factory=dict)
    display_on: bool = True  # a lit display holds a runtime-PM wakeref (i915-2016's check)

    def add_object(self, obj_id: int, nr_pages: int, content_checksum: int) -> DriverObject:
        o = DriverObject(obj_id, nr_pages, np.full(nr_pages, -1, np.int64), content_checksum)
        self.objects[obj_id] = o
        return o

    def remove_object(self, obj_id: int) -> DriverObject | None:
        self.loop_ids.discard(obj_id)
        self.loop_lost.pop(obj_id, None)
        return self.objects.pop(obj_id, None)

    def _leave_loop(self, o: DriverObject, at: float | None) -> None:
        """``o`` lost its GTT at ``at`` (None: for good, e.g. closed): it leaves the frame loop,
        whose next submission re-faults it (:meth:`loop_due`)."""
        if o.id in self.loop_ids:
            self.loop_ids.discard(o.id)
            if at is not None:
                self.loop_lost[o.id] = at

    def loop_due(self, now: float) -> list[DriverObject]:
        """The loop's objects that lost their GTT before a submission the loop has made by
        ``now``: that submission re-faults them (the caller binds them; :meth:`bind` puts them
        back in the loop). The loop's resubmissions are busy time only, so this is asked where
        the driver acts between phases, not at each submission."""
        s = None if self.loop is None else self.loop.last_submission(now)
        if s is None:
            return []
        return [self.objects[i] for i, t in self.loop_lost.items() if t < s and i in self.objects]

    # -- binding ----------------------------------------------------------------------------
    def needs_bind(self, o: DriverObject) -> bool:
        return not (o.bound and o.mapped)

    def bind(self, o: DriverObject, pfns: I64) -> None:
        """The core pinned the pages; these are their frames (i915_gem_object_pin_pages)."""
        if len(pfns) != o.nr_pages:
            raise ValueError(f"object {o.id}: bound {len(pfns)} frames for {o.nr_pages} pages")
        if o.bound:
            self.stats.refaults += 1
        o.gtt = np.asarray(pfns, dtype=np.int64).copy()
        o.bound = True
        o.mapped = bool(np.all(o.gtt >= 0))
        if o.mapped and self.loop_lost.pop(o.id, None) is not None:
            self.loop_ids.add(o.id)  # re-faulted: the loop's batches use it again

    def extend(self, o: DriverObject, start: int, pfns: I64) -> None:
        """Pages [start, start + len(pfns)) joined the object after its creation, already pinned
        by the core for the driver: map them in the GTT (growing the object as needed).

        Used where the object's pages arrive one allocation at a time, as a replayed kernel
        trace shows them (tools/replay.py). Nothing was written through the GTT: the content
        checksum is not taken (it would cost the whole object per allocation); such objects
        run no batches."""
        end = start + len(pfns)
        if end > o.nr_pages:
            gtt = np.full(end, -1, np.int64)
            gtt[: o.nr_pages] = o.gtt
            o.gtt, o.nr_pages = gtt, end
        o.gtt[start:end] = pfns
        o.bound = True
        o.mapped = bool(np.all(o.gtt >= 0))

    def forget(self, o: DriverObject, start: int, count: int) -> None:
        """Pages [start, start+count) left the object (the core freed them): unmap them."""
        o.gtt[start : start + count] = -1
        o.mapped = False

    def unbind(self, o: DriverObject, at: float | None = None) -> I64:
        """Drop the GTT (at modelled time ``at``, if known); return the frames whose pins the
        caller must release. The object leaves the frame loop until re-faulted."""
        held = o.gtt[o.gtt >= 0].copy()
        o.gtt[:] = -1
        o.bound = False
        o.mapped = False
        self._leave_loop(o, at)
        return held

    # -- the GPU ----------------------------------------------------------------------------
    def execute(
        self,
        objs: list[DriverObject],
        now: float,
        duration: float,
        write: bool,
        generation: int | None = None,
        *,
        keep: float = 0.0,
        interval: float = 0.0,
    ) -> None:
        """Run a batch: read every object through its GTT and check it; optionally write it.

        ``generation`` (optional) picks the pattern written, so a client can predict the bytes.
        ``keep`` > 0 (with ``interval`` > 0): the batch goes on being resubmitted every
        ``interval`` for ``keep`` more seconds (a :class:`FrameLoop`, replacing any other).
        """
        if keep < 0 or interval < 0 or (keep > 0) != (interval > 0):
            raise ValueError("a frame loop needs keep > 0 and interval > 0 (or neither)")
        self.stats.batches += 1
        for o in objs:
            if self.needs_bind(o):
                raise RuntimeError(f"object {o.id} executed without being bound")
            if checksum_frames(self.frames, o.gtt) != o.checksum:
                self.stats.data_errors += 1
            self.stats.pages_read += o.nr_pages
            if write:
                o.generation = o.generation + 1 if generation is None else generation
                data: npt.NDArray[Any]
                if stamped(self.frames):  # O(pages) of 4 bytes, not O(bytes)
                    first = self.next_stamp
                    self.next_stamp += o.nr_pages
                    seq = np.arange(o.nr_pages, dtype=np.uint64) + np.uint64(first)
                    data = seq.astype(np.uint32).reshape(-1, 1)
                else:
                    data = gpu_pattern(o.id, o.generation, o.nr_pages).reshape(-1, PAGE_SIZE)
                self.frames[o.gtt] = data
                o.checksum = zlib.crc32(data.data)
                self.stats.pages_written += o.nr_pages
            o.busy_until = max(o.busy_until, now + duration)
        self.busy_until = max(self.busy_until, now + duration)
        self.last_submit = max(self.last_submit, now)
        if keep > 0:
            self.loop = FrameLoop(now, interval, duration, now + keep)
            self.loop_ids = {o.id for o in objs}
            self.loop_lost = {}

    # -- what compaction sees: the explicit batches and the frame loop ------------------------
    def object_busy_until(self, o: DriverObject, t: float) -> float:
        """When the batches submitted on ``o`` by time ``t`` complete (its current fences)."""
        b = o.busy_until
        if self.loop is not None and o.id in self.loop_ids:
            b = max(b, self.loop.busy_until(t))
        return b

    def struct_mutex_free(self, t: float) -> bool:
        """Is struct_mutex free at ``t``? It is held for I915_SUBMIT_LOCK_S from each
        submission: the last explicit batch's and the frame loop's."""
        subs = [self.last_submit]
        if self.loop is not None and self.loop_ids:
            s = self.loop.last_submission(t)
            if s is not None:
                subs.append(s)
        return not any(s <= t < s + I915_SUBMIT_LOCK_S for s in subs)

    def i915_trylock(self, now: float) -> tuple[bool, float]:
        """i915_gem_shrinker_lock_uninterruptible(..., 10) from ``now``: (got it, time spent).
        A try; on failure a jiffy's sleep and another, I915_TRYLOCK_TRIES times in all."""
        t = now
        for _ in range(I915_TRYLOCK_TRIES):
            if self.struct_mutex_free(t):
                return True, t - now
            t += JIFFY_S
        return False, t - now

    def rpm_in_use(self, t: float) -> bool:
        """intel_runtime_pm_get_if_in_use() at ``t``: is a wakeref held? The display's while
        it is lit; the GT's until I915_GT_PARK_S after its last batch (explicit or the frame
        loop's) completed."""
        if self.display_on:
            return True
        if self.last_submit == -math.inf:  # the GPU never ran
            return False
        end = self.busy_until
        if self.loop is not None and self.loop_ids:
            end = max(end, self.loop.busy_until(t))
        return t < end + I915_GT_PARK_S

    def write_object(self, o: DriverObject, offset: int, data: bytes) -> None:
        """A CPU write through the GTT (pwrite ioctl); the object must be bound."""
        if self.needs_bind(o):
            raise RuntimeError(f"object {o.id} written without being bound")
        flat = self.frames[o.gtt].reshape(-1)
        flat[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.frames[o.gtt] = flat.reshape(-1, PAGE_SIZE)
        o.checksum = zlib.crc32(flat.data)

    def read_object(self, o: DriverObject) -> bytes:
        if self.needs_bind(o):
            raise RuntimeError(f"object {o.id} read without being bound")
        data = self.frames[o.gtt].tobytes()
        if zlib.crc32(data) != o.checksum:
            self.stats.data_errors += 1
        return data

    def verify(self, o: DriverObject) -> bool:
        """Does the object (through the GTT) hold what the driver last wrote?"""
        ok = checksum_frames(self.frames, o.gtt) == o.checksum
        if not ok:
            self.stats.data_errors += 1
        return ok

    # -- migrate callback decisions -----------------------------------------------------------
    def migrate_wait(self, o: DriverObject, mode: MigrateMode, now: float) -> float | None:
        """How long to wait before the pages may move: 0 now, None never (answer -EAGAIN)."""
        busy = self.object_busy_until(o, now)
        if now >= busy:
            return 0.0
        left = busy - now
        if mode == MigrateMode.ASYNC:
            return None
        if mode == MigrateMode.SYNC_LIGHT and left > SYNC_LIGHT_WAIT_S:
            return None
        return left

    def migrate_decide(
        self, o: DriverObject, n: int, mode: MigrateMode, now: float
    ) -> MigrateDecision:
        """The migrate callback's decision for ``n`` pages of object ``o`` (counted in stats).

        wait-idle and per-page-flush: wait for the GPU as the mode allows (:meth:`migrate_wait`),
        else -EAGAIN. i915-2016 (the posted patch): take struct_mutex (:meth:`i915_trylock`:
        tries a jiffy apart for ~10 ms, -EBUSY when they all fail; the lock is held during
        submissions), then -EBUSY if the object is active on the GPU (no wait, whatever the
        mode) or the device not in use (:meth:`rpm_in_use`: display off, GT parked), else
        unbind it and drop its whole backing store (the GTT here; its pins,
        through the answer, in the core) so the pages may move. The object's next use
        re-faults every page. An object whose backing store is not held (dropped and not
        used since) holds no reference on its pages: they migrate at once, no lock taken."""
        st = self.stats
        st.migrate_calls += 1
        st.migrate_pages += n
        if self.policy is DriverPolicy.I915_2016:
            if not o.bound:  # no backing store held (dropped before): page_count(page) <= 2,
                return MigrateDecision(0)  # so the patch goes straight to migrate_page()
            got, lock = self.i915_trylock(now)
            t = now + lock
            if not got or self.object_busy_until(o, t) > t or not self.rpm_in_use(t):
                st.migrate_ebusy += n
                return MigrateDecision(-EBUSY, lock_s=lock)
            self.unbind(o, at=t)
            st.dropped_objects += 1
            return MigrateDecision(0, lock_s=lock, drop=True)
        wait = self.migrate_wait(o, mode, now)
        if wait is None:
            st.migrate_eagain += n
            return MigrateDecision(-EAGAIN)
        return MigrateDecision(0, wait_s=wait)

    def migrate_commit(self, o: DriverObject, idx: I64, dst: I64) -> None:
        """The core moved pages idx to frames dst: point the GTT at them."""
        live = o.gtt[idx] >= 0
        o.gtt[idx[live]] = dst[live]

    def invalidate(self, o: DriverObject, start: int, count: int, at: float | None = None) -> I64:
        """Notifier: stop using [start, start+count) (at modelled time ``at``, if known);
        return frames whose pins to release. The object leaves the frame loop until
        re-faulted."""
        seg = o.gtt[start : start + count]
        held = seg[seg >= 0].copy()
        seg[:] = -1
        if len(seg):
            o.mapped = False
            self._leave_loop(o, at)
        o.invalidations += 1
        self.stats.invalidations += 1
        return held
