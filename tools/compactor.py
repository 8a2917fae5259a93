"""`gemfs compactor`: kcompactd as its own process.

It runs the compaction policy of :mod:`gemfs.mm.compaction` from outside: it fetches a snapshot
of the pool (frame flags, pageblock types, free blocks per order), lets the policy choose
sources and targets, and asks the core to migrate them in batches; the core asks the owners.
When to wake and what to compact are :class:`gemfs.mm.kcompactd.Kcompactd`'s rules -- the same
code the in-process backend runs. It wakes on the wall clock (a person at a shell) or, with
``model_clock``, whenever the core's modelled clock reaches its next wake (a workload player).
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
from gemfs.control.peer import CallError, Peer, connect
from gemfs.control.protocol import Call
from gemfs.mm.compaction import CompactionPolicy, CompactResult, ZoneCompactState
from gemfs.mm.kcompactd import Kcompactd
from gemfs.mm.pool import PG_ALLOC, PG_FREE, PG_OBJECT
from gemfs.mm.types import MigrateMode

log = logging.getLogger("gemfs.compactor")


@dataclass
class SnapshotView:
    """The policy's view of the pool, kept up to date with each batch's results."""

    flags: npt.NDArray[np.uint8]
    pageblock_mt: npt.NDArray[np.uint8]
    free: list[int]
    hopeless: npt.NDArray[np.bool_] | None = None  # Illuminator's blocks (if the core has it)

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> SnapshotView:
        raw = r.get("hopeless")
        return cls(
            np.frombuffer(r["flags"], dtype=np.uint8).copy(),
            np.frombuffer(r["pageblock_mt"], dtype=np.uint8).copy(),
            list(r["free"]),
            np.frombuffer(raw, dtype=np.uint8).astype(np.bool_) if isinstance(raw, bytes) else None,
        )

    def free_blocks_per_order(self) -> list[int]:
        return self.free

    def hopeless_pageblocks(self) -> npt.NDArray[np.bool_] | None:
        return self.hopeless


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
    policy: CompactionPolicy | None = None,
    now: float | None = None,
) -> CompactResult:
    """One compaction pass run from this process against the core's mechanism.

    ``policy`` (from :class:`gemfs.mm.kcompactd.Kcompactd`) or one built from order, mode and
    proactiveness. ``now``: this task's modelled start time (default: the core's clock); each
    batch's costs move it on, as they would move a kcompactd thread's time.
    """
    reply = await core.call("snapshot", {})
    snap = SnapshotView.from_reply(reply)
    if policy is None:  # compact_memory's kind: skip hints ignored (and set)
        policy = CompactionPolicy(
            len(snap.pageblock_mt),
            order=order,
            mode=mode,
            proactiveness=proactiveness,
            ignore_skip_hint=True,
        )
    if policy.state is None and isinstance(reply.get("compact_state"), dict):
        # The pass sets skip bits and moves the cached scanners in a copy of the zone's
        # state; the core takes what it left at the end.
        policy.state = ZoneCompactState.imported(len(snap.pageblock_mt), reply["compact_state"])
    t = float((await core.call("clock", {}))["now"]) if now is None else now
    tracing = bool(reply.get("tracing"))  # the core traces: tell it where the pass begins
    if tracing:
        await core.call("trace_pass", _pass_point("begin", policy))
    sent = 0  # pages scanned and already charged to this task through a migrate call
    while (batch := policy.next_batch(snap)) is not None:
        scanned = policy.stats.migrate_scanned + policy.stats.free_scanned
        r = await core.call(
            "migrate",
            {
                "src": batch.src.astype("<i8").tobytes(),
                "dst": batch.dst.astype("<i8").tobytes(),
                "mode": policy.mode.name.lower(),
                "now": t,
                "scanned": scanned - sent,  # the scanners' time comes before the batch
            },
        )
        sent = scanned
        t = float(r.get("t", t))
        res = arrays.results(r["results"])
        snap.free = list(r["free"])
        moved = res == 0
        snap.flags[batch.src[moved]] = PG_FREE
        snap.flags[batch.dst[moved]] = PG_ALLOC | PG_OBJECT
        policy.batch_done(batch, res)
        if np.any(res == -errno.EBUSY):
            # Our view went stale (the pool changed under us): look again, keep the scanners
            # and the queued targets (the next batch drops those no longer free, as in process).
            fresh = SnapshotView.from_reply(await core.call("snapshot", {}))
            snap.flags, snap.pageblock_mt, snap.free = fresh.flags, fresh.pageblock_mt, fresh.free
            snap.hopeless = fresh.hopeless
    s = policy.stats
    if stats is not None:
        stats.passes += 1
        stats.migrated += s.migrated
        stats.failed += s.failed
        stats.migrate_scanned += s.migrate_scanned
        stats.free_scanned += s.free_scanned
        stats.results.append(policy.result.value)
    report: dict[str, Any] = {
        "counters": {
            "compact_migrate_scanned": s.migrate_scanned,
            "compact_free_scanned": s.free_scanned,
        },
        "scanned": s.migrate_scanned + s.free_scanned - sent,
    }
    if policy.state is not None:
        report["compact_state"] = policy.state.export()
    await core.call("report", report)
    if tracing:
        await core.call("trace_pass", _pass_point("end", policy))
    return policy.result


def _pass_point(at: str, policy: CompactionPolicy) -> dict[str, Any]:
    """The ``trace_pass`` op's arguments: what mm_compaction_begin/end print of the pass."""
    return {
        "at": at,
        "migrate_block": policy.migrate_block,
        "free_block": policy.free_block,
        "mode": policy.mode.name.lower(),
        "result": policy.result.value,
    }


