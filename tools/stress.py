"""`gemfs stress`: concurrent load with faults injected at random; nothing may be lost.

Worker processes do file I/O on the mount (writes, reads, truncates, renames, mmap writes,
unlink and re-create), each checking every read against its own model of the files. A GPU
thread creates, executes (writes) and frees the driver's objects, remembering the checksum the
driver reports for each object. The proactive compactor runs all along and explicit full
compactions run now and then. A fault thread kills the driver (then restarts it and takes the
objects back by path, half the time as a driver that answers the core too slowly, so that
callbacks time out), kills the compactor (then restarts it), and keeps objects busy on the GPU
(modelled time follows the wall clock) so that compaction waits or is refused. At the end
every file and every object is compared with what
its writer wrote.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import random
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driver.gem import DriverPolicy, gpu_pattern
from gemfs.control.peer import CallError
from gemfs.mm.types import PAGE_SIZE, Design
from tools.stack_backend import Stack, StackError

MAX_FILE = 1 << 20
BUDGET = 12 << 20  # bytes of files one worker keeps at most


@dataclass
class WorkerReport:
    ops: int = 0
    bytes_checked: int = 0
    bytes_lost: int = 0
    enospc: int = 0
    errors: list[str] = field(default_factory=list)


# What a GPU object holds, as the GPU thread knows it: zeros (never written), the pattern of
# the batch that wrote it last (object id at the time, generation), or the exact bytes found
# after a kill tore a batch.
Content = None | tuple[int, int] | bytes


def _render(content: Content, size: int) -> bytes:
    if content is None:
        return bytes(size)
    if isinstance(content, bytes):
        return content
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    return gpu_pattern(content[0], content[1], pages).tobytes()[:size]


def torn_batch(data: bytes, old: bytes, new: bytes) -> str | None:
    """What a batch in flight when its driver was killed left in one object: "old" (it had not
    written this object), "new" (it had), "torn" (the kill landed inside the object's copy), or
    None: content no killed batch can leave.

    The GPU's write goes through the GTT in page order, so a torn object is the new content on
    pages [0, k), the old on pages (k, n), and page k a word-by-word mix of the two (a copy
    interrupted inside a page). Anything else (a page from elsewhere, an old page before a new
    one, a word of neither) is corruption."""
    if data == old:
        return "old"
    if data == new:
        return "new"
    if not (len(data) == len(old) == len(new)) or len(data) % PAGE_SIZE:
        return None
    d, o, n = (np.frombuffer(b, np.uint64).reshape(-1, PAGE_SIZE // 8) for b in (data, old, new))
    is_new = (d == n).all(axis=1)
    k = int(np.argmin(is_new))  # the first page that is not the new content
    if not ((d[k + 1 :] == o[k + 1 :]).all() and ((d[k] == n[k]) | (d[k] == o[k])).all()):
        return None
    return "torn"


def _pages_neither(data: bytes, old: bytes, new: bytes) -> int:
    if not (len(data) == len(old) == len(new)) or len(data) % PAGE_SIZE:
        return max(len(data), len(old)) // PAGE_SIZE
    d, o, n = (np.frombuffer(b, np.uint8).reshape(-1, PAGE_SIZE) for b in (data, old, new))
    return int((~((d == o).all(axis=1) | (d == n).all(axis=1))).sum())


def _diff(a: bytes, b: bytes) -> int:
    n = max(len(a), len(b))
    if a == b:
        return 0
    common = min(len(a), len(b))
    return sum(1 for i in range(common) if a[i] != b[i]) + (n - common)


def _pwrite(fd: int, data: bytes, off: int, m: bytearray) -> None:
    """pwrite, applying to the model exactly what the file system took (a short write on
    ENOSPC keeps its prefix; a failed one changes nothing) and re-raising ENOSPC."""
    done = 0
    try:
        while done < len(data):
            n = os.pwrite(fd, data[done:], off + done)
            if n <= 0:
                break
            done += n
    finally:
        if done:
            end = off + done
            if len(m) < off:
                m.extend(bytes(off - len(m)))
            m[off:end] = data[:done]


def worker(root: str, seed: int, stop_at: float, out: Any) -> None:
    """One process of file I/O on its own directory, checking against a model."""
    rng = random.Random(seed)
    d = Path(root) / f"w{seed}"
    d.mkdir()
    model: dict[str, bytearray] = {}
    dense: set[str] = set()  # files without holes
    rep = WorkerReport()

    def path(name: str) -> Path:
        return d / name

    def check(name: str, off: int = 0, n: int | None = None) -> None:
        want = bytes(model[name])
        with open(path(name), "rb") as f:
            f.seek(off)
            got = f.read(len(want) - off if n is None else n)
        exp = want[off : off + len(got)] if n is not None else want[off:]
        rep.bytes_checked += len(exp)
        lost = _diff(got, exp)
        if lost:
            rep.bytes_lost += lost
            rep.errors.append(f"{name}@{off}: {lost} bytes differ")

    try:
        while time.monotonic() < stop_at:
            rep.ops += 1
            op = rng.random()
            names = sorted(model)
            if sum(len(m) for m in model.values()) > BUDGET:
                op = 0.99  # over budget: unlink a file (keeps room for GPU churn and migration)
            try:
                if op < 0.15 or not names:
                    name = f"f{rng.randrange(1 << 30)}"
                    data = rng.randbytes(rng.randrange(1, 256 << 10))
                    model[name] = bytearray()
                    fd = os.open(path(name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                    try:
                        _pwrite(fd, data, 0, model[name])
                    finally:
                        os.close(fd)
                    dense.add(name)
                elif op < 0.45:
                    name = rng.choice(names)
                    off = rng.randrange(0, MAX_FILE - 65536)
                    data = rng.randbytes(rng.randrange(1, 65536))
                    if off > len(model[name]):
                        dense.discard(name)  # a hole: pages without frames
                    fd = os.open(path(name), os.O_WRONLY)
                    try:
                        _pwrite(fd, data, off, model[name])
                    finally:
                        os.close(fd)
                elif op < 0.7:
                    name = rng.choice(names)
                    size = len(model[name])
                    off = rng.randrange(0, max(1, size))
                    check(name, off, rng.randrange(1, 131072))
                elif op < 0.78:
                    name = rng.choice(names)
                    size = rng.randrange(0, MAX_FILE)
                    os.truncate(path(name), size)
                    if size > len(model[name]):
                        dense.discard(name)
                    m = model[name]
                    del m[size:]
                    m.extend(bytes(size - len(m)))
                elif op < 0.85:
                    name = rng.choice(names)
                    new = f"r{rng.randrange(1 << 30)}"
                    os.rename(path(name), path(new))
                    model[new] = model.pop(name)
                    if name in dense:
                        dense.discard(name)
                        dense.add(new)
                elif op < 0.93:
                    name = rng.choice(names)
                    m = model[name]
                    if len(m) >= 8192 and name in dense:  # mmap writes only over real pages
                        off = rng.randrange(0, len(m) // 4096) * 4096
                        n = min(len(m) - off, rng.randrange(1, 16384))
                        data = rng.randbytes(n)
                        with open(path(name), "r+b") as f:
                            mm = mmap.mmap(f.fileno(), len(m))
                            mm[off : off + n] = data
                            mm.flush()
                            mm.close()
                        m[off : off + n] = data
                else:
                    name = rng.choice(names)
                    check(name)
                    os.unlink(path(name))
                    del model[name]
                    dense.discard(name)
            except OSError as e:
                if e.errno == 28:  # ENOSPC: the writer is told; nothing else may change
                    rep.enospc += 1
                    if rng.random() < 0.2:
                        for n2 in list(model):
                            check(n2)
                else:
                    rep.errors.append(f"{type(e).__name__}: {e}")
                    break
        for name in sorted(model):
            check(name)
    except Exception as e:  # report, never hang the parent
        rep.errors.append(f"{type(e).__name__}: {e}")
    out.put(rep.__dict__)


@dataclass
class StressReport:
    seconds: float = 0
    file_ops: int = 0
    gpu_batches: int = 0
    gpu_objects: int = 0
    migrations: int = 0
    migrate_fail: int = 0
    callbacks: int = 0
    callback_timeouts: int = 0
    aborted: int = 0
    compactions: int = 0
    driver_kills: int = 0
    torn_objects: int = 0  # objects a killed batch left half-written (allowed, counted)
    dropped_objects: int = 0  # i915-2016: objects whose backing store a callback dropped
    compactor_kills: int = 0
    bytes_checked: int = 0
    bytes_lost: int = 0
    objects_checked: int = 0
    objects_bad: int = 0
    data_errors: int = 0
    enospc: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.bytes_lost or self.objects_bad or self.data_errors or self.errors)


class Stress:
    def __init__(
        self,
        seconds: float,
        design: Design,
        workers: int,
        seed: int,
        policy: DriverPolicy = DriverPolicy.WAIT_IDLE,
    ) -> None:
        self.seconds = seconds
        self.design = design
        self.policy = policy  # the driver's migrate callback (its process, restarts included)
        self.workers = workers
        self.rng = random.Random(seed)
        self.seed = seed
        self.report = StressReport()
        self.lock = threading.Lock()  # guards the driver client and the objects table
        self.objects: dict[str, tuple[int, int]] = {}  # path -> (obj id, expected crc)
        self.sizes: dict[str, int] = {}
        self.content: dict[str, Content] = {}  # path -> what the GPU thread last wrote
        self.maybe: dict[str, tuple[int, int]] = {}  # path -> the write in flight (id, gen)
        self.stop = threading.Event()

    def _drv_call(self, stack: Stack, op: str, args: dict[str, Any]) -> Any:
        with self.lock:
            return stack.drv.call(op, args)

    def gpu(self, stack: Stack) -> None:
        rng = random.Random(self.seed + 1)
        last = time.monotonic()
        while not self.stop.is_set():
            try:
                with self.lock:
                    paths = list(self.objects)
                if len(paths) < 40 or rng.random() < 0.25:
                    size = rng.choice([64, 256, 1024, 2048]) << 10
                    r = self._drv_call(stack, "create", {"size": size})
                    with self.lock:
                        self.objects[r["path"]] = (r["obj"], zlib.crc32(bytes(size)))
                        self.sizes[r["path"]] = size
                        self.content[r["path"]] = None
                    self.report.gpu_objects += 1
                    paths.append(r["path"])
                if rng.random() < 0.25 and len(paths) > 8:
                    p = rng.choice(paths)
                    with self.lock:
                        oid, _ = self.objects.pop(p)
                        self.content.pop(p, None)
                        self.maybe.pop(p, None)
                        stack.drv.call("close", {"obj": oid})
                    continue
                batch = rng.sample(paths, min(len(paths), rng.randrange(1, 4)))
                long = rng.random() < 0.1  # longer than SYNC_LIGHT waits: refused, or waited
                ms = rng.uniform(600, 900) if long else rng.uniform(1, 30)
                gen = rng.randrange(1, 1 << 30)
                with self.lock:
                    batch = [p for p in batch if p in self.objects]
                    # If the driver dies mid-call the batch may or may not have run, or may
                    # have been cut inside an object: see torn_batch.
                    for p in batch:
                        self.maybe[p] = (self.objects[p][0], gen)
                    ids = [self.objects[p][0] for p in batch]
                    args = {"objs": ids, "duration_ms": ms, "write": True, "generation": gen}
                    r = stack.drv.call("exec", args)
                    # Modelled time follows the wall clock here: batches end, waits are due.
                    now = time.monotonic()
                    stack.core.call("advance", {"seconds": now - last})
                    last = now
                    for p in batch:
                        oid, _ = self.objects[p]
                        self.objects[p] = (oid, r["checksums"][str(oid)])
                        self.content[p] = self.maybe.pop(p)
                self.report.gpu_batches += 1
            except (CallError, OSError, KeyError) as e:
                if self.stop.is_set():
                    return
                try:
                    self._recover_driver(stack, f"{type(e).__name__}: {e}")
                except (CallError, OSError, StackError) as e2:
                    self.report.errors.append(f"driver restart failed: {e2}")
                    return
            time.sleep(0.005)

    def _recover_driver(self, stack: Stack, why: str) -> None:
        """The driver died (we killed it): start a new one, take every object back."""
        with self.lock:
            if stack.driver_proc().poll() is None:
                try:
                    stack.drv.call("stats", {})
                    return  # a transient error, the driver is fine
                except (CallError, OSError):
                    pass
            for attempt in range(5):  # the fault thread may kill it again while it starts
                try:
                    stack.restart_driver()
                    break
                except StackError:
                    if attempt == 4:
                        raise
            for p in list(self.objects):
                r = stack.drv.call("open", {"path": p})
                data = (stack.mountpoint / p.lstrip("/")).read_bytes()
                self.report.objects_checked += 1
                old = _render(self.content[p], self.sizes[p])
                flight = self.maybe.pop(p, None)
                new = old if flight is None else _render(flight, self.sizes[p])
                verdict = torn_batch(data, old, new)
                if verdict is None:
                    self.report.objects_bad += 1
                    bad = _pages_neither(data, old, new)
                    self.report.errors.append(
                        f"{p}: content changed across a driver kill ({bad} pages hold"
                        " neither the old content nor that of the batch in flight)"
                    )
                elif verdict == "torn":
                    self.report.torn_objects += 1
                self.content[p] = {"old": self.content[p], "new": flight}.get(verdict or "", data)
                self.objects[p] = (r["obj"], zlib.crc32(data))

    def faults(self, stack: Stack) -> None:
        rng = random.Random(self.seed + 2)
        # Every kind of fault comes up in each round of four (in a random order), one every
        # 1-2.5 s, so that even a short run kills, slows, busies and compacts.
        kinds: list[float] = []
        while not self.stop.wait(rng.uniform(1.0, 2.5)):
            if not kinds:
                kinds = [0.2, 0.55, 0.8, 0.95]
                rng.shuffle(kinds)
            what = kinds.pop()
            if what < 0.4:
                # Half the time the driver that comes back answers the core slowly (longer
                # than the callback timeout): callbacks time out, nothing may be lost.
                slow = rng.random() < 0.5
                os.environ["GEMFS_DRIVER_ANSWER_DELAY_MS"] = "800" if slow else "0"
                stack.driver_proc().send_signal(signal.SIGKILL)
                self.report.driver_kills += 1
            elif what < 0.7:
                proc = next((p for n, p in stack.procs if n == "compactor"), None)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    self.report.compactor_kills += 1
                    stack.procs.remove(("compactor", proc))
                stack.start_compactor(proactiveness=60, interval_ms=200)
            else:
                if what < 0.85:
                    # Keep many objects busy, then compact synchronously: the callbacks wait
                    # for the GPU (modelled time).
                    try:
                        with self.lock:
                            live = [oid for oid, _crc in self.objects.values()]
                            ids = rng.sample(live, min(len(live), 32))
                            if ids:
                                stack.drv.call("exec", {"objs": ids, "duration_ms": 1500})
                    except (CallError, OSError):
                        pass  # the driver may be down; the GPU thread restarts it
                try:
                    stack.compact_once()
                    self.report.compactions += 1
                except StackError as e:
                    self.report.errors.append(str(e))

    def run(self) -> StressReport:
        t0 = time.monotonic()
        with Stack("128MiB", self.design, driver_policy=self.policy) as stack:
            stack.start_compactor(proactiveness=60, interval_ms=200)
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            stop_at = time.monotonic() + self.seconds
            procs = [
                ctx.Process(
                    target=worker, args=(str(stack.mountpoint), self.seed * 100 + i, stop_at, q)
                )
                for i in range(self.workers)
            ]
            for p in procs:
                p.start()
            threads = [
                threading.Thread(target=self.gpu, args=(stack,), daemon=True),
                threading.Thread(target=self.faults, args=(stack,), daemon=True),
            ]
            for t in threads:
                t.start()
            reports = [q.get(timeout=self.seconds + 300) for _ in procs]
            for p in procs:
                p.join(30)
            self.stop.set()
            for t in threads:
                t.join(120)
            rep = self.report
            for w in reports:
                rep.file_ops += w["ops"]
                rep.bytes_checked += w["bytes_checked"]
                rep.bytes_lost += w["bytes_lost"]
                rep.enospc += w["enospc"]
                rep.errors.extend(w["errors"])
            # Every GPU object against the checksum its last batch reported.
            self._recover_driver(stack, "final check")  # no-op when the driver is alive
            for path, (_oid, crc) in self.objects.items():
                data = (stack.mountpoint / path.lstrip("/")).read_bytes()
                rep.objects_checked += 1
                rep.bytes_checked += len(data)
                if zlib.crc32(data) != crc:
                    rep.objects_bad += 1
                    rep.errors.append(f"{path}: content differs from the GPU's last write")
            v = stack.drv.call("verify", {})
            rep.data_errors += int(v["data_errors"]) + int(v["bad_objects"])
            check = stack.core.call("check", {})
            if not check["ok"]:
                rep.errors.append(f"invariant: {check['error']}")
            vm = stack.core.call("stats", {})["vmstat"]
            rep.migrations = vm["pgmigrate_success"]
            rep.migrate_fail = vm["pgmigrate_fail"]
            rep.callbacks = vm["gem_migrate_callbacks"] + vm["gem_invalidate_callbacks"]
            rep.callback_timeouts = vm["gem_callback_timeouts"]
            rep.aborted = vm["pgmigrate_aborted"]
            rep.dropped_objects = vm.get("gem_objects_dropped", 0)
            if not os.path.ismount(stack.mountpoint):
                rep.errors.append("the mount went away")
        rep.seconds = time.monotonic() - t0
        return rep


def run_stress(
    seconds: float,
    design: Design,
    workers: int = 3,
    seed: int = 1,
    policy: DriverPolicy = DriverPolicy.WAIT_IDLE,
) -> StressReport:
    os.environ.setdefault("GEMFS_CALLBACK_TIMEOUT", "0.5")
    os.environ["GEMFS_DRIVER_ANSWER_DELAY_MS"] = "0"
    try:
        return Stress(seconds, design, workers, seed, policy).run()
    finally:
        os.environ.pop("GEMFS_DRIVER_ANSWER_DELAY_MS", None)
