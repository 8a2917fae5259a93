"""gemfs replay --design: GPU pages found in a kernel trace (tools/gpu_trace.py) and replayed
under each design's mechanism.

The trace is written line by line as the kernel prints it: i915's ``i915_gem_object_create``
(``obj=%p, size=0x%llx``) and ``i915_gem_object_destroy``, the page allocator's
``mm_page_alloc`` with the flags shmem asks for i915's pages, slab's reclaimable pages beside
them, ``mm_page_alloc_extfrag`` fallbacks, and a ``compact_memory`` (``mm_compaction_begin`` /
``mm_compaction_end``). Story: ``cp`` fills a 16 MiB zone with page cache, drops 32 pages at the
bottom of every pageblock, a GL client's objects take exactly those (i915 pins them), the page
cache goes, and ``echo 1 > compact_memory`` finds nothing it may move. The kernel's state at the
end is what i915 (the ``pinned`` design) gives; the same trace under ``shmem-hook`` lets
compaction move the GPU pages with the driver's consent and frees six 2 MiB blocks.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gemfs.mm.buddy import largest_aligned_order
from gemfs.mm.types import NR_ORDERS, PAGEBLOCK_NR_PAGES
from gemfs_cli.main import main
from tests.test_replay import model_record
from tools.gpu_trace import GpuAttribution, signature
from tools.replay import NO_GPU_EVENTS, compare_designs, format_table, free_huge, replay
from tools.tracefile import parse_trace, read_trace

BASE = 0x40000  # the zone's first frame
NR = 4096  # 16 MiB: eight pageblocks
I915_GFP = (
    "__GFP_HIGHMEM|__GFP_IO|__GFP_FS|__GFP_NOWARN|__GFP_NORETRY|__GFP_HARDWALL|__GFP_RECLAIMABLE"
)
SLAB_GFP = "GFP_KERNEL|__GFP_RECLAIMABLE"
GPU_PER_BLOCK = 32
MOVED_BLOCKS = 6  # pageblocks the model's compaction empties under the askable designs
SLAB_PFN = BASE + 7 * PAGEBLOCK_NR_PAGES + GPU_PER_BLOCK  # one slab page in the top block


class KernelTrace:
    """Lines as ftrace prints them: ``%16s-%-7d [%03d] %s %5lu.%06lu: event: fields``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t = 100.0

    def emit(self, comm: str, pid: int, event: str, body: str) -> None:
        self.t += 0.000013
        secs, usecs = int(self.t), round((self.t - int(self.t)) * 1e6)
        head = f"{comm:>16}-{pid:<7d} [001] ..... {secs:5d}.{usecs:06d}"
        self.lines.append(f"{head}: {event}: {body}")

    @staticmethod
    def page(pfn: int) -> str:
        return f"{(pfn * 0x9E3779B1) & 0xFFFFFFFF:016x}"

    def alloc(self, comm: str, pid: int, pfn: int, mt: int, gfp: str, order: int = 0) -> None:
        self.emit(
            comm,
            pid,
            "mm_page_alloc",
            f"page={self.page(pfn)} pfn=0x{pfn:x} order={order} migratetype={mt} gfp_flags={gfp}",
        )

    def free(self, comm: str, pid: int, pfn: int) -> None:
        self.emit(comm, pid, "mm_page_free", f"page={self.page(pfn)} pfn=0x{pfn:x} order=0")


