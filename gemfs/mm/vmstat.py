"""Statistics in the kernel's own text formats (mm/vmstat.c), and parsers back from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gemfs.mm.types import NR_ORDERS, PAGEBLOCK_NR_PAGES, PAGEBLOCK_ORDER, MigrateType

ZONE = "Normal"

VMSTAT_COUNTERS = (
    "nr_free_pages",
    "nr_gem_pages",
    "nr_gem_pinned",
    "nr_kernel_pages",
    "pgalloc",
    "pgfree",
    "pgmigrate_success",
    "pgmigrate_fail",
    "pgmigrate_eagain",
    "pgmigrate_permanent",
    "pgmigrate_aborted",
    "pgmigrate_stale_src",  # asked to move a page that is no longer a movable object page
    "pgmigrate_stale_dst",  # asked to move to a frame that is no longer free
    "compact_migrate_scanned",
    "compact_free_scanned",
    "compact_isolated",
    "compact_stall",
    "compact_fail",
    "compact_success",
    "compact_daemon_wake",
    "compact_daemon_migrate_scanned",
    "compact_daemon_free_scanned",
    "compact_daemon_defrag_reserve",  # defrag-mode: kcompactd passes for its pageblock reserve
    "proactive_compact_trigger",
    "thp_fault_alloc",  # a THP-fault-like allocation (alloc_high_order kind "thp") succeeded
    "thp_fault_fallback",  # ... failed: the fault would fall back to small pages
    "htlb_buddy_alloc_success",  # a hugetlb (nr_hugepages) allocation from the buddy
    "htlb_buddy_alloc_fail",
    "alloc_fallback",
    "pageblock_steal",
    "gem_migrate_callbacks",
    "gem_migrate_callback_pages",
    "gem_migrate_callback_eagain",
    "gem_migrate_callback_ebusy",
    "gem_migrate_callback_us_total",
    "gem_invalidate_callbacks",
    "gem_callback_timeouts",
)


class Vmstat:
    """Event counters; names follow /proc/vmstat, gemfs-specific ones start with gem_."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(VMSTAT_COUNTERS, 0)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        return self.counters.get(name, 0)


@dataclass(frozen=True, slots=True)
class ContigInfo:
    """fill_contig_page_info(): free pages, free blocks, suitable blocks for an order."""

    free_pages: int
    free_blocks_total: int
    free_blocks_suitable: int


def contig_info(free_per_order: Sequence[int], order: int) -> ContigInfo:
    free_pages = sum(n << o for o, n in enumerate(free_per_order))
    total = sum(free_per_order)
    suitable = sum(n << (o - order) for o, n in enumerate(free_per_order) if o >= order)
    return ContigInfo(free_pages, total, suitable)


def unusable_index(free_per_order: Sequence[int], order: int) -> float:
    """Fraction of free memory unusable for an allocation of this order (1.0 when none free)."""
    info = contig_info(free_per_order, order)
    if info.free_pages == 0:
        return 1.0
    return (info.free_pages - (info.free_blocks_suitable << order)) / info.free_pages


def fragmentation_index(free_per_order: Sequence[int], order: int) -> float:
    """__fragmentation_index(): -1 if a block exists; near 0 lack of memory; near 1 fragmented."""
    info = contig_info(free_per_order, order)
    if info.free_blocks_total == 0:
        return 0.0
    if info.free_blocks_suitable:
        return -1.0
    return 1.0 - (1.0 + info.free_pages / (1 << order)) / info.free_blocks_total


def fragmentation_score(free_per_order: Sequence[int]) -> int:
    """fragmentation_score_zone(): 100 x unusable index at the huge-page order, 0..100."""
    info = contig_info(free_per_order, PAGEBLOCK_ORDER)
    if info.free_pages == 0:
        return 0
    unusable = info.free_pages - (info.free_blocks_suitable << PAGEBLOCK_ORDER)
    return unusable * 100 // info.free_pages


