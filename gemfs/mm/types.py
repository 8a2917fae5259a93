"""Constants, typed ids and enums shared by the memory model (named after their kernel twins)."""

from __future__ import annotations

import enum
import re
from typing import NewType

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_ORDER = 10  # largest block: 2**10 pages = 4 MiB
NR_ORDERS = MAX_ORDER + 1
PAGEBLOCK_ORDER = 9
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER
MAX_BLOCK_PAGES = 1 << MAX_ORDER

Pfn = NewType("Pfn", int)  # frame number in the pool
ObjId = NewType("ObjId", int)  # GEM object id (>= 1)
PageIndex = NewType("PageIndex", int)  # page index inside one object


class MigrateType(enum.IntEnum):
    """Pageblock and free-list migrate types (enum migratetype)."""

    UNMOVABLE = 0
    MOVABLE = 1
    RECLAIMABLE = 2

    @classmethod
    def parse(cls, text: str) -> MigrateType:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in cls)
            raise ValueError(f"unknown migrate type {text!r} (expected one of {names})") from None

    @property
    def title(self) -> str:
        return self.name.capitalize()


NR_MIGRATETYPES = len(MigrateType)

# Linux's fallback order (mm/page_alloc.c: fallbacks[]).
FALLBACKS: dict[MigrateType, tuple[MigrateType, ...]] = {
    MigrateType.UNMOVABLE: (MigrateType.RECLAIMABLE, MigrateType.MOVABLE),
    MigrateType.MOVABLE: (MigrateType.RECLAIMABLE, MigrateType.UNMOVABLE),
    MigrateType.RECLAIMABLE: (MigrateType.UNMOVABLE, MigrateType.MOVABLE),
}


class MigrateMode(enum.IntEnum):
    """enum migrate_mode: how long migration may wait for an owner."""

    ASYNC = 0
    SYNC_LIGHT = 1
    SYNC = 2

    @classmethod
    def parse(cls, text: str) -> MigrateMode:
        try:
            return cls[text.strip().upper().replace("-", "_")]
        except KeyError:
            raise ValueError(f"unknown migrate mode {text!r}") from None


class Design(enum.StrEnum):
    """The designs gemfs compares: the status quo in its flavours, then the 2016 thread's."""

    PINNED = "pinned"  # i915: GFP_HIGHUSER | __GFP_RECLAIMABLE, pinned while bound
    PINNED_UNMOVABLE = "pinned-unmovable"  # drm_gem_shmem: GFP_HIGHUSER, "kept pinned"
    PINNED_TTM = "pinned-ttm"  # TTM: UNMOVABLE, highest order first, per-order page pools
    PINNED_IN_MOVABLE = "pinned-in-movable"  # pins in MOVABLE blocks (userptr, no LONGTERM)
    ILLUMINATOR = "illuminator"  # pinned (i915) + compaction skips blocks it cannot empty
    DEFRAG_MODE = "defrag-mode"  # pinned (i915) + vm.defrag_mode (6.15) in the allocator
    LONGTERM_PIN = "longterm-pin"  # pins in movable memory, moved out of ZONE_MOVABLE first
    CONFINE = "confine"  # pinned (i915) + non-movable memory confined to a resizable region
    SHMEM_HOOK = "shmem-hook"
    GEMFS = "gemfs"
    NOTIFIER = "notifier"

    @classmethod
    def parse(cls, text: str) -> Design:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(d.value for d in cls)
            raise ValueError(f"unknown design {text!r} (expected one of {names})") from None

    @property
    def asks_owner(self) -> bool:
        """Does the core ask the GEM pages' owner before moving them (hook, mount, notifier)?"""
        return self in (Design.SHMEM_HOOK, Design.GEMFS, Design.NOTIFIER)

    @property
    def has_region(self) -> bool:
        """Is the pool split at a fence into a part any allocation may use and a part only
        movable ones may (longterm-pin: ZONE_MOVABLE; confine: outside the confined region)?"""
        return self in (Design.LONGTERM_PIN, Design.CONFINE)

    @property
    def knob(self) -> str | None:
        """The design's own knob (``[design]`` key; the mount option with ``-`` for ``_``), if
        it has one: longterm-pin's movablecore, confine's confine_granule (gemfs.mm.region),
        pinned-ttm's ttm_pool (gemfs.mm.ttm). A mount refuses another design's knob."""
        return _KNOB.get(self)

    @property
    def gem_migratetype(self) -> MigrateType:
        """The GEM pages' migrate type: i915 RECLAIMABLE (also under illuminator,
        defrag-mode and confine, which change compaction or the allocator only), drm_gem_shmem
        and TTM UNMOVABLE, MOVABLE for pins in movable memory (pinned-in-movable, and
        longterm-pin, which moves them out of the movable region when it pins them) and under
        the proposals."""
        return _GEM_MIGRATETYPE.get(self, MigrateType.MOVABLE)


_GEM_MIGRATETYPE = {
    Design.PINNED: MigrateType.RECLAIMABLE,
    Design.PINNED_UNMOVABLE: MigrateType.UNMOVABLE,
    Design.PINNED_TTM: MigrateType.UNMOVABLE,
    Design.PINNED_IN_MOVABLE: MigrateType.MOVABLE,
    Design.ILLUMINATOR: MigrateType.RECLAIMABLE,
    Design.DEFRAG_MODE: MigrateType.RECLAIMABLE,
    Design.CONFINE: MigrateType.RECLAIMABLE,
}

_KNOB = {
    Design.LONGTERM_PIN: "movablecore",
    Design.CONFINE: "confine_granule",
    Design.PINNED_TTM: "ttm_pool",
}


class OutOfMemory(Exception):
    """The allocator could not satisfy a request (the model's ENOSPC)."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse sizes like ``1GiB``, ``512MiB``, ``64K``, ``4096`` into bytes (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r} (expected a number with an optional unit, e.g. 1GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return f"{nbytes}B"
