"""The driver's logic used directly, in one process with the model, on the modelled clock.

The same :class:`driver.gem.GemDriver` the daemon wraps with its socket; here the core is the
:class:`gemfs.mm.MemoryManager` itself. It answers the migration mechanism's asks
(:mod:`gemfs.mm.migrate`) synchronously with the same decisions the daemon makes over the
socket: wait for the GPU as the mode allows (the wait is modelled time, reported back), then
stop using the pages; on the notice, point the GTT at the new frames.
"""

from __future__ import annotations

import errno

import numpy as np

from driver.gem import DriverObject, DriverPolicy, GemDriver, checksum_frames
from gemfs.mm import MemoryManager
from gemfs.mm.migrate import Answer, Ask, AskInvalidate, Migrated
from gemfs.mm.ops import Results
from gemfs.mm.types import Design, MigrateType

EAGAIN = errno.EAGAIN


class InprocDriver:
    """i915 in process: owns objects, binds them for batches, answers the core's asks."""

    name = "i915"

    def __init__(
        self,
        mm: MemoryManager,
        design: Design,
        migratetype: MigrateType | None = None,
        policy: DriverPolicy = DriverPolicy.WAIT_IDLE,
        display_on: bool = True,
    ) -> None:
        self.mm = mm
        self.design = design
        self.migratetype = design.gem_migratetype if migratetype is None else migratetype
        self.gem = GemDriver(mm.pool.frames, policy=policy, display_on=display_on)
        if design is Design.GEMFS:
            mm.mount_ops = self

    @property
    def stats(self) -> object:
        return self.gem.stats

    # -- ioctls -----------------------------------------------------------------------------
    def create(self, size: int, path: str = "") -> DriverObject:
        obj = self.mm.create_object(size, migratetype=self.migratetype, path=path, private=True)
        obj.owner_tag = self.name
        content = checksum_frames(self.mm.pool.frames, obj.pages[: obj.nr_pages])
        o = self.gem.add_object(obj.id, obj.nr_pages, content)
        if self.design is Design.SHMEM_HOOK:
            obj.ops = self
        elif self.design is Design.NOTIFIER:
            obj.notifier = self
        return o

    def close(self, o: DriverObject) -> None:
        """Close the object now (its pins go with it; a batch still running is not waited for:
        the model frees the frames at once)."""
        obj = self.mm.get(o.id)
        self.mm.release(self, obj, 0, max(o.nr_pages, len(obj.pages)))
        self.gem.remove_object(o.id)
        self.mm.destroy_object(obj)

    def adopt(self, o: DriverObject, start: int, count: int) -> None:
        """The object's pages [start, start+count) have frames now (the core gave them outside
        a create: a replayed trace's allocations): the driver pins them and maps them in its
        GTT, as i915's get_pages and TTM's populate do for the pages they allocate."""
        obj = self.mm.get(o.id)
        self.gem.extend(o, start, self.mm.hold(self, obj, start, count))

    def bind(self, o: DriverObject) -> None:
        if not self.gem.needs_bind(o):
            return
        obj = self.mm.get(o.id)
        self.gem.bind(o, self.mm.hold(self, obj, 0, o.nr_pages))

    def loop_tick(self) -> int:
        """The frame loop's submissions up to now re-fault the objects it lost (GemDriver.
        loop_due): bind them again. Returns how many."""
        due = self.gem.loop_due(self.mm.clock.now)
        for o in due:
            self.bind(o)
        return len(due)

    def execute(
        self,
        objs: list[DriverObject],
        duration: float,
        write: bool,
        *,
        keep: float = 0.0,
        interval: float = 0.0,
    ) -> None:
        for o in objs:
            self.bind(o)
        self.gem.execute(objs, self.mm.clock.now, duration, write, keep=keep, interval=interval)

    def verify_all(self) -> int:
        """Objects whose content (through the core's page table, not the GTT) differs from
        what the driver last wrote."""
        bad = 0
        frames = self.mm.pool.frames
        for o in self.gem.objects.values():
            obj = self.mm.get(o.id)
            if checksum_frames(frames, obj.pages[: o.nr_pages]) != o.checksum:
                bad += 1
            elif o.bound and not self.gem.needs_bind(o) and not self.gem.verify(o):
                bad += 1
        return bad

    # -- the core's asks (migrate for the hook and mount designs, invalidate for notifier) ----
    def answer(self, ask: Ask) -> Answer:
        if isinstance(ask, AskInvalidate):
            return self._invalidate(ask)
        results: list[Results] = []
        dropped: list[bool] = []
        waited = lock = 0.0
        for part in ask.parts:
            n = len(part.idx)
            o = self.gem.objects.get(part.obj.id)
            if o is None:  # not ours any more: nothing to stop using
                results.append(np.zeros(n, dtype=np.int32))
                dropped.append(False)
                continue
            d = self.gem.migrate_decide(o, n, ask.mode, ask.now + lock)
            lock += d.lock_s  # one callback: the lock is taken object after object
            waited = max(waited, d.wait_s)
            results.append(np.full(n, d.rc, dtype=np.int32))
            dropped.append(d.drop)
        self.gem.stats.stall_s += waited
        return Answer(results=tuple(results), waited_s=waited, lock_s=lock, dropped=tuple(dropped))

    def _invalidate(self, ask: AskInvalidate) -> Answer:
        o = self.gem.objects.get(ask.part.obj.id)
        if o is None:
            return Answer(rc=0)
        wait = self.gem.migrate_wait(o, ask.mode, ask.now)
        if wait is None:  # a non-blocking invalidation of a busy range: -EAGAIN
            return Answer(rc=-EAGAIN)
        self.gem.stats.stall_s += wait
        self.gem.invalidate(o, ask.start, ask.count, at=ask.now + wait)
        return Answer(rc=0, waited_s=wait)

    def migrated(self, notice: Migrated) -> None:
        for obj, idx, dst, ok in notice.parts:
            o = self.gem.objects.get(obj.id)
            if o is not None:
                self.gem.migrate_commit(o, idx[ok], dst[ok])