async def kcompactd_wake(
    core: Peer, kc: Kcompactd, proactiveness: int | None, stats: CompactorStats, now: float | None
) -> None:
    """One wake-up of the shared kcompactd rules, its passes run through the core."""
    stats.wakeups += 1
    r = await core.call("fragmentation", {})
    p = int(r["proactiveness"]) if proactiveness is None else proactiveness
    free: list[int] = list(r["free"])

    async def flush() -> None:  # counters reach the pool's vmstat before the work they count
        counters = kc.take_counters()
        if counters:
            await core.call("report", {"counters": counters})

    # Order work (kswapd's pending order, or --order) runs in the core, in the zone's state.
    work: dict[str, Any] = {"order": kc.order}
    if now is not None:
        work["now"] = now
    worked = bool((await core.call("kcompactd_work", work))["worked"])
    if worked:
        free[:] = list((await core.call("fragmentation", {}))["free"])
    for policy in kc.wake(lambda: free, p, worked=worked):
        await flush()
        await compact_remote(core, policy=policy, stats=stats, now=now)
        free[:] = list((await core.call("fragmentation", {}))["free"])
    await flush()


async def proactive_loop(
    core: Peer, proactiveness: int | None, interval: float, stats: CompactorStats, order: int
) -> None:
    """kcompactd on the wall clock (a person at a shell): wake every ``interval`` seconds.

    With ``proactiveness`` None the mount's own knob (``.gemfs/compaction_proactiveness``) is
    read at every wake-up, as kcompactd reads the sysctl.
    """
    snap = await core.call("fragmentation", {})
    kc = _kcompactd(snap, order)
    while True:
        await trio.sleep(interval)
        await kcompactd_wake(core, kc, proactiveness, stats, None)


def _kcompactd(frag: dict[str, Any], order: int) -> Kcompactd:
    reserve = frag.get("defrag_reserve", 0)
    if not isinstance(reserve, int) or reserve < 0:
        raise RuntimeError("the core sent a bad defrag_reserve")
    return Kcompactd(_nr_pageblocks(frag), order=order, reserve=reserve)


def _nr_pageblocks(frag: dict[str, Any]) -> int:
    nr = frag.get("nr_pageblocks")
    if not isinstance(nr, int) or nr <= 0:
        raise RuntimeError("the core did not say how many pageblocks the pool has")
    return nr


async def run_compactor(
    control: str,
    *,
    order: int = -1,
    proactiveness: int | None = None,
    once: bool = False,
    interval: float = 0.5,
    model_clock: bool = False,
) -> CompactorStats:
    """``model_clock``: wake when the core's modelled clock reaches each interval (a workload
    player drives it), not on the wall clock."""
    stats = CompactorStats()
    kc: Kcompactd | None = None

    async def on_call(peer: Peer, call: Call) -> Any:
        if call.op != "wake" or kc is None:
            raise CallError("EOPNOTSUPP", f"unknown call {call.op!r}")
        now = call.args.get("now")
        if not isinstance(now, int | float):
            raise CallError("EINVAL", "now must be a number")
        await kcompactd_wake(peer, kc, proactiveness, stats, float(now))
        return 0

    core = await connect(control, "compactor", "kcompactd", on_call=on_call)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.serve)
        try:
            if once:
                await compact_remote(core, order=-1, mode=MigrateMode.SYNC, stats=stats)
            elif model_clock:
                kc = _kcompactd(await core.call("fragmentation", {}), order)
                await core.call("kcompactd", {"interval_s": interval})
                await trio.sleep_forever()
            else:
                await proactive_loop(core, proactiveness, interval, stats, order)
        finally:
            nursery.cancel_scope.cancel()
    return stats
