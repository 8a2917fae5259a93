"""`gemfs bench mm`: speed of the memory model, in process."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from driver.gem import DriverObject
from driver.inproc import InprocDriver
from gemfs.mm import PAGE_SIZE, Design, MemoryManager, MigrateMode, MigrateType
from gemfs.mm.types import format_size
from tools.inproc_backend import InprocBackend
from tools.player import play
from tools.workload import (
    Amount,
    Create,
    Free,
    Gpu,
    Noise,
    PageCache,
    Phase,
    Probe,
    Repeat,
    Workload,
    load_workload,
)


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    note: str = ""


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def fragment_like_compaction_test(
    mm: MemoryManager, drv: InprocDriver, chunk: int = 1 << 20
) -> int:
    """80% of the pool in GPU-bound objects of ``chunk`` bytes, the rest page cache, every
    other chunk freed."""
    chunks: list[DriverObject] = []
    target = int(mm.pool.nr_pages * 0.8) * PAGE_SIZE
    while len(chunks) * chunk + chunk <= target:
        o = drv.create(chunk)
        drv.execute([o], 0.0, write=True)
        chunks.append(o)
    cache = mm.create_object(migratetype=MigrateType.MOVABLE, path="page-cache")
    mm.populate(cache, 0, mm.buddy.free_pages)
    for o in chunks[::2]:
        drv.close(o)
    return len(chunks)


def bench_mm(size: str = "4GiB", big: str = "16GiB", pairs: int = 200_000) -> list[Figure]:
    figs: list[Figure] = []
    mm = MemoryManager(size, design=Design.SHMEM_HOOK)
    try:
        # order-0 alloc+free pairs
        buddy = mm.buddy
        t = time.perf_counter()
        for _ in range(pairs):
            pfn = buddy.alloc(0, MigrateType.MOVABLE)
            buddy.free_block(pfn, 0)
        figs.append(Figure("order-0 alloc+free", _rate(pairs, time.perf_counter() - t), "pairs/s"))
        # 64 MiB object allocation (frames zeroed, as shmem hands out zeroed pages)
        n = 64 << 20
        t = time.perf_counter()
        obj = mm.create_object(n)
        dt = time.perf_counter() - t
        figs.append(Figure("object alloc 64MiB", _rate(n // PAGE_SIZE, dt), "pages/s"))
        # migrations in process, batches of 512
        src_all = obj.pages.copy()
        moved = 0
        t = time.perf_counter()
        for i in range(0, len(src_all), 512):
            src = obj.pages[i : i + 512].copy()
            free = np.flatnonzero(mm.pool.flags[-(1 << 18) :] & 1)[: len(src)]
            dst = (free + mm.pool.nr_pages - (1 << 18)).astype(np.int64)
            moved += mm.migrate_pages(src, dst, MigrateMode.SYNC).success
        dt = time.perf_counter() - t
        mig = _rate(moved, dt)
        figs.append(Figure("migrations (batches of 512)", mig, "pages/s"))
        # baseline: the bare frame copy those migrations contain
        src, dst = obj.pages.copy(), src_all
        t = time.perf_counter()
        for i in range(0, len(src), 512):
            mm.pool.frames[dst[i : i + 512]] = mm.pool.frames[src[i : i + 512]]
        copy = _rate(len(src), time.perf_counter() - t)
        figs.append(Figure("baseline: bare frame copy", copy, "pages/s", f"ratio {mig / copy:.2f}"))
        mm.destroy_object(obj)
    finally:
        mm.close()
    # full compaction of the fragmented compaction-test pool
    mm = MemoryManager(size, design=Design.SHMEM_HOOK)
    try:
        drv = InprocDriver(mm, Design.SHMEM_HOOK)
        fragment_like_compaction_test(mm, drv)
        before = mm.order_free_units(9)
        t = time.perf_counter()
        mm.compact()
        dt = time.perf_counter() - t
        after = mm.order_free_units(9)
        moved = mm.vmstat["pgmigrate_success"]
        note = f"order-9 blocks {before} -> {after}, {moved} pages moved, target < 2 s"
        figs.append(Figure(f"full compaction {format_size(mm.pool.size)}", dt, "s", note))
        figs.append(Figure("compaction migration rate", _rate(moved, dt), "pages/s"))
        figs.append(
            Figure("metadata", mm.pool.metadata_bytes / mm.pool.nr_pages, "bytes/frame", size)
        )
    finally:
        mm.close()
    # a 16 GiB pool runs at all
    t = time.perf_counter()
    mm = MemoryManager(big, design=Design.SHMEM_HOOK)
    try:
        obj = mm.create_object(256 << 20)
        mm.compact()
        dt = time.perf_counter() - t
        per = mm.pool.metadata_bytes / mm.pool.nr_pages
        figs.append(Figure(f"pool {big}: create + 256MiB + compact", dt, "s"))
        figs.append(Figure("metadata", per, "bytes/frame", f"{big}, {mm.pool.nr_pages} frames"))
        del obj
    finally:
        mm.close()
    return figs


# -----------------------------------------------------------------------------------------------
# Direct compaction under probe load, and a scaled desktop played in process


def scale_workload(w: Workload, factor: int) -> Workload:
    """The workload on a pool ``factor`` times larger with every count ``factor`` times larger
    (fills, fractions and sizes unchanged): the same story, more of it."""

    def amount(a: Amount) -> Amount:
        return replace(a, count=a.count * factor) if a.count is not None else a

    def one(p: Phase) -> Phase:
        match p:
            case Create() | PageCache():
                return replace(p, amount=amount(p.amount))
            case Noise():
                return replace(p, count=p.count * factor)
            case Probe(count=int(n)):
                return replace(p, count=n * factor)
            case Gpu(count=int(n)) | Free(count=int(n)):
                return replace(p, count=n * factor)
            case Repeat():
                return replace(p, phases=tuple(one(q) for q in p.phases))
            case _:
                return p

    return replace(w, pool=w.pool * factor, phases=tuple(one(p) for p in w.phases))


PROBE_CHUNK = 256 << 10


@dataclass(frozen=True)
class ProbeFigure:
    design: str
    attempts: int
    succeeded: int
    seconds: float
    migrate_scanned: int
    free_scanned: int
    migrated: int

    @property
    def rate(self) -> float:
        return _rate(self.attempts, self.seconds)


def bench_direct_compaction(
    size: str = "4GiB", design: Design = Design.PINNED, attempts: int = 400
) -> ProbeFigure:
    """THP-fault-like order-9 attempts (each block kept) on the compaction-test fragmentation
    with 256 KiB chunks (1 MiB holes would make the kernel's fragmentation index call the
    failure lack of memory, and compaction_suitable() would skip every attempt)."""
    mm = MemoryManager(size, design=design)
    try:
        drv = InprocDriver(mm, design)
        fragment_like_compaction_test(mm, drv, PROBE_CHUNK)
        v0 = dict(mm.vmstat.counters)
        got = 0
        t = time.process_time()
        for _ in range(attempts):
            if mm.alloc_high_order(9, MigrateType.MOVABLE, kind="thp") is not None:
                got += 1
        dt = time.process_time() - t
        v = mm.vmstat.counters
        return ProbeFigure(
            design.value,
            attempts,
            got,
            dt,
            v["compact_migrate_scanned"] - v0.get("compact_migrate_scanned", 0),
            v["compact_free_scanned"] - v0.get("compact_free_scanned", 0),
            v["pgmigrate_success"] - v0.get("pgmigrate_success", 0),
        )
    finally:
        mm.close()


def play_scaled(path: Path, factor: int, design: Design = Design.PINNED) -> tuple[float, int]:
    """CPU seconds to play a workload scaled by ``factor`` in process; and its probes that
    succeeded."""
    w = scale_workload(load_workload(path), factor)
    t = time.process_time()
    record = play(w, InprocBackend(w, design), design).record
    return time.process_time() - t, int(record.probes["succeeded"])
