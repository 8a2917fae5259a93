"""The FUSE Operations called directly (no mount): names, lookup counts, objects, .gemfs."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyfuse3
import pytest

from gemfs import procfs
from gemfs.daemon import Kernel
from gemfs.fs import GEMFS_DIR, ROOT_INODE, GemFS, Inode, SetAttrs
from gemfs.mm import MemoryManager, ObjectError
from gemfs.mm.types import PAGE_SIZE
from gemfs.mm.vmstat import parse_buddyinfo, parse_index, parse_pagetypeinfo, parse_vmstat
from gemfs.mountproc import is_mounted, mount_device

CTX = pyfuse3.RequestContext()  # uid 0, gid 0


@pytest.fixture
def mm() -> Iterator[MemoryManager]:
    m = MemoryManager("16MiB")
    yield m
    m.close()


@pytest.fixture
def fs(mm: MemoryManager) -> GemFS:
    return GemFS(mm, uid=0, gid=0, test_faults=True)


def fuse_errno(code: int) -> pytest.RaisesExc[pyfuse3.FUSEError]:
    return pytest.raises(pyfuse3.FUSEError, check=lambda e: e.errno == code)


async def create(fs: GemFS, name: bytes, parent: int = ROOT_INODE) -> tuple[int, int]:
    """Create a file; returns (inode, fh)."""
    fi, attr = await fs.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    return attr.st_ino, fi.fh


async def read_all(fs: GemFS, fh: int, size: int = 1 << 24) -> bytes:
    return bytes(await fs.read(fh, 0, size))


async def listdir(fs: GemFS, ino: int) -> list[bytes]:
    names: list[bytes] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        names.append(name)
        return True

    fs.readdir_reply = reply
    fh = await fs.opendir(ino, CTX)
    await fs.readdir(fh, 0, pyfuse3.ReaddirToken())
    await fs.releasedir(fh)
    return names


async def test_create_write_read_getattr(fs: GemFS, mm: MemoryManager) -> None:
    ino, fh = await create(fs, b"a")
    data = os.urandom(3 * PAGE_SIZE + 100)
    assert await fs.write(fh, 0, data) == len(data)
    assert await read_all(fs, fh) == data
    assert bytes(await fs.read(fh, PAGE_SIZE - 5, 10)) == data[PAGE_SIZE - 5 : PAGE_SIZE + 5]
    attr = await fs.getattr(ino, CTX)
    assert attr.st_size == len(data)
    assert attr.st_blocks == 4 * PAGE_SIZE // 512
    assert stat.S_ISREG(attr.st_mode)
    obj = fs.inodes[ino].obj
    assert obj is not None
    assert obj.path == "/a"
    assert mm.read(obj, 0, len(data)) == data
    mm.check()


async def test_sparse_write_reads_zeros_in_holes(fs: GemFS) -> None:
    ino, fh = await create(fs, b"sparse")
    await fs.write(fh, 10 * PAGE_SIZE + 7, b"xyz")
    attr = await fs.getattr(ino, CTX)
    assert attr.st_size == 10 * PAGE_SIZE + 10
    assert attr.st_blocks == PAGE_SIZE // 512  # one frame
    data = await read_all(fs, fh)
    assert data == bytes(10 * PAGE_SIZE + 7) + b"xyz"


async def test_truncate_frees_frames_and_grows_with_zeros(fs: GemFS, mm: MemoryManager) -> None:
    ino, fh = await create(fs, b"t")
    await fs.write(fh, 0, b"\xff" * (8 * PAGE_SIZE))
    free = mm.buddy.free_pages
    fs.apply_setattr(fs.inodes[ino], SetAttrs(size=PAGE_SIZE + 1))
    assert mm.buddy.free_pages == free + 6
    fs.apply_setattr(fs.inodes[ino], SetAttrs(size=3 * PAGE_SIZE))
    data = await read_all(fs, fh)
    assert data == b"\xff" * (PAGE_SIZE + 1) + bytes(2 * PAGE_SIZE - 1)
    mm.check()


async def test_lookup_counts_and_forget(fs: GemFS, mm: MemoryManager) -> None:
    ino, fh = await create(fs, b"f")  # create: one lookup reference
    await fs.lookup(ROOT_INODE, b"f", CTX)
    assert fs.inodes[ino].lookups == 2
    await fs.write(fh, 0, b"x" * PAGE_SIZE)
    await fs.release(fh)
    await fs.unlink(ROOT_INODE, b"f", CTX)
    assert not mm.objects  # unlinked and closed: frames freed at once
    assert ino in fs.inodes  # but the kernel still knows the inode
    await fs.getattr(ino, CTX)
    await fs.forget([(ino, 2)])
    assert ino not in fs.inodes


async def test_readdir_counts_lookups_and_stops(fs: GemFS) -> None:
    inos = [(await create(fs, n))[0] for n in (b"a", b"b", b"c")]
    before = {i: fs.inodes[i].lookups for i in inos}
    dots = [b".", b".."]
    assert await listdir(fs, ROOT_INODE) == [*dots, GEMFS_DIR.encode(), b"a", b"b", b"c"]
    assert all(fs.inodes[i].lookups == before[i] + 1 for i in inos)
    assert fs.inodes[ROOT_INODE].lookups == 1  # "." and "..": the kernel takes no reference

    calls: list[bytes] = []

    def full(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        calls.append(name)
        return len(calls) < 2  # the buffer is full after the second entry

    fs.readdir_reply = full
    fh = await fs.opendir(ROOT_INODE, CTX)
    await fs.readdir(fh, 3, pyfuse3.ReaddirToken())
    assert calls == [b"a", b"b"]
    assert fs.inodes[inos[1]].lookups == before[inos[1]] + 1  # not counted: not returned


async def test_unlink_while_open_keeps_frames_until_release(fs: GemFS, mm: MemoryManager) -> None:
    ino, fh = await create(fs, b"u")
    await fs.write(fh, 0, b"keep" * 1024)
    free = mm.buddy.free_pages
    await fs.unlink(ROOT_INODE, b"u", CTX)
    assert await listdir(fs, ROOT_INODE) == [b".", b"..", GEMFS_DIR.encode()]
    assert mm.buddy.free_pages == free
    assert await read_all(fs, fh) == b"keep" * 1024
    obj = fs.inodes[ino].obj
    assert obj is not None
    assert obj.path == "/u (deleted)"
    await fs.release(fh)
    assert mm.buddy.free_pages == free + 1
    mm.check()


async def test_rename_file_and_directory_updates_paths(fs: GemFS) -> None:
    d = await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)
    e = await fs.mkdir(d.st_ino, b"e", 0o755, CTX)
    ino, _ = await create(fs, b"f", e.st_ino)
    obj = fs.inodes[ino].obj
    assert obj is not None
    assert obj.path == "/d/e/f"
    await fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"D", 0, CTX)
    assert obj.path == "/D/e/f"
    await fs.rename(e.st_ino, b"f", ROOT_INODE, b"g", 0, CTX)
    assert obj.path == "/g"
    with fuse_errno(errno.EINVAL):  # into its own subtree
        await fs.rename(ROOT_INODE, b"D", e.st_ino, b"x", 0, CTX)
    assert fs.inodes[d.st_ino].nlink == 3


async def test_rename_replaces_target_and_noreplace(fs: GemFS, mm: MemoryManager) -> None:
    a, fa = await create(fs, b"a")
    _b, fb = await create(fs, b"b")
    await fs.write(fa, 0, b"A")
    await fs.write(fb, 0, b"B")
    await fs.release(fb)
    with fuse_errno(errno.EEXIST):
        await fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", pyfuse3.RENAME_NOREPLACE, CTX)
    await fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0, CTX)
    assert len(mm.objects) == 1  # the replaced file was closed: its object is gone
    attr = await fs.lookup(ROOT_INODE, b"b", CTX)
    assert attr.st_ino == a
    d = await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)
    with fuse_errno(errno.EISDIR):
        await fs.rename(ROOT_INODE, b"b", ROOT_INODE, b"d", 0, CTX)
    with fuse_errno(errno.ENOTDIR):
        await fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"b", 0, CTX)
    assert d.st_ino in fs.inodes


async def test_mkdir_rmdir(fs: GemFS) -> None:
    d = await fs.mkdir(ROOT_INODE, b"d", 0o750, CTX)
    assert stat.S_ISDIR(d.st_mode)
    assert stat.S_IMODE(d.st_mode) == 0o750
    with fuse_errno(errno.EEXIST):
        await fs.mkdir(ROOT_INODE, b"d", 0o750, CTX)
    await create(fs, b"x", d.st_ino)
    with fuse_errno(errno.ENOTEMPTY):
        await fs.rmdir(ROOT_INODE, b"d", CTX)
    await fs.unlink(d.st_ino, b"x", CTX)
    await fs.rmdir(ROOT_INODE, b"d", CTX)
    with fuse_errno(errno.ENOENT):
        await fs.lookup(ROOT_INODE, b"d", CTX)
    file_ino, _ = await create(fs, b"file")
    with fuse_errno(errno.ENOTDIR):
        await fs.lookup(file_ino, b"x", CTX)
    with fuse_errno(errno.ENOTDIR):
        await fs.rmdir(ROOT_INODE, b"file", CTX)


async def test_enospc_leaves_written_data(mm: MemoryManager, fs: GemFS) -> None:
    _ino, fh = await create(fs, b"big")
    chunk = os.urandom(1 << 20)
    written = 0
    with fuse_errno(errno.ENOSPC):
        while True:
            await fs.write(fh, written, chunk)
            written += len(chunk)
    assert written == 16 << 20 or written == 15 << 20
    data = await read_all(fs, fh)
    assert len(data) == written
    assert all(data[i : i + len(chunk)] == chunk for i in range(0, written, len(chunk)))
    mm.check()


async def test_xattrs(fs: GemFS, mm: MemoryManager) -> None:
    ino, fh = await create(fs, b"x")
    await fs.write(fh, 0, bytes(3 * PAGE_SIZE))
    await fs.write(fh, 5 * PAGE_SIZE, b"z")
    obj = fs.inodes[ino].obj
    assert obj is not None
    mm.pin(obj, 0, 2)
    names = await fs.listxattr(ino, CTX)
    assert set(names) == {b"user.gemfs.object", b"user.gemfs.pages", b"user.gemfs.pinned",
                          b"user.gemfs.frames"}  # fmt: skip
    assert await fs.getxattr(ino, b"user.gemfs.object", CTX) == str(obj.id).encode()
    assert await fs.getxattr(ino, b"user.gemfs.pages", CTX) == b"4"
    assert await fs.getxattr(ino, b"user.gemfs.pinned", CTX) == b"2"
    frames = (await fs.getxattr(ino, b"user.gemfs.frames", CTX)).decode()
    assert procfs.parse_frames(frames) == obj.pages.tolist()
    assert "hole*2" in frames
    with fuse_errno(pyfuse3.ENOATTR):
        await fs.getxattr(ino, b"user.other", CTX)
    with fuse_errno(errno.EPERM):
        await fs.setxattr(ino, b"user.gemfs.pages", b"1", CTX)
    with fuse_errno(errno.ENOTSUP):
        await fs.setxattr(ino, b"user.mine", b"1", CTX)
    assert await fs.listxattr(ROOT_INODE, CTX) == []


def test_format_frames_round_trip() -> None:
    pages = np.array([10, 11, 12, -1, -1, 40, 7, 8, -1], dtype=np.int64)
    text = procfs.format_frames(pages)
    assert text == "10-12,hole*2,40,7-8,hole*1"
    assert procfs.parse_frames(text) == pages.tolist()
    assert procfs.format_frames(np.empty(0, dtype=np.int64)) == ""


async def gemfs_file(fs: GemFS, name: str) -> Inode:
    attr = await fs.lookup(fs.gemfs_dir.ino, name.encode(), CTX)
    return fs.inodes[attr.st_ino]


async def read_proc(fs: GemFS, name: str) -> str:
    node = await gemfs_file(fs, name)
    fi = await fs.open(node.ino, os.O_RDONLY, CTX)
    assert fi.direct_io
    try:
        return (await read_all(fs, fi.fh)).decode()
    finally:
        await fs.release(fi.fh)


async def write_proc(fs: GemFS, name: str, text: str) -> None:
    node = await gemfs_file(fs, name)
    fi = await fs.open(node.ino, os.O_WRONLY, CTX)
    try:
        await fs.write(fi.fh, 0, text.encode())
    finally:
        await fs.release(fi.fh)


async def test_gemfs_stats_files_agree_with_model(fs: GemFS, mm: MemoryManager) -> None:
    _, fh = await create(fs, b"obj with\ttab")
    await fs.write(fh, 0, bytes(5 * PAGE_SIZE))
    free = parse_buddyinfo(await read_proc(fs, "buddyinfo"))
    assert free == mm.free_blocks_per_order()
    assert sum(n << o for o, n in enumerate(free)) == mm.buddy.free_pages
    types, blocks = parse_pagetypeinfo(await read_proc(fs, "pagetypeinfo"))
    assert sum(blocks.values()) == mm.pool.nr_pageblocks
    assert [sum(col) for col in zip(*types.values(), strict=True)] == free
    vm = parse_vmstat(await read_proc(fs, "vmstat"))
    assert vm["nr_free_pages"] == mm.buddy.free_pages
    assert vm["nr_gem_pages"] == 5
    assert len(parse_index(await read_proc(fs, "extfrag_index"))) == 11
    assert parse_index(await read_proc(fs, "unusable_index"))[0] == 0.0
    state = parse_vmstat(await read_proc(fs, "compaction_state"))
    assert state["compact_defer_shift"] == 0
    assert state["compact_cached_free_pfn"] == (mm.pool.nr_pageblocks - 1) * 512
    objs = procfs.parse_objects(await read_proc(fs, "objects"))
    assert [(o.path, o.pages, o.pinned, o.migratetype) for o in objs] == [
        ("/obj with\ttab", 5, 0, "movable")
    ]
    pool = procfs.parse_pool(await read_proc(fs, "pool"))
    assert pool["size"] == str(16 << 20)
    assert pool["design"] == "shmem-hook"
    assert pool["page_size"] == "4096"


async def test_proc_reads_are_fresh_and_offsets_work(fs: GemFS) -> None:
    node = await gemfs_file(fs, "vmstat")
    fi = await fs.open(node.ino, os.O_RDONLY, CTX)
    first = await read_all(fs, fi.fh)
    part = bytes(await fs.read(fi.fh, 5, 10))
    assert part == first[5:15]  # a read past the start continues the same rendering
    _, fh = await create(fs, b"more")
    await fs.write(fh, 0, b"x")
    assert await read_all(fs, fi.fh) != first  # from offset 0: rendered afresh


async def test_knobs(fs: GemFS, mm: MemoryManager) -> None:
    assert await read_proc(fs, "compaction_proactiveness") == "20\n"
    await write_proc(fs, "compaction_proactiveness", "35\n")
    assert mm.compaction_proactiveness == 35
    await write_proc(fs, "extfrag_threshold", "700")
    assert await read_proc(fs, "extfrag_threshold") == "700\n"
    for name, bad in [
        ("compaction_proactiveness", "101"),
        ("compaction_proactiveness", "x"),
        ("extfrag_threshold", "-1"),
        ("compact_memory", "2"),
        ("inject_fault", "no_such_handler"),
    ]:
        with fuse_errno(errno.EINVAL):
            await write_proc(fs, name, bad)
    node = await gemfs_file(fs, "compact_memory")
    with fuse_errno(errno.EACCES):
        await fs.open(node.ino, os.O_RDONLY, CTX)
    node = await gemfs_file(fs, "buddyinfo")
    with fuse_errno(errno.EACCES):
        await fs.open(node.ino, os.O_WRONLY, CTX)


async def test_gemfs_dir_is_fixed(fs: GemFS) -> None:
    g = fs.gemfs_dir.ino
    with fuse_errno(errno.EPERM):
        await fs.create(g, b"new", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    with fuse_errno(errno.EPERM):
        await fs.unlink(g, b"vmstat", CTX)
    with fuse_errno(errno.EPERM):
        await fs.rmdir(ROOT_INODE, GEMFS_DIR.encode(), CTX)
    with fuse_errno(errno.EPERM):
        await fs.rename(ROOT_INODE, GEMFS_DIR.encode(), ROOT_INODE, b"x", 0, CTX)
    with fuse_errno(errno.EPERM):
        await fs.mkdir(g, b"d", 0o755, CTX)
    node = await gemfs_file(fs, "vmstat")
    with fuse_errno(errno.EPERM):
        fs.apply_setattr(node, SetAttrs(mode=0o666))
    fs.apply_setattr(node, SetAttrs(size=0))  # O_TRUNC before writing a knob: accepted


def fragment(mm: MemoryManager, fs: GemFS) -> list[Inode]:
    """Fill the pool with 64-page files and delete every other one."""
    root = fs.inodes[ROOT_INODE]
    files = []
    for i in range(mm.pool.nr_pages // 64):
        node = fs.new_file(root, f"f{i}".encode(), 0o644, 0, 0)
        assert node.obj is not None
        mm.write(node.obj, 0, bytes([i % 256]) * (64 * PAGE_SIZE))
        files.append(node)
    for node in files[::2]:
        fs.remove(root, node.name)
    return files[1::2]


async def test_compact_memory_knob_compacts(fs: GemFS, mm: MemoryManager) -> None:
    kept = fragment(mm, fs)
    before = mm.order_free_units(9)
    assert before == 0
    await write_proc(fs, "compact_memory", "1\n")
    assert mm.order_free_units(9) > before
    assert mm.vmstat["pgmigrate_success"] > 0
    for node in kept:
        assert node.obj is not None
        i = int(node.name[1:])
        assert mm.read(node.obj, 0, 64 * PAGE_SIZE) == bytes([i % 256]) * (64 * PAGE_SIZE)
    mm.check()


async def test_unexpected_exception_is_eio_and_logged(
    fs: GemFS, mm: MemoryManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _ino, fh = await create(fs, b"f")
    await fs.write(fh, 0, b"data")

    def boom(*args: object) -> None:
        raise ZeroDivisionError("bug")

    with monkeypatch.context() as m:
        m.setattr(mm, "read_view", boom)
        with caplog.at_level(logging.ERROR, logger="gemfs.fs"), fuse_errno(errno.EIO):
            await fs.read(fh, 0, 4)
    assert "ZeroDivisionError: bug" in caplog.text
    assert await read_all(fs, fh) == b"data"  # still serving


async def test_fault_injection_knob(fs: GemFS) -> None:
    ino, _ = await create(fs, b"f")
    await write_proc(fs, "inject_fault", "getattr 2")
    for _ in range(2):
        with fuse_errno(errno.EIO):
            await fs.getattr(ino, CTX)
    await fs.getattr(ino, CTX)


async def test_forget_never_raises(fs: GemFS, monkeypatch: pytest.MonkeyPatch) -> None:
    ino, _fh = await create(fs, b"f")
    monkeypatch.setattr(fs, "_maybe_free", lambda inode: 1 / 0)
    await fs.forget([(ino, 1), (12345, 1)])


async def test_statfs(fs: GemFS, mm: MemoryManager) -> None:
    _, fh = await create(fs, b"f")
    await fs.write(fh, 0, bytes(10 * PAGE_SIZE))
    s = await fs.statfs(CTX)
    assert s.f_bsize == PAGE_SIZE
    assert s.f_blocks == mm.pool.nr_pages
    assert s.f_bfree == s.f_bavail == mm.pool.nr_pages - 10


# -- the Kernel facade the control server uses --------------------------------------------------
@pytest.fixture
def kernel(mm: MemoryManager, fs: GemFS) -> Kernel:
    return Kernel(mm, fs, "/mnt/gemfs", control_path="/run/gemfs.sock")


async def test_kernel_create_resolve_path(kernel: Kernel, fs: GemFS) -> None:
    await fs.mkdir(ROOT_INODE, b"gpu", 0o777, CTX)
    with pytest.raises(ObjectError) as denied:  # "/" is 0755 and not uid 1000's
        kernel.create_file("bo0", PAGE_SIZE, 1000, 1000, 0o640)
    assert denied.value.errno == errno.EACCES
    obj = kernel.create_file("gpu/bo1", 3 * PAGE_SIZE, 1000, 1000, 0o640)
    assert obj.nr_resident == 3
    assert obj.size == 3 * PAGE_SIZE
    assert kernel.resolve("/gpu/bo1") is obj
    assert kernel.path_of(obj) == "/gpu/bo1"
    attr = await fs.lookup(fs.walk("gpu").ino, b"bo1", CTX)
    assert attr.st_uid == 1000
    assert stat.S_IMODE(attr.st_mode) == 0o640
    assert kernel.may_write("gpu/bo1", 1000, 5)
    assert not kernel.may_write("gpu/bo1", 1001, 1000)
    assert kernel.may_write("gpu/bo1", 0, 0)
    assert not kernel.may_write("gpu/none", 0, 0)
    for bad, code in [
        ("nodir/x", errno.ENOENT),
        ("gpu/bo1", errno.EEXIST),
        ("gpu/bo1/x", errno.ENOTDIR),
        (".gemfs/x", errno.EPERM),
        ("../x", errno.EINVAL),
    ]:
        with pytest.raises(ObjectError) as info:
            kernel.create_file(bad, 0, 0, 0, 0o644)
        assert info.value.errno == code, bad
    with pytest.raises(ObjectError) as info:
        kernel.resolve("gpu")
    assert info.value.errno == errno.EISDIR
    assert kernel.control_path == "/run/gemfs.sock"
    assert procfs.parse_pool(await read_proc(fs, "pool"))["control"] == "/run/gemfs.sock"


async def test_kernel_hold_keeps_unlinked_object(kernel: Kernel, mm: MemoryManager) -> None:
    obj = kernel.create_file("bo", PAGE_SIZE, 0, 0, 0o644)
    kernel.get_object(obj)
    kernel.unlink("bo")
    assert obj.id in mm.objects
    assert obj.path == "/bo (deleted)"
    kernel.put_object(obj)
    assert obj.id not in mm.objects
    mm.check()


async def test_kernel_invalidate_runs_in_a_thread(
    kernel: Kernel, fs: GemFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    calls: list[tuple[int, bool, bool]] = []
    main = threading.get_ident()

    def invalidate_inode(ino: int, attr_only: bool = False) -> None:
        calls.append((ino, attr_only, threading.get_ident() != main))

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate_inode)
    obj = kernel.create_file("bo", PAGE_SIZE, 0, 0, 0o644)
    await kernel.invalidate(obj, 0, 1)
    assert calls == []  # not mounted: nothing to tell
    fs.mounted = True
    await kernel.invalidate(obj, 0, 1)
    assert calls == []  # the kernel never looked the inode up: nothing cached
    attr = await fs.lookup(ROOT_INODE, b"bo", CTX)
    await kernel.invalidate(obj, 0, 1)
    assert calls == [(attr.st_ino, False, True)]


def test_layering_plugin_import_is_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gemfs.testing, gemfs.mountproc, gemfs.procfs as _; "
        "heavy = {'pyfuse3', 'trio'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mountinfo_helpers(tmp_path: Path) -> None:
    assert is_mounted("/")
    assert mount_device("/") is not None
    assert not is_mounted(str(tmp_path))
    assert mount_device(str(tmp_path)) is None
