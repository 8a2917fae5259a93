"""The gemfs server: one trio nursery running the FUSE main loop and any extra services.

:func:`serve` mounts, reports readiness with ``task_status.started(kernel)``, serves until the
mount goes away (``fusermount3 -u``, ``gemfs umount``) or SIGINT/SIGTERM arrives, then unmounts.
Extra services (the control-socket server) are started in the same nursery with the
:class:`Kernel`, the object that holds the model and the file system and offers what a service
needs from them.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pyfuse3
import trio

from gemfs import fuse_lseek
from gemfs.fs import GemFS, Inode, Kind, split_path
from gemfs.mm import Design, GemObject, MemoryManager, ObjectError
from gemfs.mm.types import format_size
from gemfs.mountproc import (
    MountError,
    check_fuse_device,
    check_mountpoint,
    control_socket_in_use,
    mount_device,
)

log = logging.getLogger(__name__)

INIT_TIMEOUT = 10.0  # seconds for the kernel's FUSE INIT after mounting
SHUTDOWN_GRACE = 2.0  # seconds services get to finish once the mount is gone
FUSE_MAX_TASKS = 16
READAHEAD_KB = 4096

# A service is called as ``await nursery.start(service, kernel)``: it must call
# ``task_status.started()`` once it is ready (e.g. listening), then run until cancelled or until
# ``kernel.stopping`` is set.
Service = Callable[..., Awaitable[object]]


class Kernel:
    """What services (the control server) get: the model, the file system, and helpers.

    All methods run on the trio thread that serves FUSE; none of them awaits except
    :meth:`invalidate`, so each acts atomically with respect to file system requests.
    Errors are :class:`~gemfs.mm.ObjectError` with an errno.
    """

    def __init__(
        self, mm: MemoryManager, fs: GemFS, mountpoint: str, control_path: str | None = None
    ) -> None:
        self.mm = mm
        self.fs = fs
        self.mountpoint = mountpoint
        self.control_path = control_path
        if control_path is not None:  # tools find the socket of a mount in .gemfs/pool
            fs.pool_info["control"] = os.path.abspath(control_path)
        self.stopping = trio.Event()  # set when the mount is gone and services should end

    @property
    def design(self) -> Design:
        return self.mm.design

    @property
    def mounted(self) -> bool:
        """The FUSE session exists: notifications to the kernel can be sent."""
        return self.fs.mounted

    def create_file(self, path: str, size: int, uid: int, gid: int, mode: int) -> GemObject:
        """Create a regular file at ``path`` (relative to the mount root; its parent directory
        must exist) backed by a new object of ``size`` bytes, all pages populated."""
        parts = split_path(path)
        if not parts:
            raise ObjectError(errno.EEXIST, "the root exists")
        parent = self.fs.walk("/".join(os.fsdecode(p) for p in parts[:-1]))
        if parent.kind is not Kind.DIR:
            raise ObjectError(errno.ENOTDIR, f"{path}: parent is not a directory")
        if not _permits(parent, uid, gid, os.W_OK | os.X_OK):  # as open(O_CREAT) would check
            raise ObjectError(errno.EACCES, f"{path}: no permission to create in the directory")
        inode = self.fs.new_file(parent, parts[-1], mode, uid, gid, size)
        assert inode.obj is not None
        return inode.obj

    def resolve(self, path: str) -> GemObject:
        """The object of the regular file at ``path`` (relative to the mount root)."""
        inode = self.fs.walk(path)
        if inode.obj is None:
            code = errno.EISDIR if inode.kind is Kind.DIR else errno.EINVAL
            raise ObjectError(code, f"{path}: not a GEM object")
        return inode.obj

    def may_write(self, path: str, uid: int, gid: int) -> bool:
        """Would a process of uid/gid be allowed to write the file (its mode bits)?"""
        try:
            inode = self.fs.walk(path)
        except ObjectError:
            return False
        if inode.obj is None:
            return False
        return _permits(inode, uid, gid, os.W_OK)

    def path_of(self, obj: GemObject) -> str:
        """The object's path from the mount root ("/dir/name"; "... (deleted)" once unlinked)."""
        return obj.path

    def unlink(self, path: str) -> None:
        """Remove a file's name (frames live on while it is open or held); tell the kernel."""
        parts = split_path(path)
        if not parts:
            raise ObjectError(errno.EISDIR, "cannot unlink the root")
        parent = self.fs.walk("/".join(os.fsdecode(p) for p in parts[:-1]))
        ino = parent.children.get(parts[-1], 0)
        self.fs.remove(parent, parts[-1])
        if self.mounted:  # drop the kernel's cached name (a worker thread of pyfuse3 sends it)
            pyfuse3.invalidate_entry_async(parent.ino, parts[-1], deleted=ino, ignore_enoent=True)

    def get_object(self, obj: GemObject) -> None:
        """Hold the object like an open file does (drm_gem_object_get): an unlinked file's
        frames stay until every holder lets go."""
        self._inode(obj).opens += 1

    def put_object(self, obj: GemObject) -> None:
        inode = self._inode(obj)
        inode.opens -= 1
        self.fs._maybe_free(inode)

    def _inode(self, obj: GemObject) -> Inode:
        inode = self.fs.by_object.get(obj.id)
        if inode is None:
            raise ObjectError(errno.ENOENT, f"object {obj.id} is not a file of this mount")
        return inode

    def trace(self, seed: int | None, buffer_lines: int | None = None) -> None:
        """Turn the model's tracepoints on (for the run of ``seed``, in a new buffer of
        ``buffer_lines`` lines, or the default) or off (``seed`` None), as ``.gemfs/tracing_on``
        does; the lines are read at ``.gemfs/trace_pipe``."""
        if seed is None:
            self.fs.trace_pipe.disable()
        else:
            self.fs.trace_pipe.enable(seed, buffer_lines)

    async def invalidate(self, obj: GemObject, first_page: int, count: int) -> None:
        """Drop the kernel's cached pages of the object's range after its content changed
        behind the page cache's back (GPU writes); see :meth:`GemFS.invalidate`."""
        await self.fs.invalidate(obj, first_page, count)