def zone_files(free: np.ndarray) -> list[str]:
    """The /proc files of a snapshot whose free frames are ``free`` (all blocks Movable)."""
    per_order = [0] * NR_ORDERS
    runs = np.flatnonzero(np.diff(np.concatenate(([0], free.astype(np.int8), [0]))))
    for lo, hi in zip(runs[::2].tolist(), runs[1::2].tolist(), strict=True):
        while lo < hi:
            o = largest_aligned_order(lo, hi - lo)
            per_order[o] += 1
            lo += 1 << o
    counts = " ".join(f"{c:6d}" for c in per_order)
    nfree = int(free.sum())
    return [
        "#@file /proc/buddyinfo",
        f"Node 0, zone   Normal {counts} ",
        "#@file /proc/pagetypeinfo",
        "Page block order: 9",
        "Pages per block:  512",
        "",
        "Free pages count per migrate type at order      0      1      2      3      4      5"
        "      6      7      8      9     10 ",
        "Node    0, zone   Normal, type    Unmovable " + " ".join(["     0"] * NR_ORDERS) + " ",
        f"Node    0, zone   Normal, type      Movable {counts} ",
        "Node    0, zone   Normal, type  Reclaimable " + " ".join(["     0"] * NR_ORDERS) + " ",
        "",
        "Number of blocks type     Unmovable      Movable  Reclaimable ",
        "Node 0, zone   Normal            0            8            0 ",
        "#@file /proc/vmstat",
        f"nr_free_pages {nfree}",
        "compact_stall 0",
        "compact_fail 0",
        "compact_success 0",
        "#@file /proc/zoneinfo",
        "Node 0, zone   Normal",
        f"  pages free     {nfree}",
        f"        spanned  {NR}",
        f"        present  {NR}",
        f"        managed  {NR}",
        f"  start_pfn:           {BASE}",
    ]


def gpu_trace(tmp_path: Path) -> Path:
    k = KernelTrace()
    out = ["# gemfs-record 1", "# source hand-written, as Linux 6.1 prints it"]
    free = np.ones(NR, dtype=np.bool_)

    def snapshot(n: int) -> None:
        out.extend([f"#@snapshot {n}", *zone_files(free), "#@end"])
        k.emit("gemfs", 999, "tracing_mark_write", f"gemfs-snapshot {n}")

    snapshot(0)
    for pfn in range(BASE, BASE + NR):  # cp fills the zone with page cache
        k.alloc("cp", 2000, pfn, 1, "GFP_HIGHUSER_MOVABLE")
    gpu_pfns = [BASE + b * PAGEBLOCK_NR_PAGES + i for b in range(8) for i in range(GPU_PER_BLOCK)]
    extra = [BASE + GPU_PER_BLOCK + i for i in range(16)]  # object 4's, in block 0
    for pfn in [*gpu_pfns, *extra, SLAB_PFN]:  # a file of it is deleted
        k.free("cp", 2000, pfn)
    free[:] = False
    # glxgears: four 256 KiB objects, then a 64 KiB one; i915 reads their pages through shmem
    for obj in range(4):
        k.emit("glxgears", 3001, "i915_gem_object_create", f"obj={0xA000 + obj:016x}, size=0x40000")
    k.emit("glxgears", 3001, "i915_gem_object_create", f"obj={0xA004:016x}, size=0x10000")
    k.alloc("glxgears", 3001, SLAB_PFN, 2, SLAB_GFP)  # a slab page: reclaimable, not the GPU's
    for i, pfn in enumerate([*gpu_pfns, *extra]):
        if i % GPU_PER_BLOCK == 0:  # the first page in each block is a fallback
            k.emit(
                "glxgears",
                3001,
                "mm_page_alloc_extfrag",
                f"page={k.page(pfn)} pfn=0x{pfn:x} alloc_order=0 fallback_order=5 "
                "pageblock_order=9 alloc_migratetype=2 fallback_migratetype=1 fragmenting=1 "
                "change_ownership=0",
            )
        k.alloc("glxgears", 3001, pfn, 2, I915_GFP)
    k.emit("glxgears", 3001, "i915_gem_object_destroy", f"obj={0xA004:016x}")
    for pfn in extra:
        k.free("glxgears", 3001, pfn)
    for pfn in range(BASE, BASE + NR):  # the page cache goes
        if pfn not in set(gpu_pfns) | set(extra) | {SLAB_PFN}:
            k.free("kswapd0", 80, pfn)
    # echo 1 > /proc/sys/vm/compact_memory: the kernel moves nothing (i915's pages are pinned)
    k.emit(
        "bash",
        4000,
        "mm_compaction_begin",
        f"zone_start=0x{BASE:x} migrate_pfn=0x{BASE:x} free_pfn=0x{BASE + NR - 512:x} "
        f"zone_end=0x{BASE + NR:x}, mode=sync",
    )
    k.emit(
        "bash",
        4000,
        "mm_compaction_end",
        f"zone_start=0x{BASE:x} migrate_pfn=0x{BASE + NR:x} free_pfn=0x{BASE + NR - 512:x} "
        f"zone_end=0x{BASE + NR:x}, mode=sync status=complete",
    )
    free[:] = True
    free[[p - BASE for p in gpu_pfns]] = False
    free[SLAB_PFN - BASE] = False
    snapshot(1)
    # the kernel lines first, then the snapshots, as gemfs record writes them
    snaps = [i for i, line in enumerate(out) if line.startswith("#@snapshot")]
    text = out[:2] + k.lines + out[snaps[0] :] + ["#@lost 0", "#@eof"]
    path = tmp_path / "gpu.trace.gz"
    path.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))
    return path


