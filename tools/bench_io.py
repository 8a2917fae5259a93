"""``gemfs bench io``: file I/O on a gemfs mount against a kernel tmpfs mounted side by side.

Both file systems are mounted in a temporary directory and measured in the same run, round by
round alternately, so the ratio gemfs/tmpfs is robust against the machine's mood. "Cold" reads
first drop the file's page cache (``posix_fadvise(DONTNEED)``: on gemfs the data then comes
through FUSE from the pool's frames; tmpfs has no other copy, so cold equals warm there).
"""

from __future__ import annotations

import functools
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from gemfs.mm.types import format_size, parse_size
from gemfs.mountproc import MountError, server_args, start_server, stop, unmount

CHUNK = 1 << 20
SMALL = 4096


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

    def to_json(self) -> str:
        figs = [{**asdict(f), "ratio": round(f.ratio, 3), "met": f.met} for f in self.figures]
        return json.dumps(
            {"size": self.size, "pool": self.pool, "rounds": self.rounds, "figures": figs}
        )


def format_table(r: IoResult) -> str:
    lines = [
        f"gemfs bench io: {format_size(r.size)} file, 1 MiB sequential and 4 KiB random "
        f"requests, gemfs pool {r.pool}, median of {r.rounds} runs",
        f"{'figure':<28}{'gemfs':>12}{'tmpfs':>12}{'gemfs/tmpfs':>13}  target",
    ]
    for f in r.figures:
        target = "" if f.target is None else f">= {f.target:.2f} " + ("ok" if f.met else "MISSED")
        lines.append(
            f"{f.name + ' (' + f.unit + ')':<28}{f.gemfs:>12,.0f}{f.tmpfs:>12,.0f}"
            f"{f.ratio:>13.2f}  {target}"
        )
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
) -> IoResult:
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
        _run(["mount", "-t", "tmpfs", "-o", f"size={2 * nbytes}", "gemfs-bench", tmp_mp])
        try:
            with open(log_path, "wb") as log:
                try:
                    server = start_server(server_args(gem_mp, pool=pool), output=log)
                except MountError as e:
                    raise BenchError(f"cannot mount gemfs: {e}") from None
            try:
                _measure(result, {"gemfs": gem_mp, "tmpfs": tmp_mp}, rand_ops, cold_rand_ops)
            finally:
                rc = _unmount_and_wait(gem_mp, server)
                if rc != 0:
                    with open(log_path, errors="replace") as f:
                        raise BenchError(f"gemfs server exited {rc}: {f.read()[-2000:]}")
        finally:
            _run(["umount", tmp_mp])
    return result


def _measure(result: IoResult, mounts: dict[str, str], rand_ops: int, cold_ops: int) -> None:
    size, rounds = result.size, result.rounds
    data = os.urandom(CHUNK)
    rng = random.Random(3)
    offsets = [rng.randrange(size // SMALL) * SMALL for _ in range(rand_ops)]
    samples: dict[str, dict[str, list[float]]] = {fs: {} for fs in mounts}

    def sample(fs: str, name: str, fn: Callable[[], float]) -> None:
        samples[fs].setdefault(name, []).append(fn())

    for _ in range(rounds):
        for fs, mp in mounts.items():
            path = os.path.join(mp, "bench.bin")
            sample(fs, "seq write", functools.partial(seq_write, path, size, data))
            drop_cache(path)
            sample(fs, "seq read cold", functools.partial(seq_read, path, size))
            sample(fs, "seq read warm", functools.partial(seq_read, path, size))
            warm = functools.partial(rand_read, path, offsets, cold=False)
            sample(fs, "rand read 4K warm", warm)
            cold = functools.partial(rand_read, path, offsets[:cold_ops], cold=True)
            sample(fs, "rand read 4K cold", cold)
    targets = {"seq write": 0.4, "seq read cold": 0.6, "seq read warm": 0.6}
    for name in samples["gemfs"]:
        unit = "MB/s" if name.startswith("seq") else "IOPS"
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
