"""The page pool: frames in one shared-memory file, per-frame metadata in numpy arrays.

Per-frame metadata (12 bytes a frame, the kernel's ``struct page`` in miniature):

========  ======  =========================================================
array     dtype   meaning
========  ======  =========================================================
flags     uint8   PG_* bits below, plus a 2-bit migrate type
order     uint8   order of a free block (valid on its head frame only)
pin       uint16  pin count (a device holds the frame; the core must not move it)
owner     int32   object id of an allocated page; prev link of a free head
index     int32   page index in the owner; next link of a free head
========  ======  =========================================================

Like ``page->lru`` in Linux, a free block's head reuses ``owner``/``index`` as the links of its
free list, so the buddy allocator's lists cost no memory beyond these arrays.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from gemfs.mm.types import (
    MAX_BLOCK_PAGES,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    MigrateType,
    format_size,
    parse_size,
)

PG_FREE = 0x01  # frame lies in a free buddy block
PG_BUDDY = 0x02  # frame is the head of a free buddy block
PG_ALLOC = 0x04  # frame is allocated
PG_ISOLATED = 0x08  # allocated frame isolated for migration
PG_MT_SHIFT = 4
PG_MT_MASK = 0x30  # migrate type: of the free list (free head) or of the allocation
PG_OBJECT = 0x40  # allocated frame backs a page of an object (file page)
PG_TARGET = 0x80  # free frame taken out of the buddy lists as a migration target

OWNER_NONE = -1
OWNER_KERNEL = -2  # an allocation that belongs to no object (kernel noise, probes)

METADATA_BYTES_PER_FRAME = 12  # the per-frame arrays below
STAMP_BYTES_PER_FRAME = 4  # a content-free pool's frames: one uint32 content stamp each
S_MAXBYTES_POOLS = 4
"""The largest file is this many pools (``s_maxbytes``; beyond it write and truncate answer
EFBIG). No file can hold more data than the pool, but a sparse one may be larger (holes cost
nothing); the bound keeps every dense view of a page table (8 bytes per page of file size, e.g.
a driver's pin map) under 1/128 of the pool, however large a size or offset a user asks for."""

I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class PoolTooLarge(ValueError):
    """The machine cannot hold a pool of the requested size (one line for the user)."""


def memory_available() -> tuple[int, str] | None:
    """Bytes this process can still get, and where that figure comes from: MemAvailable from
    /proc/meminfo, or what the cgroup's memory.max leaves when that is less (a memfd's pages
    are shmem, charged to the cgroup). None when neither can be read."""
    best: tuple[int, str] | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best = (int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
                    break
    except (OSError, ValueError, IndexError):
        pass
    cg = _cgroup_headroom()
    if cg is not None and (best is None or cg[0] < best[0]):
        best = cg
    return best


def _cgroup_headroom() -> tuple[int, str] | None:
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            rel = next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current"), encoding="ascii") as f:
            used = int(f.read())
        return max(0, int(limit) - used), f"left under memory.max of cgroup {rel}"
    except (OSError, ValueError, StopIteration):
        return None


def pool_memory(nbytes: int, *, content: bool = True) -> int:
    """Bytes a pool of ``nbytes`` takes: its frames (real bytes, or a stamp each) and metadata."""
    frames = nbytes if content else nbytes // PAGE_SIZE * STAMP_BYTES_PER_FRAME
    return frames + nbytes // PAGE_SIZE * METADATA_BYTES_PER_FRAME


def check_memory(nbytes: int, *, content: bool = True) -> None:
    """Refuse a pool the machine cannot hold: its frames are real shared memory (or, without
    content, a stamp each), and a pool larger than what is available gets processes
    OOM-killed once it is touched."""
    need = pool_memory(nbytes, content=content)
    have = memory_available()
    if have is not None and need > have[0]:
        raise PoolTooLarge(
            f"a pool of {format_size(nbytes)} needs {_approx(need)} of memory; "
            f"only {_approx(have[0])} is available ({have[1]})"
        )


def _approx(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def check_pool_size(size: int | str) -> int:
    """Return the pool size in bytes, or raise ValueError with a clear reason."""
    nbytes = parse_size(size)
    unit = MAX_BLOCK_PAGES * PAGE_SIZE
    if nbytes <= 0 or nbytes % unit:
        raise ValueError(
            f"pool size {format_size(nbytes)} must be a positive multiple of "
            f"{format_size(unit)} (one order-10 block)"
        )
    return nbytes


class PagePool:
    """Frames plus metadata. Frames live in a memfd so other processes can map them.

    ``content=False`` (model runs that need no mount): a frame is a uint32 *content stamp*
    instead of 4 KiB of bytes -- ``frames`` has shape (nr_pages, 1). Everything that moves or
    overwrites content moves or overwrites the stamp the same way (a migration copies it, a GPU
    or file write sets a new one), so a stale, lost or duplicated page is caught exactly as with
    bytes, for 16 bytes a frame in all.
    """

    def __init__(self, size: int | str, *, name: str = "gemfs-pool", content: bool = True) -> None:
        self.size = check_pool_size(size)
        check_memory(self.size, content=content)
        self.nr_pages = self.size // PAGE_SIZE
        # The largest file (the superblock's s_maxbytes), see S_MAXBYTES_POOLS.
        self.s_maxbytes = S_MAXBYTES_POOLS * self.size
        self.nr_pageblocks = self.nr_pages // PAGEBLOCK_NR_PAGES
        self.content = content
        self._map: mmap.mmap | None = None
        self.fd = -1
        self.frames: npt.NDArray[Any]  # (n, PAGE_SIZE) uint8, or (n, 1) uint32 stamps
        if not content:
            self.frames = np.zeros((self.nr_pages, 1), dtype=np.uint32)
        else:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, self.size)
                self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
            except OSError:
                os.close(self.fd)
                raise
            self.frames = np.frombuffer(self._map, dtype=np.uint8).reshape(self.nr_pages, PAGE_SIZE)
        n = self.nr_pages
        self.flags = np.zeros(n, dtype=np.uint8)
        self.order = np.zeros(n, dtype=np.uint8)
        self.pin = np.zeros(n, dtype=np.uint16)
        self.owner = np.full(n, OWNER_NONE, dtype=np.int32)
        self.index = np.full(n, -1, dtype=np.int32)
        # Every pageblock starts MOVABLE, as on a freshly booted zone.
        self.pageblock_mt = np.full(self.nr_pageblocks, MigrateType.MOVABLE, dtype=np.uint8)
        # Per-pageblock statistics kept up to date over the pageblocks that changed since they
        # were last looked at (sampling costs O(change), not O(pool)): free frames, and whether
        # the block holds allocations of another type than its own (a mixed pageblock).
        self.pb_dirty = np.ones(self.nr_pageblocks, dtype=np.bool_)
        self.pb_nfree = np.zeros(self.nr_pageblocks, dtype=np.int32)
        self.pb_mixed = np.zeros(self.nr_pageblocks, dtype=np.bool_)

    @property
    def metadata_bytes(self) -> int:
        arrays = (
            self.flags,
            self.order,
            self.pin,
            self.owner,
            self.index,
            self.pageblock_mt,
            self.pb_dirty,
            self.pb_nfree,
            self.pb_mixed,
        )
        return sum(a.nbytes for a in arrays)

    @property
    def data(self) -> npt.NDArray[np.uint8]:
        """The frames as bytes (file I/O, the mount); a content-free pool has none."""
        if not self.content:
            raise ValueError("this pool keeps content stamps, not bytes (a model run)")
        return self.frames

    @property
    def bytes_per_frame(self) -> float:
        """Memory per frame beyond its content bytes: metadata, plus the stamp without content."""
        stamps = 0 if self.content else self.frames.nbytes
        return (self.metadata_bytes + stamps) / self.nr_pages

    def pageblock_of(self, pfn: int) -> int:
        return pfn >> PAGEBLOCK_ORDER

    def get_pageblock_migratetype(self, pfn: int) -> MigrateType:
        return MigrateType(int(self.pageblock_mt[pfn >> PAGEBLOCK_ORDER]))

    def set_pageblock_migratetype(self, pfn: int, mt: MigrateType) -> None:
        self.pageblock_mt[pfn >> PAGEBLOCK_ORDER] = mt
        self.pb_dirty[pfn >> PAGEBLOCK_ORDER] = True

    def touch(self, pfn: int, n: int = 1) -> None:
        """Frames [pfn, pfn+n) changed state: their pageblocks' statistics are stale."""
        self.pb_dirty[pfn >> PAGEBLOCK_ORDER : ((pfn + n - 1) >> PAGEBLOCK_ORDER) + 1] = True

    def touch_pfns(self, pfns: npt.NDArray[np.int64]) -> None:
        if len(pfns):
            self.pb_dirty[pfns >> PAGEBLOCK_ORDER] = True

    def refresh_pageblocks(self) -> None:
        """Recompute the statistics of the pageblocks that changed (vectorized over them)."""
        blocks = np.flatnonzero(self.pb_dirty)
        if len(blocks) == 0:
            return
        fl = self.flags.reshape(self.nr_pageblocks, PAGEBLOCK_NR_PAGES)[blocks]
        self.pb_nfree[blocks] = np.count_nonzero(fl & PG_FREE, axis=1)
        alloc = (fl & PG_ALLOC) != 0
        mt = (fl & PG_MT_MASK) >> PG_MT_SHIFT
        self.pb_mixed[blocks] = (alloc & (mt != self.pageblock_mt[blocks][:, None])).any(axis=1)
        self.pb_dirty[blocks] = False

    def close(self) -> None:
        """Release the mapping and the memfd (idempotent)."""
        if self._map is None:
            return  # closed already, or content-free (nothing mapped)
        del self.frames
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
        self._map = None
        os.close(self.fd)


def map_frames(fd: int, nr_pages: int) -> tuple[mmap.mmap, npt.NDArray[np.uint8]]:
    """Map another process's pool memfd: the very same frames, by frame number."""
    m = mmap.mmap(fd, nr_pages * PAGE_SIZE, mmap.MAP_SHARED)
    return m, np.frombuffer(m, dtype=np.uint8).reshape(nr_pages, PAGE_SIZE)