def test_the_attribution_rule_follows_the_drivers_flags() -> None:
    k = KernelTrace()
    k.emit("glxgears", 3001, "i915_gem_object_create", f"obj={0xA000:016x}, size=0x3000")
    k.alloc("glxgears", 3001, 0x100, 2, SLAB_GFP)  # slab: reclaimable but not highmem
    k.alloc("other", 3002, 0x101, 2, I915_GFP)  # another task
    k.alloc("glxgears", 3001, 0x102, 2, I915_GFP)
    k.alloc("glxgears", 3001, 0x103, 1, "GFP_HIGHUSER_MOVABLE")  # its anonymous memory
    k.alloc("glxgears", 3001, 0x104, 2, I915_GFP, order=1)
    k.alloc("glxgears", 3001, 0x106, 2, I915_GFP)  # the quota (3 pages) is used up
    k.emit(
        "Xorg",
        900,
        "amdgpu_bo_create",
        f"bo={0xB000:016x}, pages=512, type=2, preferred=4, allowed=6, visible=0",
    )
    k.emit(
        "Xorg",
        900,
        "amdgpu_bo_create",
        f"bo={0xB001:016x}, pages=4, type=1, preferred=2, allowed=6, visible=0",
    )
    k.alloc("Xorg", 900, 0x200, 0, "GFP_HIGHUSER|__GFP_NOWARN|__GFP_NORETRY", order=2)
    k.emit("xe_test", 77, "xe_bo_create", "dev=0000:00:02.0, size=8192, flags=0x41, vm=0")
    k.alloc("xe_test", 77, 0x300, 0, "GFP_KERNEL")  # page tables: unmovable, no highmem
    k.alloc("xe_test", 77, 0x301, 0, "GFP_HIGHUSER|__GFP_ZERO", order=1)
    trace = parse_trace("\n".join(k.lines) + "\n", "t")
    gpu = GpuAttribution()
    claimed: list[tuple[int, str]] = []
    for e in trace.events:
        if e.name.endswith("_create"):
            gpu.create(e)
        elif e.name == "mm_page_alloc":
            bo = gpu.claim(e)
            if bo is not None:
                claimed.append((e.int("pfn"), bo.driver))
    assert claimed == [(0x102, "i915"), (0x104, "i915"), (0x200, "amdgpu"), (0x301, "xe")]
    assert [bo.backed for bo in gpu.objects] == [3, 4, 2]
    assert gpu.ignored_vram == 1
    assert signature("i915", trace.events[3]) is True


