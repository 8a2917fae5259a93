"""gemfs record: trace a real kernel's page allocator with tracefs, no trace-cmd needed.

A private tracefs instance (``instances/gemfs-record-PID``: its own ring buffer, so the global
buffer and anybody else's tracing are left alone) with the page allocator's events on. Its
``trace_pipe`` is drained into a gzip'd record (format: tools/tracefile.py) while /proc/buddyinfo,
pagetypeinfo, vmstat and zoneinfo are snapshotted at the start, every ``interval`` and at the end;
each snapshot is announced in the trace through the instance's ``trace_marker``, so the replay
knows which events came before it. The ring buffer is bounded (``buffer_kb`` per CPU); what it
overwrote before being drained is counted from ``per_cpu/cpuN/stats`` and written to the record
(``#@lost N``).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from tools.tracefile import RECORD_MAGIC, SNAPSHOT_MARK

EVENTS = (
    "kmem:mm_page_alloc",
    "kmem:mm_page_free",
    "kmem:mm_page_alloc_extfrag",
    "compaction:mm_compaction_begin",
    "compaction:mm_compaction_end",
    "compaction:mm_compaction_try_to_compact_pages",
    "compaction:mm_compaction_finished",
    "compaction:mm_compaction_suitable",
    "compaction:mm_compaction_deferred",
    "compaction:mm_compaction_defer_compaction",
    "compaction:mm_compaction_defer_reset",
    "compaction:mm_compaction_migratepages",
    "compaction:mm_compaction_isolate_migratepages",
    "compaction:mm_compaction_isolate_freepages",
    "compaction:mm_compaction_fast_isolate_freepages",
    "compaction:mm_compaction_kcompactd_wake",
    "compaction:mm_compaction_kcompactd_sleep",
    "compaction:mm_compaction_wakeup_kcompactd",
    "migrate:mm_migrate_pages",
    "i915:i915_gem_object_create",
    "i915:i915_gem_object_destroy",
    "xe:xe_bo_create",
    "amdgpu:amdgpu_bo_create",
)


SNAPSHOT_FILES = ("/proc/buddyinfo", "/proc/pagetypeinfo", "/proc/vmstat", "/proc/zoneinfo")
TRACEFS = Path("/sys/kernel/tracing")
DEFAULT_BUFFER_KB = 8192
"""Ring buffer per CPU: 8 MiB holds ~200,000 page events between two drains."""


class RecordUnavailable(RuntimeError):
    """Recording is not possible here (one line for the user: no root, no tracefs)."""


def find_tracefs(path: Path = TRACEFS, *, mount: bool = True) -> Path:
    """The tracefs mount, mounted here if needed (root only); RecordUnavailable otherwise."""
    if os.geteuid() != 0:
        raise RecordUnavailable(
            "gemfs record needs root: tracefs (/sys/kernel/tracing) is readable by root only"
        )
    if (path / "trace_pipe").exists():
        return path
    legacy = Path("/sys/kernel/debug/tracing")
    if (legacy / "trace_pipe").exists():
        return legacy
    if mount and path.is_dir():
        proc = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(path)], capture_output=True, text=True
        )
        if proc.returncode == 0 and (path / "trace_pipe").exists():
            return path
        why = proc.stderr.strip() or f"mount exited with {proc.returncode}"
        raise RecordUnavailable(f"tracefs is not mounted at {path} and mounting it failed: {why}")
    raise RecordUnavailable(f"no tracefs at {path} (is CONFIG_TRACING enabled?)")


@dataclass
class RecordStats:
    path: Path
    seconds: float = 0.0
    events: int = 0
    bytes_in: int = 0
    snapshots: int = 0
    lost: int = 0
    enabled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    command_status: int | None = None


KPAGEFLAGS = Path("/proc/kpageflags")
KPF_BUDDY = 10


def kpageflags_free_runs(pfn_range: tuple[int, int] | None = None, path: Path = KPAGEFLAGS) -> str:
    """Runs of pages on the buddy free lists, from /proc/kpageflags (KPF_BUDDY is set on every
    page of a free block, not on pages in per-CPU lists): ``start_pfn pages`` per line. The
    kernel's exact free layout, which buddyinfo only counts; the replay uses it to start from
    the kernel's own layout and to compare a window of a zone too large to model whole."""
    chunks = []
    lo, hi = pfn_range or (0, 1 << 62)
    left = (hi - lo) * 8
    with path.open("rb", buffering=0) as f:  # read(2) of a size it takes; -1 gives EINVAL
        f.seek(lo * 8)
        while left > 0 and (chunk := f.read(min(1 << 24, left))):
            chunks.append(chunk)
            left -= len(chunk)
    data = b"".join(chunks)
    flags = np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64)
    free = ((flags >> np.uint64(KPF_BUDDY)) & np.uint64(1)).astype(np.int8)
    edges = np.diff(np.concatenate(([0], free, [0])))
    starts = np.flatnonzero(edges == 1) + lo
    ends = np.flatnonzero(edges == -1) + lo
    return "".join(f"{s} {e - s}\n" for s, e in zip(starts.tolist(), ends.tolist(), strict=True))


def snapshot_block(
    index: int,
    files: Sequence[str] = SNAPSHOT_FILES,
    *,
    kpageflags: bool = False,
    pfn_range: tuple[int, int] | None = None,
) -> str:
    """The ``#@snapshot`` block of a record (see tools/tracefile.py) with the files as read now;
    with ``kpageflags``, also the free runs (``#@file kpageflags-free``)."""
    parts = [f"#@snapshot {index}"]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        parts.append(f"#@file {name}")
        parts.append(text.rstrip("\n"))
    if kpageflags:
        try:
            runs = kpageflags_free_runs(pfn_range)
        except OSError:
            runs = None
        if runs is not None:
            parts.append("#@file kpageflags-free")
            parts.append(runs.rstrip("\n"))
    parts.append("#@end")
    return "\n".join(parts) + "\n"


