"""Illuminator (Panwar, Prodromou, Gandhi: "Making Huge Pages Actually Useful", ASPLOS 2018):
the allocator keeps, per pageblock, how many of its pages compaction cannot move, and the
migrate scanner passes over every pageblock that holds one -- it can never be emptied, so the
pages migrated out of it would be moved for nothing (the paper: compaction cost -99%).

The paper counts unmovable allocations per pageblock; in the model a page cannot be moved when
it is a kernel allocation (slab-like noise, probes, contiguous ranges: ``OWNER_KERNEL`` frames in
``kernel_pages``) or a pinned object page (under the status-quo designs nobody can be asked to
unpin it). :class:`PageblockCounts` keeps both counts as the memory manager allocates, frees,
pins and unpins; ``MemoryManager.check`` recounts them. Compaction reads the result through its
view (``PoolView.hopeless_pageblocks``), in process and, from the control server's snapshot, in
the compactor process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gemfs.mm.pool import I64
from gemfs.mm.types import PAGEBLOCK_ORDER


@dataclass
class PageblockCounts:
    nr_pageblocks: int
    unmovable: npt.NDArray[np.int32] = field(init=False)  # kernel pages per pageblock
    pinned: npt.NDArray[np.int32] = field(init=False)  # pinned object pages per pageblock

    def __post_init__(self) -> None:
        self.unmovable = np.zeros(self.nr_pageblocks, dtype=np.int32)
        self.pinned = np.zeros(self.nr_pageblocks, dtype=np.int32)

    def kernel(self, pfn: int, n: int, sign: int) -> None:
        """``n`` kernel frames from ``pfn`` were allocated (+1) or freed (-1)."""
        first, last = pfn >> PAGEBLOCK_ORDER, (pfn + n - 1) >> PAGEBLOCK_ORDER
        if first == last:
            self.unmovable[first] += sign * n
            return
        per = np.bincount(
            np.arange(pfn, pfn + n, dtype=np.int64) >> PAGEBLOCK_ORDER,
            minlength=self.nr_pageblocks,
        )
        self.unmovable += sign * per.astype(np.int32)

    def pins(self, pfns: I64, sign: int) -> None:
        """These frames became pinned (+1) or unpinned (-1) (each frame once)."""
        if len(pfns):
            np.add.at(self.pinned, pfns >> PAGEBLOCK_ORDER, sign)

    def hopeless(self) -> npt.NDArray[np.bool_]:
        """Pageblocks that hold a page compaction cannot move."""
        out: npt.NDArray[np.bool_] = (self.unmovable > 0) | (self.pinned > 0)
        return out