def test_a_design_changes_the_replay_of_gpu_pages(tmp_path: Path) -> None:
    trace = read_trace(gpu_trace(tmp_path))
    pinned, hook = replay(trace, ["pinned", "shmem-hook"], placement="kernel")
    # pinned is i915 as it is: the replay ends where the kernel did, nothing free at 2 MiB
    assert pinned.final.model_free == pinned.final.kernel_free
    assert pinned.summary()["final_divergence"] == 0.0
    assert free_huge(pinned.final.model_free) == 0
    (choice,) = pinned.choices
    assert (choice.kernel_status, choice.kernel_migrated) == ("complete", 0)
    assert (choice.model_result, choice.model_migrated, choice.differs) == ("COMPLETE", 0, False)
    assert pinned.gpu["objects"] == 5
    assert pinned.gpu["pages"] == 256 + 16  # the slab page is not the GPU's
    assert pinned.gpu["pages_at_end"] == pinned.gpu["pinned_at_end"] == 256
    assert pinned.gpu["migratetype"] == 2  # RECLAIMABLE
    assert pinned.gpu["callbacks"] == pinned.gpu["pages_moved_by_driver"] == 0
    # shmem-hook: compaction asks the driver, which consents (its GPU is idle); the GPU pages
    # of blocks 0-5 move up into block 7, each re-pinned at its new frame. Block 6 keeps its
    # own: the model's free scanner queues a whole pageblock's free pages and steps down, so
    # the scanners meet at block 6 (Linux would restart inside block 7 and empty block 6 too).
    assert free_huge(hook.final.model_free) == MOVED_BLOCKS
    assert hook.final.model_free[9:] == [0, 3]
    (choice,) = hook.choices
    assert choice.model_result == "COMPLETE"
    assert choice.model_migrated == MOVED_BLOCKS * GPU_PER_BLOCK
    assert choice.differs  # the kernel moved nothing
    assert hook.gpu["migratetype"] == 1  # MOVABLE
    assert hook.gpu["pages_moved_by_driver"] == MOVED_BLOCKS * GPU_PER_BLOCK
    assert hook.gpu["pinned_at_end"] == 256
    assert hook.gpu["callbacks"] >= 1
    assert hook.gpu["migration_ms"] > 0
    assert hook.summary()["final_divergence"] > 0.5
    report = format_table([pinned, hook])
    assert "GPU pages under shmem-hook: 5 objects" in report
    assert "designs compared" in report
    assert NO_GPU_EVENTS not in report


@pytest.mark.parametrize("design", ["gemfs", "notifier"])
def test_the_other_askable_designs_free_the_same_blocks(tmp_path: Path, design: str) -> None:
    (r,) = replay(read_trace(gpu_trace(tmp_path)), [design], placement="kernel")
    assert free_huge(r.final.model_free) == MOVED_BLOCKS
    # the notifier drops the pins and re-pins on the next use (none in a trace)
    moved = MOVED_BLOCKS * GPU_PER_BLOCK
    assert r.gpu["pinned_at_end"] == (256 - moved if design == "notifier" else 256)


def test_gpu_tables_follow_the_moves(tmp_path: Path) -> None:
    from tools.replay import Replayer

    r = Replayer(read_trace(gpu_trace(tmp_path)), design="shmem-hook", placement="kernel")
    try:
        r.run()
        assert r.gpu_objects
        for obj, o in r.gpu_objects.values():
            assert np.array_equal(o.gtt, np.asarray(obj.pages[: o.nr_pages]))
        r.mm.check()
    finally:
        r.mm.close()


def test_a_trace_without_gpu_events_says_so(tmp_path: Path) -> None:
    results = replay(read_trace(model_record(tmp_path)), ["pinned", "shmem-hook"])
    assert all(not r.gpu for r in results)
    text = format_table(results)
    assert text.count(NO_GPU_EVENTS) == 3  # once per design, once under the comparison
    assert compare_designs(results)[-2] == NO_GPU_EVENTS


DESIGN_ARGS = ("--design", "pinned", "--design", "shmem-hook")


def test_replay_command_compares_designs(tmp_path: Path) -> None:
    path = gpu_trace(tmp_path)
    out = CliRunner().invoke(
        main,
        ["replay", str(path), "--placement", "kernel", *DESIGN_ARGS],
    )
    assert out.exit_code == 0, out.output
    rows = {
        line.split()[0]: line.split()
        for line in out.output.splitlines()
        if line.startswith(("pinned ", "shmem-hook "))
    }
    assert rows["pinned"][1:3] == ["0", "0"]  # 2 MiB free: model, kernel
    assert rows["shmem-hook"][1:3] == [str(MOVED_BLOCKS), "0"]
