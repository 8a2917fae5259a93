"""The driver's logic used directly, in one process with the model and a simulated clock.

The same :class:`driver.gem.GemDriver` the daemon wraps with its socket; here the core is the
:class:`gemfs.mm.MemoryManager` itself and "waiting for the GPU" advances a simulated clock
(the wait is accounted as GPU stall time).
"""

from __future__ import annotations

import errno
import zlib

import numpy as np

from driver.gem import I64, DriverObject, GemDriver
from gemfs.mm import GemObject, MemoryManager, MigrateMode, MigrationCore
from gemfs.mm.ops import Results
from gemfs.mm.types import Design

EAGAIN = errno.EAGAIN


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, dt: float) -> None:
        self.now += max(0.0, dt)


class InprocDriver:
    """i915 in process: owns objects, binds them for batches, answers migrate callbacks."""

    name = "i915"

    def __init__(self, mm: MemoryManager, design: Design, clock: SimClock | None = None) -> None:
        self.mm = mm
        self.design = design
        self.clock = clock or SimClock()
        self.gem = GemDriver(mm.pool.frames)
        if design is Design.GEMFS:
            mm.mount_ops = self

    @property
    def stats(self) -> object:
        return self.gem.stats

    # -- ioctls -----------------------------------------------------------------------------
    def create(self, size: int, path: str = "") -> DriverObject:
        mt = self.design.gem_migratetype
        obj = self.mm.create_object(size, migratetype=mt, path=path)
        data = self.mm.read(obj, 0, obj.size)
        o = self.gem.add_object(obj.id, obj.nr_pages, zlib.crc32(data))
        if self.design is Design.SHMEM_HOOK:
            obj.ops = self
        elif self.design is Design.NOTIFIER:
            obj.notifier = self
        return o

    def close(self, o: DriverObject) -> None:
        obj = self.mm.get(o.id)
        self.wait(o)
        if o.bound:
            held = self.gem.unbind(o)
            self.mm.unpin_pages(held)
        self.gem.remove_object(o.id)
        self.mm.destroy_object(obj)

    def bind(self, o: DriverObject) -> None:
        if not self.gem.needs_bind(o):
            return
        obj = self.mm.get(o.id)
        if o.bound:  # partly invalidated: release what is still held, pin the whole object
            self.mm.unpin_pages(self.gem.unbind(o))
        self.gem.bind(o, self.mm.pin(obj, 0, o.nr_pages))

    def execute(self, objs: list[DriverObject], duration: float, write: bool) -> None:
        for o in objs:
            self.bind(o)
        self.gem.execute(objs, self.clock.now, duration, write)

    def wait(self, o: DriverObject) -> None:
        if o.busy(self.clock.now):
            self.clock.advance(o.busy_until - self.clock.now)

    def verify_all(self) -> int:
        """Objects whose content (read by the core, not the GTT) differs from the driver's."""
        bad = 0
        for o in self.gem.objects.values():
            obj = self.mm.get(o.id)
            if zlib.crc32(self.mm.read(obj, 0, obj.size)) != o.checksum:
                bad += 1
            elif o.bound and not self.gem.needs_bind(o) and not self.gem.verify(o):
                bad += 1
        return bad

    # -- address-space ops (shmem-hook per object, gemfs for the mount) -----------------------
    def isolate(self, core: MigrationCore, obj: GemObject, idx: I64) -> np.ndarray:
        return np.ones(len(idx), dtype=np.bool_)

    def migrate(
        self, core: MigrationCore, obj: GemObject, idx: I64, src: I64, dst: I64, mode: MigrateMode
    ) -> Results:
        o = self.gem.objects.get(obj.id)
        if o is None:  # not ours (a plain file on a gemfs mount): plain shmem behaviour
            return core.migrate_folio(obj, idx, src, dst)
        st = self.gem.stats
        st.migrate_calls += 1
        st.migrate_pages += len(idx)
        wait = self.gem.migrate_wait(o, mode, self.clock.now)
        if wait is None:
            st.migrate_eagain += len(idx)
            return np.full(len(idx), -EAGAIN, dtype=np.int32)
        if wait:
            st.stall_s += wait
            self.clock.advance(wait)
        held = o.gtt[idx] >= 0
        core.unpin_pages(src[held])
        res = core.migrate_folio(obj, idx, src, dst)
        moved = res == 0
        self.gem.migrate_commit(o, idx[moved], dst[moved])
        repin = np.where(moved, dst, src)[held]
        core.pin_pages(repin)
        return res

    def putback(self, core: MigrationCore, obj: GemObject, idx: I64) -> None:
        return None

    # -- notifier -------------------------------------------------------------------------------
    def invalidate(self, core: MigrationCore, obj: GemObject, start: int, count: int) -> int:
        o = self.gem.objects.get(obj.id)
        if o is None:
            return 0
        if o.busy(self.clock.now):
            wait = o.busy_until - self.clock.now
            self.gem.stats.stall_s += wait
            self.clock.advance(wait)
        core.unpin_pages(self.gem.invalidate(o, start, count))
        return 0
