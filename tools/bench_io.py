"""``gemfs bench io``: file I/O on a gemfs mount against a kernel tmpfs mounted side by side.

Both file systems are mounted in a temporary directory and measured in the same run, figure by
figure alternately (who goes first alternates from round to round), so the ratio gemfs/tmpfs is
robust against the machine's mood. "Cold" reads
first drop the file's page cache (``posix_fadvise(DONTNEED)``: on gemfs the data then comes
through FUSE from the pool's frames; tmpfs has no other copy, so cold equals warm there).
O_DIRECT reads bypass the page cache on both, so on gemfs every byte is a FUSE request; the
small-write figure is dbench's kind of load (mixed writes of 1 B to 64 KiB into fresh files).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from gemfs.mm.types import format_size, parse_size
from gemfs.mountproc import MountError, server_args, start_server, stop, unmount

CHUNK = 1 << 20
SMALL = 4096
DIRECT_PAIRS = 5  # O_DIRECT passes per file system and round: the noisiest figure


class BenchError(Exception):
    """The benchmark could not run; one line for the user."""


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    unit: str
    gemfs: float
    tmpfs: float
    target: float | None = None  # minimum gemfs/tmpfs ratio the project aims for

    @property
    def ratio(self) -> float:
        return self.gemfs / self.tmpfs if self.tmpfs else 0.0

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target


@dataclass
class IoResult:
    size: int
    pool: str
    rounds: int
    figures: list[Figure] = field(default_factory=list)
    slowest_write_ms: dict[str, float] = field(default_factory=dict)  # per file system
    # --floor: O_DIRECT MB/s of the barest pyfuse3 server (tools/pyfuse3_floor.py), measured
    # interleaved with the other two
    floor_direct: float | None = None

    @property
    def floor_figure(self) -> Figure | None:
        """The floor's O_DIRECT figure against the same tmpfs median."""
        if self.floor_direct is None:
            return None
        direct = next(f for f in self.figures if f.name == "seq read O_DIRECT")
        return Figure("O_DIRECT bare pyfuse3", "MB/s", self.floor_direct, direct.tmpfs)

    def to_json(self) -> str:
        figs = [{**asdict(f), "ratio": round(f.ratio, 3), "met": f.met} for f in self.figures]
        return json.dumps(
            {
                "size": self.size,
                "pool": self.pool,
                "rounds": self.rounds,
                "figures": figs,
                "slowest_write_ms": self.slowest_write_ms,
                **({"floor_o_direct": self.floor_direct} if self.floor_direct else {}),
            }
        )


def format_table(r: IoResult) -> str:
    lines = [
        f"gemfs bench io: {format_size(r.size)} file, 1 MiB sequential (buffered and O_DIRECT) "
        f"and 4 KiB random requests, small writes (dbench-like), gemfs pool {r.pool}, "
        f"median of {r.rounds} runs",
        f"{'figure':<28}{'gemfs':>12}{'tmpfs':>12}{'gemfs/tmpfs':>13}  target",
    ]
    for f in r.figures:
        target = "" if f.target is None else f">= {f.target:.2f} " + ("ok" if f.met else "MISSED")
        lines.append(
            f"{f.name + ' (' + f.unit + ')':<28}{f.gemfs:>12,.0f}{f.tmpfs:>12,.0f}"
            f"{f.ratio:>13.2f}  {target}"
        )
    floor = r.floor_figure
    if floor is not None:
        direct = next(f for f in r.figures if f.name == "seq read O_DIRECT")
        lines.append(
            f"{floor.name + ' (' + floor.unit + ')':<28}{floor.gemfs:>12,.0f}{floor.tmpfs:>12,.0f}"
            f"{floor.ratio:>13.2f}  gemfs/floor {direct.gemfs / floor.gemfs:.2f}"
        )
    if r.slowest_write_ms:
        g, t = r.slowest_write_ms.get("gemfs", 0.0), r.slowest_write_ms.get("tmpfs", 0.0)
        lines.append(f"{'slowest small write (ms)':<28}{g:>12,.2f}{t:>12,.2f}")
    return "\n".join(lines)


