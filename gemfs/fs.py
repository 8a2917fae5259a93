"""The FUSE file system: a thin pyfuse3 adapter over the memory model.

Every regular file is a GEM object of the pool (``mm.create_object``); directories only organise
names. Handlers decode a request, call the model, and reply or raise ``FUSEError(errno)``; the
boundary (:func:`_handler`) turns ENOSPC and model errnos into FUSE errors and any other exception
into EIO with its traceback logged, so a bug answers one request with EIO and the mount lives on.

Inodes are freed the kernel's way: ``unlink`` removes the name; the object's frames go back to
the allocator when the last open handle closes; the inode itself is dropped at ``forget`` once
the kernel holds no lookup reference.

Caching: object contents go through the kernel page cache (``keep_cache``, write-through, so
mmap works and repeated reads never reach us); write-only handles use ``direct_io`` (nothing
reads through them, and a cached copy would double the object's memory). Writeback caching stays
off: a write that does not fit the pool must fail with ENOSPC in the writer's own write(2).

``.gemfs`` at the root is this pool's /proc: stats files in the kernel's formats and writable
knobs, all served with ``direct_io`` so every read shows the current state; ``trace_pipe`` reads
like the kernel's: it consumes, and waits when nothing is new (``_read_pipe``).
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import numpy as np
import pyfuse3
import trio

from gemfs import procfs
from gemfs.mm import GemObject, MemoryManager, MigrateMode, ObjectError, ObjId
from gemfs.mm.types import PAGE_SIZE, OutOfMemory

MIGRATION_WAIT_S = 30.0  # longest a truncate waits for pages being migrated
log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
GEMFS_DIR = ".gemfs"
TIMEOUT = 1.0  # seconds the kernel may cache names and attributes
NAME_MAX = 255
XATTR_SIZE_MAX = 65536
BLKSIZE = 1 << 20  # preferred I/O size: one FUSE request carries up to 1 MiB
XATTR_PREFIX = "user.gemfs."
XATTRS = ("object", "pages", "pinned", "frames")

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[Concatenate["GemFS", P], Coroutine[Any, Any, R]]


class Kind(enum.Enum):
    DIR = "dir"
    FILE = "file"  # a GEM object
    PROC = "proc"  # a .gemfs stats file or knob


@dataclass(frozen=True, slots=True)
class ProcFile:
    """A .gemfs entry: ``show`` renders it, ``store`` takes a written value (ValueError: EINVAL)."""

    name: str
    perm: int
    show: Callable[[], str] | None = None
    store: Callable[[str], Awaitable[None]] | None = None
    stream: bool = False
    """A pipe (trace_pipe): reads consume ``show``'s text whatever the offset, and a read that
    finds nothing waits for more (EAGAIN if opened O_NONBLOCK); not seekable."""


@dataclass(eq=False, slots=True)
class Inode:
    ino: int
    kind: Kind
    mode: int
    uid: int
    gid: int
    parent: int  # directory holding the (only) name; 0 once unlinked
    name: bytes
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int = 1
    fixed: bool = False  # .gemfs and its files: no renames, removals, new entries, chmod
    children: dict[bytes, int] = field(default_factory=dict)  # directories
    obj: GemObject | None = None  # regular files
    proc: ProcFile | None = None  # .gemfs files
    lookups: int = 0  # references the kernel holds (lookup, create, mkdir, readdirplus)
    opens: int = 0  # open handles plus holds from other owners (Kernel.get_object)


@dataclass(eq=False, slots=True)
class Handle:
    inode: Inode
    uid: int = 0  # who opened it: a write through it by anyone but root drops set-uid bits
    text: bytes = b""  # .gemfs file: the rendering being read
    nonblock: bool = False  # opened O_NONBLOCK: a pipe read that finds nothing gives EAGAIN
    entries: list[tuple[bytes, int]] | None = None  # directory: listing being read


@dataclass(frozen=True, slots=True)
class SetAttrs:
    """The fields of one setattr request that are to change (None: leave)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


