"""`gemfs bench scale`: what a content-free pool costs from 1 GiB to 128 GiB.

For each pool size, in a fresh process (so its RSS is its own), the pool is filled the same way
in proportion: 512 GPU objects of 256 KiB bound, then page cache in 512 KiB files until it is
full, every other file dropped (half the memory free, no free 2 MiB block). Then it times a
light sample (what the player takes after every step), a GPU batch over 32 objects, and a
direct-compaction attempt for an order-9 block. Every figure is printed with its ratio to the
first size's; a size the machine cannot hold is skipped with one line.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from typing import Any

from gemfs.mm.pool import PoolTooLarge, check_memory, check_pool_size
from gemfs.mm.types import Design

SIZES = ("1GiB", "4GiB", "16GiB", "64GiB", "128GiB")


@dataclass(frozen=True)
class ScaleFigures:
    size: str
    rss_mib: float
    bytes_per_frame: float
    sample_us: float
    gpu_batch_us: float
    compaction_us: float
    setup_s: float


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(size: str) -> dict[str, Any]:
    from tools.inproc_backend import InprocBackend
    from tools.workload import parse_workload

    t0 = time.perf_counter()
    w = parse_workload(f'pool = "{size}"\n[[phase]]\nkind = "compact"\n', "scale.toml")
    b = InprocBackend(w, Design.SHMEM_HOOK)
    mm = b.mm
    objs = [b.create(256 << 10, "gpu", True) for _ in range(512)]
    # 512 KiB files, every other one dropped: half the memory free in 512 KiB holes (a
    # fragmentation index of 0.75, above the kernel's 0.5 threshold), so an order-9
    # allocation has to compact.
    files = [b.page_cache(512 << 10) for _ in range(mm.buddy.free_pages // 128)]
    for h in files[::2]:
        b.close(h)
    setup = time.perf_counter() - t0
    b.sample(full=False)  # the setup's changes are looked at once, here
    n = 200
    spent = 0.0
    for _ in range(n):
        h = b.page_cache(64 << 10)  # a little change between samples, as in a run
        t = time.perf_counter()
        b.sample(full=False)
        spent += time.perf_counter() - t
        b.close(h)
    sample_us = spent / n * 1e6
    t = time.perf_counter()
    for k in range(n):
        b.execute(objs[(k * 32) % 480 : (k * 32) % 480 + 32], 0.002, True)
        b.advance(0.0)
    batch_us = (time.perf_counter() - t) / n * 1e6
    # Direct compaction: allocate order-9 blocks until one needs compacting, then time the
    # attempts that do (each frees its block again so the next one has to work as well).
    attempts = 0
    spent = 0.0
    for _ in range(64):
        before = mm.vmstat["compact_stall"]
        t = time.perf_counter()
        b.probe(9)
        dt = time.perf_counter() - t
        if mm.vmstat["compact_stall"] > before:
            attempts += 1
            spent += dt
            if attempts >= 8:
                break
    b.release_probes()
    compaction_us = spent / attempts * 1e6 if attempts else 0.0
    out = {
        "size": size,
        "rss_mib": _rss_mib(),
        "bytes_per_frame": mm.pool.bytes_per_frame,
        "sample_us": sample_us,
        "gpu_batch_us": batch_us,
        "compaction_us": compaction_us,
        "setup_s": setup,
    }
    b.teardown()
    return out


def _child(size: str, q: Any) -> None:
    q.put(json.dumps(_measure(size)))


def bench_scale(sizes: tuple[str, ...] = SIZES) -> list[ScaleFigures | str]:
    """Per size: its figures, or one line saying why it was skipped."""
    out: list[ScaleFigures | str] = []
    ctx = mp.get_context("spawn")
    for size in sizes:
        nbytes = check_pool_size(size)
        try:
            check_memory(nbytes, content=False)
        except PoolTooLarge as e:
            out.append(f"{size}: skipped ({e})")
            continue
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(size, q))
        p.start()
        try:
            data = json.loads(q.get(timeout=3600))
        finally:
            p.join(60)
        out.append(ScaleFigures(**data))
    return out


def format_scale(rows: list[ScaleFigures | str]) -> str:
    figs = [r for r in rows if isinstance(r, ScaleFigures)]
    base = figs[0] if figs else None
    lines = [
        f"{'pool':>7} {'RSS MiB':>9} {'B/frame':>8} {'sample µs':>10} {'GPU batch µs':>13} "
        f"{'compaction µs':>14} {'setup s':>8}",
    ]
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
            continue
        lines.append(
            f"{r.size:>7} {r.rss_mib:>9.0f} {r.bytes_per_frame:>8.2f} {r.sample_us:>10.0f} "
            f"{r.gpu_batch_us:>13.0f} {r.compaction_us:>14.0f} {r.setup_s:>8.1f}"
        )
    if base is not None:
        lines.append("ratio to the first size (time per sample / GPU batch / compaction attempt):")
        for r in figs:
            lines.append(
                f"{r.size:>7}  sample x{r.sample_us / base.sample_us:.2f}  "
                f"batch x{r.gpu_batch_us / base.gpu_batch_us:.2f}  "
                f"compaction x{r.compaction_us / max(base.compaction_us, 1e-9):.2f}  "
                f"RSS x{r.rss_mib / base.rss_mib:.2f}"
            )
    return "\n".join(lines)


__all__ = ["SIZES", "ScaleFigures", "bench_scale", "format_scale"]
