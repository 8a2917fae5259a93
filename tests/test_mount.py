"""gemfs mounted for real: ordinary system calls and shell tools on GEM objects."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemfs import procfs
from gemfs.mm.types import PAGE_SIZE
from gemfs.mm.vmstat import parse_buddyinfo, parse_index, parse_pagetypeinfo, parse_vmstat
from gemfs.mountproc import is_mounted, mount_device
from gemfs.testing import GemfsMount, mount_gemfs
from gemfs_cli.main import main as cli

pytestmark = pytest.mark.mount

Factory = Callable[..., GemfsMount]


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GemfsMount]:
    """One mount for the module (64MiB pool, fault injection on)."""
    with mount_gemfs(tmp_path_factory.mktemp("gemfs") / "mnt", test_faults=True) as m:
        yield m


@pytest.fixture
def work(mnt: GemfsMount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount, removed after the test."""
    d = mnt.path / request.node.name
    d.mkdir()
    yield d
    shutil.rmtree(d)


def raises_errno(code: int) -> pytest.RaisesExc[OSError]:
    return pytest.raises(OSError, match=rf"^\[Errno {code}\] ")


def drop_cache(path: Path) -> None:
    """Forget the kernel's cached pages of a file: the next read comes from the pool."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pool_free_pages(m: GemfsMount) -> int:
    return int(procfs.parse_pool(m.read_stat("pool"))["free_pages"])


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True)


def test_cp_dd_cmp_cat(work: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    run("cp", src, work / "copy.bin")
    run("cmp", src, work / "copy.bin")
    drop_cache(work / "copy.bin")
    run("cmp", src, work / "copy.bin")
    run("cp", work / "copy.bin", tmp_path / "back.bin")
    run("cmp", src, tmp_path / "back.bin")
    run("dd", f"if={src}", f"of={work / 'dd.bin'}", "bs=64k", "status=none")
    run("dd", f"if={src}", f"of={work / 'dd.bin'}", "bs=4k", "seek=3", "count=2", "conv=notrunc")
    expect = bytearray(src.read_bytes())
    expect[3 * 4096 : 5 * 4096] = src.read_bytes()[: 2 * 4096]
    drop_cache(work / "dd.bin")
    assert (work / "dd.bin").read_bytes() == expect
    (work / "hello").write_text("hello, gemfs\n")
    assert run("cat", work / "hello").stdout == "hello, gemfs\n"


def test_sparse_writes(work: Path) -> None:
    p = work / "sparse"
    with open(p, "wb") as f:
        f.seek(5 * 1024 * 1024)
        f.write(b"tail")
        f.seek(100)
        f.write(b"head")
    st = p.stat()
    assert st.st_size == 5 * 1024 * 1024 + 4
    assert st.st_blocks == 2 * PAGE_SIZE // 512  # two frames, the rest is holes
    assert os.getxattr(p, "user.gemfs.pages") == b"2"
    drop_cache(p)
    data = p.read_bytes()
    assert data[100:104] == b"head"
    assert data[-4:] == b"tail"
    assert data.count(0) == len(data) - 8


def test_truncate_shrinks_and_grows(mnt: GemfsMount, work: Path) -> None:
    p = work / "t"
    p.write_bytes(b"\xab" * (64 * PAGE_SIZE))
    free = pool_free_pages(mnt)
    os.truncate(p, 10 * PAGE_SIZE + 1)
    assert pool_free_pages(mnt) == free + 53  # frames go back to the allocator
    os.truncate(p, 20 * PAGE_SIZE)
    drop_cache(p)
    assert p.read_bytes() == b"\xab" * (10 * PAGE_SIZE + 1) + bytes(10 * PAGE_SIZE - 1)
    with open(p, "r+b") as f:
        f.truncate(0)
    assert p.stat().st_size == 0


def test_unlink_while_open(mnt: GemfsMount, work: Path) -> None:
    p = work / "u"
    data = os.urandom(16 * PAGE_SIZE)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        free = pool_free_pages(mnt)
        os.unlink(p)
        assert not p.exists()
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"still here", 0)
        assert os.pread(fd, 10, 0) == b"still here"
        assert pool_free_pages(mnt) == free  # frames live until the last close
        paths = [o.path for o in procfs.parse_objects(mnt.read_stat("objects"))]
        assert f"/{work.name}/u (deleted)" in paths
    finally:
        os.close(fd)
    assert pool_free_pages(mnt) == free + 16


def test_rename(mnt: GemfsMount, work: Path) -> None:
    (work / "a").write_bytes(b"A")
    (work / "b").write_bytes(b"B")
    os.rename(work / "a", work / "b")
    assert (work / "b").read_bytes() == b"A"
    assert not (work / "a").exists()
    (work / "d").mkdir()
    os.rename(work / "b", work / "d" / "c")
    os.rename(work / "d", work / "e")
    assert (work / "e" / "c").read_bytes() == b"A"
    paths = [o.path for o in procfs.parse_objects(mnt.read_stat("objects"))]
    assert f"/{work.name}/e/c" in paths
    with raises_errno(errno.EINVAL):
        os.rename(work / "e", work / "e" / "inside")


def test_mkdir_rmdir_readdir(work: Path) -> None:
    (work / "d" / "sub").mkdir(parents=True)
    (work / "d" / "f").write_bytes(b"x")
    assert sorted(os.listdir(work / "d")) == ["f", "sub"]
    assert os.stat(work / "d").st_nlink == 3
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(work / "d")
    for i in range(300):  # more than one readdir buffer
        (work / "d" / f"file{i:03d}").touch()
    assert len(os.listdir(work / "d")) == 302
    shutil.rmtree(work / "d")
    assert os.listdir(work) == []


def test_setattr_mode_owner_times(work: Path) -> None:
    p = work / "m"
    p.write_bytes(b"x")
    os.chmod(p, 0o600)
    os.chown(p, 1234, 5678)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    st = p.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    with open(p, "rb+") as f:
        os.fsync(f.fileno())


def test_mmap_shared_writes_reach_the_pool(work: Path) -> None:
    p = work / "mm"
    p.write_bytes(bytes(8 * PAGE_SIZE))
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 8 * PAGE_SIZE, mmap.MAP_SHARED) as m:
        m[PAGE_SIZE : PAGE_SIZE + 5] = b"hello"
        m[7 * PAGE_SIZE - 3 : 7 * PAGE_SIZE + 3] = b"across"
        m.flush()
        assert os.pread(f.fileno(), 5, PAGE_SIZE) == b"hello"
    drop_cache(p)  # now the bytes can only come from the pool's frames
    data = p.read_bytes()
    assert data[PAGE_SIZE : PAGE_SIZE + 5] == b"hello"
    assert data[7 * PAGE_SIZE - 3 : 7 * PAGE_SIZE + 3] == b"across"
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8 * PAGE_SIZE)
        assert os.preadv(fd, [buf], 0) == 8 * PAGE_SIZE
        assert buf[PAGE_SIZE : PAGE_SIZE + 5] == b"hello"
    finally:
        os.close(fd)


def test_xattrs(work: Path) -> None:
    p = work / "x"
    p.write_bytes(bytes(3 * PAGE_SIZE))
    names = set(os.listxattr(p))
    assert {"user.gemfs.object", "user.gemfs.pages", "user.gemfs.pinned"} <= names
    assert int(os.getxattr(p, "user.gemfs.object")) > 0
    assert os.getxattr(p, "user.gemfs.pages") == b"3"
    assert os.getxattr(p, "user.gemfs.pinned") == b"0"
    frames = procfs.parse_frames(os.getxattr(p, "user.gemfs.frames").decode())
    assert len(frames) == 3
    assert min(frames) >= 0
    with raises_errno(errno.EPERM):
        os.setxattr(p, "user.gemfs.pages", b"7")


def test_stats_files_parse_and_agree(mnt: GemfsMount, work: Path) -> None:
    (work / "s").write_bytes(bytes(10 * PAGE_SIZE))
    pool = procfs.parse_pool(mnt.read_stat("pool"))
    free = parse_buddyinfo(mnt.read_stat("buddyinfo"))
    assert sum(n << o for o, n in enumerate(free)) == int(pool["free_pages"])
    types, blocks = parse_pagetypeinfo(mnt.read_stat("pagetypeinfo"))
    assert sum(blocks.values()) == int(pool["pageblocks"])
    assert [sum(col) for col in zip(*types.values(), strict=True)] == free
    vm = parse_vmstat(mnt.read_stat("vmstat"))
    assert vm["nr_free_pages"] == int(pool["free_pages"])
    objs = procfs.parse_objects(mnt.read_stat("objects"))
    assert vm["nr_gem_pages"] == sum(o.pages for o in objs)
    assert [o.pages for o in objs if o.path == f"/{work.name}/s"] == [10]
    assert len(parse_index(mnt.read_stat("extfrag_index"))) == 11
    assert len(parse_index(mnt.read_stat("unusable_index"))) == 11
    st = os.statvfs(mnt.path)
    assert st.f_blocks == int(pool["pages"])
    assert st.f_bfree == int(pool["free_pages"])
    # Reads always show the current state: no stale page cache for these files.
    (work / "t").write_bytes(bytes(PAGE_SIZE))
    assert parse_vmstat(mnt.read_stat("vmstat"))["nr_free_pages"] == vm["nr_free_pages"] - 1


def test_knobs(mnt: GemfsMount) -> None:
    mnt.write_knob("compaction_proactiveness", 42)
    assert mnt.read_stat("compaction_proactiveness") == "42\n"
    mnt.write_knob("extfrag_threshold", 321)
    assert mnt.read_stat("extfrag_threshold") == "321\n"
    with raises_errno(errno.EINVAL):
        mnt.write_knob("compaction_proactiveness", 1000)
    with pytest.raises(PermissionError):
        (mnt.gemfs_dir / "vmstat").write_text("1\n")
    mnt.write_knob("compaction_proactiveness", 20)


def test_handler_exception_gives_eio_and_mount_keeps_serving(mnt: GemfsMount, work: Path) -> None:
    p = work / "f"
    p.write_bytes(b"payload")
    # O_DIRECT: the read goes to the server exactly once (page cache reads are retried).
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, PAGE_SIZE)
        mnt.write_knob("inject_fault", "read")
        with raises_errno(errno.EIO):
            os.preadv(fd, [buf], 0)
        assert os.preadv(fd, [buf], 0) == 7
        assert buf[:7] == b"payload"
    finally:
        os.close(fd)
    mnt.write_knob("inject_fault", "open")
    with raises_errno(errno.EIO):
        p.read_bytes()
    assert p.read_bytes() == b"payload"
    log = mnt.log()
    assert "RuntimeError: fault injected into read" in log
    assert "RuntimeError: fault injected into open" in log
    assert "Traceback" in log


def write_or_enospc(fd: int, data: bytes) -> int:
    """os.write, but 0 when the pool is full."""
    try:
        return os.write(fd, data)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return 0
        raise


def test_enospc_loses_nothing(gemfs_mount_factory: Factory) -> None:
    m = gemfs_mount_factory(pool="4MiB")
    keep = os.urandom(PAGE_SIZE * 100)
    (m.path / "keep").write_bytes(keep)
    chunk = os.urandom(256 * 1024)
    fd = os.open(m.path / "fill", os.O_WRONLY | os.O_CREAT)
    written = 0
    try:
        while n := write_or_enospc(fd, chunk):
            assert n == len(chunk)
            written += n
    finally:
        os.close(fd)
    assert written > 0
    for name in ("keep", "fill"):
        drop_cache(m.path / name)
    assert (m.path / "keep").read_bytes() == keep
    assert (m.path / "fill").read_bytes() == chunk * (written // len(chunk))
    os.unlink(m.path / "fill")
    (m.path / "again").write_bytes(chunk)  # space is back


def fragment(root: Path, pool_pages: int, file_pages: int = 64) -> list[Path]:
    """Fill the pool with files and delete every other one: free memory in small holes."""
    files = []
    for i in range((pool_pages - 1024) // file_pages):
        p = root / f"f{i:04d}"
        p.write_bytes(bytes([i % 251]) * (file_pages * PAGE_SIZE))
        files.append(p)
    for p in files[::2]:
        p.unlink()
    return files[1::2]


def test_compact_memory_makes_order9_blocks_and_keeps_content(
    gemfs_mount_factory: Factory,
) -> None:
    m = gemfs_mount_factory(pool="16MiB")
    kept = fragment(m.path, 4096)
    free = parse_buddyinfo(m.read_stat("buddyinfo"))
    before = sum(n << (o - 9) for o, n in enumerate(free) if o >= 9)
    frames_before = {p: os.getxattr(p, "user.gemfs.frames") for p in kept}
    migrated = parse_vmstat(m.read_stat("vmstat"))["pgmigrate_success"]

    # Read the objects while compaction runs: O_DIRECT reads come from the frames every time.
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for p in kept:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                try:
                    buf = mmap.mmap(-1, 64 * PAGE_SIZE)
                    os.preadv(fd, [buf], 0)
                    if buf[:] != bytes([int(p.name[1:]) % 251]) * (64 * PAGE_SIZE):
                        errors.append(p.name)
                finally:
                    os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    try:
        m.write_knob("compact_memory", 1)
    finally:
        stop.set()
        t.join()
    assert errors == []
    free = parse_buddyinfo(m.read_stat("buddyinfo"))
    after = sum(n << (o - 9) for o, n in enumerate(free) if o >= 9)
    assert after > before
    assert parse_vmstat(m.read_stat("vmstat"))["pgmigrate_success"] > migrated
    moved = [p for p in kept if os.getxattr(p, "user.gemfs.frames") != frames_before[p]]
    assert moved  # some objects really changed frames
    for p in kept:  # and read the same, from the page cache and from the frames
        want = bytes([int(p.name[1:]) % 251]) * (64 * PAGE_SIZE)
        assert p.read_bytes() == want
        drop_cache(p)
        assert p.read_bytes() == want


def test_sigterm_unmounts_and_exits_0(gemfs_mount_factory: Factory) -> None:
    m = gemfs_mount_factory(pool="4MiB")
    (m.path / "f").write_bytes(b"x")
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=20) == 0
    assert not is_mounted(str(m.path))


def test_umount_command(gemfs_mount_factory: Factory) -> None:
    m = gemfs_mount_factory(pool="4MiB")
    res = CliRunner().invoke(cli, ["umount", str(m.path)])
    assert res.exit_code == 0, res.output
    assert m.proc.wait(timeout=20) == 0
    assert not is_mounted(str(m.path))


def test_background_mount_returns_when_ready(tmp_path: Path) -> None:
    mp = tmp_path / "bg"
    mp.mkdir()
    log = tmp_path / "bg.log"
    cmd = [sys.executable, "-m", "gemfs_cli", "mount", str(mp), "--pool", "4MiB", "--log", str(log)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    try:
        assert is_mounted(str(mp))
        (mp / "f").write_bytes(b"background")
        assert (mp / "f").read_bytes() == b"background"
    finally:
        res = subprocess.run(
            [sys.executable, "-m", "gemfs_cli", "umount", str(mp)],
            capture_output=True,
            text=True,
            check=False,
        )
    assert res.returncode == 0, res.stderr
    assert not is_mounted(str(mp))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{file}"], "is not a directory"),
        (["{busy}"], "busy"),
        (["{dir}", "--pool", "10MiB"], "must be a positive multiple"),
        (["{dir}", "--pool", "lots"], "bad size"),
        (["{dir}", "--design", "longterm-pin", "--movablecore", "64MiB"], "leaves no room"),
        (["{dir}", "--design", "longterm-pin", "--movablecore", "x%"], "bad movablecore"),
        (["{dir}", "--movablecore", "50%"], "applies to the longterm-pin design only"),
        (["{dir}", "--design", "confine", "--confine-granule", "6MiB"], "multiple of 4MiB"),
        (["{dir}", "--design", "pinned", "--confine-granule", "8MiB"], "confine design only"),
        (["{dir}", "--ttm-pool", "0"], "--ttm-pool applies to the pinned-ttm design only"),
        (["{dir}", "--design", "pinned-ttm", "--ttm-pool", "lots"], "bad ttm_pool 'lots'"),
        (["{dir}", "--design", "pinned-ttm", "--ttm-pool", "1GiB"], "larger than the pool"),
        # --design is a click.Choice (a usage error): tests/test_first_hour_help.py
    ],
)
def test_bad_cli_input_gives_one_line(
    mnt: GemfsMount, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "file").touch()
    (tmp_path / "dir").mkdir()
    paths = {
        "missing": tmp_path / "missing",
        "file": tmp_path / "file",
        "busy": mnt.path,
        "dir": tmp_path / "dir",
    }
    argv = [a.format(**paths) for a in args]
    try:
        res = CliRunner().invoke(cli, ["mount", *argv])
    finally:
        if is_mounted(str(tmp_path / "dir")):  # it should not have mounted; clean up if it did
            subprocess.run(["fusermount3", "-u", str(tmp_path / "dir")], check=False)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error: ")
    assert message in lines[0]


def test_bad_cli_input_in_a_real_process(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "gemfs_cli", "mount", str(tmp_path / "nope"), "--foreground"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"Error: mount point {tmp_path / 'nope'} does not exist"
    ]


def test_missing_dev_fuse_gives_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/dev/fuse" else real(p))
    res = CliRunner().invoke(cli, ["mount", str(tmp_path)])
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [
        "Error: /dev/fuse is missing (is the fuse kernel module loaded?)"
    ]


def test_umount_of_a_plain_directory_fails_clearly(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["umount", str(tmp_path)])
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [f"Error: {tmp_path} is not a mount point"]


def test_content_changed_behind_the_cache_is_invalidated(mnt: GemfsMount, work: Path) -> None:
    p = work / "gpu"
    p.write_bytes(b"A" * (4 * PAGE_SIZE))
    oid = int(os.getxattr(p, "user.gemfs.object"))
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert p.read_bytes() == b"A" * (4 * PAGE_SIZE)  # now in the page cache
        assert m[PAGE_SIZE : PAGE_SIZE + 4] == b"AAAA"
        # The "GPU" writes the frames directly; the core invalidates the inode's cache.
        mnt.write_knob("test_poke", f"{oid} {PAGE_SIZE} {b'GPU!'.hex()}")
        assert p.read_bytes()[PAGE_SIZE - 1 : PAGE_SIZE + 5] == b"AGPU!A"
        assert m[PAGE_SIZE : PAGE_SIZE + 4] == b"GPU!"  # mappings see it too


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may widen a mount's readahead")
def test_readahead_window_is_widened(mnt: GemfsMount) -> None:
    dev = mount_device(str(mnt.path))
    assert dev is not None
    assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "4096"


def test_write_only_handles_bypass_the_cache_and_stay_coherent(work: Path) -> None:
    p = work / "w"
    p.write_bytes(b"a" * (2 * PAGE_SIZE))
    with open(p, "rb") as reader:
        assert reader.read() == b"a" * (2 * PAGE_SIZE)  # cached now
        fd = os.open(p, os.O_WRONLY)  # a write-only handle: direct writes, no page cache
        try:
            os.pwrite(fd, b"bb", PAGE_SIZE)
        finally:
            os.close(fd)
        reader.seek(0)
        assert reader.read()[PAGE_SIZE - 1 : PAGE_SIZE + 3] == b"abba"


def test_plugin_fixture_is_a_path(gemfs_mount: GemfsMount) -> None:
    (gemfs_mount / "f").write_bytes(b"x")
    assert Path(gemfs_mount) == gemfs_mount.path
    assert sorted(os.listdir(gemfs_mount)) == [".gemfs", "f"]
    with open(os.path.join(gemfs_mount, "f"), "rb") as f:
        assert f.read() == b"x"
    assert int(procfs.parse_pool(gemfs_mount.read_stat("pool"))["size"]) == 64 << 20


def test_plugin_fixtures_are_documented(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text("def test_x(): pass\n")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for text in ("gemfs_mount ", "gemfs_mount_factory ", "os.PathLike", "mount_gemfs", "log()"):
        assert text in out, out


def test_trace_pipe_blocks_like_the_kernels(gemfs_mount: GemfsMount) -> None:
    """A read of .gemfs/trace_pipe waits for the next line (other requests go on meanwhile);
    opened O_NONBLOCK it answers EAGAIN instead."""
    pipe = gemfs_mount.gemfs_dir / "trace_pipe"
    gemfs_mount.write_knob("tracing_on", 1)
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    got: list[bytes] = []
    fd = os.open(pipe, os.O_RDONLY)
    reader = threading.Thread(target=lambda: got.append(os.read(fd, 1 << 16)), daemon=True)
    reader.start()
    try:
        reader.join(timeout=1.0)
        assert reader.is_alive(), got  # waiting, not at the end of a file
        # the waiting read holds one request; the mount answers others meanwhile
        assert parse_buddyinfo(gemfs_mount.read_stat("buddyinfo"))
        (gemfs_mount / "traced").write_bytes(bytes(3 * PAGE_SIZE))
        reader.join(timeout=30)
        assert not reader.is_alive(), "the write did not wake the reader"
    finally:
        os.close(fd)
    assert b"mm_page_alloc: page=" in got[0]
    assert got[0].count(b"mm_page_alloc") >= 3
