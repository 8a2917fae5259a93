"""`gemfs compactor`: kcompactd as its own process.

It runs the compaction policy of :mod:`gemfs.mm.compaction` from outside: it fetches a snapshot
of the pool (frame flags, pageblock types, free blocks per order), lets the policy choose
sources and targets, and asks the core to migrate them in batches; the core calls the owners'
callbacks. Proactive mode wakes every interval, compares the fragmentation score with the
proactiveness watermarks, and backs off when a pass makes no progress (like kcompactd's
proactive_defer).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from gemfs.control import arrays
from gemfs.control.peer import Peer, connect
from gemfs.mm.compaction import CompactionPolicy, CompactResult
from gemfs.mm.pool import PG_ALLOC, PG_FREE, PG_OBJECT
from gemfs.mm.types import MigrateMode
from gemfs.mm.vmstat import fragmentation_score, proactive_watermarks

log = logging.getLogger("gemfs.compactor")
MAX_DEFER = 32  # wakeups to skip after a pass that did not lower the score


@dataclass
class SnapshotView:
    """The policy's view of the pool, kept up to date with each batch's results."""

    flags: npt.NDArray[np.uint8]
    pageblock_mt: npt.NDArray[np.uint8]
    free: list[int]

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> SnapshotView:
        return cls(
            np.frombuffer(r["flags"], dtype=np.uint8).copy(),
            np.frombuffer(r["pageblock_mt"], dtype=np.uint8).copy(),
            list(r["free"]),
        )

    def free_blocks_per_order(self) -> list[int]:
        return self.free


@dataclass
class CompactorStats:
    wakeups: int = 0
    passes: int = 0
    migrated: int = 0
    failed: int = 0
    migrate_scanned: int = 0
    free_scanned: int = 0
    deferred: int = 0
    results: list[str] = field(default_factory=list)


async def compact_remote(
    core: Peer,
    *,
    order: int = -1,
    mode: MigrateMode = MigrateMode.SYNC,
    proactiveness: int | None = None,
    stats: CompactorStats | None = None,
) -> CompactResult:
    """One compaction pass run from this process against the core's mechanism."""
    snap = SnapshotView.from_reply(await core.call("snapshot", {}))
    policy = CompactionPolicy(
        len(snap.pageblock_mt), order=order, mode=mode, proactiveness=proactiveness
    )
    while (batch := policy.next_batch(snap)) is not None:
        r = await core.call(
            "migrate",
            {
                "src": batch.src.astype("<i8").tobytes(),
                "dst": batch.dst.astype("<i8").tobytes(),
                "mode": mode.name.lower(),
            },
        )
        res = arrays.results(r["results"])
        snap.free = list(r["free"])
        moved = res == 0
        snap.flags[batch.src[moved]] = PG_FREE
        snap.flags[batch.dst[moved]] = PG_ALLOC | PG_OBJECT
        policy.batch_done(batch, res)
        if np.any(res == -errno.EBUSY):
            # Our view went stale (the pool changed under us): look again, keep the scanners.
            fresh = SnapshotView.from_reply(await core.call("snapshot", {}))
            snap.flags, snap.pageblock_mt, snap.free = fresh.flags, fresh.pageblock_mt, fresh.free
            policy.forget_targets()
    s = policy.stats
    if stats is not None:
        stats.passes += 1
        stats.migrated += s.migrated
        stats.failed += s.failed
        stats.migrate_scanned += s.migrate_scanned
        stats.free_scanned += s.free_scanned
        stats.results.append(policy.result.value)
    await core.call(
        "report",
        {
            "counters": {
                "compact_daemon_migrate_scanned": s.migrate_scanned,
                "compact_daemon_free_scanned": s.free_scanned,
                "compact_migrate_scanned": s.migrate_scanned,
                "compact_free_scanned": s.free_scanned,
            }
        },
    )
    return policy.result


async def proactive_loop(
    core: Peer, proactiveness: int | None, interval: float, stats: CompactorStats
) -> None:
    """kcompactd's proactive compaction: wake, compare the score, compact, back off.

    With ``proactiveness`` None the mount's own knob (``.gemfs/compaction_proactiveness``) is
    read at every wake-up, as kcompactd reads the sysctl.
    """
    defer = 0
    backoff = 1
    while True:
        await trio.sleep(interval)
        stats.wakeups += 1
        await core.call("report", {"counters": {"compact_daemon_wake": 1}})
        if defer:
            defer -= 1
            stats.deferred += 1
            continue
        r = await core.call("fragmentation", {})
        p = int(r["proactiveness"]) if proactiveness is None else proactiveness
        if p <= 0:
            continue
        score = fragmentation_score(r["free"])
        _low, high = proactive_watermarks(p)
        if score <= high:
            backoff = 1
            continue
        await core.call("report", {"counters": {"proactive_compact_trigger": 1}})
        await compact_remote(core, mode=MigrateMode.SYNC_LIGHT, proactiveness=p, stats=stats)
        after = fragmentation_score((await core.call("fragmentation", {}))["free"])
        if after >= score:  # no progress: don't hammer the owners
            defer = backoff
            backoff = min(backoff * 2, MAX_DEFER)
        else:
            backoff = 1


async def run_compactor(
    control: str,
    *,
    order: int = 9,
    proactiveness: int | None = None,
    once: bool = False,
    interval: float = 0.5,
) -> CompactorStats:
    stats = CompactorStats()
    core = await connect(control, "compactor", "kcompactd")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.serve)
        try:
            if once:
                await compact_remote(core, order=-1, mode=MigrateMode.SYNC, stats=stats)
            else:
                await proactive_loop(core, proactiveness, interval, stats)
        finally:
            nursery.cancel_scope.cancel()
    return stats
