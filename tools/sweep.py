"""Sweeps: one workload under a grid of parameters × designs × seeds, run on dask.distributed.

A sweep spec is a small TOML file::

    workload = "examples/compaction-test.toml"   # relative to the spec's folder, else the cwd
    designs = ["pinned", "shmem-hook"]          # optional: all four by default
    seeds = 2                                   # the workload's seed, seed + 1 (or a list)
    [grid]
    "compactor.proactiveness" = [0, 20]         # dotted path into the workload -> values

A grid parameter addresses a workload key by its dotted path: ``pool``,
``compactor.proactiveness``, ``costs.flush_page_us``, or ``phase.NAME.KEY`` where NAME is a
phase's ``name`` or ``tag`` (phases inside ``repeat`` bodies too; a quoted part may hold dots:
``phase."app start".count``) and KEY may go deeper into an inline table
(``phase.tabs.size.median``).
The values are applied to the parsed TOML data before the workload is validated, so every
check of :mod:`tools.workload` applies to every grid point; an error names the spec's line.

Every run is one task on a dask.distributed cluster (a :class:`distributed.LocalCluster` sized
to the machine, or an existing scheduler); a task plays the workload in process
(:class:`tools.inproc_backend.InprocBackend`) and returns the :class:`tools.player.RunRecord`
as a dict. Results stream into ``results.csv`` (:class:`ResultsTable`), one row per run keyed
by a stable hash of (workload text, parameters, design, seed), so an interrupted sweep resumes
without redoing finished runs. A run that raises is recorded ``failed`` with its error; a run
whose worker dies is retried once by the scheduler (``allowed_failures = 1``), then recorded
``failed`` (``KilledWorker``); the sweep goes on either way.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import re
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemfs.mm.types import Design
from tools.inproc_backend import InprocBackend
from tools.player import play
from tools.workload import (
    Workload,
    WorkloadError,
    _Locator,
    workload_from_data,
)

Scalar = str | int | float | bool
Params = tuple[tuple[str, Any], ...]  # (dotted path, value), in the spec's order
Row = dict[str, Any]

RETRIES = 1  # a run whose worker dies is tried this many more times, then recorded as failed
STATUSES = ("ok", "failed")
WAIT_FOR_WORKERS_S = 60.0  # for the first worker of an existing scheduler
CONNECT_TIMEOUT_S = 10.0  # to reach an existing scheduler


class SpecError(Exception):
    """A sweep or fleet spec that cannot be run: ``file:line: what is wrong``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


class ParamError(Exception):
    """A dotted path that does not lead to a workload key (message without file or line)."""


# -- spec files ---------------------------------------------------------------------------------
class SpecFile:
    """A spec's TOML data and where each key is written (for errors with a line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = str(path)
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(self.file, 1, f"cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise SpecError(self.file, 1, "not a UTF-8 text file") from None
        try:
            self.data: dict[str, Any] = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column \d+\)", str(e))
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
            raise SpecError(
                self.file, int(m.group(1)) if m else 1, f"not valid TOML: {msg}"
            ) from None
        self.locator = _Locator(self.text)

    def error(self, path: tuple[str | int, ...], message: str) -> SpecError:
        return SpecError(self.file, self.locator.line(path), message)

    def allow(
        self, table: Mapping[str, Any], path: tuple[str | int, ...], keys: Sequence[str]
    ) -> None:
        for key in table:
            if key not in keys:
                expected = ", ".join(keys)
                raise self.error((*path, key), f"unknown key {key!r} (expected one of: {expected})")

    def workload_path(self, value: object, where: tuple[str | int, ...]) -> Path:
        """A workload file: relative to the spec's folder if it is there, else to the cwd."""
        if not isinstance(value, str) or not value:
            raise self.error(where, f"workload must be a file name, not {value!r}")
        p = Path(value)
        candidates = [p] if p.is_absolute() else [self.path.parent / p, Path.cwd() / p]
        for c in candidates:
            if c.is_file():
                return c
        tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
        raise self.error(where, f"workload file {value!r} not found (looked for {tried})")

    def designs(self) -> tuple[Design, ...]:
        raw = self.data.get("designs", [d.value for d in Design])
        names = [d.value for d in Design]
        if not isinstance(raw, list) or not raw:
            raise self.error(("designs",), f"designs must be a non-empty array of {names}")
        out: list[Design] = []
        for v in raw:
            if v not in names:
                raise self.error(("designs",), f"unknown design {v!r} (expected one of {names})")
            out.append(Design(v))
        if len(set(out)) != len(out):
            raise self.error(("designs",), "a design is listed twice")
        return tuple(out)

    def seeds(self, base: int) -> tuple[int, ...]:
        """``seeds = N``: the workload's seed, seed + 1, … (as ``gemfs run --seeds``); or a list."""
        raw = self.data.get("seeds", 1)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
            return tuple(base + k for k in range(raw))
        if (
            isinstance(raw, list)
            and raw
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw)
            and len(set(raw)) == len(raw)
        ):
            return tuple(raw)
        raise self.error(
            ("seeds",),
            f"seeds must be a count of at least 1 or a list of distinct seeds, not {raw!r}",
        )


