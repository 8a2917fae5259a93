"""The workload player's backend on the real stack: a FUSE mount, a driver daemon and a
compactor, each its own process, talking over the control socket.

Objects are created and executed through the driver's client socket (``gemfs gem`` does the
same); page-cache files are written through the mount with ordinary system calls; kernel
noise and high-order probes are core allocations made over the control socket; explicit
compaction is one pass of the compactor process (``gemfs compactor --once``). Time is the
mount's modelled clock: ``advance`` moves it (the compactor process, started with
``--clock model``, wakes at its instants), so what a run reports does not depend on how fast
or loaded this machine is; the stack runs as fast as it can.

On an existing mount (``gemfs run --mount M``) the run needs M to itself as far as drivers go
(no other driver attached), plays the mount's design on the mount's pool, keeps its files in
one directory on M (``gemfs-run-<pid>``) and removes it at the end. Whatever goes wrong (a
driver that exits, the mount going away) is a :class:`StackError`: one line that names the
log, which is then kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driver.gem import DriverPolicy
from gemfs.control.client import SyncClient
from gemfs.control.peer import CallError
from gemfs.mm import OutOfMemory
from gemfs.mm.trace import LOST_EVENTS, Sink
from gemfs.mm.types import PAGE_SIZE, Design, MigrateType, format_size
from gemfs.procfs import parse_pool
from tools.backend import GpuSample, Handle, ProbeResult, Sample
from tools.runner import BackendUnavailable
from tools.workload import Workload

STARTUP_S = 30.0
EXIT_GRACE_S = 5.0  # how long a peer that closed its connection may take to exit
GONE = ("ENOTCONN", "ECONNRESET", "EPIPE")  # CallError errnos: the peer closed the connection


class StackError(BackendUnavailable, RuntimeError):
    """The stack could not be brought up, or a part of it failed under a run (one line for the
    user, naming the log to read)."""


@dataclass(frozen=True, slots=True)
class MountInfo:
    """What ``.gemfs/pool`` says about an existing mount."""

    path: Path
    pool: int  # bytes
    design: Design
    control: Path | None

    @property
    def pool_human(self) -> str:
        return format_size(self.pool)


def mount_info(mount: str | Path) -> MountInfo:
    """Read an existing gemfs mount's pool size, design and control socket (StackError if it is
    not a gemfs mount)."""
    path = Path(mount)
    try:
        fields = parse_pool((path / ".gemfs" / "pool").read_text())
        pool, design = int(fields["size"]), Design.parse(fields["design"])
    except (OSError, KeyError, ValueError):
        raise StackError(f"{mount} is not a gemfs mount (no readable .gemfs/pool)") from None
    control = fields.get("control")
    return MountInfo(path, pool, design, Path(control) if control else None)


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _gemfs() -> list[str]:
    return [sys.executable, "-m", "gemfs_cli"]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not path.exists():
        if proc.poll() is not None:
            raise StackError(f"{what} {_how(proc.returncode)} at start; log: {log}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {STARTUP_S:.0f} s; log: {log}")
        time.sleep(0.02)


def _connect(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> SyncClient:
    """Connect once the socket accepts (it exists a moment before it listens)."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            return SyncClient(str(sock), name="gemfs-run")
        except (CallError, OSError):  # not listening yet, or it died in the handshake
            if proc.poll() is not None:
                raise StackError(
                    f"the driver {_how(proc.returncode)} during the run; log: {log}"
                ) from None
            if time.monotonic() > deadline:
                raise StackError(f"cannot connect to the driver at {sock}; log: {log}") from None
            time.sleep(0.02)


