"""Text of the ``.gemfs`` directory: the pool's /proc and /sys files (pure: no FUSE, no trio).

The stats files use the kernel's own formats (``gemfs.mm.vmstat``); this module adds the ones the
kernel has no twin for (``objects``, ``pool``), the knobs' value parsers, and parsers back from
the text for tests and tools that read a mount.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from gemfs.mm.core import MemoryManager
from gemfs.mm.pool import I64
from gemfs.mm.trace import Tracer, lost_line, task_of
from gemfs.mm.types import PAGE_SIZE, format_size

OBJECTS_HEADER = "id\tpath\tpages\tpinned\tmigratetype"


def escape_path(path: str) -> str:
    r"""Octal-escape tab, newline and backslash, as /proc/mounts does (``\011``, ...)."""
    return path.replace("\\", "\\134").replace("\t", "\\011").replace("\n", "\\012")


def unescape_path(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def format_objects(mm: MemoryManager) -> str:
    """One line per object: id, path, resident pages, pinned pages, migrate type."""
    lines = [OBJECTS_HEADER]
    pin = mm.pool.pin
    for obj in mm.objects.values():
        _, pfns = obj.resident()
        pinned = int(np.count_nonzero(pin[pfns]))
        fields = (obj.id, escape_path(obj.path), len(pfns), pinned, obj.migratetype.name.lower())
        lines.append("\t".join(str(f) for f in fields))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ObjectLine:
    id: int
    path: str
    pages: int
    pinned: int
    migratetype: str


def parse_objects(text: str) -> list[ObjectLine]:
    out: list[ObjectLine] = []
    for line in text.splitlines():
        if not line or line == OBJECTS_HEADER:
            continue
        oid, path, pages, pinned, mt = line.split("\t")
        out.append(ObjectLine(int(oid), unescape_path(path), int(pages), int(pinned), mt))
    return out


def format_pool(mm: MemoryManager, extra: Mapping[str, str] | None = None) -> str:
    """``key value`` lines: the pool's geometry, design and headline numbers (+ ``extra``)."""
    p = mm.pool
    rows = {
        "size": p.size,
        "size_human": format_size(p.size),
        "page_size": PAGE_SIZE,
        "pages": p.nr_pages,
        "pageblocks": p.nr_pageblocks,
        "s_maxbytes": p.s_maxbytes,  # the largest file: write/truncate beyond it is EFBIG
        "design": mm.design.value,
        "free_pages": mm.buddy.free_pages,
        "objects": len(mm.objects),
        "fragmentation_score": mm.fragmentation_score(),
        **(extra or {}),
    }
    return "".join(f"{k} {v}\n" for k, v in rows.items())


def parse_pool(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value
    return out


def format_frames(pages: I64) -> str:
    """A page table as compact text: ``a-b`` a run of consecutive frames, ``a`` one frame,
    ``hole*n`` n pages without a frame; comma separated, in page order."""
    if len(pages) == 0:
        return ""
    hole = pages < 0
    # A run continues while the next page is the next frame, or both are holes.
    step = np.diff(pages)
    cont = (step == 1) & ~hole[1:] & ~hole[:-1] | (hole[1:] & hole[:-1])
    starts = np.concatenate(([0], np.flatnonzero(~cont) + 1))
    ends = np.concatenate((starts[1:], [len(pages)]))
    parts: list[str] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first = int(pages[s])
        if first < 0:
            parts.append(f"hole*{e - s}")
        elif e - s == 1:
            parts.append(str(first))
        else:
            parts.append(f"{first}-{first + e - s - 1}")
    return ",".join(parts)


def parse_frames(text: str) -> list[int]:
    """Back from format_frames: one frame number per page, -1 for a hole."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        if part.startswith("hole*"):
            out.extend([-1] * int(part[5:]))
        elif "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def parse_int(text: str, lo: int, hi: int) -> int:
    """A knob's value: one integer in [lo, hi] (surrounding white space allowed)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"not an integer: {text.strip()!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{value} out of range {lo}..{hi}")
    return value


class TracePipe:
    """``.gemfs/tracing_on`` and ``.gemfs/trace_pipe``: the model's tracepoints on the mount.

    Writing 1 to tracing_on gives the pool a :class:`gemfs.mm.trace.Tracer` (0 takes it away);
    the control socket's ``trace`` op does the same with a run's seed (:meth:`enable`), so the
    lines carry the label :func:`gemfs.mm.trace.task_of` gives. Reading trace_pipe consumes
    what was traced since the last read, in the kernel's text format, with a
    ``CPU:0 [LOST N EVENTS]`` line where the bounded buffer overwrote lines before anyone read
    them. As with the kernel's, a read that finds nothing new waits for the next line: that
    waiting is the FUSE adapter's (gemfs/fs.py); here ``notify``, when set, is called on every
    line the tracer makes, so the adapter can wake its readers."""

    def __init__(self, mm: MemoryManager, capacity: int = 1 << 16) -> None:
        self.mm = mm
        self.capacity = capacity
        self.cursor = 0
        self.notify: Callable[[], None] | None = None

    def show_on(self) -> str:
        return f"{int(self.mm.tracer is not None)}\n"

    def store_on(self, text: str) -> None:
        on = parse_int(text, 0, 1)
        if on and self.mm.tracer is None:
            self.enable()
        elif not on:
            self.disable()

    def enable(self, seed: int = 0, capacity: int | None = None) -> None:
        """Trace from now on, the lines labelled for the run of this seed (a new buffer of
        ``capacity`` lines, the default if None)."""
        mm = self.mm
        comm, pid = task_of(mm.design, seed)
        tracer = Tracer(
            lambda: mm.clock.now, comm=comm, pid=pid, capacity=capacity or self.capacity
        )
        tracer.sinks.append(self._line)
        mm.tracer = tracer
        self.cursor = 0

    def disable(self) -> None:
        self.mm.tracer = None

    def _line(self, _line: str) -> None:
        if self.notify is not None:
            self.notify()

    def pending(self) -> bool:
        """Is there anything for a reader (lines, or a count of lost ones)?"""
        tracer = self.mm.tracer
        return tracer is not None and tracer.written > self.cursor

    def take(self) -> str:
        tracer = self.mm.tracer
        if tracer is None:
            return ""
        lines, self.cursor, lost = tracer.consume(self.cursor)
        head = lost_line(tracer.cpu, lost) + "\n" if lost else ""
        return head + "".join(line + "\n" for line in lines)
