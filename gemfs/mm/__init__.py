"""The pure memory model: page pool, buddy allocator, objects, migration, compaction, vmstat.

No I/O (besides the pool's memfd), no trio, no pyfuse3.
"""

from gemfs.mm.compaction import Batch, CompactionPolicy, CompactResult, PoolView
from gemfs.mm.core import MemoryManager, MigrateOutcome, ObjectError
from gemfs.mm.objects import GemObject
from gemfs.mm.ops import AddressSpaceOps, Notifier, Owner
from gemfs.mm.types import (
    MAX_ORDER,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    Design,
    MigrateMode,
    MigrateType,
    ObjId,
    OutOfMemory,
    Pfn,
    parse_size,
)

__all__ = [
    "MAX_ORDER",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "PAGE_SIZE",
    "AddressSpaceOps",
    "Batch",
    "CompactResult",
    "CompactionPolicy",
    "Design",
    "GemObject",
    "MemoryManager",
    "MigrateMode",
    "MigrateOutcome",
    "MigrateType",
    "Notifier",
    "ObjId",
    "ObjectError",
    "OutOfMemory",
    "Owner",
    "Pfn",
    "PoolView",
    "parse_size",
]
