"""``gemfs bench sweep``: a sweep on dask.distributed against the same runs one after another.

The runs are the same in both: a small workload under every design, over as many seeds as make
``runs``. Figures: the local cluster's start-up, the wall time of the sweep on the cluster and
of the runs played one after another in this process (half before the cluster, half after, as
the machine's other load drifts), their ratio, the same runs on a plain process pool of as
many workers (what the cores allow, without dask), and the engine's overhead per run, measured
two ways: the same path with tasks that do nothing, and in the real sweep as (workers × wall
time − time spent playing) / runs (which includes workers left idle at the end).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemfs.mm.types import Design, parse_size
from tools.sweep import ResultsTable, RunTask, dask_client, execute, run_key, run_task, text_hash
from tools.workload import load_workload


@dataclass(frozen=True, slots=True)
class SweepBench:
    runs: int
    workers: int
    startup_s: float  # the local cluster, until its workers are up
    serial_s: float  # the runs one after another in this process (half before, half after)
    dask_s: float  # the same runs on the cluster
    play_s: float  # time the workers spent in the runs (summed)
    noop_s: float  # as many tasks that do nothing, through the same path
    processes_s: float  # the same runs on a plain process pool of as many workers (no dask)

    @property
    def speedup(self) -> float:
        return self.serial_s / self.dask_s

    @property
    def overhead_ms(self) -> float:
        """Per run: the workers' time not spent playing."""
        return 1000 * (self.workers * self.dask_s - self.play_s) / self.runs

    @property
    def noop_ms(self) -> float:
        return 1000 * self.noop_s / self.runs


def timed_run(task: RunTask) -> dict[str, Any]:
    t0 = time.perf_counter()
    record = run_task(task)
    record["task_s"] = time.perf_counter() - t0
    return record


def noop(task: RunTask) -> dict[str, Any]:
    return {"task_s": 0.0}


def bench_tasks(workload: Path, pool: str, runs: int) -> list[RunTask]:
    """``runs`` runs: every design, seeds seed, seed + 1, … (``runs`` a multiple of 4)."""
    w = load_workload(workload)
    w = dataclasses.replace(w, pool=parse_size(pool))
    digest = text_hash(workload.read_text(encoding="utf-8") + pool)
    designs = list(Design)
    tasks = []
    for k in range(runs):
        d, seed = designs[k % len(designs)].value, w.seed + k // len(designs)
        tasks.append(
            RunTask(
                key=run_key(digest, (("pool", pool),), d, seed),
                design=d,
                seed=seed,
                params=(("pool", pool),),
                workload=dataclasses.replace(w, seed=seed),
            )
        )
    return tasks


def bench_sweep(
    workload: Path, pool: str = "32MiB", runs: int = 64, workers: int = 2
) -> SweepBench:
    tasks = bench_tasks(workload, pool, runs)
    # Half the runs one after another before the cluster, half after: the machine's other load
    # drifts, and both figures should see the same.
    half = len(tasks) // 2
    t1 = time.perf_counter()
    for t in tasks[:half]:
        timed_run(t)
    serial = time.perf_counter() - t1
    with tempfile.TemporaryDirectory(prefix="gemfs-bench-sweep-") as tmp:
        t0 = time.perf_counter()
        with dask_client(workers=workers) as client:
            client.wait_for_workers(workers)
            startup = time.perf_counter() - t0
            played: list[float] = []
            table = ResultsTable(Path(tmp) / "sweep.csv")
            out = execute(
                tasks, table, client, lambda t, row: played.append(row["task_s"]), timed_run
            )
            if out.failed:
                raise RuntimeError(f"{out.failed} runs failed: {out.errors[:3]}")
            noop_out = execute(tasks, ResultsTable(Path(tmp) / "noop.csv"), client, fn=noop)
    t1 = time.perf_counter()
    for t in tasks[half:]:
        timed_run(t)
    serial += time.perf_counter() - t1
    # The machine's own parallelism, without dask: the same runs on as many plain processes.
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as procs:
        list(procs.map(noop, tasks[:workers]))  # started
        t2 = time.perf_counter()
        list(procs.map(timed_run, tasks))
        processes = time.perf_counter() - t2
    return SweepBench(
        runs=runs,
        workers=workers,
        startup_s=startup,
        serial_s=serial,
        dask_s=out.wall_s,
        play_s=sum(played),
        noop_s=noop_out.wall_s,
        processes_s=processes,
    )