def proactive_watermarks(proactiveness: int) -> tuple[int, int]:
    """fragmentation_score_wmark(): (low, high) = (100 - p, low + 10), high capped at 100."""
    low = 100 - proactiveness
    return low, min(low + 10, 100)


def _fixed3(value: float) -> str:
    millis = round(value * 1000)
    sign = "-" if millis < 0 else ""
    millis = abs(millis)
    return f"{sign}{millis // 1000}.{millis % 1000:03d}"


def format_buddyinfo(free_per_order: Sequence[int]) -> str:
    cols = "".join(f"{n:6d} " for n in free_per_order)
    return f"Node 0, zone {ZONE:>8} {cols}\n"


def format_pagetypeinfo(free: Sequence[Sequence[int]], blocks: Sequence[int]) -> str:
    """free[mt][order]: free blocks per type and order; blocks[mt]: pageblocks of each type."""
    lines = [
        f"Page block order: {PAGEBLOCK_ORDER}",
        f"Pages per block:  {PAGEBLOCK_NR_PAGES}",
        "",
        "Free pages count per migrate type at order "
        + "".join(f"{o:6d} " for o in range(NR_ORDERS)),
    ]
    for mt in MigrateType:
        cols = "".join(f"{n:6d} " for n in free[mt])
        lines.append(f"Node {0:4d}, zone {ZONE:>8}, type {mt.title:>12} {cols}")
    lines.append("")
    lines.append("Number of blocks type  " + "".join(f"{mt.title:>12} " for mt in MigrateType))
    lines.append(f"Node 0, zone {ZONE:>8} " + "".join(f"{blocks[mt]:12d} " for mt in MigrateType))
    return "\n".join(lines) + "\n"


def format_index(values: Sequence[float]) -> str:
    return f"Node 0, zone {ZONE:>8} " + "".join(f"{_fixed3(v)} " for v in values) + "\n"


def format_extfrag_index(free_per_order: Sequence[int]) -> str:
    return format_index([fragmentation_index(free_per_order, o) for o in range(NR_ORDERS)])


def format_unusable_index(free_per_order: Sequence[int]) -> str:
    return format_index([unusable_index(free_per_order, o) for o in range(NR_ORDERS)])


def format_vmstat(counters: dict[str, int]) -> str:
    return "".join(f"{k} {v}\n" for k, v in counters.items())


# -- parsers (for tests, the compactor and tools that read a mount's .gemfs files) -------------
def parse_buddyinfo(text: str) -> list[int]:
    """Sum the per-order counts of every zone line."""
    total = [0] * NR_ORDERS
    for line in text.splitlines():
        if "zone" not in line:
            continue
        nums = [int(x) for x in line.split()[4:]]
        for o, n in enumerate(nums[:NR_ORDERS]):
            total[o] += n
    return total


def parse_pagetypeinfo(text: str) -> tuple[dict[str, list[int]], dict[str, int]]:
    free: dict[str, list[int]] = {}
    blocks: dict[str, int] = {}
    header: list[str] = []
    for line in text.splitlines():
        if ", type" in line:
            _left, right = line.split(", type", 1)
            parts = right.split()
            free[parts[0]] = free.get(parts[0], [0] * NR_ORDERS)
            for o, n in enumerate(int(x) for x in parts[1 : 1 + NR_ORDERS]):
                free[parts[0]][o] += n
        elif line.startswith("Number of blocks type"):
            header = line[len("Number of blocks type") :].split()
        elif header and line.startswith("Node") and "zone" in line:
            nums = line.split()[4:]
            for name, count in zip(header, nums, strict=False):
                blocks[name] = blocks.get(name, 0) + int(count)
    return free, blocks


def parse_index(text: str) -> list[float]:
    for line in text.splitlines():
        if "zone" in line:
            return [float(x) for x in line.split()[4:]]
    return []


def parse_vmstat(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = int(parts[1])
    return out
