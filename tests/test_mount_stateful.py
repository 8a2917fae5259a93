"""Random file operations on a real mount against an in-memory model (hypothesis, stateful),
with random page migrations and compactions in between: contents never change."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from gemfs import procfs
from gemfs.control import arrays
from gemfs.control.client import SyncClient
from gemfs.mm.pool import PG_ALLOC, PG_FREE, PG_OBJECT
from gemfs.mm.types import PAGE_SIZE
from gemfs.mm.vmstat import parse_vmstat
from gemfs.testing import GemfsMount, mount_gemfs

pytestmark = pytest.mark.mount

DIRS = st.sampled_from(["", "x", "y"])
NAMES = st.sampled_from(["a", "b", "c"])
OFFSETS = st.integers(0, 3 * PAGE_SIZE + 10)
DATA = st.binary(min_size=0, max_size=2 * PAGE_SIZE + 20)
SIZES = st.integers(0, 4 * PAGE_SIZE)
_runs = itertools.count()


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GemfsMount]:
    base = tmp_path_factory.mktemp("gemfs")
    with mount_gemfs(base / "mnt", pool="16MiB", control=str(base / "ctl")) as m:
        yield m


class FileOps(RuleBasedStateMachine):
    """Files (a, b, c) in the root and in subdirectories (x, y) of a fresh run directory."""

    def __init__(self, mnt: GemfsMount) -> None:
        super().__init__()
        self.mnt = mnt
        self.run = f"run{next(_runs)}"
        self.top = mnt.path / self.run
        self.top.mkdir()
        self.files: dict[str, bytearray] = {}  # "x/a" -> content
        self.dirs: set[str] = {""}

    def path(self, d: str, name: str = "") -> Path:
        return self.top / d / name if name else self.top / d

    @staticmethod
    def key(d: str, name: str) -> str:
        return f"{d}/{name}" if d else name

    @rule(d=DIRS)
    def mkdir(self, d: str) -> None:
        if d in self.dirs:
            return
        self.path(d).mkdir()
        self.dirs.add(d)

    @rule(d=DIRS)
    def rmdir(self, d: str) -> None:
        if not d or d not in self.dirs:
            return
        if any(k.startswith(d + "/") for k in self.files):
            with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOTEMPTY}\] "):
                self.path(d).rmdir()
        else:
            self.path(d).rmdir()
            self.dirs.discard(d)

    @rule(d=DIRS, name=NAMES, offset=OFFSETS, data=DATA)
    def write(self, d: str, name: str, offset: int, data: bytes) -> None:
        if d not in self.dirs:
            return
        k = self.key(d, name)
        with open(self.path(d, name), "r+b" if k in self.files else "wb") as f:
            f.seek(offset)
            f.write(data)
        buf = self.files.setdefault(k, bytearray())
        if offset > len(buf) and data:
            buf.extend(bytes(offset - len(buf)))
        if data:
            buf[offset : offset + len(data)] = data

    @rule(d=DIRS, name=NAMES, data=DATA, mode=st.sampled_from(["wb", "w+b"]))
    def overwrite(self, d: str, name: str, data: bytes, mode: str) -> None:
        """open(O_TRUNC) over an existing file, as a shell's > or cp does (issue 10, item 1)."""
        if d not in self.dirs:
            return
        with open(self.path(d, name), mode) as f:
            f.write(data)
        self.files[self.key(d, name)] = bytearray(data)

    @rule(d=DIRS, name=NAMES, size=SIZES)
    def truncate(self, d: str, name: str, size: int) -> None:
        k = self.key(d, name)
        if k not in self.files:
            return
        os.truncate(self.path(d, name), size)
        buf = self.files[k]
        del buf[size:]
        buf.extend(bytes(size - len(buf)))

    @rule(d=DIRS, name=NAMES, offset=OFFSETS, data=st.binary(min_size=1, max_size=64))
    def mmap_write(self, d: str, name: str, offset: int, data: bytes) -> None:
        k = self.key(d, name)
        buf = self.files.get(k)
        if buf is None or offset + len(data) > len(buf):
            return
        with open(self.path(d, name), "r+b") as f, mmap.mmap(f.fileno(), len(buf)) as m:
            m[offset : offset + len(data)] = data
            m.flush()
        buf[offset : offset + len(data)] = data

    @rule(d=DIRS, name=NAMES)
    def unlink(self, d: str, name: str) -> None:
        k = self.key(d, name)
        if k not in self.files:
            return
        self.path(d, name).unlink()
        del self.files[k]

    @rule(d1=DIRS, n1=NAMES, d2=DIRS, n2=NAMES)
    def rename(self, d1: str, n1: str, d2: str, n2: str) -> None:
        k1, k2 = self.key(d1, n1), self.key(d2, n2)
        if k1 not in self.files or d2 not in self.dirs:
            return
        os.rename(self.path(d1, n1), self.path(d2, n2))
        self.files[k2] = self.files.pop(k1)

    @rule(d=DIRS, name=NAMES)
    def drop_cache(self, d: str, name: str) -> None:
        if self.key(d, name) not in self.files:
            return
        fd = os.open(self.path(d, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    @rule()
    def compact_memory(self) -> None:
        """echo 1 > compact_memory: pages of every file may move."""
        self.mnt.write_knob("compact_memory", "1")

    @rule(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 64))
    def migrate_random(self, seed: int, n: int) -> None:
        """Move random file pages to random free frames, over the control socket."""
        rng = np.random.default_rng(seed)
        with SyncClient(str(self.mnt.path.parent / "ctl")) as c:
            snap = c.call("snapshot")
            flags = np.frombuffer(snap["flags"], dtype=np.uint8)
            used = np.flatnonzero((flags & (PG_ALLOC | PG_OBJECT)) == (PG_ALLOC | PG_OBJECT))
            free = np.flatnonzero(flags & PG_FREE)
            k = min(n, len(used), len(free))
            if k == 0:
                return
            src = rng.choice(used, k, replace=False).astype("<i8")
            dst = rng.choice(free, k, replace=False).astype("<i8")
            out = c.call("migrate", {"src": src.tobytes(), "dst": dst.tobytes()})
            res = arrays.results(out["results"]).tolist()
            assert all(r in (0, -11, -16) for r in res), res

    @invariant()
    def tree_and_contents_match(self) -> None:
        found: dict[str, bytes] = {}
        dirs: set[str] = set()
        for dirpath, _dirnames, filenames in os.walk(self.top):
            rel = os.path.relpath(dirpath, self.top)
            dirs.add("" if rel == "." else rel)
            for n in filenames:
                found[os.path.relpath(os.path.join(dirpath, n), self.top)] = Path(
                    dirpath, n
                ).read_bytes()
        assert dirs == self.dirs
        assert found == {k: bytes(v) for k, v in self.files.items()}
        for k, v in self.files.items():
            assert os.stat(self.top / k).st_size == len(v)

    @invariant()
    def objects_follow_the_names(self) -> None:
        objs = procfs.parse_objects(self.mnt.read_stat("objects"))
        mine = {o.path for o in objs if o.path.startswith(f"/{self.run}/")}
        assert mine == {f"/{self.run}/{k}" for k in self.files}

    def teardown(self) -> None:
        shutil.rmtree(self.top)


def test_file_operations_match_a_model(mnt: GemfsMount) -> None:
    class OnThisMount(FileOps):
        def __init__(self) -> None:
            super().__init__(mnt)

    run_state_machine_as_test(
        OnThisMount,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert procfs.parse_objects(mnt.read_stat("objects")) == []  # nothing leaked


def test_migrating_a_files_pages_keeps_its_content(mnt: GemfsMount) -> None:
    """The deterministic twin of the migrate rule: every page of a file moves, bytes stay."""
    data = os.urandom(40 * PAGE_SIZE + 123)
    f = mnt.path / "moving"
    f.write_bytes(data)
    before = parse_vmstat(mnt.read_stat("vmstat"))["pgmigrate_success"]
    with SyncClient(str(mnt.path.parent / "ctl")) as c:
        snap = c.call("snapshot")
        flags = np.frombuffer(snap["flags"], dtype=np.uint8)
        frames = procfs.parse_frames(os.getxattr(f, "user.gemfs.frames").decode())
        src = np.asarray(frames, dtype="<i8")
        free = np.flatnonzero(flags & PG_FREE)[-len(src) :].astype("<i8")
        out = c.call("migrate", {"src": src.tobytes(), "dst": free.tobytes()})
    assert (arrays.results(out["results"]) == 0).all()
    assert parse_vmstat(mnt.read_stat("vmstat"))["pgmigrate_success"] == before + len(src)
    new = procfs.parse_frames(os.getxattr(f, "user.gemfs.frames").decode())
    assert sorted(new) == sorted(free.tolist())
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the new frames
    finally:
        os.close(fd)
    assert f.read_bytes() == data
    f.unlink()
