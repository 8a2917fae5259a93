"""Runs one workload under several designs and seeds, one backend each, and collects the results.

The backend is chosen here: :class:`tools.inproc_backend.InprocBackend` for ``--inproc``;
otherwise the multi-process stack from ``tools.stack_backend.make_stack_backend(workload,
design, mount)``, imported only when asked for so the in-process path works without it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import cast

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
) -> list[RunResult]:
    """Play the workload ``seeds`` times per design (seeds ``seed``, ``seed + 1``, …), each run on
    a fresh backend; the results come design by design, seeds in order within each design.

    ``progress(design, seed, phase)`` is called once per tick.
    """
    plays = seeded(workload, seeds)
    results = []
    for design in designs:
        for w in plays:
            tick: Progress | None = None
            if progress is not None:
                tick = functools.partial(progress, design, w.seed)
            backend = factory(w, design)
            results.append(play(w, backend, design, tick))
    return results
