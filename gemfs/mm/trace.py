"""The model's tracepoints, printed as the kernel's ftrace prints them (sans-IO).

A :class:`Tracer` turns the model's events into lines of the kernel's ``trace`` text, field for
field: the same header (``comm-pid [cpu] flags timestamp: event: ``), the same ``TP_printk``
formats (include/trace/events/kmem.h, compaction.h, migrate.h), so a parser written for a
kernel's trace reads the model's unchanged (tests/test_trace.py checks this against lines from a
real trace). It keeps the newest lines in a bounded buffer and counts what it dropped, like the
kernel's ring buffer in overwrite mode; readers take lines from a cursor (``.gemfs/trace_pipe``)
and sinks get every line as it is made (``gemfs run --trace FILE``). No I/O here.

Who the lines say made them (the ``comm-pid`` of each line) follows one rule, :func:`task_of`:
the comm is the design, the pid the seed of the run (0 when tracing was turned on by hand with
the mount's ``tracing_on``). Whoever turns tracing on passes the seed: ``gemfs run --trace``
in process, the control socket's ``trace`` op on the stack; so the same run prints the same lines
on both backends.

Printings that differ between kernels are options; the defaults are Debian 12's 6.1 (the QEMU
guest's kernel): ``pfn`` hexadecimal (``pfn=0x1e06b7``; older kernels print it in decimal), a
flags column of five characters (``.....``; four on older kernels), and ``mm_migrate_pages``
without the ``nr_split=`` that newer kernels (6.18 here) print after ``nr_thp_split=``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from gemfs.mm.compaction import CompactResult
from gemfs.mm.types import PAGEBLOCK_NR_PAGES, PAGEBLOCK_ORDER, Design, MigrateMode, MigrateType

MIGRATE_MODES = {
    MigrateMode.ASYNC: "MIGRATE_ASYNC",
    MigrateMode.SYNC_LIGHT: "MIGRATE_SYNC_LIGHT",
    MigrateMode.SYNC: "MIGRATE_SYNC",
}
COMPACT_STATUS = {
    0: "not_suitable_zone",
    1: "skipped",
    2: "deferred",
    3: "no_suitable_page",
    4: "continue",
    5: "complete",
    6: "partial_skipped",
    7: "contended",
    8: "success",
}
STATUS_OF = {name: value for value, name in COMPACT_STATUS.items()}
GFP_FOR_TYPE = {
    MigrateType.UNMOVABLE: "GFP_KERNEL",
    MigrateType.MOVABLE: "GFP_HIGHUSER_MOVABLE",
    MigrateType.RECLAIMABLE: "GFP_HIGHUSER|__GFP_RECLAIMABLE",
}
"""What the model's allocations would have asked for (i915 GEM pages: GFP_HIGHUSER|RECLAIMABLE)."""

Sink = Callable[[str], None]
LOST_EVENTS = re.compile(r"CPU:(\d+) \[LOST (\d+) EVENTS\]$")
"""trace_pipe's line where the buffer overwrote lines no reader had taken (:func:`lost_line`)."""


def lost_line(cpu: int, lost: int) -> str:
    return f"CPU:{cpu} [LOST {lost} EVENTS]"


TASK_COMM_LEN = 16
"""The kernel's comm holds 15 characters and a NUL; a longer name is cut, as the kernel cuts it."""


def task_of(design: Design, seed: int = 0) -> tuple[str, int]:
    """The ``comm`` and ``pid`` a trace's lines carry: the design's name and the run's seed (0
    when no run turned tracing on). The one rule both backends and the mount follow."""
    if seed < 0:
        raise ValueError(f"a seed is not negative: {seed}")
    return design.value[: TASK_COMM_LEN - 1], seed


def hashed_pointer(pfn: int) -> str:
    """``%p`` of the page's struct page as ftrace prints it with ``hash-ptr`` on: 16 hex digits
    of a keyed hash, the upper half zero. Deterministic here, so two runs give the same text."""
    digest = hashlib.blake2b(pfn.to_bytes(8, "little"), digest_size=4, key=b"gemfs").digest()
    return f"{int.from_bytes(digest, 'little'):016x}"