# -- the measurements (each returns units per second) -----------------------------------------
def seq_write(path: str, size: int, data: bytes) -> float:
    if os.path.exists(path):
        os.unlink(path)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // len(data)):
            if os.write(fd, data) != len(data):
                raise BenchError(f"short write on {path}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / 1e6 / (time.perf_counter() - t0)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seq_read(path: str, size: int) -> float:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    if total != size:
        raise BenchError(f"read {total} bytes of {size} from {path}")
    return size / 1e6 / (time.perf_counter() - t0)


def seq_read_direct(path: str, size: int) -> float:
    """1 MiB sequential reads with O_DIRECT: no page cache, every byte through the file system
    (on gemfs: FUSE requests answered from the pool's frames)."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            t0 = time.perf_counter()
            total = 0
            while n := os.readv(fd, [buf]):
                total += n
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        buf.close()
    if total != size:
        raise BenchError(f"read {total} bytes of {size} from {path} with O_DIRECT")
    return size / 1e6 / elapsed


# dbench's NetBench load in miniature: small writes of mixed sizes into fresh files, a stat
# and a close after each file, the file removed at the end; one-byte writes included.
SMALL_WRITES = (1, 512, 4096, 17, 65536, 8192, 100, 4096, 32768, 1)


SMALL_WRITE_FILES = 100  # of sum(SMALL_WRITES) bytes each: 11 MiB


def small_writes(
    directory: str, files: int = SMALL_WRITE_FILES, slowest: list[float] | None = None
) -> float:
    """Small writes (dbench-like): MB per second over create, write, fstat, close, unlink.
    ``slowest`` gets the longest single write (seconds) appended."""
    payload = os.urandom(max(SMALL_WRITES))
    total = 0
    worst = 0.0
    t0 = time.perf_counter()
    for i in range(files):
        path = os.path.join(directory, f"small-{i}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            off = 0
            for n in SMALL_WRITES:
                t = time.perf_counter()
                off += os.pwrite(fd, payload[:n], off)
                worst = max(worst, time.perf_counter() - t)
            os.fstat(fd)
        finally:
            os.close(fd)
        total += off
    for i in range(files):
        os.unlink(os.path.join(directory, f"small-{i}"))
    elapsed = time.perf_counter() - t0
    if slowest is not None:
        slowest.append(worst)
    return total / 1e6 / elapsed


def rand_read(path: str, offsets: list[int], *, cold: bool) -> float:
    buf = bytearray(SMALL)
    fd = os.open(path, os.O_RDONLY)
    try:
        if cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        for off in offsets:
            if os.preadv(fd, [buf], off) != SMALL:
                raise BenchError(f"short read on {path}")
        return len(offsets) / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def bench_io(
    size: str | int = "256MiB",
    pool: str = "512MiB",
    rounds: int = 3,
    *,
    rand_ops: int = 20000,
    cold_rand_ops: int = 4000,
    floor: bool = False,
) -> IoResult:
    """``floor``: also O_DIRECT reads from the barest pyfuse3 server, the binding's ceiling."""
    if os.geteuid() != 0:
        raise BenchError("gemfs bench io needs root (it mounts a tmpfs to compare with)")
    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if nbytes < CHUNK or nbytes % CHUNK:
        raise BenchError(f"size {size} must be a positive multiple of 1MiB")
    if rounds < 1:
        raise BenchError("rounds must be at least 1")
    result = IoResult(nbytes, pool, rounds)
    with tempfile.TemporaryDirectory(prefix="gemfs-bench-") as tmp:
        gem_mp, tmp_mp = os.path.join(tmp, "gemfs"), os.path.join(tmp, "tmpfs")
        os.mkdir(gem_mp)
        os.mkdir(tmp_mp)
        log_path = os.path.join(tmp, "gemfs.log")
        room = 2 * nbytes + SMALL_WRITE_FILES * sum(SMALL_WRITES)
        _run(["mount", "-t", "tmpfs", "-o", f"size={room}", "gemfs-bench", tmp_mp])
        try:
            with open(log_path, "wb") as log:
                try:
                    server = start_server(server_args(gem_mp, pool=pool), output=log)
                except MountError as e:
                    raise BenchError(f"cannot mount gemfs: {e}") from None
            try:
                with _floor_server(tmp, nbytes) if floor else contextlib.nullcontext() as fl:
                    mounts = {"gemfs": gem_mp, "tmpfs": tmp_mp}
                    _measure(result, mounts, rand_ops, cold_rand_ops, fl)
            finally:
                rc = _unmount_and_wait(gem_mp, server)
                if rc != 0:
                    with open(log_path, errors="replace") as f:
                        raise BenchError(f"gemfs server exited {rc}: {f.read()[-2000:]}")
        finally:
            _run(["umount", tmp_mp])
    return result


@contextlib.contextmanager
def _floor_server(tmp: str, size: int) -> Iterator[str]:
    """Mount tools/pyfuse3_floor.py's file system; yields its file's path."""
    mp = os.path.join(tmp, "floor")
    os.mkdir(mp)
    log = open(os.path.join(tmp, "floor.log"), "wb")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.pyfuse3_floor", mp, str(size)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(tmp, "floor.log"), errors="replace") as f:
                    raise BenchError(f"the pyfuse3 floor server did not mount: {f.read()[-500:]}")
            time.sleep(0.05)
        yield os.path.join(mp, "data")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", mp], check=False)
        log.close()


def _measure(
    result: IoResult,
    mounts: dict[str, str],
    rand_ops: int,
    cold_ops: int,
    floor: str | None = None,
) -> None:
    size, rounds = result.size, result.rounds
    data = os.urandom(CHUNK)
    rng = random.Random(3)
    offsets = [rng.randrange(size // SMALL) * SMALL for _ in range(rand_ops)]
    samples: dict[str, dict[str, list[float]]] = {fs: {} for fs in mounts}
    slowest: dict[str, list[float]] = {fs: [] for fs in mounts}
    paths = {fs: os.path.join(mp, "bench.bin") for fs, mp in mounts.items()}
    cold_offsets = offsets[:cold_ops]

    def each(order: list[str], name: str, fn: Callable[[str], float], times: int = 1) -> None:
        """One figure on every file system back to back, so that both see the same load."""
        for _ in range(times):
            for fs in order:
                try:
                    samples[fs].setdefault(name, []).append(fn(fs))
                except OSError as e:  # e.g. ENOSPC: a pool too small for --size
                    raise BenchError(f"{name} on {fs}: {e.strerror or e}") from None

    def cold_read(fs: str) -> float:
        drop_cache(paths[fs])
        return seq_read(paths[fs], size)

    for r in range(rounds):
        order = list(mounts) if r % 2 == 0 else list(reversed(mounts))
        each(order, "seq write", lambda fs: seq_write(paths[fs], size, data))
        each(order, "seq read cold", cold_read)
        each(order, "seq read warm", lambda fs: seq_read(paths[fs], size))
        if floor is not None:  # the floor in the same alternation, right after the other two
            paths["floor"] = floor
            samples.setdefault("floor", {})
            order = [*order, "floor"] if r % 2 == 0 else ["floor", *order]
        each(order, "seq read O_DIRECT", lambda fs: seq_read_direct(paths[fs], size), DIRECT_PAIRS)
        order = [fs for fs in order if fs != "floor"]
        each(order, "rand read 4K warm", lambda fs: rand_read(paths[fs], offsets, cold=False))
        each(order, "rand read 4K cold", lambda fs: rand_read(paths[fs], cold_offsets, cold=True))
        each(order, "small writes", lambda fs: small_writes(mounts[fs], slowest=slowest[fs]))
    result.slowest_write_ms = {fs: max(v) * 1000 for fs, v in slowest.items() if v}
    targets = {
        "seq write": 0.4,
        "seq read cold": 0.6,
        "seq read warm": 0.6,
        "seq read O_DIRECT": 0.6,
    }
    if floor is not None:
        result.floor_direct = statistics.median(samples["floor"]["seq read O_DIRECT"])
    for name in samples["gemfs"]:
        unit = "IOPS" if name.startswith("rand") else "MB/s"
        g = statistics.median(samples["gemfs"][name])
        t = statistics.median(samples["tmpfs"][name])
        result.figures.append(Figure(name, unit, g, t, targets.get(name)))


def _unmount_and_wait(mountpoint: str, server: subprocess.Popen[bytes]) -> int:
    try:
        unmount(mountpoint)
        return server.wait(timeout=30)
    except (MountError, subprocess.TimeoutExpired):
        return stop(server)  # SIGTERM: the server unmounts lazily and exits


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")