class Stack:
    """mount + driver (+ proactive compactor) as separate processes; clients to both."""

    def __init__(
        self,
        pool: str | int,
        design: Design,
        mount: str | None = None,
        *,
        proactiveness: int = 0,
        order: int = -1,
        interval_ms: float = 500,
        model_clock: bool = False,
        gem_migratetype: MigrateType | None = None,
        allow_uids: Sequence[int] = (),
        driver_policy: DriverPolicy = DriverPolicy.WAIT_IDLE,
        display_on: bool = True,
        movablecore: str | None = None,
        confine_granule: str | None = None,
        ttm_pool: str | None = None,
    ) -> None:
        self.driver_policy = driver_policy
        self.display_on = display_on
        # the design's own knob (longterm-pin, confine, pinned-ttm): an option of the mount this
        # stack starts. The others are left out, as in process: a mount refuses another
        # design's knob, a workload's knobs hold for whichever design it is played under.
        knob = design.knob
        values = {
            "movablecore": movablecore,
            "confine_granule": confine_granule,
            "ttm_pool": ttm_pool,
        }
        value = None if knob is None else values[knob]
        self.knob_args = []
        if knob is not None and value is not None:
            self.knob_args.append(f"--{knob.replace('_', '-')}={value}")
        self.design = design
        self.allow_uids = list(allow_uids)
        self.workdir = Path(tempfile.mkdtemp(prefix="gemfs-stack-"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._own_mount = mount is None
        self._closed = False
        self.keep = False  # keep the work directory (the logs) at teardown
        self.rundir: Path | None = None  # on an existing mount: where this run's files go
        self.model_clock = model_clock
        self.gem_migratetype = gem_migratetype
        try:
            self._start(pool, mount, proactiveness, order, interval_ms)
        except StackError as e:
            self.keep = str(self.workdir) in str(e)  # it names a log: that must stay
            self.teardown()
            raise
        except BaseException:
            self.teardown()
            raise

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append((name, proc))
        return proc

    def _start(
        self,
        pool: str | int,
        mount: str | None,
        proactiveness: int,
        order: int,
        interval_ms: float,
    ) -> None:
        if mount is None:
            self.mountpoint = self.workdir / "mnt"
            self.mountpoint.mkdir()
            self.control = self.workdir / "control.sock"
            r = subprocess.run(
                [
                    *_gemfs(),
                    "mount",
                    str(self.mountpoint),
                    "--pool",
                    str(pool),
                    "--design",
                    self.design.value,
                    "--control",
                    str(self.control),
                    "--log",
                    str(self.workdir / "mount.log"),
                    *[f"--allow-uid={u}" for u in self.allow_uids],
                    *self.knob_args,
                ],
                capture_output=True,
                text=True,
                timeout=STARTUP_S,
            )
            if r.returncode != 0:
                raise StackError(f"gemfs mount failed: {(r.stderr or r.stdout).strip()}")
        else:
            info = mount_info(mount)
            self.mountpoint = info.path
            if info.control is None:
                raise StackError(f"{mount} has no control socket (mount it with --control PATH)")
            self.control = info.control
            if info.design is not self.design:
                raise StackError(
                    f"{mount} runs design {info.design.value}, not {self.design.value} "
                    f"(a mount plays the design it was mounted with)"
                )
        try:
            self.core = SyncClient(str(self.control), name="gemfs-run")
        except (CallError, OSError) as e:
            raise StackError(f"cannot connect to {self.control}: {e}") from None
        if not self._own_mount:
            self._claim_existing_mount()
        self.driver_sock = self.workdir / "driver.sock"
        cmd = self._driver_args()
        drv = self._spawn("driver", [*_gemfs(), *cmd])
        _wait_for(self.driver_sock, drv, self.workdir / "driver.log", "the driver")
        self.drv = _connect(self.driver_sock, drv, self.workdir / "driver.log")
        if proactiveness > 0 or order >= 0:
            self.start_compactor(proactiveness=proactiveness, order=order, interval_ms=interval_ms)

    def _claim_existing_mount(self) -> None:
        """A run on someone's mount: no other driver may be attached (its objects and callbacks
        would mix with the run's); the run's files go into a directory of their own."""
        drivers = [p for p in self.core.call("stats")["peers"] if p["role"] == "driver"]
        if drivers:
            d = drivers[0]
            raise StackError(
                f"{self.mountpoint} already has a driver attached ({d['name']}, pid {d['pid']}); "
                "stop it or use another mount"
            )
        self.rundir = self.mountpoint / f"gemfs-run-{os.getpid()}"
        try:
            self.rundir.mkdir()
        except FileExistsError:
            shutil.rmtree(self.rundir)  # left by a run of an earlier process with our pid
            self.rundir.mkdir()
        except OSError as e:
            self.rundir = None
            raise StackError(f"cannot create a directory on {self.mountpoint}: {e}") from None

    def path_for(self, name: str) -> str:
        """Where a file of this run goes, relative to the mount's root."""
        if self.rundir is None:
            return name
        return f"{self.rundir.name}/{name}"

    def failed(self, what: str, error: BaseException) -> StackError:
        """The error to raise when a call to a part of the stack failed under a run: says which
        process exited (and how) and names its log, which is kept."""
        self.keep = True
        for name, proc in self.procs:
            if name not in ("driver", "compactor"):
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):  # it may be exiting right now
                proc.wait(EXIT_GRACE_S if what.startswith(name) else 0.1)
            if proc.returncode is not None:
                log = self.workdir / f"{name}.log"
                return StackError(f"the {name} {_how(proc.returncode)} during the run; log: {log}")
        if not os.path.ismount(self.mountpoint):
            where = self.workdir / "mount.log" if self._own_mount else self.mountpoint
            return StackError(f"the mount went away during the run ({what}: {error}); see {where}")
        return StackError(f"{what} failed: {error}; logs: {self.workdir}")

    def _driver_args(self) -> list[str]:
        cmd = ["driver", "--control", str(self.control), "--listen", str(self.driver_sock)]
        if self.gem_migratetype is not None:
            cmd += ["--migratetype", self.gem_migratetype.name.lower()]
        if self.driver_policy is not DriverPolicy.WAIT_IDLE:
            cmd += ["--policy", self.driver_policy.value]
        if not self.display_on:
            cmd += ["--display", "off"]
        return cmd

    def driver_proc(self) -> subprocess.Popen[bytes]:
        return next(p for name, p in reversed(self.procs) if name == "driver")

    def restart_driver(self) -> None:
        """Start a fresh driver (after the old one died or was killed); reconnect to it."""
        old = self.driver_proc()
        if old.poll() is None:
            old.kill()
        old.wait()
        self.drv.close()
        with contextlib.suppress(FileNotFoundError):
            self.driver_sock.unlink()
        cmd = self._driver_args()
        drv = self._spawn("driver", [*_gemfs(), *cmd])
        _wait_for(self.driver_sock, drv, self.workdir / "driver.log", "the driver")
        self.drv = _connect(self.driver_sock, drv, self.workdir / "driver.log")

    def start_compactor(
        self, *, proactiveness: int | None, order: int = -1, interval_ms: float = 500
    ) -> None:
        """Start a kcompactd process (another one may already run); on the modelled clock it
        registers with the core before this returns, so the next ``advance`` wakes it."""
        args = [*_gemfs(), "compactor", "--control", str(self.control)]
        args += ["--interval-ms", str(max(1, round(interval_ms)))]
        if proactiveness is not None:  # else the mount's knob decides
            args += ["--proactiveness", str(proactiveness)]
        args += ["--order", str(order)]
        if self.model_clock:
            args += ["--clock", "model"]
        proc = self._spawn("compactor", args)
        if self.model_clock:
            deadline = time.monotonic() + STARTUP_S
            while not self._compactor_registered():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = self.workdir / "compactor.log"
                    raise StackError(f"the compactor did not start; log: {log}")
                time.sleep(0.02)

    def _compactor_registered(self) -> bool:
        peers = self.core.call("stats")["peers"]
        return any(p["role"] == "compactor" and p.get("driven") for p in peers)

    def compact_once(self) -> str:
        r = subprocess.run(
            [*_gemfs(), "compactor", "--control", str(self.control), "--once"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            raise StackError(f"compactor --once failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout.strip()

    def logs(self) -> str:
        out = []
        for f in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in ("drv", "core"):
            client = getattr(self, c, None)
            if client is not None:
                client.close()
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.rundir is not None:  # the driver is gone: its pins with it; the files go now
            with contextlib.suppress(OSError):
                shutil.rmtree(self.rundir)
        if self._own_mount and hasattr(self, "mountpoint") and os.path.ismount(self.mountpoint):
            subprocess.run([*_gemfs(), "umount", str(self.mountpoint)], capture_output=True)
            if os.path.ismount(self.mountpoint):
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        if self.keep:
            return
        if os.environ.get("GEMFS_KEEP_STACK"):
            print(f"gemfs: kept {self.workdir}", file=sys.stderr)
            return
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


class PipeReader:
    """The mount's ``.gemfs/trace_pipe``, opened O_NONBLOCK: :meth:`drain` reads until the pipe
    answers EAGAIN (nothing more traced yet) and returns the whole lines read so far; a line
    cut by a read's end waits for the next drain."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._tail = b""

    def drain(self) -> list[str]:
        chunks = [self._tail]
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        *lines, self._tail = b"".join(chunks).split(b"\n")
        return [line.decode() for line in lines]

    def close(self) -> None:
        os.close(self.fd)


TRACE_LINES_PER_PAGE = 8
"""The trace buffer a run asks the mount for, per page of the pool: the run drains the pipe
after every call, so the buffer holds what one call traces (a compaction of the whole pool
makes about three lines a page); a buffer that overflowed all the same shows as a
``CPU:0 [LOST N EVENTS]`` line in the trace, as the kernel's does."""


class StackBackend:
    """:class:`tools.backend.Backend` on the real stack (``gemfs run`` without --inproc)."""

    name = "stack"

    def __init__(self, workload: Workload, design: Design, mount: str | None = None) -> None:
        self.design = design
        self._next = 1
        self._objects: dict[Handle, int] = {}
        self._files: dict[Handle, tuple[str, int]] = {}
        self._noise: dict[Handle, int] = {}
        self._probes: list[int] = []
        self._pool_pages = workload.pool // PAGE_SIZE
        self._pipe: PipeReader | None = None
        self._sink: Sink | None = None
        self._traced = 0  # lines read from trace_pipe (not counting LOST lines)
        c = workload.compactor
        self.stack = Stack(
            workload.pool,
            design,
            mount,
            proactiveness=c.proactiveness,
            order=c.order,
            interval_ms=c.interval_s * 1000,
            model_clock=True,
            gem_migratetype=workload.gem_migratetype,
            driver_policy=workload.driver_policy,
            display_on=workload.display_on,
            movablecore=workload.movablecore,
            confine_granule=workload.confine_granule,
            ttm_pool=workload.ttm_pool,
        )
        self.core, self.drv = self.stack.core, self.stack.drv
        self.mountpoint = self.stack.mountpoint
        if workload.costs:
            self._core("costs", {"table": dict(workload.costs)})

    def _call(self, client: SyncClient, what: str, op: str, args: dict[str, Any]) -> Any:
        """One call; a peer that went away (or a dead socket) becomes a StackError that names
        the log, anything else the peer answered is raised as it came."""
        try:
            result = client.call(op, args)
        except CallError as e:
            if e.errno in GONE:
                raise self.stack.failed(f"{what} {op}", e) from None
            raise
        except OSError as e:
            raise self.stack.failed(f"{what} {op}", e) from None
        self._drain_trace()
        return result

    def _core(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return self._call(self.core, "core", op, args or {})

    def _drv(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return self._call(self.drv, "driver", op, args or {})

    def _handle(self) -> Handle:
        h = Handle(self._next)
        self._next += 1
        return h

    # -- objects ----------------------------------------------------------------------------
    def create(self, size: int, tag: str, bind: bool) -> Handle:
        args: dict[str, Any] = {"size": size}
        if self.stack.rundir is not None:
            args["path"] = self.stack.path_for(f"gem-{self._next}")
        try:
            r = self._drv("create", args)
        except CallError as e:
            if e.errno in ("ENOSPC", "ENOMEM"):
                raise OutOfMemory(str(e)) from None
            raise
        h = self._handle()
        self._objects[h] = int(r["obj"])
        if bind:
            self._drv("exec", {"objs": [int(r["obj"])], "duration_ms": 0, "write": True})
        return h

    def close(self, handle: Handle) -> None:
        if (oid := self._objects.pop(handle, None)) is not None:
            self._drv("close", {"obj": oid, "unlink": True})
        elif (f := self._files.pop(handle, None)) is not None:
            self._core("close", {"obj": f[1], "unlink": True})
        else:
            raise KeyError(f"no object or file with handle {handle}")

    def execute(
        self,
        handles: Sequence[Handle],
        duration_s: float,
        write: bool,
        *,
        keep_s: float = 0.0,
        interval_s: float = 0.0,
    ) -> None:
        ids = [self._objects[h] for h in handles]
        args: dict[str, Any] = {"objs": ids, "duration_ms": duration_s * 1000, "write": write}
        if keep_s > 0:
            args |= {"keep_ms": keep_s * 1000, "interval_ms": interval_s * 1000}
        self._drv("exec", args)

    def loop_tick(self) -> int:
        return int(self._drv("loop_tick")["refaulted"])

    def page_cache(self, size: int) -> Handle:
        h = self._handle()
        name = self.stack.path_for(f"cache-{int(h)}")
        try:  # the pages are allocated at once (as in process), then written through the mount
            r = self._core("create", {"path": name, "size": size, "mt": "movable"})
        except CallError as e:
            if e.errno in ("ENOSPC", "ENOMEM"):
                raise OutOfMemory(str(e)) from None
            raise
        data = _cache_bytes(int(h), size)
        try:
            with open(self.mountpoint / name, "r+b") as f:
                f.write(data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG):
                raise self.stack.failed(f"writing {name}", e) from None
            self._core("close", {"obj": int(r["obj"]), "unlink": True})
            raise OutOfMemory(str(e)) from None
        self._files[h] = (name, int(r["obj"]))
        return h

    # -- kernel allocations -----------------------------------------------------------------
    def alloc_noise(self, order: int, mt: MigrateType) -> Handle | None:
        try:
            r = self._core("alloc", {"order": order, "mt": mt.name.lower()})
        except CallError:
            return None
        h = self._handle()
        self._noise[h] = int(r["pfn"])
        return h

    def free_noise(self, handle: Handle) -> None:
        self._core("free", {"pfn": self._noise.pop(handle)})

    def probe(self, order: int, gfp: str = "thp") -> ProbeResult:
        r = self._core("alloc", {"order": order, "mt": "movable", "compact": True, "kind": gfp})
        pfn = int(r["pfn"])
        if pfn < 0:
            return False, float(r["latency_us"]), False
        self._probes.append(pfn)
        return True, float(r["latency_us"]), bool(r["compacted"])

    def kswapd_sleep(self) -> None:
        self._core("kswapd", {})

    def release_probes(self) -> None:
        for pfn in self._probes:
            self._core("free", {"pfn": pfn})
        self._probes.clear()

    # -- compaction and time ----------------------------------------------------------------
    def compact(self) -> None:
        """echo 1 > compact_memory: the core's own compaction (its zone state, as in process)."""
        self.core.call("compact", {})
        self._drain_trace()

    def advance(self, seconds: float) -> None:
        self._core("advance", {"seconds": max(0.0, seconds)})

    def sample(self, *, full: bool = True) -> Sample:
        s = self._core("stats", {"light": not full})
        d = self._drv("stats")
        lat = np.asarray(s["callback_wall_us"], dtype=np.float64)  # harness figure only
        p50, p99 = np.percentile(lat, [50, 99]).tolist() if len(lat) else (0.0, 0.0)
        vm = dict(s["vmstat"])
        costs = dict(s["costs"])
        gpu: GpuSample = {
            "batches": int(d["batches"]),
            "stall_s": float(costs["gpu_stall_ms"]) / 1000,
            "data_errors": int(d["data_errors"]),
            "migrate_calls": int(d["migrate_calls"]),
            "migrate_eagain": int(d["migrate_eagain"]),
            "invalidations": int(d["invalidations"]),
            "refaults": int(d["refaults"]),
        }
        blocks = s["pageblocks"]
        return {
            "time_s": float(s["clock"]),
            "pool_pages": int(s["nr_pages"]),
            "free_pages": int(s["free_pages"]),
            "buddyinfo": list(s["free"]),
            "score": int(s["score"]),
            "vmstat": vm,
            "pageblocks": {mt.name.lower(): int(blocks[mt]) for mt in MigrateType},
            "mixed_pageblocks": int(s["mixed_pageblocks"]),
            "pageblock_types": np.frombuffer(s["pageblock_mt"], np.uint8).astype(int).tolist(),
            "pageblock_states": np.frombuffer(s["pageblock_states"], np.uint8).astype(int).tolist(),
            "callbacks": int(costs["callbacks"]),
            "callback_p50_us": float(p50),
            "callback_p99_us": float(p99),
            "gpu": gpu,
            "costs": costs,
            "cost_table": dict(s["cost_table"]),
            "pageblock_mixed": np.frombuffer(s["pageblock_mixed"], "<i8").tolist(),
        }

    def verify(self) -> int:
        """GPU-side mismatches, objects whose content differs, and page-cache files that
        read back (through the mount) differently from what was written."""
        r = self._drv("verify")
        bad = int(r["data_errors"])
        for h, (name, _oid) in self._files.items():
            data = (self.mountpoint / name).read_bytes()
            if zlib.crc32(data) != zlib.crc32(_cache_bytes(int(h), len(data))):
                bad += 1
        return bad

    # -- tracing ----------------------------------------------------------------------------
    def trace(self, seed: int, sink: Sink) -> None:
        """The model's tracepoints from now on, labelled for the run of ``seed``, to ``sink``:
        the control socket's ``trace`` op turns them on in the mount, and the lines are read
        through the mount's ``.gemfs/trace_pipe`` after every call (and at teardown)."""
        lines = max(1 << 16, TRACE_LINES_PER_PAGE * self._pool_pages)
        try:
            self._core("trace", {"on": True, "seed": seed, "buffer_lines": lines})
        except CallError as e:
            if e.errno != "EBUSY":
                raise
            raise StackError(
                f"{self.mountpoint} is being traced already (.gemfs/tracing_on is 1): turn that "
                "off, or run without --trace"
            ) from None
        try:
            self._pipe = PipeReader(self.mountpoint / ".gemfs" / "trace_pipe")
        except OSError as e:
            with contextlib.suppress(CallError, StackError):  # leave the mount untraced
                self._core("trace", {"on": False})
            raise self.stack.failed("opening .gemfs/trace_pipe", e) from None
        self._sink = sink

    def _drain_trace(self) -> None:
        if self._pipe is None or self._sink is None:
            return
        try:
            lines = self._pipe.drain()
        except OSError as e:
            raise self.stack.failed("reading .gemfs/trace_pipe", e) from None
        for line in lines:
            if not LOST_EVENTS.match(line):
                self._traced += 1
            self._sink(line)

    def _end_trace(self) -> None:
        """The last lines, then tracing off; every line the mount traced must have come."""
        if self._pipe is None:
            return
        try:
            self._drain_trace()
            counts = self._core("trace", {"on": False})
        finally:
            self._pipe.close()
            self._pipe = None
        written, lost = int(counts["written"]), int(counts["lost"])
        if self._traced != written - lost:
            self.stack.keep = True
            raise StackError(
                f"trace_pipe gave {self._traced} lines, the mount traced {written} "
                f"({lost} lost); logs: {self.stack.workdir}"
            )

    def teardown(self) -> None:
        try:
            self._end_trace()
        finally:
            self.stack.teardown()


def _cache_bytes(seed: int, size: int) -> bytes:
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    stamp = np.arange(pages * PAGE_SIZE // 8, dtype=np.uint64) * np.uint64(2654435761)
    return (stamp ^ np.uint64(seed)).view(np.uint8)[:size].tobytes()


def make_stack_backend(workload: Workload, design: Design, mount: str | None) -> StackBackend:
    return StackBackend(workload, design, mount)
