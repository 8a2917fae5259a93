"""`gemfs bench migrate`: pages/s moved through the driver's callbacks over the socket."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from gemfs.control import arrays
from gemfs.mm.pool import PG_ALLOC, PG_FREE, PG_OBJECT
from gemfs.mm.types import Design, MigrateType
from tools.stack_backend import Stack


@dataclass(frozen=True)
class MigrateFigures:
    single_pages_s: float
    batched_pages_s: float
    batch: int
    p50_us: float
    p99_us: float
    single_p50_us: float
    inproc_pages_s: float
    big_batch: int = 0
    big_pages_s: float = 0.0


def _frames(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    snap = stack.core.call("snapshot")
    flags = np.frombuffer(snap["flags"], dtype=np.uint8)
    used = np.flatnonzero((flags & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT))
    free = np.flatnonzero(flags & PG_FREE)
    return used.astype(np.int64), free.astype(np.int64)


def _latencies(stack: Stack, since: int) -> np.ndarray:
    lat = stack.core.call("stats")["callback_wall_us"]
    return np.asarray(lat[since:], dtype=np.float64)


def _move(stack: Stack, n: int, batch: int) -> tuple[float, int]:
    """Move n object pages in calls of `batch` pages; returns (pages/s, pages moved)."""
    moved = 0
    t = time.perf_counter()
    while moved < n:
        used, free = _frames(stack)
        k = min(batch, n - moved, len(used), len(free))
        rounds = max(1, min((n - moved) // k, 256))
        for r in range(rounds):
            src = used[r * k : (r + 1) * k]
            dst = free[-(r + 1) * k : len(free) - r * k]
            if len(src) < k or len(dst) < k:
                break
            out = stack.core.call(
                "migrate", {"src": src.astype("<i8").tobytes(), "dst": dst.astype("<i8").tobytes()}
            )
            moved += int(np.count_nonzero(arrays.results(out["results"]) == 0))
    return moved / (time.perf_counter() - t), moved


def _inproc_rate(pages: int, batch: int) -> float:
    from driver.inproc import InprocDriver
    from gemfs.mm import MemoryManager

    mm = MemoryManager("256MiB", design=Design.SHMEM_HOOK)
    mm.prefault()  # as the mount does: no first-touch faults in the copies
    try:
        drv = InprocDriver(mm, Design.SHMEM_HOOK)
        objs = [drv.create(1 << 20) for _ in range(pages // 256)]
        drv.execute(objs, 0.0, write=True)
        moved = 0
        t = time.perf_counter()
        while moved < pages:
            used = np.flatnonzero(mm.pool.owner > 0).astype(np.int64)[:batch]
            free = np.flatnonzero(mm.pool.flags & PG_FREE).astype(np.int64)[-batch:]
            moved += mm.migrate_pages(used, free).success
        return moved / (time.perf_counter() - t)
    finally:
        mm.close()


def bench_migrate(pages: int = 16384, single: int = 1000, batch: int = 512) -> MigrateFigures:
    with Stack("256MiB", Design.SHMEM_HOOK) as stack:
        for _ in range(pages // 256):
            r = stack.drv.call("create", {"size": 1 << 20})
            stack.drv.call("exec", {"objs": [r["obj"]], "duration_ms": 0, "write": True})
        n0 = len(stack.core.call("stats")["callback_wall_us"])
        one, _ = _move(stack, single, 1)
        lat1 = _latencies(stack, n0)
        n1 = n0 + len(lat1)
        many, _ = _move(stack, pages, batch)
        latb = _latencies(stack, n1)
        big = 8 * batch
        bigrate, _ = _move(stack, pages, big)
        bad = stack.drv.call("verify")
        if bad["bad_objects"] or bad["data_errors"]:
            raise RuntimeError(f"data errors after the benchmark: {bad}")
    p50, p99 = np.percentile(latb, [50, 99]).tolist() if len(latb) else (0.0, 0.0)
    s50 = float(np.percentile(lat1, 50)) if len(lat1) else 0.0
    base = _inproc_rate(pages, batch)
    return MigrateFigures(one, many, batch, p50, p99, s50, base, big, bigrate)


__all__ = ["MigrateFigures", "MigrateType", "bench_migrate"]
