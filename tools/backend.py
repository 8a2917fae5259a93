"""What the workload player drives: a small synchronous interface to "a pool with a driver".

:class:`Backend` is implemented in process by :class:`tools.inproc_backend.InprocBackend`
(the model, the driver's logic and kcompactd's policy on a simulated clock) and, for the real
multi-process stack (mount + driver daemon + compactor), by ``tools.stack_backend``. The player
calls nothing else, so the same workload plays the same way against both.

Rules every implementation follows:

- Calls are synchronous and happen one at a time, in workload order.
- Handles are opaque ints chosen by the backend, unique within one backend's life.
- ``create``/``page_cache`` raise :class:`gemfs.mm.OutOfMemory` when the pool cannot hold the
  object (ENOSPC); nothing is left allocated. ``alloc_noise`` and ``probe`` report failure by
  their return value instead.
- Time is modelled, the same on both: the pool's clock (:class:`gemfs.mm.costs.Clock`), moved
  by ``advance`` and by what allocating tasks wait; the compactor wakes on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NewType, NotRequired, Protocol, TypedDict

from gemfs.mm.trace import Sink
from gemfs.mm.types import MigrateType

Handle = NewType("Handle", int)
# (succeeded, modelled latency in µs, it needed direct compaction)
ProbeResult = tuple[bool, float, bool]


class GpuSample(TypedDict):
    """The driver's side of the story (driver.gem.GpuStats)."""

    batches: int
    stall_s: float  # modelled GPU stall caused by migration (gemfs.mm.costs explains it)
    data_errors: int  # GPU reads that did not match what the driver last wrote
    migrate_calls: int
    migrate_eagain: int  # pages answered -EAGAIN (busy)
    invalidations: int  # notifier design
    refaults: int  # re-binds after an invalidation (notifier design)


class Sample(TypedDict):
    """The pool's state at one moment, as ``sample()`` returns it."""

    time_s: float  # the backend's clock
    pool_pages: int
    free_pages: int
    buddyinfo: list[int]  # free blocks per order 0..MAX_ORDER (/proc/buddyinfo)
    score: int  # fragmentation score 0..100 (100 x unusable index at order 9)
    vmstat: dict[str, int]  # /proc/vmstat-style counters (gemfs.mm.vmstat.VMSTAT_COUNTERS)
    pageblocks: dict[str, int]  # pageblocks per migrate type: unmovable, movable, reclaimable
    mixed_pageblocks: int  # pageblocks holding allocations of a type other than their own
    pageblock_types: list[int]  # per pageblock: its MigrateType value
    pageblock_states: list[int]  # per pageblock: 0 free, 1 partly used, 2 full
    callbacks: int  # owner callbacks made (migrate + invalidate)
    callback_p50_us: float  # callback latency percentiles (0 when there were none)
    callback_p99_us: float
    gpu: GpuSample
    costs: dict[str, float]  # gemfs.mm.costs.Ledger.to_json(): what migration cost so far
    cost_table: dict[str, float]  # the CostTable in use
    pageblock_mixed: NotRequired[list[int]]  # indices of mixed pageblocks, when known


class Backend(Protocol):
    """A pool under one design, driven by the workload player."""

    def create(self, size: int, tag: str, bind: bool) -> Handle:
        """A GEM object of ``size`` bytes. ``bind``: the GPU binds it now (pinned until closed).

        Raises OutOfMemory when it does not fit.
        """
        ...

    def close(self, handle: Handle) -> None:
        """Free a GEM object or a page-cache file (waits for its GPU work; drops its pins)."""
        ...

    def execute(
        self,
        handles: Sequence[Handle],
        duration_s: float,
        write: bool,
        *,
        keep_s: float = 0.0,
        interval_s: float = 0.0,
    ) -> None:
        """Submit one GPU batch over these objects, binding (pinning) those not bound.

        The objects stay busy for ``duration_s`` of backend time; ``write`` changes their contents.
        ``keep_s`` > 0: the batch goes on being resubmitted every ``interval_s`` for ``keep_s``
        more (a frame loop: its objects and the device stay busy while later phases run).
        """
        ...

    def loop_tick(self) -> int:
        """The frame loop's submissions up to now re-fault the loop's objects that lost their
        GTT since (an i915-2016 drop, a notifier invalidation); returns how many. The player
        asks at each phase: between phases the loop's objects come back, not within one."""
        ...

    def page_cache(self, size: int) -> Handle:
        """An unpinned MOVABLE file of ``size`` bytes that is not the driver's (can always move).

        Raises OutOfMemory when it does not fit.
        """
        ...

    def alloc_noise(self, order: int, mt: MigrateType) -> Handle | None:
        """A kernel allocation of 2**order pages of this migrate type; None when it fails."""
        ...

    def free_noise(self, handle: Handle) -> None:
        """Free a noise allocation."""
        ...

    def probe(self, order: int, gfp: str = "thp") -> ProbeResult:
        """A high-order allocation with direct compaction; the block is kept until released.
        ``gfp``: whose slow-path rules (gemfs.mm.page_alloc.AllocKind: thp, hugetlb, kernel).

        Returns whether it succeeded, the modelled latency the allocating task saw, and
        whether it took a direct compaction to succeed."""
        ...

    def release_probes(self) -> None:
        """Free every block that successful probes hold."""
        ...

    def kswapd_sleep(self) -> None:
        """Page cache was reclaimed (by kswapd, woken by the pressure): kswapd goes back to
        sleep, flushing the compaction skip hints as the kernel's does."""
        ...

    def compact(self) -> None:
        """Compact the whole pool now (``echo 1 > compact_memory``)."""
        ...

    def advance(self, seconds: float) -> None:
        """Let time pass; the proactive compactor wakes each interval and runs when due."""
        ...

    def sample(self, *, full: bool = True) -> Sample:
        """The pool's state now. Without ``full``, ``pageblock_types`` and ``pageblock_states``
        may be empty: a light sample costs O(what changed), not O(pool)."""
        ...

    def verify(self) -> int:
        """Data errors: GPU reads that mismatched during the run plus objects whose content
        differs now from what their owner last wrote (GEM objects and page-cache files)."""
        ...

    def trace(self, seed: int, sink: Sink) -> None:
        """From now on, every tracepoint of the model to ``sink``, one line of the kernel's
        ftrace text each (gemfs.mm.trace), labelled for the run of ``seed``
        (:func:`gemfs.mm.trace.task_of`); all of them by the end of :meth:`teardown`, in the
        order the model made them."""
        ...

    def teardown(self) -> None:
        """Release everything (idempotent)."""
        ...