class CompactionPass(Protocol):
    """What mm_compaction_begin/end print of a pass: a
    :class:`~gemfs.mm.compaction.CompactionPolicy`, or :class:`PassPoint` (a pass that a
    compactor process runs, as it tells the core)."""

    @property
    def migrate_block(self) -> int: ...
    @property
    def free_block(self) -> int: ...
    @property
    def mode(self) -> MigrateMode: ...
    @property
    def result(self) -> CompactResult: ...


@dataclass(frozen=True, slots=True)
class PassPoint:
    """A compaction pass's scanners, mode and result at its start or end, as values."""

    migrate_block: int
    free_block: int
    mode: MigrateMode
    result: CompactResult = CompactResult.CONTINUE


class Tracer:
    """Formats the model's events and keeps the newest ``capacity`` lines."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        comm: str = "gemfs",
        pid: int = 1,
        cpu: int = 0,
        capacity: int = 65536,
        pfn_hex: bool = True,
        flags_width: int = 5,
        nr_split: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.clock = clock
        self.comm, self.pid, self.cpu = comm, pid, cpu
        self.pfn_hex = pfn_hex
        self.nr_split = nr_split
        self.flags = "." * flags_width
        self.capacity = capacity
        self.lines: deque[str] = deque(maxlen=capacity)
        self.written = 0  # every line ever made; the buffer holds the last len(lines)
        self.overrun = 0  # lines the full buffer overwrote (consumed ones are not counted)
        self.sinks: list[Sink] = []

    @property
    def lost(self) -> int:
        """Lines overwritten before any reader took them from the buffer (the ring's overrun)."""
        return self.overrun

    def read(self, cursor: int) -> tuple[list[str], int, int]:
        """Lines written since ``cursor`` (a count of lines): (lines, new cursor, lines lost)."""
        first = self.written - len(self.lines)
        lost = max(0, first - cursor)
        start = max(cursor, first) - first
        return list(itertools.islice(self.lines, start, None)), self.written, lost

    def consume(self, cursor: int) -> tuple[list[str], int, int]:
        """:meth:`read`, and drop the lines returned from the buffer, as a read of the kernel's
        trace_pipe does: a consuming reader keeps the buffer (and its memory) small."""
        got = self.read(cursor)
        self.lines.clear()  # every line is now at most ``written``: read, now or before
        return got

    def emit(self, event: str, body: str) -> str:
        t = self.clock()
        secs = int(t)
        usecs = round((t - secs) * 1e6)
        if usecs >= 1_000_000:
            secs, usecs = secs + 1, usecs - 1_000_000
        line = (
            f"{self.comm:>16}-{self.pid:<7d} [{self.cpu:03d}] {self.flags} "
            f"{secs:5d}.{usecs:06d}: {event}: {body}"
        )
        if len(self.lines) == self.capacity:
            self.overrun += 1
        self.lines.append(line)
        self.written += 1
        for sink in self.sinks:
            sink(line)
        return line

    def _pfn(self, pfn: int) -> str:
        return f"0x{pfn:x}" if self.pfn_hex else str(pfn)

    # -- kmem ---------------------------------------------------------------------------------
    def mm_page_alloc(self, pfn: int, order: int, mt: int, gfp: str | None = None) -> None:
        gfp = gfp or GFP_FOR_TYPE.get(MigrateType(mt), "GFP_KERNEL")
        self.emit(
            "mm_page_alloc",
            f"page={hashed_pointer(pfn)} pfn={self._pfn(pfn)} order={order} "
            f"migratetype={mt} gfp_flags={gfp}",
        )

    def mm_page_free(self, pfn: int, order: int) -> None:
        self.emit("mm_page_free", f"page={hashed_pointer(pfn)} pfn={self._pfn(pfn)} order={order}")

    def mm_page_alloc_extfrag(
        self, pfn: int, alloc_order: int, fallback_order: int, alloc_mt: int, fallback_mt: int,
        change_ownership: bool,
    ) -> None:  # fmt: skip
        self.emit(
            "mm_page_alloc_extfrag",
            f"page={hashed_pointer(pfn)} pfn={self._pfn(pfn)} alloc_order={alloc_order} "
            f"fallback_order={fallback_order} pageblock_order={PAGEBLOCK_ORDER} "
            f"alloc_migratetype={alloc_mt} fallback_migratetype={fallback_mt} "
            f"fragmenting={int(fallback_order < PAGEBLOCK_ORDER)} "
            f"change_ownership={int(change_ownership)}",
        )

    def page_alloc_run(self, pfn: int, n: int, mt: int) -> None:
        """``n`` order-0 allocations from ``pfn`` up (a bulk populate, as the kernel traces it)."""
        for p in range(pfn, pfn + n):
            self.mm_page_alloc(p, 0, mt)

    def page_free_run(self, pfns: Sequence[int]) -> None:
        """Order-0 frees of these frames (the kernel frees folios of file pages page by page)."""
        for p in pfns:
            self.mm_page_free(p, 0)

    def extfrag(
        self, pfn: int, order: int, fallback_order: int, alloc_mt: int, fallback_mt: int,
        pageblock_mt: npt.NDArray[np.uint8],
    ) -> None:  # fmt: skip
        """After a fallback: ``change_ownership`` is whether the block is now the request's."""
        owned = int(pageblock_mt[pfn >> PAGEBLOCK_ORDER]) == int(alloc_mt)
        self.mm_page_alloc_extfrag(pfn, order, fallback_order, alloc_mt, fallback_mt, owned)

    # -- migrate ------------------------------------------------------------------------------
    def mm_migrate_pages(
        self, succeeded: int, failed: int, mode: MigrateMode, reason: str = "compaction"
    ) -> None:
        self.emit(
            "mm_migrate_pages",
            f"nr_succeeded={succeeded} nr_failed={failed} nr_thp_succeeded=0 nr_thp_failed=0 "
            f"nr_thp_split=0 {'nr_split=0 ' if self.nr_split else ''}"
            f"mode={MIGRATE_MODES[mode]} reason={reason}",
        )

    def migrate_batch(self, succeeded: int, failed: int, mode: MigrateMode) -> None:
        """One migration batch: the kernel prints mm_compaction_migratepages, then
        mm_migrate_pages."""
        self.mm_compaction_migratepages(succeeded, failed)
        self.mm_migrate_pages(succeeded, failed, mode)

    # -- compaction ---------------------------------------------------------------------------
    def mm_compaction_begin(
        self, zone_start: int, migrate_pfn: int, free_pfn: int, zone_end: int, sync: bool
    ) -> None:
        self.emit(
            "mm_compaction_begin",
            f"zone_start=0x{zone_start:x} migrate_pfn=0x{migrate_pfn:x} free_pfn=0x{free_pfn:x} "
            f"zone_end=0x{zone_end:x}, mode={'sync' if sync else 'async'}",
        )

    def mm_compaction_end(
        self,
        zone_start: int,
        migrate_pfn: int,
        free_pfn: int,
        zone_end: int,
        sync: bool,
        status: int,
    ) -> None:
        self.emit(
            "mm_compaction_end",
            f"zone_start=0x{zone_start:x} migrate_pfn=0x{migrate_pfn:x} free_pfn=0x{free_pfn:x} "
            f"zone_end=0x{zone_end:x}, mode={'sync' if sync else 'async'} "
            f"status={COMPACT_STATUS[status]}",
        )

    def compaction_begin(self, policy: CompactionPass, nr_pages: int) -> None:
        self.mm_compaction_begin(
            0,
            policy.migrate_block * PAGEBLOCK_NR_PAGES,
            policy.free_block * PAGEBLOCK_NR_PAGES,
            nr_pages,
            policy.mode != MigrateMode.ASYNC,
        )

    def compaction_end(self, policy: CompactionPass, nr_pages: int) -> None:
        status = STATUS_OF[policy.result.value]
        self.mm_compaction_end(
            0,
            policy.migrate_block * PAGEBLOCK_NR_PAGES,
            policy.free_block * PAGEBLOCK_NR_PAGES,
            nr_pages,
            policy.mode != MigrateMode.ASYNC,
            status,
        )

    def mm_compaction_migratepages(self, migrated: int, failed: int) -> None:
        self.emit("mm_compaction_migratepages", f"nr_migrated={migrated} nr_failed={failed}")
