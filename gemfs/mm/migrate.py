"""The migration mechanism, once: a state machine that does no I/O, for both backends.

One batch of (source, target) frames goes through it like ``migrate_pages_batch``:

1. :meth:`Migration.start` validates the batch, isolates the targets, splits it by object, and
   moves the pages nobody owns at once (plain shmem: ``migrate_folio``, which refuses pinned
   pages with -EAGAIN). For pages whose object has an owner it isolates them first -- from
   here until they are settled no pin is granted on them -- and returns what it needs next:
   an :class:`AskMigrate` per owner (the hook and mount-wide designs: "stop using these pages
   of these objects"; one call per owner per batch) or an :class:`AskInvalidate` per object
   range (the notifier design).
2. Whoever drives the machine delivers each ask to its owner -- in process by calling the
   driver, on the server by awaiting the owner's socket, all owners at once -- and hands the
   answer back with :meth:`Migration.answer`. For a consent the machine carries the owner's
   pins from the old frame to the new one and moves the page; for an invalidation it drops the
   owner's pins in the range and moves what is no longer pinned; anything refused is put back.
   It returns a :class:`Migrated` notice for the owner (which pages now live where).
3. :meth:`Migration.finish` frees the old frames, releases unused targets and counts.

Modes: the owner decides from ``ask.mode`` and ``ask.now`` how long it may wait for its GPU
(ASYNC never, SYNC_LIGHT a bounded time, SYNC as long as it takes) and says how long it waited
(modelled seconds). The machine charges every cost in :class:`gemfs.mm.costs.CostTable` to the
task that runs the batch and to the pool's ledger.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gemfs.mm.costs import Task
from gemfs.mm.objects import GemObject
from gemfs.mm.ops import Owner, Results
from gemfs.mm.pool import I64, PG_ISOLATED, Bools
from gemfs.mm.types import MigrateMode

if TYPE_CHECKING:
    from gemfs.mm.core import MemoryManager, MigrateOutcome, MigrationBatch, MigrationRequest

EAGAIN = errno.EAGAIN
EBUSY = errno.EBUSY


@dataclass(frozen=True, slots=True, eq=False)
class Part:
    """One object's pages in an ask (positions ``sel`` in the batch)."""

    obj: GemObject
    idx: I64
    src: I64
    dst: I64
    sel: I64


@dataclass(frozen=True, slots=True, eq=False)
class AskMigrate:
    """Ask an owner to stop using these pages (wait idle, drop its use) so they may move."""

    owner: Owner
    parts: tuple[Part, ...]
    mode: MigrateMode
    now: float


@dataclass(frozen=True, slots=True, eq=False)
class AskInvalidate:
    """Notifier: the range [start, start+count) of the object is about to change."""

    owner: Owner
    part: Part
    start: int
    count: int
    mode: MigrateMode
    now: float


Ask = AskMigrate | AskInvalidate


@dataclass(frozen=True, slots=True)
class Answer:
    """An owner's reply. ``results`` per part of an AskMigrate (0: stopped using the page, it
    may move; -EAGAIN: busy, retry later; -EBUSY: refused this time, as migrate_pages treats
    any error but -EAGAIN: the page stays and the pass moves on; other -errno: never); ``rc``
    for an AskInvalidate (0 done, -EAGAIN busy); ``waited_s`` modelled seconds it waited for its
    GPU (a stall); ``lock_s`` modelled seconds the callback spent on the driver's own lock (the
    migrating task's time, not a GPU stall); ``dropped`` per part: the owner dropped the
    object's whole backing store (every pin it held on the object goes, and its next use
    re-faults every page: i915-2016); ``failed``: no usable answer (a timeout, a dead owner, a
    malformed reply) -- every page stays where it is."""

    results: tuple[Results, ...] = ()
    rc: int = 0
    waited_s: float = 0.0
    lock_s: float = 0.0
    dropped: tuple[bool, ...] = ()
    failed: str = ""

    @classmethod
    def failure(cls, why: str) -> Answer:
        return cls(failed=why)


@dataclass(frozen=True, slots=True, eq=False)
class Migrated:
    """To a migrate owner after its answer was applied: per object, the pages asked about,
    their new frames, and which of them moved (it may use the objects again)."""

    owner: Owner
    parts: tuple[tuple[GemObject, I64, I64, Bools], ...]