class Recorder:
    """Record into a private tracefs instance (the global buffer and other users' tracing are
    left alone), drain its trace_pipe into a gzip'd record, snapshot /proc every ``interval``."""

    def __init__(
        self,
        out: Path,
        *,
        tracefs: Path | None = None,
        buffer_kb: int = DEFAULT_BUFFER_KB,
        interval: float = 1.0,
        events: Sequence[str] = EVENTS,
        progress: Callable[[RecordStats], None] | None = None,
        kpageflags: bool = False,
        pfn_range: tuple[int, int] | None = None,
    ) -> None:
        self.tracefs = tracefs or find_tracefs()
        self.out = out
        self.buffer_kb = buffer_kb
        self.interval = interval
        self.events = events
        self.progress = progress
        self.kpageflags = kpageflags or pfn_range is not None
        self.pfn_range = pfn_range
        self.stats = RecordStats(out)
        self.instance = self.tracefs / "instances" / f"gemfs-record-{os.getpid()}"

    def _write(self, rel: str, text: str) -> None:
        (self.instance / rel).write_text(text)

    def _setup(self) -> None:
        try:
            self.instance.mkdir()
        except OSError as exc:
            raise RecordUnavailable(
                f"cannot create tracefs instance {self.instance}: {exc}"
            ) from None
        self._write("buffer_size_kb", str(self.buffer_kb))
        for event in self.events:
            system, name = event.split(":")
            enable = self.instance / "events" / system / name / "enable"
            try:
                enable.write_text("1")
                self.stats.enabled.append(event)
            except OSError:
                self.stats.missing.append(event)
        if self.pfn_range is not None:  # only the page events of this range (kernel-side filter)
            lo, hi = self.pfn_range
            for event in self.stats.enabled:
                if event.startswith("kmem:"):
                    system, name = event.split(":")
                    where = self.instance / "events" / system / name / "filter"
                    where.write_text(f"pfn >= {lo} && pfn < {hi}")
        if not any(e.startswith("kmem:mm_page") for e in self.stats.enabled):
            raise RecordUnavailable("this kernel has no kmem:mm_page_alloc/free tracepoints")

    def _teardown(self) -> None:
        if not self.instance.exists():
            return
        with contextlib.suppress(OSError):
            self._write("tracing_on", "0")
        for event in self.stats.enabled:
            system, name = event.split(":")
            with contextlib.suppress(OSError):
                (self.instance / "events" / system / name / "enable").write_text("0")
        with contextlib.suppress(OSError):
            self.instance.rmdir()

    def _lost(self) -> int:
        lost = 0
        for stats in sorted((self.instance / "per_cpu").glob("cpu*/stats")):
            for line in stats.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("overrun", "dropped events"):
                    with contextlib.suppress(ValueError):
                        lost += int(value)
        return lost

    def run(self, duration: float | None, command: Sequence[str] = ()) -> RecordStats:
        """Record for ``duration`` seconds, or while ``command`` runs (whichever ends first)."""
        if duration is None and not command:
            raise ValueError("give a duration, a command, or both")
        self._setup()
        proc: subprocess.Popen[bytes] | None = None
        try:
            with gzip.open(self.out, "wt", compresslevel=3) as f:
                f.write(f"{RECORD_MAGIC}\n# source tracefs kernel {os.uname().release}\n")
                for event in self.stats.missing:
                    f.write(f"# event {event} not available\n")
                fd = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
                try:
                    proc = self._loop(f, fd, duration, command)
                finally:
                    os.close(fd)
                self.stats.lost = self._lost()
                f.write(f"#@lost {self.stats.lost}\n#@eof\n")
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            self._teardown()
        return self.stats

    def _loop(
        self, f: TextIO, fd: int, duration: float | None, command: Sequence[str]
    ) -> subprocess.Popen[bytes] | None:
        marker = self.instance / "trace_marker"
        rest = b""
        index = 0
        start = time.monotonic()

        every = 1

        def snap(last: bool = False) -> None:
            nonlocal index, every
            marker.write_text(f"{SNAPSHOT_MARK} {index}\n")
            t0 = time.monotonic()
            kpf = self.kpageflags and (index % every == 0 or last)
            f.write(snapshot_block(index, kpageflags=kpf, pfn_range=self.pfn_range))
            if index == 0:  # reading kpageflags is slow on a big machine: only as often as
                every = max(1, math.ceil(4 * (time.monotonic() - t0) / self.interval))  # 1/4
            index += 1
            self.stats.snapshots = index

        def drain() -> None:
            nonlocal rest
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                data = rest + chunk
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                whole = data[:cut]
                self.stats.bytes_in += len(whole)
                self.stats.events += whole.count(b"\n")
                f.write(whole.decode(errors="replace"))

        self._write("tracing_on", "1")
        snap()
        proc = subprocess.Popen(list(command)) if command else None
        next_snap = start + self.interval
        while True:
            now = time.monotonic()
            self.stats.seconds = now - start
            if proc is not None and proc.poll() is not None:
                self.stats.command_status = proc.returncode
                break
            if duration is not None and now - start >= duration:
                break
            select.select([fd], [], [], min(0.1, max(0.0, next_snap - now)))
            drain()
            if time.monotonic() >= next_snap:
                snap()
                next_snap += self.interval
                if self.progress is not None:
                    self.stats.lost = self._lost()
                    self.progress(self.stats)
        snap(last=True)  # the marker must go in while tracing is on
        self._write("tracing_on", "0")
        drain()
        if rest:
            f.write(rest.decode(errors="replace") + "\n")
        return proc