# -- dotted paths into a workload's TOML data ----------------------------------------------------
_PATH_PART = re.compile(r'"([^"]*)"|([^."]+)')


def split_path(path: str) -> list[str]:
    """``phase."app start".count`` -> ["phase", "app start", "count"]."""
    parts: list[str] = []
    pos = 0
    while pos < len(path):
        m = _PATH_PART.match(path, pos)
        if m is None:
            raise ParamError(f"cannot read the path {path!r}")
        parts.append(m.group(1) if m.group(1) is not None else m.group(2).strip())
        pos = m.end()
        if pos < len(path):
            if path[pos] != ".":
                raise ParamError(f"cannot read the path {path!r}")
            pos += 1
    if not parts or any(p == "" for p in parts):
        raise ParamError(f"cannot read the path {path!r}")
    return parts


def _phases(data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    def walk(items: object) -> Iterator[dict[str, Any]]:
        if isinstance(items, list):
            for p in items:
                if isinstance(p, dict):
                    yield p
                    yield from walk(p.get("do"))

    yield from walk(data.get("phase"))


def _tags(phase: Mapping[str, Any]) -> list[str]:
    tag = phase.get("tag")
    if isinstance(tag, str):
        return [tag]
    return [t for t in tag if isinstance(t, str)] if isinstance(tag, list) else []


def _find_phase(data: Mapping[str, Any], which: str, key: str) -> dict[str, Any]:
    phases = list(_phases(data))
    found = (
        [p for p in phases if p.get("name") == which]
        or [p for p in phases if which in _tags(p)]
        or [p for p in phases if "name" not in p and p.get("kind") == which]  # default name
    )
    if len(found) > 1:  # a tag shared by several phases: the one that sets this key
        having = [p for p in found if key in p]
        found = having if having else found
    if not found:
        known = sorted(
            {str(p["name"]) for p in phases if "name" in p} | {t for p in phases for t in _tags(p)}
        )
        raise ParamError(f"no phase named or tagged {which!r} (phases: {', '.join(known)})")
    if len(found) > 1:
        kinds = ", ".join(str(p.get("name", p.get("kind", "?"))) for p in found)
        raise ParamError(
            f"phase {which!r} matches {len(found)} phases ({kinds}): give the phase a name"
        )
    return found[0]


def apply_param(data: dict[str, Any], path: str, value: Any) -> None:
    """Set the key at the dotted ``path`` in a workload's TOML data (in place).

    Whether the key is a workload key is for the workload's own validation to say."""
    parts = split_path(path)
    target: dict[str, Any] = data
    rest = parts
    if parts[0] == "phase":
        if len(parts) < 3:
            raise ParamError("a phase parameter is phase.NAME.KEY (NAME: the phase's name or tag)")
        target, rest = _find_phase(data, parts[1], parts[2]), parts[2:]
    for i, k in enumerate(rest[:-1]):
        sub = target.get(k)
        if sub is None:
            sub = target[k] = {}
        elif not isinstance(sub, dict):
            raise ParamError(f"{'.'.join(rest[: i + 1])} is not a table")
        target = sub
    target[rest[-1]] = value


def with_params(data: Mapping[str, Any], params: Params) -> dict[str, Any]:
    out = copy.deepcopy(dict(data))
    for path, value in params:
        apply_param(out, path, value)
    return out


# -- runs ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class RunTask:
    """One run: a validated workload (its seed set), a design, and what identifies the run."""

    key: str
    design: str
    seed: int
    params: Params  # the grid point (or a fleet machine's draws)
    labels: tuple[tuple[str, Any], ...] = ()  # extra identity columns (a fleet's machine)
    workload: Workload


def run_key(workload_hash: str, params: Params, design: str, seed: int, labels: Params = ()) -> str:
    """A stable key for a run: the same workload text, parameters, design and seed, the same key."""
    blob = json.dumps(
        {
            "workload": workload_hash,
            "params": [[p, v] for p, v in params],
            "labels": [[p, v] for p, v in labels],
            "design": design,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_task(task: RunTask) -> dict[str, Any]:
    """Play one run in this process (on a dask worker) and return its record as a dict."""
    backend = InprocBackend(task.workload, Design(task.design))
    return play(task.workload, backend, task.design).record.to_json()


# -- records as rows -------------------------------------------------------------------------------
# Record fields left out of a row: per-pageblock maps (their length is the pool's), and the
# provenance's cost table and sources (the same for every run; gemfs_version is kept).
LEFT_OUT = ("design", "seed", "pageblock_types", "pageblock_states", "pageblock_mixed")
# Free memory at the end as naturally aligned, entirely free ranges of these sizes, counted from
# the record's per-pageblock states: what a buddy allocator with a larger MAX_ORDER would hold
# (the model's largest buddy block is order 10, 4 MiB).
FREE_BLOCK_SIZES = (("2MiB", 1), ("16MiB", 8), ("1GiB", 512))  # in pageblocks


def free_blocks(pageblock_states: Sequence[int], pageblocks: int) -> int:
    """Aligned runs of ``pageblocks`` entirely free pageblocks (state 0)."""
    states = np.asarray(pageblock_states, dtype=np.int64)
    n = len(states) // pageblocks
    if n == 0:
        return 0
    free = (states[: n * pageblocks] == 0).reshape(n, pageblocks)
    return int(np.count_nonzero(free.all(axis=1)))


def flatten_record(record: Mapping[str, Any]) -> Row:
    """A record's metrics as one flat row: nested keys joined with dots; buddyinfo per order
    (``buddyinfo.0`` … ``buddyinfo.10``); per-pageblock lists left out, but their end state is
    summed up in ``free_blocks_end.2MiB`` / ``.16MiB`` / ``.1GiB``."""
    out: Row = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    for key, value in record.items():
        if key in LEFT_OUT:
            continue
        if key == "provenance":
            out["provenance.gemfs_version"] = value.get("gemfs_version")
            continue
        walk(key, value)
    states = record.get("pageblock_states", [])
    for name, n in FREE_BLOCK_SIZES:
        out[f"free_blocks_end.{name}"] = free_blocks(states, n)
    return out


def identity(task: RunTask) -> Row:
    row: Row = {"key": task.key, **dict(task.labels), "design": task.design, "seed": task.seed}
    row.update(dict(task.params))
    return row


def result_row(task: RunTask, record: Mapping[str, Any] | None, error: str | None) -> Row:
    """The row of one run: identity, status (and error), then the metrics."""
    row = identity(task)
    row["status"] = "ok" if error is None else "failed"
    row["error"] = error or ""
    if record is not None:
        row.update(flatten_record(record))
    return row


def cell(value: object) -> str:
    """How a value is written to the CSV (and compared): None is empty, floats round-trip."""
    match value:
        case None:
            return ""
        case bool():
            return "true" if value else "false"
        case float():
            return repr(value)
        case _:
            return str(value)


# -- the results table -----------------------------------------------------------------------------
class ResultsTable:
    """``results.csv``: one row per run, appended and flushed as runs finish.

    The columns grow when a row brings new ones (the first successful run, a vmstat counter
    that appears only in some runs): the file is then rewritten once with the wider header.
    A row cut short by an interruption (a partial last line) is dropped when the table is
    opened again, so the run is done again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        self.rows: dict[str, dict[str, str]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            good = True
            if header is not None:
                self.columns = header
                for values in reader:
                    row = dict(zip(header, values, strict=False))
                    if len(values) != len(header) or row.get("status") not in STATUSES:
                        good = False  # cut short: run it again
                        continue
                    self.rows[row["key"]] = row
        if not good:
            self._rewrite()

    def _line(self, values: Sequence[str]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            f.write(self._line(self.columns))
            for row in self.rows.values():
                f.write(self._line([row.get(c, "") for c in self.columns]))
        os.replace(tmp, self.path)

    def add(self, row: Row) -> None:
        cells = {k: cell(v) for k, v in row.items()}
        new = [c for c in cells if c not in self.columns]
        replacing = cells["key"] in self.rows
        self.rows[cells["key"]] = cells
        if new or replacing or not self.path.exists():
            self.columns.extend(new)
            self._rewrite()
            return
        with self.path.open("a", newline="", encoding="utf-8") as f:
            f.write(self._line([cells.get(c, "") for c in self.columns]))
            f.flush()

    def drop(self, keys: Sequence[str]) -> None:
        for k in keys:
            self.rows.pop(k, None)
        if self.path.exists():
            self._rewrite()


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``OUT/.lock`` while a sweep writes OUT: two sweeps on one results.csv would each
    rewrite it under the other (:class:`SweepError` if another holds it)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another gemfs sweep or fleet is writing {out}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the engine ------------------------------------------------------------------------------------
def default_workers() -> int:
    """One single-threaded worker process per core (a run is one busy Python thread)."""
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A client on an existing scheduler, or on a new local cluster of worker processes that
    retries a run whose worker died once (``allowed_failures``).

    Start an existing scheduler with ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1`` and
    ``DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=1.0`` for the same behaviour (dask's
    defaults retry three times and may count a run queued on a dying worker as a suspect)."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as e:
            raise SweepError(f"cannot reach the dask scheduler at {scheduler}: {e}") from None
        try:
            try:
                client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
            except TimeoutError:
                raise SweepError(
                    f"no dask worker joined the scheduler at {scheduler} within "
                    f"{WAIT_FOR_WORKERS_S:g} s (start some with: dask worker {scheduler})"
                ) from None
            yield client
        finally:
            client.close()
        return
    # worker-saturation 1.0: a worker holds only the run it is playing, so when it dies no
    # other run is counted against allowed_failures as a suspect (dask's default 1.1 rounds
    # up to a second run queued on a one-thread worker).
    # Without dask's MALLOC_TRIM_THRESHOLD_ for the workers: setting it turns off glibc's
    # dynamic mmap threshold, so every large numpy array of a run is mmapped and unmapped anew
    # (page faults): runs played 1.5x slower on a worker than in this process.
    environ = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}
    with dask.config.set(
        {
            "distributed.scheduler.worker-saturation": 1.0,
            "distributed.nanny.pre-spawn-environ": environ,
        }
    ):
        cluster = LocalCluster(
            n_workers=workers or default_workers(),
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # an HTTP port of its own (no clash with 8787)
            scheduler_kwargs={"allowed_failures": RETRIES},
            silence_logs=logging.CRITICAL,  # failed runs are in results.csv
        )
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


class SweepError(Exception):
    """A sweep that cannot start (one line for the user)."""


def scheduler_retries(client: Any) -> int:
    """How many times the scheduler retries a run whose worker died."""

    def get(dask_scheduler: Any) -> int:
        return int(dask_scheduler.allowed_failures)

    return int(client.run_on_scheduler(get))


TaskFn = Callable[[RunTask], dict[str, Any]]
OnRow = Callable[[RunTask, Row], None]


def run_on(
    client: Any,
    tasks: Sequence[RunTask],
    on_row: OnRow,
    fn: TaskFn = run_task,
) -> None:
    """Submit every task; as each finishes (in any order), call ``on_row`` with its row."""
    from distributed import as_completed

    # A fresh dask key per submission: a scheduler that still remembers an earlier attempt
    # under the same key (a released erred task) would hand back its old result.
    nonce = uuid.uuid4().hex[:8]
    futures = {client.submit(fn, t, key=f"gemfs-run-{t.key}-{nonce}"): t for t in tasks}
    for future in as_completed(futures):
        task = futures[future]
        if future.status == "finished":
            row = result_row(task, future.result(), None)
        elif future.cancelled():  # the cluster let go of it (e.g. the scheduler restarted)
            row = result_row(task, None, "cancelled by the dask cluster")
        else:
            exc = future.exception()
            row = result_row(task, None, f"{type(exc).__name__}: {exc}")
        future.release()
        on_row(task, row)


@dataclass(slots=True)
class Outcome:
    """What one call of :func:`execute` did."""

    total: int
    skipped: int  # already in results.csv
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def execute(
    tasks: Sequence[RunTask],
    table: ResultsTable,
    client: Any,
    on_row: OnRow | None = None,
    fn: TaskFn = run_task,
    retry_failed: bool = False,
) -> Outcome:
    """Run the tasks not yet in the table (and failed ones, with ``retry_failed``), writing
    each row as it comes."""
    if retry_failed:
        table.drop([t.key for t in tasks if table.rows.get(t.key, {}).get("status") == "failed"])
    todo = [t for t in tasks if t.key not in table.rows]
    outcome = Outcome(total=len(tasks), skipped=len(tasks) - len(todo))
    t0 = time.perf_counter()

    def done(task: RunTask, row: Row) -> None:
        table.add(row)
        if row["status"] == "ok":
            outcome.ok += 1
        else:
            outcome.failed += 1
            outcome.errors.append(
                f"{task.design} seed {task.seed} {dict(task.params)}: {row['error']}"
            )
        if on_row is not None:
            on_row(task, row)

    if todo:
        run_on(client, todo, done, fn)
    outcome.wall_s = time.perf_counter() - t0
    return outcome


# -- sweeps ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep:
    file: str
    name: str
    description: str
    workload_file: str
    designs: tuple[Design, ...]
    seeds: tuple[int, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    metrics: tuple[str, ...]  # for the plots
    tasks: tuple[RunTask, ...]

    @property
    def params(self) -> list[str]:
        return [p for p, _ in self.grid]


DEFAULT_METRICS = (
    "order9_after",
    "order9_free_mean",
    "drain.blocks",
    "alloc.latency_us.p99",
    "costs.gpu_stall_ms",
    "costs.callbacks",
)


def param_error(
    spec: SpecFile, where: tuple[str | int, ...], path: str, value: Any, e: Exception, wl: str
) -> SpecError:
    if isinstance(e, ParamError):
        return spec.error(where, f"unknown parameter {path!r}: {e}")
    assert isinstance(e, WorkloadError)
    if "unknown key" in e.message:
        return spec.error(where, f"unknown parameter {path!r}: {e.message} (in {wl})")
    return spec.error(where, f"{path} = {value!r}: {e.message} (in {wl}:{e.line})")


def load_workload_data(
    spec: SpecFile, where: tuple[str | int, ...], raw: object
) -> tuple[str, str, dict[str, Any]]:
    """The workload file named at ``where``: its name, text and TOML data (validated as is)."""
    path = spec.workload_path(raw, where)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
        workload_from_data(data, str(raw), text)
    except tomllib.TOMLDecodeError as e:
        raise spec.error(where, f"workload {raw!r} is not valid TOML: {e}") from None
    except WorkloadError as e:
        raise spec.error(where, f"workload {raw!r} is not valid: {e}") from None
    return str(path), text, data


def metrics_of(spec: SpecFile) -> tuple[str, ...]:
    raw = spec.data.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
        raise spec.error(("metrics",), "metrics must be a non-empty array of column names")
    return tuple(raw)


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep spec and build its runs; :class:`SpecError` (file and line) if it is wrong."""
    spec = SpecFile(path)
    d = spec.data
    spec.allow(d, (), ("name", "description", "workload", "designs", "seeds", "grid", "metrics"))
    if "workload" not in d:
        raise spec.error((), "missing required key 'workload' (the workload file to sweep)")
    wl_name, wl_text, wl_data = load_workload_data(spec, ("workload",), d["workload"])
    grid_raw = d.get("grid")
    if not isinstance(grid_raw, dict) or not grid_raw:
        raise spec.error(
            ("grid",),
            "the grid is empty: give at least one parameter, e.g. "
            '[grid] "compactor.proactiveness" = [0, 20]',
        )
    grid: list[tuple[str, tuple[Any, ...]]] = []
    for p, values in grid_raw.items():
        where = ("grid", p)
        if p == "seed":
            raise spec.error(where, "seeds are not a grid parameter: give seeds = [1, 2, …]")
        if not isinstance(values, list) or not values:
            raise spec.error(where, f"grid parameter {p!r} must be a non-empty array of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise spec.error(where, f"grid parameter {p!r} lists a value twice")
        for v in values:  # each value alone: the error names this parameter's line
            try:
                workload_from_data(with_params(wl_data, ((p, v),)), wl_name, wl_text)
            except (ParamError, WorkloadError) as e:
                raise param_error(spec, where, p, v, e, wl_name) from None
        grid.append((p, tuple(values)))
    designs = spec.designs()
    base = workload_from_data(wl_data, wl_name, wl_text)
    seeds = spec.seeds(base.seed)
    wl_hash = text_hash(wl_text)
    tasks: list[RunTask] = []
    for values in itertools.product(*(vs for _, vs in grid)):
        params: Params = tuple(zip((p for p, _ in grid), values, strict=True))
        try:
            w = workload_from_data(with_params(wl_data, params), wl_name, wl_text)
        except (ParamError, WorkloadError) as e:
            point = ", ".join(f"{p} = {v!r}" for p, v in params)
            raise spec.error(("grid",), f"grid point {point}: {e}") from None
        for design in designs:
            for seed in seeds:
                wd = _reseed(w, seed)
                tasks.append(
                    RunTask(
                        key=run_key(wl_hash, params, design.value, seed),
                        design=design.value,
                        seed=seed,
                        params=params,
                        workload=wd,
                    )
                )
    name = d.get("name", spec.path.stem)
    return Sweep(
        file=spec.file,
        name=str(name),
        description=str(d.get("description", "")),
        workload_file=wl_name,
        designs=designs,
        seeds=seeds,
        grid=tuple(grid),
        metrics=metrics_of(spec),
        tasks=tuple(tasks),
    )


def _reseed(w: Workload, seed: int) -> Workload:
    return dataclasses.replace(w, seed=seed)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results.csv (strings, as written)."""
    return list(ResultsTable(path).rows.values())


def number(value: str) -> float | None:
    """A CSV cell as a number (None when empty or not a number)."""
    if value in ("", None):
        return None
    if value in ("true", "false"):
        return 1.0 if value == "true" else 0.0
    try:
        return float(value)
    except ValueError:
        return None


def write_meta(
    out: Path, kind: str, spec_file: str, outcome: Outcome, extra: Mapping[str, Any]
) -> None:
    """``KIND.json``: what was run, when, and how it went (for a person; resume needs none)."""
    meta = {
        "kind": kind,
        "spec": spec_file,
        "runs": outcome.total,
        "skipped_already_done": outcome.skipped,
        "ok": outcome.ok,
        "failed": outcome.failed,
        "wall_s": round(outcome.wall_s, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (out / f"{kind}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


__all__ = [
    "DEFAULT_METRICS",
    "Outcome",
    "ParamError",
    "ResultsTable",
    "RunTask",
    "SpecError",
    "SpecFile",
    "Sweep",
    "SweepError",
    "apply_param",
    "cell",
    "dask_client",
    "execute",
    "flatten_record",
    "load_sweep",
    "read_rows",
    "result_row",
    "run_key",
    "run_task",
    "scheduler_retries",
]