@dataclass(eq=False)
class Migration:
    mm: MemoryManager
    src: I64
    dst: I64
    mode: MigrateMode
    task: Task
    batch: MigrationBatch | None = None
    _max_wait: float = 0.0
    _pending: int = 0
    _isolated: dict[int, Bools] = field(default_factory=dict)  # id(part) -> isolated mask

    # -- 1. start ---------------------------------------------------------------------------
    def start(self) -> list[Ask]:
        mm = self.mm
        self.batch = batch = mm.migrate_begin(self.src, self.dst, self.mode)
        groups: dict[int, tuple[Owner, list[Part]]] = {}
        asks: list[Ask] = []
        now = self.task.t
        for req in batch.requests:
            owner, notifier = mm.owner_of(req.obj)
            if owner is None:
                batch.results[req.sel] = self._local(req)
                continue
            part = self._isolate(req)
            if part is None:
                continue
            if notifier:
                lo, hi = int(part.idx.min()), int(part.idx.max()) + 1
                asks.append(AskInvalidate(owner, part, lo, hi - lo, self.mode, now))
            else:
                groups.setdefault(id(owner), (owner, []))[1].append(part)
        for owner, parts in groups.values():
            asks.append(AskMigrate(owner, tuple(parts), self.mode, now))
        self._pending = len(asks)
        return asks

    def _isolate(self, req: MigrationRequest) -> Part | None:
        """Take the request's live pages off (PG_ISOLATED): no pin, no truncate until settled."""
        mm = self.mm
        assert self.batch is not None
        part_req, live = mm.narrow_request(req)
        self.batch.results[req.sel[~live]] = -EBUSY
        if len(part_req.src) == 0:
            return None
        mm.pool.flags[part_req.src] |= PG_ISOLATED
        return Part(part_req.obj, part_req.idx, part_req.src, part_req.dst, part_req.sel)

    def _local(self, req: MigrationRequest) -> Results:
        """Plain shmem (no owner): migrate_folio now; pinned pages are refused."""
        mm = self.mm
        part, live = mm.narrow_request(req)
        res = np.full(len(req.src), -EBUSY, dtype=np.int32)
        if len(part.src):
            out = mm.migrate_folio(part.obj, part.idx, part.src, part.dst)
            self._count(part.obj, part.idx, out, moved_cost=True)
            res[live] = out
        return res

    # -- 2. answers -------------------------------------------------------------------------
    def answer(self, ask: Ask, ans: Answer) -> Migrated | None:
        """Apply an owner's answer to its ask; a notice for the owner (or None)."""
        self._pending -= 1
        mm = self.mm
        costs = mm.costs
        ledger = mm.ledger
        if not ans.failed:
            ledger.callbacks += 1
            mm.vmstat.inc(
                "gem_invalidate_callbacks"
                if isinstance(ask, AskInvalidate)
                else "gem_migrate_callbacks"
            )
            self.task.charge(costs.callback_us)
        elif ans.failed == "timeout":
            mm.vmstat.inc("gem_callback_timeouts")
        else:
            mm.vmstat.inc("pgmigrate_aborted", sum(len(p.idx) for p in _parts(ask)))
        waited = max(0.0, ans.waited_s) if not ans.failed else 0.0
        lock = max(0.0, ans.lock_s) if not ans.failed else 0.0
        if lock:
            mm.vmstat.inc("gem_callback_lock_us", round(lock * 1e6))
        # the owners were asked at once: the task waits for the slowest (lock, then GPU)
        self._max_wait = max(self._max_wait, waited + lock)
        if isinstance(ask, AskInvalidate):
            self._invalidated(ask, ans, waited)
            return None
        return self._consented(ask, ans, waited)

    def _consented(self, ask: AskMigrate, ans: Answer, waited: float) -> Migrated | None:
        mm = self.mm
        c = mm.costs
        stall_us = waited * 1e6
        mm.ledger.waits_us += stall_us
        notices = []
        for k, part in enumerate(ask.parts):
            n = len(part.idx)
            out = np.full(n, -EAGAIN, dtype=np.int32)
            if not ans.failed and k < len(ans.results) and len(ans.results[k]) == n:
                out = np.asarray(ans.results[k], dtype=np.int32).copy()
            mm.vmstat.inc("gem_migrate_callback_ebusy", int(np.count_nonzero(out == -EBUSY)))
            obj = part.obj
            alive = mm.objects.get(obj.id) is obj and mm.owner_of(obj)[0] is ask.owner
            dropped = alive and not ans.failed and k < len(ans.dropped) and ans.dropped[k]
            if dropped:
                stall_us += self._drop(ask.owner, obj)
            consent = (out == 0) & alive
            if dropped:
                # The owner let its whole backing store go (i915-2016): a page someone else
                # still pins is "still referenced" (page_count > 2), and the patch answers
                # -EBUSY for it rather than letting migrate_page() fail with -EAGAIN.
                ref = consent & (mm.pool.pin[part.src] > 0)
                out[ref] = -EBUSY
                consent &= ~ref
            if not alive:
                out[out == 0] = -EBUSY
            if np.any(consent):
                still = _still_mapped(obj, part.idx, part.src)
                out[consent & ~still] = -EBUSY
                consent &= still
            moved = np.zeros(n, dtype=np.bool_)
            held = np.zeros(n, dtype=np.bool_)
            if np.any(consent):
                held = mm.pins.held_mask(ask.owner, obj.id, part.idx) & consent
                mm.unpin_pages(part.src[held])
                res = mm.migrate_folio(obj, part.idx[consent], part.src[consent], part.dst[consent])
                out[consent] = res
                moved = out == 0
                mm.pin_pages(np.where(moved, part.dst, part.src)[held])
                nh = int(np.count_nonzero(held))
                if nh:  # the owner unpinned and re-pinned (i915 put_pages / get_pages)
                    us = c.unpin_call_us + c.unpin_page_us * nh + c.pin_call_us
                    us += c.pin_page_us * nh
                    hm = int(np.count_nonzero(held & moved))
                    us += (c.gtt_pte_us + c.flush_page_us) * hm
                    mm.ledger.repinned_pages += hm
                    mm.ledger.migration_us += us
                    self.task.charge(us)
                    stall_us += us + c.copy_page_us * hm
            self._count(obj, part.idx, out, moved_cost=True)
            self._settle(part, out)
            notices.append((obj, part.idx, part.dst, moved))
        mm.ledger.gpu_stall_us += stall_us
        return Migrated(ask.owner, tuple(notices))

    def _drop(self, owner: Owner, obj: GemObject) -> float:
        """The owner dropped the object's backing store (i915 put_pages): every pin it held on
        the object goes, remembered for the re-fault on its next use. The unpin is charged to
        the task and as GPU stall (the object is unusable until re-faulted); returns its µs."""
        mm = self.mm
        c = mm.costs
        mm.vmstat.inc("gem_objects_dropped")
        dropped = mm.drop_holds(owner, obj, 0, len(obj.pages))
        if not dropped:
            return 0.0
        us = c.unpin_call_us + c.unpin_page_us * dropped
        mm.ledger.migration_us += us
        self.task.charge(us)
        return us

    def _invalidated(self, ask: AskInvalidate, ans: Answer, waited: float) -> None:
        mm = self.mm
        c = mm.costs
        part = ask.part
        obj = part.obj
        n = len(part.idx)
        rc = -EAGAIN if ans.failed else ans.rc
        alive = mm.objects.get(obj.id) is obj and mm.owner_of(obj)[0] is ask.owner
        stall_us = waited * 1e6
        mm.ledger.waits_us += stall_us
        if rc != 0 or not alive:
            out = np.full(n, -EBUSY if rc == 0 else -abs(rc), dtype=np.int32)
        else:
            dropped = mm.drop_holds(ask.owner, obj, ask.start, ask.count)
            if dropped:
                us = c.unpin_call_us + c.unpin_page_us * dropped
                mm.ledger.migration_us += us
                self.task.charge(us)
                stall_us += us
            out = np.full(n, -EBUSY, dtype=np.int32)
            still = _still_mapped(obj, part.idx, part.src)
            if np.any(still):
                out[still] = mm.migrate_folio(
                    obj, part.idx[still], part.src[still], part.dst[still]
                )
        self._count(obj, part.idx, out, moved_cost=True)
        self._settle(part, out)
        mm.ledger.gpu_stall_us += stall_us

    def _count(self, obj: GemObject, idx: I64, out: Results, *, moved_cost: bool) -> None:
        mm = self.mm
        moved = int(np.count_nonzero(out == 0))
        mm.ledger.pages_migrated += moved
        if moved_cost and moved:
            us = mm.costs.copy_page_us * moved
            mm.ledger.migration_us += us
            self.task.charge(us)
        refused = out == -EAGAIN
        if np.any(refused):
            ids = np.full(int(np.count_nonzero(refused)), obj.id, dtype=np.int64)
            mm.ledger.refuse(ids, idx[refused])

    def _settle(self, part: Part, out: Results) -> None:
        """Record the part's results; pages that did not move are no longer isolated."""
        assert self.batch is not None
        back = out != 0
        if np.any(back):
            self.mm.pool.flags[part.src[back]] &= ~np.uint8(PG_ISOLATED)
        self.batch.results[part.sel] = out

    # -- 3. finish --------------------------------------------------------------------------
    def finish(self) -> MigrateOutcome:
        assert self.batch is not None
        # The owners were asked at the same moment and waited side by side: the task waited
        # as long as the longest of them.
        self.task.charge(self._max_wait * 1e6)
        return self.mm.migrate_end(self.batch)


def _parts(ask: Ask) -> tuple[Part, ...]:
    return (ask.part,) if isinstance(ask, AskInvalidate) else ask.parts


def _still_mapped(obj: GemObject, idx: I64, src: I64) -> Bools:
    inside = idx < len(obj.pages)
    still = np.zeros(len(idx), dtype=np.bool_)
    still[inside] = obj.pages[idx[inside]] == src[inside]
    return still