def _handler(fn: Handler[P, R]) -> Handler[P, R]:
    """The error boundary every request handler passes through (the only exit is FUSEError)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: GemFS, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            if self.faults:
                self.fire_fault(name)
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OutOfMemory:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except ObjectError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("%s%s failed; answering EIO", name, _brief(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _brief(args: Sequence[object]) -> str:
    parts = [repr(a)[:40] for a in args if not isinstance(a, pyfuse3.RequestContext)]
    return "(" + ", ".join(parts) + ")"


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class GemFS(pyfuse3.Operations):
    # Write-through, not writeback: a write that does not fit the pool must fail with ENOSPC in
    # the writer's write(2), and the kernel must not hold dirty data the pool never saw.
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(
        self,
        mm: MemoryManager,
        *,
        uid: int | None = None,
        gid: int | None = None,
        test_faults: bool = False,
    ) -> None:
        super().__init__()
        self.mm = mm
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.inodes: dict[int, Inode] = {}
        self.handles: dict[int, Handle] = {}
        self.by_object: dict[ObjId, Inode] = {}
        self.faults: dict[str, int] = {}  # handler name -> injected failures still to come
        self.mounted = False  # set by the daemon while the FUSE session exists
        self.pool_info: dict[str, str] = {}  # more "key value" lines for .gemfs/pool
        self.ready = trio.Event()  # set when the kernel's INIT arrived
        # compact_memory runs this; an integrator may replace it (e.g. to reach a driver).
        self.compact_memory: Callable[[], Awaitable[object]] = self.compact_all
        self.readdir_reply: Callable[
            [pyfuse3.ReaddirToken, bytes, pyfuse3.EntryAttributes, int], bool
        ] = pyfuse3.readdir_reply
        self._next_ino = ROOT_INODE
        self._trace_waiters: list[trio.Event] = []
        self._pipe_text = b""  # taken from the tracer, not yet read
        self._next_fh = 1
        root = self._new_inode(Kind.DIR, stat.S_IFDIR | 0o755, self.uid, self.gid, None, b"")
        root.parent = ROOT_INODE
        root.lookups = 1  # the kernel's reference to the root never goes away
        gemfs_dir = self._new_inode(
            Kind.DIR, stat.S_IFDIR | 0o555, self.uid, self.gid, root, GEMFS_DIR.encode()
        )
        gemfs_dir.fixed = True
        self.gemfs_dir = gemfs_dir
        for pf in self._proc_files(test_faults):
            node = self._new_inode(
                Kind.PROC, stat.S_IFREG | pf.perm, self.uid, self.gid, gemfs_dir, pf.name.encode()
            )
            node.fixed = True
            node.proc = pf

    # -- the .gemfs directory -----------------------------------------------------------------
    def _proc_files(self, test_faults: bool) -> list[ProcFile]:
        mm = self.mm

        async def store_compact_memory(text: str) -> None:
            procfs.parse_int(text, 1, 1)
            await self.compact_memory()

        async def store_proactiveness(text: str) -> None:
            mm.compaction_proactiveness = procfs.parse_int(text, 0, 100)

        async def store_extfrag_threshold(text: str) -> None:
            mm.extfrag_threshold = procfs.parse_int(text, 0, 1000)

        pipe = self.trace_pipe = procfs.TracePipe(mm)

        async def store_tracing_on(text: str) -> None:
            pipe.store_on(text)

        files = [
            ProcFile("buddyinfo", 0o444, show=mm.buddyinfo),
            ProcFile("pagetypeinfo", 0o444, show=mm.pagetypeinfo),
            ProcFile("vmstat", 0o444, show=mm.vmstat_text),
            ProcFile("extfrag_index", 0o444, show=mm.extfrag_index),
            ProcFile("unusable_index", 0o444, show=mm.unusable_index),
            ProcFile("compaction_state", 0o444, show=mm.compact_state.format),
            ProcFile("objects", 0o444, show=lambda: procfs.format_objects(mm)),
            ProcFile("pool", 0o444, show=lambda: procfs.format_pool(mm, self.pool_info)),
            ProcFile("compact_memory", 0o200, store=store_compact_memory),
            ProcFile(
                "compaction_proactiveness",
                0o644,
                show=lambda: f"{mm.compaction_proactiveness}\n",
                store=store_proactiveness,
            ),
            ProcFile(
                "extfrag_threshold",
                0o644,
                show=lambda: f"{mm.extfrag_threshold}\n",
                store=store_extfrag_threshold,
            ),
            ProcFile("tracing_on", 0o644, show=pipe.show_on, store=store_tracing_on),
            ProcFile("trace_pipe", 0o444, show=pipe.take, stream=True),
        ]
        if test_faults:
            files.append(ProcFile("inject_fault", 0o200, store=self._store_fault))
            files.append(ProcFile("test_poke", 0o200, store=self._store_poke))
        return files

    async def compact_all(self) -> None:
        """compact_memory: compact the whole pool, letting other requests in between batches."""
        for _batch in self.mm.iter_policy(self.mm.compact_policy(-1, MigrateMode.SYNC)):
            await trio.lowlevel.checkpoint()

    async def _store_fault(self, text: str) -> None:
        """Test-only: ``HANDLER [COUNT]`` makes the next COUNT calls of HANDLER raise."""
        words = text.split()
        if not 1 <= len(words) <= 2 or not callable(getattr(GemFS, words[0], None)):
            raise ValueError(f"expected 'HANDLER [COUNT]', got {text.strip()!r}")
        count = procfs.parse_int(words[1], 0, 1 << 20) if len(words) == 2 else 1
        self.faults[words[0]] = count

    async def _store_poke(self, text: str) -> None:
        """Test-only: ``OBJ OFFSET HEX`` writes bytes into an object's frames behind the page
        cache (as the GPU does) and invalidates the kernel's cache of it."""
        oid, offset, data = text.split()
        obj = self.mm.get(int(oid))
        pos, raw = int(offset), bytes.fromhex(data)
        if not raw or pos < 0 or pos + len(raw) > obj.size:
            raise ValueError("poke outside the object")
        first, last = pos // PAGE_SIZE, (pos + len(raw) - 1) // PAGE_SIZE
        frames = self.mm.populate(obj, first, last - first + 1)
        block = self.mm.pool.frames[frames]
        lo = pos - first * PAGE_SIZE
        block.reshape(-1)[lo : lo + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.mm.pool.frames[frames] = block
        await self.invalidate(obj, first, last - first + 1)

    async def invalidate(self, obj: GemObject, first_page: int, count: int) -> None:
        """Drop the kernel's cached pages of an object whose frames changed behind the page
        cache's back. pyfuse3 can only invalidate a whole inode, so the range widens to the
        file. Runs in a worker thread: the kernel may wait for page locks held by reads that
        this very loop must answer."""
        inode = self.by_object.get(obj.id)
        if not self.mounted or inode is None or count <= 0 or inode.lookups <= 0:
            return  # no session, or the kernel holds no reference: nothing cached
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode.ino, False)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EBADF):
                raise
            log.debug("invalidate_inode(%d): %s", inode.ino, e)

    def fire_fault(self, name: str) -> None:
        left = self.faults.get(name, 0)
        if left > 0:
            self.faults[name] = left - 1
            if left == 1:
                del self.faults[name]
            raise RuntimeError(f"fault injected into {name}")

    # -- inode table --------------------------------------------------------------------------
    def _new_inode(
        self, kind: Kind, mode: int, uid: int, gid: int, parent: Inode | None, name: bytes
    ) -> Inode:
        now = time.time_ns()
        ino = self._next_ino
        self._next_ino += 1
        inode = Inode(ino, kind, mode, uid, gid, 0, name, now, now, now)
        if kind is Kind.DIR:
            inode.nlink = 2
        self.inodes[ino] = inode
        if parent is not None:
            self._link(parent, name, inode)
        return inode

    def _link(self, parent: Inode, name: bytes, inode: Inode) -> None:
        parent.children[name] = inode.ino
        inode.parent = parent.ino
        inode.name = name
        if inode.kind is Kind.DIR:
            parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def _unlink(self, parent: Inode, name: bytes) -> Inode:
        inode = self.inodes[parent.children.pop(name)]
        if inode.kind is Kind.DIR:
            parent.nlink -= 1
        inode.parent = 0
        parent.mtime_ns = parent.ctime_ns = inode.ctime_ns = time.time_ns()
        return inode

    def inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise _err(errno.ENOENT)
        return inode

    def _dir(self, ino: int, *, mutable: bool = False) -> Inode:
        inode = self.inode(ino)
        if inode.kind is not Kind.DIR:
            raise _err(errno.ENOTDIR)
        if mutable and inode.fixed:
            raise _err(errno.EPERM)
        return inode

    def path_of_inode(self, inode: Inode) -> str:
        """Path from the mount root ("/a/b"), or "" if the inode has no name any more."""
        parts: list[bytes] = []
        node = inode
        while node.ino != ROOT_INODE:
            if node.parent == 0:
                return ""
            parts.append(node.name)
            node = self.inodes[node.parent]
        return "/" + "/".join(os.fsdecode(p) for p in reversed(parts))

    def walk(self, path: str) -> Inode:
        """The inode at a path relative to the mount root (leading "/" optional)."""
        node = self.inodes[ROOT_INODE]
        for part in split_path(path):
            if node.kind is not Kind.DIR:
                raise ObjectError(errno.ENOTDIR, f"{path}: not a directory")
            ino = node.children.get(part)
            if ino is None:
                raise ObjectError(errno.ENOENT, f"{path}: no such file or directory")
            node = self.inodes[ino]
        return node

    def _subtree(self, inode: Inode) -> Iterator[Inode]:
        yield inode
        for ino in inode.children.values():
            yield from self._subtree(self.inodes[ino])

    def _renamed(self, inode: Inode) -> None:
        for node in self._subtree(inode):
            if node.obj is not None:
                node.obj.path = self.path_of_inode(node)

    def _maybe_free(self, inode: Inode) -> None:
        """Release what nobody can reach any more: frames at the last close, the inode at forget."""
        if inode.nlink > 0 or inode.opens > 0:
            return
        if inode.obj is not None:
            self.by_object.pop(inode.obj.id, None)
            self.mm.destroy_object(inode.obj)
            inode.obj = None
        if inode.lookups <= 0:
            del self.inodes[inode.ino]

    # -- files (also used by the control server through the Kernel) ----------------------------
    def new_file(
        self, parent: Inode, name: bytes, mode: int, uid: int, gid: int, size: int = 0
    ) -> Inode:
        if parent.fixed:
            raise ObjectError(errno.EPERM, f"{GEMFS_DIR} is read-only")
        check_name(name)
        if name in parent.children:
            raise ObjectError(errno.EEXIST, f"{os.fsdecode(name)} exists")
        path = self.path_of_inode(parent).rstrip("/") + "/" + os.fsdecode(name)
        obj = self.mm.create_object(size, path=path)
        inode = self._new_inode(Kind.FILE, stat.S_IFREG | (mode & 0o7777), uid, gid, parent, name)
        inode.obj = obj
        self.by_object[obj.id] = inode
        return inode

    def remove(self, parent: Inode, name: bytes) -> None:
        """unlink(2): drop the name; the frames live on while the file is open."""
        if parent.fixed:
            raise ObjectError(errno.EPERM, f"{GEMFS_DIR} is read-only")
        ino = parent.children.get(name)
        if ino is None:
            raise ObjectError(errno.ENOENT, f"{os.fsdecode(name)}: no such file")
        if self.inodes[ino].kind is Kind.DIR:
            raise ObjectError(errno.EISDIR, f"{os.fsdecode(name)} is a directory")
        inode = self._unlink(parent, name)
        inode.nlink = 0
        if inode.obj is not None:
            inode.obj.path += " (deleted)"
        self._maybe_free(inode)

    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = 0
        obj = inode.obj
        if obj is not None:
            a.st_size = obj.size
            a.st_blocks = obj.nr_resident * (PAGE_SIZE // 512)
        else:
            a.st_size = PAGE_SIZE if inode.kind is Kind.DIR else 0
            a.st_blocks = 0
        a.st_blksize = BLKSIZE
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = inode.mtime_ns
        a.st_ctime_ns = inode.ctime_ns
        return a

    def _open_handle(self, inode: Inode, uid: int = 0) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(inode, uid)
        inode.opens += 1
        return fh

    def _file_info(self, fh: int, inode: Inode, flags: int) -> pyfuse3.FileInfo:
        if inode.kind is Kind.PROC:
            stream = inode.proc is not None and inode.proc.stream
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=stream)
        # The page cache stays valid across opens: only this file system changes the frames'
        # content, and whoever else does (the GPU) invalidates explicitly.
        # A write-only handle bypasses the cache: nobody reads through it, so caching what it
        # writes would only keep a second copy of the object in memory (and cost the writer
        # a page-cache fill per write). The kernel drops cached pages a direct write covers.
        direct = flags & os.O_ACCMODE == os.O_WRONLY
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=True)

    # -- pyfuse3 handlers ---------------------------------------------------------------------
    def init(self) -> None:
        log.debug("FUSE session initialized")
        self.ready.set()

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if name == b".":
            inode = parent
        elif name == b"..":
            inode = self.inode(parent.parent or ROOT_INODE)
        else:
            ino = parent.children.get(name)
            if ino is None:
                raise _err(errno.ENOENT)
            inode = self.inodes[ino]
        inode.lookups += 1
        return self.attributes(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # forget has no reply: it must never raise (that would end the FUSE main loop).
        try:
            for ino, nlookup in inode_list:
                inode = self.inodes.get(ino)
                if inode is None or ino == ROOT_INODE:
                    continue
                inode.lookups -= nlookup
                self._maybe_free(inode)
        except Exception:
            log.exception("forget(%r) failed", inode_list)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attributes(self.inode(inode))

    @_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        changes = SetAttrs(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        node = self.inode(inode)
        if changes.size is not None and ctx.uid != 0:
            changes = replace(changes, mode=_kill_suid(node.mode, changes.mode))
        await self._setattr_waiting(node, changes)
        return self.attributes(node)

    async def _setattr_waiting(self, node: Inode, changes: SetAttrs) -> None:
        # A truncate that would cut pages mid-migration waits for the batch to land (the
        # kernel would wait on the page lock); callbacks are time-boxed, so this is bounded.
        with trio.move_on_after(MIGRATION_WAIT_S):
            while True:
                try:
                    self.apply_setattr(node, changes)
                    return
                except ObjectError as e:
                    if e.errno != errno.EAGAIN:
                        raise
                await trio.sleep(0.005)
        raise _err(errno.EBUSY)

    def apply_setattr(self, inode: Inode, ch: SetAttrs) -> None:
        now = time.time_ns()
        if ch.size is not None:
            if inode.kind is Kind.DIR:
                raise _err(errno.EISDIR)
            if inode.obj is not None:  # .gemfs files: O_TRUNC before a knob write is a no-op
                self.mm.truncate(inode.obj, ch.size)
                inode.mtime_ns = now
        if inode.fixed and (ch.mode is not None or ch.uid is not None or ch.gid is not None):
            raise _err(errno.EPERM)
        if ch.mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (ch.mode & 0o7777)
        if ch.uid is not None:
            inode.uid = ch.uid
        if ch.gid is not None:
            inode.gid = ch.gid
        if ch.atime_ns is not None:
            inode.atime_ns = ch.atime_ns
        if ch.mtime_ns is not None:
            inode.mtime_ns = ch.mtime_ns
        inode.ctime_ns = now

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode, mutable=True)
        check_name(name)
        if name in parent.children:
            raise _err(errno.EEXIST)
        inode = self._new_inode(
            Kind.DIR, stat.S_IFDIR | (mode & 0o7777), ctx.uid, ctx.gid, parent, name
        )
        inode.lookups += 1
        return self.attributes(inode)

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise _err(errno.EPERM)  # only GEM objects and directories live here
        inode = self.new_file(self._dir(parent_inode), name, mode, ctx.uid, ctx.gid)
        inode.lookups += 1
        return self.attributes(inode)

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self.new_file(self._dir(parent_inode), name, mode, ctx.uid, ctx.gid)
        inode.lookups += 1
        fh = self._open_handle(inode, ctx.uid)
        return self._file_info(fh, inode, flags), self.attributes(inode)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _err(errno.EPERM)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _err(errno.EPERM)  # an object has one path

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.remove(self._dir(parent_inode), name)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._dir(parent_inode, mutable=True)
        ino = parent.children.get(name)
        if ino is None:
            raise _err(errno.ENOENT)
        inode = self.inodes[ino]
        if inode.kind is not Kind.DIR:
            raise _err(errno.ENOTDIR)
        if inode.fixed:
            raise _err(errno.EPERM)
        if inode.children:
            raise _err(errno.ENOTEMPTY)
        self._unlink(parent, name)
        inode.nlink = 0
        self._maybe_free(inode)

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise _err(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT
        old_dir = self._dir(parent_inode_old, mutable=True)
        new_dir = self._dir(parent_inode_new, mutable=True)
        check_name(name_new)
        ino = old_dir.children.get(name_old)
        if ino is None:
            raise _err(errno.ENOENT)
        src = self.inodes[ino]
        if src.fixed:
            raise _err(errno.EPERM)
        if src.kind is Kind.DIR:
            node = new_dir
            while node.ino != ROOT_INODE:  # a directory cannot move below itself
                if node is src:
                    raise _err(errno.EINVAL)
                node = self.inodes[node.parent]
        target_ino = new_dir.children.get(name_new)
        if target_ino == src.ino:
            return
        if target_ino is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise _err(errno.EEXIST)
            target = self.inodes[target_ino]
            if target.kind is Kind.DIR:
                if src.kind is not Kind.DIR:
                    raise _err(errno.EISDIR)
                if target.children:
                    raise _err(errno.ENOTEMPTY)
                self._unlink(new_dir, name_new)
                target.nlink = 0
                self._maybe_free(target)
            else:
                if src.kind is Kind.DIR:
                    raise _err(errno.ENOTDIR)
                self.remove(new_dir, name_new)
        self._unlink(old_dir, name_old)
        self._link(new_dir, name_new, src)
        self._renamed(src)

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inode(inode)
        if node.kind is Kind.DIR:
            raise _err(errno.EISDIR)
        if node.proc is not None:
            acc = flags & os.O_ACCMODE
            if acc != os.O_WRONLY and node.proc.show is None:
                raise _err(errno.EACCES)
            if acc != os.O_RDONLY and node.proc.store is None:
                raise _err(errno.EACCES)
        if node.obj is not None and flags & os.O_TRUNC:
            # The kernel asks for an atomic O_TRUNC: the truncation is ours to do (and, like
            # truncate(2), it updates mtime and ctime and drops set-uid bits of others' files).
            mode = _kill_suid(node.mode, None) if ctx.uid != 0 else None
            await self._setattr_waiting(node, SetAttrs(size=0, mode=mode))
        fh = self._open_handle(node, ctx.uid)
        self.handles[fh].nonblock = bool(flags & os.O_NONBLOCK)
        return self._file_info(fh, node, flags)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        obj = h.inode.obj
        if obj is not None:
            # pyfuse3 replies from any contiguous buffer before the next request runs, so the
            # model's zero-copy view of the frames is safe to hand over.
            return cast(bytes, self.mm.read_view(obj, off, size))
        proc = h.inode.proc
        if proc is None or proc.show is None:
            raise _err(errno.EBADF)
        if proc.stream:
            return await self._read_pipe(h, proc.show, size)
        if off == 0 or not h.text:  # like seq_file: render afresh when read from the start
            h.text = proc.show().encode()
        return h.text[off : off + size]

    async def _read_pipe(self, h: Handle, take: Callable[[], str], size: int) -> bytes:
        """trace_pipe's read: what is new, at most ``size`` bytes (the rest stays with the pipe
        for whichever handle reads next); when nothing is, EAGAIN for an O_NONBLOCK open, else
        wait for the next line. The wait is this request's task only: pyfuse3 serves the
        others meanwhile (up to FUSE_MAX_TASKS at once). pyfuse3 does not pass FUSE_INTERRUPT
        on, so a reader that catches its signals waits on; a killed one is gone, and the lines
        this read then takes are lost with it (the kernel's trace_pipe consumes the same way)."""
        while not self._pipe_text:
            self._pipe_text = take().encode()
            if self._pipe_text:
                break
            if h.nonblock:
                raise _err(errno.EAGAIN)
            await self._trace_wait()
        out, self._pipe_text = self._pipe_text[:size], self._pipe_text[size:]
        return out

    async def _trace_wait(self) -> None:
        """Until the tracer makes a line (called from the model, possibly in a worker thread:
        the wake-up goes through the trio token)."""
        pipe = self.trace_pipe
        ready = trio.Event()
        self._trace_waiters.append(ready)
        token = trio.lowlevel.current_trio_token()
        pipe.notify = lambda: token.run_sync_soon(self._wake_trace_readers, idempotent=True)
        try:
            if not pipe.pending():  # (a line made before notify was set is not waited for)
                await ready.wait()
        finally:
            if ready in self._trace_waiters:
                self._trace_waiters.remove(ready)
            if not self._trace_waiters:
                pipe.notify = None

    def _wake_trace_readers(self) -> None:
        waiters, self._trace_waiters = self._trace_waiters, []
        self.trace_pipe.notify = None
        for ready in waiters:
            ready.set()

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        inode = h.inode
        if inode.obj is not None:
            n = self.mm.write(inode.obj, off, buf)
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
            if h.uid != 0:  # write(2) by a process without CAP_FSETID drops set-uid/set-gid
                inode.mode = drop_suid(inode.mode)
            return n
        proc = inode.proc
        if proc is None or proc.store is None:
            raise _err(errno.EBADF)
        try:
            text = buf.decode()
            await proc.store(text)
        except (UnicodeDecodeError, ValueError) as e:
            log.info("%s: rejected %r: %s", proc.name, buf[:80], e)
            raise _err(errno.EINVAL) from None
        return len(buf)

    def seek_data_hole(self, ino: int, off: int, whence: int) -> int:
        """lseek(SEEK_DATA / SEEK_HOLE) as tmpfs answers it: data is a page with a frame, a
        hole a page without one, the end of the file is a hole; ENXIO at or past the end.
        Called synchronously from the session (see gemfs.fuse_lseek); errors as OSError."""
        node = self.inodes.get(ino)
        if node is None:
            raise OSError(errno.ENOENT, "no such inode")
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE come here")
        obj = node.obj
        size = obj.size if obj is not None else 0
        if off < 0 or off >= size:
            raise OSError(errno.ENXIO, "offset at or past the end of the file")
        assert obj is not None
        idx, _ = obj.resident()
        idx = idx[idx < obj.nr_pages]
        page = off // PAGE_SIZE
        j = int(np.searchsorted(idx, page))
        here = j < len(idx) and int(idx[j]) == page
        if whence == os.SEEK_DATA:
            if here:
                return off
            if j == len(idx):
                raise OSError(errno.ENXIO, "no data past the offset")
            return int(idx[j]) * PAGE_SIZE
        if not here:
            return off
        run = idx[j:] - np.arange(page, page + len(idx) - j)  # 0 while the pages are consecutive
        gap = np.flatnonzero(run)
        hole = page + (int(gap[0]) if len(gap) else len(idx) - j)
        return min(hole * PAGE_SIZE, size)

    @_handler
    async def flush(self, fh: int) -> None:
        return None

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # every write is already in the pool

    @_handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        h.inode.opens -= 1
        self._maybe_free(h.inode)

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir(inode)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node)
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self.handles[fh]
        d = h.inode
        if start_id == 0 or h.entries is None:
            dots = [(b".", d.ino), (b"..", d.parent or ROOT_INODE)]
            h.entries = dots + list(d.children.items())
        for i in range(start_id, len(h.entries)):
            name, ino = h.entries[i]
            dot = i < 2
            if not dot and d.children.get(name) != ino:
                continue  # removed since the listing began
            child = self.inodes.get(ino)
            if child is None:
                continue  # "..": the parent went away since the listing began
            if not self.readdir_reply(token, name, self.attributes(child), i + 1):
                break
            if not dot:  # the kernel takes no reference on "." and ".."
                child.lookups += 1

    @_handler
    async def releasedir(self, fh: int) -> None:
        del self.handles[fh]

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        pool = self.mm.pool
        s.f_bsize = PAGE_SIZE
        s.f_frsize = PAGE_SIZE
        s.f_blocks = pool.nr_pages
        s.f_bfree = s.f_bavail = self.mm.buddy.free_pages
        s.f_files = len(self.inodes) + s.f_bfree
        s.f_ffree = s.f_favail = s.f_bfree
        s.f_namemax = NAME_MAX
        return s

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inode(inode)
        key = os.fsdecode(name)
        if node.obj is None or not key.startswith(XATTR_PREFIX):
            raise _err(pyfuse3.ENOATTR)
        value = self.xattr(node.obj, key[len(XATTR_PREFIX) :])
        if value is None:
            raise _err(pyfuse3.ENOATTR)
        data = value.encode()
        if len(data) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        return data

    def xattr(self, obj: GemObject, key: str) -> str | None:
        match key:
            case "object":
                return str(obj.id)
            case "pages":
                return str(obj.nr_resident)
            case "pinned":
                return str(self.mm.pinned_pages(obj))
            case "frames":
                return procfs.format_frames(obj.pages[: obj.nr_pages])
        return None

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if self.inode(inode).obj is None:
            return []
        return [(XATTR_PREFIX + k).encode() for k in XATTRS]

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.inode(inode)
        raise _err(errno.EPERM if name.startswith(XATTR_PREFIX.encode()) else errno.ENOTSUP)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.inode(inode)
        raise _err(errno.EPERM if name.startswith(XATTR_PREFIX.encode()) else errno.ENOTSUP)


def drop_suid(mode: int) -> int:
    """The mode without set-uid, and without set-gid when group-executable: what the kernel
    drops when a process without CAP_FSETID writes or truncates a file (should_remove_suid)."""
    kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
    return mode & ~kill


def _kill_suid(mode: int, new_mode: int | None) -> int | None:
    """The permission bits a setattr should set so that set-uid bits drop (``new_mode``, if
    the request sets a mode, or the current ones); None when there is nothing to change."""
    base = mode if new_mode is None else stat.S_IFMT(mode) | (new_mode & 0o7777)
    dropped = drop_suid(base)
    if dropped == base:
        return new_mode
    return dropped & 0o7777


def split_path(path: str) -> list[bytes]:
    """Split "/a/b" or "a/b" into [b"a", b"b"]; ".", ".." and bad names are refused."""
    parts = [os.fsencode(p) for p in path.strip("/").split("/") if p]
    for p in parts:
        if p in (b".", b".."):
            raise ObjectError(errno.EINVAL, f"{path}: '.' and '..' are not allowed")
        check_name(p)
    return parts


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise ObjectError(errno.ENAMETOOLONG, "name too long")
    if not name or b"/" in name or b"\0" in name:
        raise ObjectError(errno.EINVAL, f"bad name {name!r}")
