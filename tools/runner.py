"""Runs one workload under several designs and seeds, one backend each, and collects the results.

The backend is chosen here: :class:`tools.inproc_backend.InprocBackend` for ``--inproc``;
otherwise the multi-process stack from ``tools.stack_backend.make_stack_backend(workload,
design, mount)``, imported only when asked for so the in-process path works without it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, cast

from gemfs.mm.trace import LOST_EVENTS
from gemfs.mm.types import Design
from tools.backend import Backend
from tools.inproc_backend import InprocBackend
from tools.player import Progress, RunResult, play
from tools.workload import Workload

BackendFactory = Callable[[Workload, Design], Backend]
StackFactory = Callable[[Workload, Design, str | None], Backend]


class BackendUnavailable(Exception):
    """The requested backend cannot be used here (one line for the user)."""


def inproc_factory() -> BackendFactory:
    return InprocBackend


def stack_factory(mount: str | None) -> BackendFactory:
    """The multi-process stack backend, or :class:`BackendUnavailable` if it is not there."""
    try:
        module = importlib.import_module("tools.stack_backend")
    except ImportError as e:
        raise BackendUnavailable(
            f"the multi-process stack backend is not available ({e}); use --inproc"
        ) from None
    make = getattr(module, "make_stack_backend", None)
    if make is None:
        raise BackendUnavailable(
            "tools.stack_backend has no make_stack_backend(workload, design, mount); use --inproc"
        )
    factory = cast(StackFactory, make)

    def build(workload: Workload, design: Design) -> Backend:
        return factory(workload, design, mount)

    return build


def seeded(workload: Workload, seeds: int) -> list[Workload]:
    """The workload with seeds ``seed, seed + 1, …``: ``seeds`` of them, the file's seed first."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    return [dataclasses.replace(workload, seed=workload.seed + k) for k in range(seeds)]


def run_designs(
    workload: Workload,
    designs: Sequence[Design],
    factory: BackendFactory,
    progress: Callable[[Design, int, str], None] | None = None,
    seeds: int = 1,
    jobs: int = 1,
) -> list[RunResult]:
    """Play the workload ``seeds`` times per design (seeds ``seed``, ``seed + 1``, …), each run on
    a fresh backend; the results come design by design, seeds in order within each design.

    ``jobs`` > 1 plays that many runs at once (each its own backend: on the stack, its own
    mount and processes). What a run reports is modelled, so it does not depend on ``jobs``.
    ``progress(design, seed, phase)`` is called once per tick (from the runs' threads).
    """
    plays = [(design, w) for design in designs for w in seeded(workload, seeds)]

    def one(design: Design, w: Workload) -> RunResult:
        tick: Progress | None = None
        if progress is not None:
            tick = functools.partial(progress, design, w.seed)
        return play(w, factory(w, design), design, tick)

    if jobs <= 1 or len(plays) <= 1:
        return [one(d, w) for d, w in plays]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, d, w) for d, w in plays]
        return [f.result() for f in futures]


def default_jobs() -> int:
    """Runs at once by default: one per core (at most 4)."""
    return max(1, min(4, os.cpu_count() or 1))


class TraceWriter:
    """``gemfs run --trace FILE``: every run's tracepoints into one text file, in the kernel's
    trace format, on either backend: each line names its run as
    :func:`gemfs.mm.trace.task_of` says (``comm`` the design, ``pid`` the seed), so runs can be
    told apart and the same run prints the same lines in process and on the stack.

    The file is opened (and its header written) at once: an unwritable FILE is an OSError
    before anything plays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO = path.open("w")
        self._file.write("# tracer: nop\n#\n")
        self._lock = threading.Lock()
        self.lines = 0
        self.lost = 0  # events the stack's trace buffer overwrote (CPU:N [LOST M EVENTS])

    def write(self, line: str) -> None:
        with self._lock:
            self._file.write(line + "\n")
            if (m := LOST_EVENTS.match(line)) is not None:
                self.lost += int(m.group(2))
            else:
                self.lines += 1

    def factory(self, base: BackendFactory) -> BackendFactory:
        """``base``'s backends, each tracing into this file from its start."""

        def build(workload: Workload, design: Design) -> Backend:
            backend = base(workload, design)
            try:
                backend.trace(workload.seed, self.write)
            except BaseException:
                backend.teardown()
                raise
            return backend

        return build

    def close(self) -> None:
        self._file.close()
