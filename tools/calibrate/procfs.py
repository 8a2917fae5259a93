"""Parsers for the kernel's fragmentation reports: buddyinfo, pagetypeinfo and vmstat from /proc.

They take the text exactly as the kernel prints it (a host's or a guest's) and know nothing about
QEMU, so the CLI can reuse them on the host's own /proc. Multi-node machines are kept apart by
``(node, zone)`` keys; the helpers sum over nodes (and over zones when no zone is named).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PAGEBLOCK_ORDER = 9
"""x86-64 pageblock order: a 2 MiB huge page is an order-9 block of 512 4 KiB pages."""

ZoneKey = tuple[int, str]
"""(NUMA node, zone name), e.g. ``(0, "DMA32")``."""

_ZONE_LINE = re.compile(r"^Node\s+(\d+),\s*zone\s+(\S+)\s+(.*)$")
_TYPE_LINE = re.compile(r"^Node\s+(\d+),\s*zone\s+(\S+),\s*type\s+(\S+)\s+(.*)$")
_COUNT = re.compile(r"^>?\d+$")


class ProcParseError(ValueError):
    """The text does not look like the /proc file it was given as."""


def _counts(fields: Iterable[str], what: str) -> tuple[tuple[int, ...], bool]:
    """Parse a row of counts; ``>100000`` (pagetypeinfo's cap) reads as 100000 and sets the flag."""
    values: list[int] = []
    saturated = False
    for item in fields:
        if not _COUNT.match(item):
            raise ProcParseError(f"bad count {item!r} in {what}")
        if item.startswith(">"):
            saturated = True
        values.append(int(item.lstrip(">")))
    return tuple(values), saturated


def blocks_of_order(per_order: Iterable[int], order: int = PAGEBLOCK_ORDER) -> int:
    """How many free blocks of ``order`` a per-order free list yields: a block of order o > order
    counts as 2**(o - order) of them (an order-10 block is two 2 MiB huge pages)."""
    return sum(count << (o - order) for o, count in enumerate(per_order) if o >= order)


def pages_in(per_order: Iterable[int]) -> int:
    """Free pages held by a per-order free list."""
    return sum(count << o for o, count in enumerate(per_order))


def _sum_rows(rows: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    total: list[int] = []
    for row in rows:
        if len(total) < len(row):
            total.extend([0] * (len(row) - len(total)))
        for i, value in enumerate(row):
            total[i] += value
    return tuple(total)


@dataclass(frozen=True)
class BuddyInfo:
    """/proc/buddyinfo: free blocks per order, per (node, zone)."""

    zones: Mapping[ZoneKey, tuple[int, ...]]

    def zone_names(self) -> list[str]:
        """Zone names in the kernel's order (DMA, DMA32, Normal, Movable...), without repeats."""
        return list(dict.fromkeys(zone for _, zone in self.zones))

    def per_order(self, zone: str | None = None) -> tuple[int, ...]:
        """Free blocks per order summed over nodes, for one zone or (``None``) all zones."""
        return _sum_rows(
            counts for (_, name), counts in self.zones.items() if zone is None or name == zone
        )

    def free_pages(self, zone: str | None = None) -> int:
        return pages_in(self.per_order(zone))

    def huge_blocks(self, zone: str | None = None, order: int = PAGEBLOCK_ORDER) -> int:
        """Free blocks of ``order`` or larger, in units of order-``order`` blocks, summed per zone
        (blocks never span zones, so summing zones' counts is exact)."""
        return sum(
            blocks_of_order(counts, order)
            for (_, name), counts in self.zones.items()
            if zone is None or name == zone
        )


def parse_buddyinfo(text: str) -> BuddyInfo:
    """Parse /proc/buddyinfo (``Node 0, zone   Normal   12   4 ...``, one line per zone)."""
    zones: dict[ZoneKey, tuple[int, ...]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = _ZONE_LINE.match(line)
        if match is None:
            raise ProcParseError(f"not a buddyinfo line: {line!r}")
        counts, _ = _counts(match.group(3).split(), "buddyinfo")
        zones[(int(match.group(1)), match.group(2))] = counts
    if not zones:
        raise ProcParseError("empty buddyinfo")
    return BuddyInfo(zones)


@dataclass(frozen=True)
class PageTypeInfo:
    """/proc/pagetypeinfo: free blocks per (migrate type, order) and pageblocks per migrate type.

    ``free`` is keyed by ``(node, zone, migratetype)``; ``blocks`` likewise, one count of whole
    pageblocks per type. ``mixed_blocks`` is only printed with page_owner enabled (else empty).
    ``saturated`` is true when some free count was printed as ``>100000`` (the kernel stops
    counting there, so that number is a lower bound)."""

    pageblock_order: int
    free: Mapping[tuple[int, str, str], tuple[int, ...]]
    blocks: Mapping[tuple[int, str, str], int]
    mixed_blocks: Mapping[tuple[int, str, str], int] = field(default_factory=dict)
    saturated: bool = False

    def migratetypes(self) -> list[str]:
        return list(dict.fromkeys(mt for _, _, mt in [*self.free, *self.blocks]))

    def free_by_type(self, zone: str | None = None) -> dict[str, tuple[int, ...]]:
        """Free blocks per order for each migrate type, summed over nodes (and zones if None)."""
        out: dict[str, tuple[int, ...]] = {}
        for mt in self.migratetypes():
            rows = [
                counts
                for (_, name, kind), counts in self.free.items()
                if kind == mt and (zone is None or name == zone)
            ]
            if rows:
                out[mt] = _sum_rows(rows)
        return out

    def blocks_by_type(self, zone: str | None = None) -> dict[str, int]:
        """Pageblocks of each migrate type, summed over nodes (and zones if None)."""
        out: dict[str, int] = {}
        for (_, name, kind), count in self.blocks.items():
            if zone is None or name == zone:
                out[kind] = out.get(kind, 0) + count
        return out


def _block_table(
    header: str, line: str, into: dict[tuple[int, str, str], int], types: list[str]
) -> None:
    match = _ZONE_LINE.match(line)
    if match is None:
        raise ProcParseError(f"not a pagetypeinfo {header} line: {line!r}")
    counts, _ = _counts(match.group(3).split(), "pagetypeinfo")
    if len(counts) != len(types):
        raise ProcParseError(f"{len(counts)} counts for {len(types)} types in {line!r}")
    node, zone = int(match.group(1)), match.group(2)
    for kind, count in zip(types, counts, strict=True):
        into[(node, zone, kind)] = count


def parse_pagetypeinfo(text: str) -> PageTypeInfo:
    """Parse /proc/pagetypeinfo as Linux (2.6.24 to 6.x) prints it."""
    pageblock_order = PAGEBLOCK_ORDER
    free: dict[tuple[int, str, str], tuple[int, ...]] = {}
    blocks: dict[tuple[int, str, str], int] = {}
    mixed: dict[tuple[int, str, str], int] = {}
    saturated = False
    table: dict[tuple[int, str, str], int] | None = None
    types: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            table = None
            continue
        if line.startswith("Page block order:"):
            pageblock_order = int(line.split(":", 1)[1])
        elif line.startswith(("Pages per block:", "Free pages count per migrate type")):
            continue
        elif line.startswith("Number of blocks type"):
            table, types = blocks, line.removeprefix("Number of blocks type").split()
        elif line.startswith("Number of mixed blocks"):
            table, types = mixed, line.removeprefix("Number of mixed blocks").split()
        elif (match := _TYPE_LINE.match(line)) is not None:
            counts, capped = _counts(match.group(4).split(), "pagetypeinfo")
            saturated = saturated or capped
            free[(int(match.group(1)), match.group(2), match.group(3))] = counts
        elif table is not None:
            _block_table("block-count", line, table, types)
        else:
            raise ProcParseError(f"unexpected pagetypeinfo line: {line!r}")
    if not free:
        raise ProcParseError("pagetypeinfo has no free-count lines")
    return PageTypeInfo(pageblock_order, free, blocks, mixed, saturated)


def parse_vmstat(text: str) -> dict[str, int]:
    """Parse /proc/vmstat (``name value`` per line)."""
    out: dict[str, int] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ProcParseError(f"not a vmstat line: {raw!r}")
        out[parts[0]] = int(parts[1])
    return out


def vmstat_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """after − before for every counter present in both."""
    return {key: after[key] - before[key] for key in after if key in before}
