"""GEM objects: shmem-file mappings with a page table from page index to frame."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gemfs.mm.ops import AddressSpaceOps, Notifier
from gemfs.mm.pool import I64
from gemfs.mm.types import PAGE_SIZE, MigrateType, ObjId


@dataclass(eq=False)
class GemObject:
    id: ObjId
    migratetype: MigrateType
    path: str = ""
    size: int = 0  # bytes (the file size)
    pages: I64 = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # -1 = hole
    ops: AddressSpaceOps | None = None  # per-object ops (shmem-hook); None: the mount's
    notifier: Notifier | None = None  # notifier design
    owner_tag: str = ""  # who registered ops / owns it (a peer name), for display
    private: bool = False  # a driver's object: the gemfs design's mount-wide ops apply to it

    @property
    def nr_pages(self) -> int:
        """Pages covered by the file size."""
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE

    @property
    def nr_resident(self) -> int:
        return int(np.count_nonzero(self.pages >= 0))

    def resident(self) -> tuple[I64, I64]:
        """(page indices, frames) of pages that have a frame."""
        idx = np.flatnonzero(self.pages >= 0).astype(np.int64)
        return idx, self.pages[idx]
