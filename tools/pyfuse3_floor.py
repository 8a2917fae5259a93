"""The floor of gemfs's FUSE binding: the barest pyfuse3 + trio server (``gemfs bench io
--floor``).

One read-only file, ``data``, whose bytes live in a memfd mapped once; ``read`` answers with a
view of the mapping (what gemfs does with a run of frames, minus everything else gemfs does:
the page table, the model, the checks). O_DIRECT reads of it measure what pyfuse3's request
path costs on this machine, so gemfs's own figure can be read against it.

    python -m tools.pyfuse3_floor MOUNTPOINT SIZE_BYTES

Byte ``i`` of the file is ``i % 251`` (a test checks what comes back). SIGTERM or SIGINT
unmounts and exits 0.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import sys

import pyfuse3
import trio

INO = pyfuse3.ROOT_INODE + 1
NAME = b"data"


def pattern(size: int) -> bytes:
    """The file's content."""
    period = bytes(range(251))
    return (period * (size // 251 + 1))[:size]


class Floor(pyfuse3.Operations):
    def __init__(self, data: mmap.mmap, size: int) -> None:
        super().__init__()
        self.view = memoryview(data)
        self.size = size

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, self.size
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(
        self, ino: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if ino not in (pyfuse3.ROOT_INODE, INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INO)

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if ino != INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.view[off : off + size]  # type: ignore[return-value]

    async def release(self, fh: int) -> None:
        pass


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or int(argv[1]) <= 0:
        print("usage: python -m tools.pyfuse3_floor MOUNTPOINT SIZE_BYTES", file=sys.stderr)
        return 2
    mountpoint, size = argv[0], int(argv[1])
    fd = os.memfd_create("gemfs-floor")
    os.ftruncate(fd, size)
    data = mmap.mmap(fd, size)
    data[:] = pattern(size)
    pyfuse3.init(Floor(data, size), mountpoint, {"fsname=gemfs-floor", "ro"})
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
