"""Issue 10, the way a user hits it: shell tools and a second uid on a real mount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemfs import procfs
from gemfs.mm.pool import S_MAXBYTES_POOLS
from gemfs.testing import GemfsMount, mount_gemfs

pytestmark = pytest.mark.mount

NOBODY = 65534
POOL = 64 << 20


@pytest.fixture(scope="module")
def pub() -> Iterator[GemfsMount]:
    """A mount other uids can reach (pytest's tmp_path is root's 0700), with a world-writable
    sticky directory ``pub/shared`` in it, like /tmp."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts with allow_other and runs code as uid 65534")
    top = Path(tempfile.mkdtemp(prefix="gemfs-safety-"))
    top.chmod(0o755)
    try:
        with mount_gemfs(top / "mnt", pool=POOL) as m:
            shared = m.path / "shared"
            shared.mkdir()
            shared.chmod(0o1777)
            yield m
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def shared(pub: GemfsMount, request: pytest.FixtureRequest) -> Iterator[Path]:
    d = pub.path / "shared" / request.node.name
    d.mkdir()
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def as_nobody(script: str, *args: str | Path | int) -> subprocess.CompletedProcess[str]:
    """Run a shell script as uid/gid 65534 with no supplementary groups and no capabilities;
    its positional parameters ($1, ...) are args."""
    return subprocess.run(
        ["sh", "-c", textwrap.dedent(script), "sh", *map(str, args)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def sh(script: str, cwd: Path) -> None:
    subprocess.run(["sh", "-c", script], cwd=cwd, check=True, timeout=60)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- 1. open(O_TRUNC) truncates -------------------------------------------------------------
def test_shell_redirect_over_a_longer_file_truncates_it(shared: Path) -> None:
    sh("printf 'hello world\\n' > f; printf 'hi\\n' > f", shared)
    assert (shared / "f").read_bytes() == b"hi\n"


def test_open_w_cp_and_mtime_over_a_longer_file(shared: Path, tmp_path: Path) -> None:
    f = shared / "g"
    f.write_bytes(b"x" * 3 * 4096 + b"tail")
    before = f.stat().st_mtime_ns
    with open(f, "w") as out:  # Python's open(..., "w"): O_WRONLY | O_CREAT | O_TRUNC
        out.write("short")
    assert f.read_bytes() == b"short"
    assert f.stat().st_mtime_ns > before
    assert f.stat().st_blocks == 8  # the old pages went back to the pool
    src = tmp_path / "src"
    src.write_bytes(b"cp")
    f.write_bytes(b"y" * 10000)
    subprocess.run(["cp", str(src), str(f)], check=True)
    assert f.read_bytes() == b"cp"
    # O_RDWR | O_TRUNC through the page cache too, and an empty file stays empty
    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.pread(fd, 10, 0) == b""
    finally:
        os.close(fd)


# -- 2. a file size limit that follows the pool; memory does not follow the offset ----------
def test_other_user_cannot_grow_the_daemon_with_a_far_write(pub: GemfsMount, shared: Path) -> None:
    limit = S_MAXBYTES_POOLS * POOL
    far = shared / "far"
    pool = procfs.parse_pool(pub.read_stat("pool"))
    assert int(pool["s_maxbytes"]) == limit
    before = rss_kib(pub.proc.pid)
    last = f"seek={limit - 1}"
    res = as_nobody(f"dd if=/dev/zero of=$1 bs=1 count=1 {last} conv=notrunc status=none", far)
    assert res.returncode == 0, res.stderr  # the last byte a file may hold
    for off in (limit, 1 << 40, 32 << 40):  # beyond it: EFBIG ("File too large"), not EIO
        res = as_nobody(f"dd if=/dev/zero of=$1 bs=1 count=1 seek={off} conv=notrunc", far)
        assert res.returncode != 0
        assert "File too large" in res.stderr, res.stderr
    res = as_nobody(f"truncate -s {limit + 1} $1", far)
    assert res.returncode != 0
    assert "File too large" in res.stderr, res.stderr
    st = far.stat()
    assert (st.st_size, st.st_blocks) == (limit, 8)  # one page holds the byte
    with open(far, "rb") as f:
        f.seek(limit - 2)
        assert f.read() == b"\0\0"
    grown = rss_kib(pub.proc.pid) - before
    assert grown < 4096, f"the server grew by {grown} KiB for one byte"
    assert "Traceback" not in pub.log()


# -- 7. POSIX details -----------------------------------------------------------------------
def test_write_by_another_user_drops_setuid_and_setgid(shared: Path) -> None:
    names = ("direct", "cached", "trunc", "sgid_noexec")
    for name in names:
        (shared / name).write_bytes(b"data")
    for name in names[:3]:
        (shared / name).chmod(0o6777)
    (shared / "sgid_noexec").chmod(0o2666)  # set-gid without group exec: mandatory locking
    res = as_nobody(
        """
        cd "$1" || exit 1
        echo x >> direct      # O_WRONLY|O_APPEND: a direct_io handle
        echo y 1<> cached     # O_RDWR: through the page cache
        truncate -s 1 trunc
        echo z >> sgid_noexec
        """,
        shared,
    )
    assert res.returncode == 0, res.stderr
    modes = {n: stat.S_IMODE((shared / n).stat().st_mode) for n in names}
    assert modes == {"direct": 0o777, "cached": 0o777, "trunc": 0o777, "sgid_noexec": 0o2666}
    # root (CAP_FSETID) keeps them
    (shared / "direct").chmod(0o6777)
    with open(shared / "direct", "ab") as f:
        f.write(b"r")
    assert stat.S_IMODE((shared / "direct").stat().st_mode) == 0o6777


def test_long_name_lookup_is_enametoolong(shared: Path) -> None:
    for name in ("a" * 256, "é" * 128):  # 256 bytes either way
        with pytest.raises(OSError, match=rf"^\[Errno {errno.ENAMETOOLONG}\] "):
            os.stat(shared / name)
    (shared / ("b" * 255)).write_bytes(b"")  # 255 is allowed
    assert os.stat(shared / ("b" * 255)).st_size == 0


def test_readdir_lists_dot_and_dotdot(shared: Path, pub: GemfsMount) -> None:
    (shared / "x").write_bytes(b"")
    out = subprocess.run(["ls", "-a1", str(shared)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [".", "..", "x"]
    names = subprocess.run(
        ["find", str(pub.path), "-maxdepth", "1"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(Path(n).name for n in names[1:]) == [".gemfs", "shared"]
    # an inode reached through ".." stays usable (the kernel takes no reference on it)
    sub = shared / "sub"
    sub.mkdir()
    assert os.stat(sub / "..").st_ino == os.stat(shared).st_ino


def seek_answers(path: Path, size: int) -> list[tuple[int, int, int | str]]:
    fd = os.open(path, os.O_RDONLY)
    out: list[tuple[int, int, int | str]] = []
    try:
        offsets = sorted({0, 1, 4095, 4096, 5000, 8191, 8192, 65536, size - 1, size, size + 9})
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            for off in offsets:
                try:
                    out.append((whence, off, os.lseek(fd, off, whence)))
                except OSError as e:
                    out.append((whence, off, errno.errorcode[e.errno or 0]))
    finally:
        os.close(fd)
    return out


LAYOUTS: dict[str, tuple[list[tuple[int, bytes]], int | None]] = {
    "empty": ([], None),
    "dense": ([(0, b"d" * 3 * 4096)], None),
    "byte_far": ([(1 << 20, b"x")], None),
    "islands": ([(5000, b"a"), (65536, b"b" * 8192), (200_000, b"c")], None),
    "truncated_up": ([(0, b"t" * 100)], 300_000),
    "hole_then_truncated": ([(70_000, b"h")], 60_000),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_seek_data_and_hole_answer_like_tmpfs(
    pub: GemfsMount, shared: Path, tmp_path: Path, layout: str
) -> None:
    """SEEK_DATA/SEEK_HOLE on the same sparse file, on gemfs and on a kernel tmpfs."""
    declined = [ln for ln in pub.log().splitlines() if "SEEK_DATA/SEEK_HOLE stay" in ln]
    if declined:  # gemfs.fuse_lseek found this pyfuse3/libfuse build not as it expects
        pytest.skip(declined[0])
    writes, size = LAYOUTS[layout]
    ref_dir = tmp_path / "tmpfs"
    ref_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", str(ref_dir)], check=True)
    try:
        files = [shared / layout, ref_dir / layout]
        for f in files:
            fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                for off, data in writes:
                    os.pwrite(fd, data, off)
                if size is not None:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
        st = files[1].stat().st_size
        assert files[0].stat().st_size == st
        assert seek_answers(files[0], st) == seek_answers(files[1], st)
    finally:
        subprocess.run(["umount", str(ref_dir)], check=False)