def _permits(inode: Inode, uid: int, gid: int, want: int) -> bool:
    """The mode-bit check the kernel's default_permissions makes (root may do anything)."""
    if uid == 0:
        return True
    if uid == inode.uid:
        shift = 6
    elif gid == inode.gid:
        shift = 3
    else:
        shift = 0
    have = (inode.mode >> shift) & 0o7
    return have & want == want


def mount_options() -> set[str]:
    opts = set(pyfuse3.default_options) | {"fsname=gemfs", "subtype=gemfs"}
    if os.geteuid() == 0:
        opts.add("allow_other")  # clients and the driver may run as other users
    return opts


async def serve(
    mountpoint: str,
    *,
    pool: int | str = "64MiB",
    design: Design | str = Design.SHMEM_HOOK,
    movablecore: str | None = None,
    confine_granule: str | None = None,
    ttm_pool: str | None = None,
    control_path: str | None = None,
    services: Sequence[Service] = (),
    test_faults: bool = False,
    prefault: bool = True,
    task_status: trio.TaskStatus[Kernel] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount gemfs and serve until unmounted or signalled (SIGINT/SIGTERM: unmount, return).

    Raises :class:`MountError` (one line for the user) when it cannot mount.
    One mount per process: pyfuse3 keeps one global session.
    """
    mountpoint = check_mountpoint(mountpoint)
    check_fuse_device()
    if control_path is not None and control_socket_in_use(control_path):
        raise MountError(f"control socket {control_path} is in use by a live server")
    try:
        mm = MemoryManager(
            pool,
            design=design,
            movablecore=movablecore,
            confine_granule=confine_granule,
            ttm_pool=ttm_pool,
        )
    except ValueError as e:
        raise MountError(str(e)) from None
    except OSError as e:
        raise MountError(f"cannot create the pool: {e.strerror}") from None
    try:
        if prefault:
            mm.prefault()
        fs = GemFS(mm, test_faults=test_faults)
        kernel = Kernel(mm, fs, mountpoint, control_path)
        try:
            pyfuse3.init(fs, mountpoint, mount_options())
        except RuntimeError as e:
            raise MountError(f"cannot mount on {mountpoint}: {e}") from None
        fs.mounted = True
        fuse_lseek.install(fs.seek_data_hole)  # SEEK_DATA/SEEK_HOLE like tmpfs
        # Signals are caught from here to the end: one arriving while we shut down is no kill.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                await _serve_mounted(kernel, services, signals, task_status)
            finally:
                fs.mounted = False
                pyfuse3.close(unmount=True)
                log.info("gemfs unmounted from %s", mountpoint)
    finally:
        mm.close()


async def _serve_mounted(
    kernel: Kernel,
    services: Sequence[Service],
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[Kernel],
) -> None:
    mm, fs = kernel.mm, kernel.fs
    async with trio.open_nursery() as nursery:
        watcher = trio.CancelScope()
        nursery.start_soon(_run_fuse, kernel, nursery.cancel_scope, watcher)
        nursery.start_soon(_watch_signals, watcher, signals)
        with trio.fail_after(INIT_TIMEOUT):
            await fs.ready.wait()
        set_readahead(kernel.mountpoint, READAHEAD_KB)
        for service in services:
            try:
                await nursery.start(service, kernel)
            except OSError as e:  # e.g. the control socket: one line for the user
                raise MountError(f"cannot start {_service_name(service)}: {e}") from None
        log.info(
            "gemfs mounted on %s (pool %s, design %s)",
            kernel.mountpoint,
            format_size(mm.pool.size),
            mm.design.value,
        )
        task_status.started(kernel)


def _service_name(service: Service) -> str:
    fn = getattr(service, "func", service)  # functools.partial
    return str(getattr(fn, "__name__", "a service")).replace("_", " ")


def set_readahead(mountpoint: str, kb: int) -> None:
    """Widen the kernel's readahead window for this mount (best effort; needs root).

    FUSE mounts get the block layer's default of 128 KiB, so a cold sequential read reaches us
    as 128 KiB requests; a window of several max-size (1 MiB) requests keeps requests in flight
    while the reader copies the previous ones out of the page cache.
    """
    dev = mount_device(mountpoint)
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        log.debug("cannot set read_ahead_kb of %s: %s", dev, e)


async def _run_fuse(
    kernel: Kernel, everything: trio.CancelScope, signals: trio.CancelScope
) -> None:
    try:
        await pyfuse3.main(max_tasks=FUSE_MAX_TASKS)
    finally:
        # The mount is gone: services get a grace period to finish, then are cancelled.
        kernel.stopping.set()
        signals.cancel()
        everything.deadline = min(everything.deadline, trio.current_time() + SHUTDOWN_GRACE)


async def _watch_signals(scope: trio.CancelScope, signals: AsyncIterator[int]) -> None:
    with scope:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
