"""Sweeps and fleets: specs, dotted paths, results.csv, and runs on a real dask.distributed
cluster (a LocalCluster of worker processes, and a scheduler and a worker started as a user
would with ``dask scheduler`` / ``dask worker``)."""

from __future__ import annotations

import csv
import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import tools.sweep
from gemfs.mm.types import Design
from gemfs_cli.main import main
from tests.workloads import SMALL
from tools.fleet import load_fleet
from tools.inproc_backend import InprocBackend
from tools.player import NONDETERMINISTIC, play
from tools.sweep import (
    ResultsTable,
    RunTask,
    SpecError,
    apply_param,
    cell,
    dask_client,
    execute,
    flatten_record,
    free_blocks,
    load_sweep,
    locked,
    result_row,
    run_task,
    split_path,
)
from tools.sweep_report import fleet_stats, plot_fleet, plot_sweep
from tools.workload import parse_workload

TINY = SMALL.replace('pool = "32MiB"', 'pool = "16MiB"')


def write_spec(tmp_path: Path, body: str, workload: str = TINY) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tiny.toml").write_text(workload, encoding="utf-8")
    spec = tmp_path / "spec.toml"
    spec.write_text(body, encoding="utf-8")
    return spec


SPEC = """\
workload = "tiny.toml"
designs = ["pinned", "shmem-hook"]
seeds = 1
[grid]
"compactor.proactiveness" = [0, 50]
"""


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def comparable(row: dict[str, str]) -> dict[str, str]:
    """A row without the wall-clock fields (they differ between two plays of one seed)."""
    return {k: v for k, v in row.items() if k not in NONDETERMINISTIC and v != ""}


# -- dotted paths -------------------------------------------------------------------------------
def test_split_path_reads_quoted_parts() -> None:
    assert split_path("compactor.proactiveness") == ["compactor", "proactiveness"]
    assert split_path('phase."app start: 2.0".count') == ["phase", "app start: 2.0", "count"]


def test_apply_param_finds_phases_by_name_then_tag() -> None:
    import tomllib

    data = tomllib.loads(TINY)
    apply_param(data, "compactor.interval_ms", 250)
    apply_param(data, "phase.churn.times", 2)  # by name
    apply_param(data, "phase.log.count", 9)  # by tag
    apply_param(data, "phase.buf.size.median", "16KiB")  # tag shared: the phase with `size`
    apply_param(data, "pool", "32MiB")
    assert data["compactor"]["interval_ms"] == 250
    assert data["phase"][3]["times"] == 2
    assert data["phase"][5]["count"] == 9
    assert data["phase"][3]["do"][0]["size"]["median"] == "16KiB"
    assert data["pool"] == "32MiB"


def test_load_sweep_builds_every_run_with_stable_keys(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    s = load_sweep(spec)
    assert s.params == ["compactor.proactiveness"]
    assert [(t.design, t.seed, t.params) for t in s.tasks] == [
        ("pinned", 5, (("compactor.proactiveness", 0),)),
        ("shmem-hook", 5, (("compactor.proactiveness", 0),)),
        ("pinned", 5, (("compactor.proactiveness", 50),)),
        ("shmem-hook", 5, (("compactor.proactiveness", 50),)),
    ]
    assert [t.workload.compactor.proactiveness for t in s.tasks] == [0, 0, 50, 50]
    assert len({t.key for t in s.tasks}) == 4
    assert [t.key for t in load_sweep(spec).tasks] == [t.key for t in s.tasks]
    # The key follows the workload's text: an edited workload is a new run.
    (tmp_path / "tiny.toml").write_text(TINY.replace("seed = 5", "seed = 6"), encoding="utf-8")
    assert not {t.key for t in load_sweep(spec).tasks} & {t.key for t in s.tasks}


def test_the_issue_spec_loads_as_written(tmp_path: Path) -> None:
    """The spec of issue 15, from the repository root (the workload path is the cwd's)."""
    spec = tmp_path / "issue.toml"
    spec.write_text(
        'workload = "examples/compaction-test.toml"\ndesigns = ["pinned", "shmem-hook"]\n'
        'seeds = 2\n[grid]\n"compactor.proactiveness" = [0, 20]\n',
        encoding="utf-8",
    )
    root = Path(__file__).resolve().parent.parent
    cwd = Path.cwd()
    os.chdir(root)
    try:
        s = load_sweep(spec)
    finally:
        os.chdir(cwd)
    assert len(s.tasks) == 2 * 2 * 2
    assert sorted({t.seed for t in s.tasks}) == [1, 2]


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        (SPEC.replace("compactor.proactiveness", "compactor.proactivenes"), 5, "unknown parameter"),
        (SPEC.replace("compactor.proactiveness", "phase.nothing.count"), 5, "no phase named"),
        (SPEC.replace('"compactor.proactiveness" = [0, 50]', ""), 4, "grid is empty"),
        (SPEC.replace('[grid]\n"compactor.proactiveness" = [0, 50]\n', ""), 1, "grid is empty"),
        (SPEC.replace("[0, 50]", "[0, 200]"), 5, "between 0 and 100"),
        (SPEC.replace("[0, 50]", "[]"), 5, "non-empty array"),
        (SPEC.replace('"shmem-hook"]', '"shmem"]'), 2, "unknown design"),
        (SPEC.replace("seeds = 1", "seeds = 0"), 3, "seeds must be"),
        (SPEC.replace('"compactor.proactiveness"', "seed"), 5, "not a grid parameter"),
        (SPEC.replace("tiny.toml", "missing.toml"), 1, "not found"),
        ("bogus = 1\n" + SPEC, 1, "unknown key 'bogus'"),
    ],
)
def test_bad_spec_is_one_error_with_file_and_line(
    tmp_path: Path, body: str, line: int, words: str
) -> None:
    spec = write_spec(tmp_path, body)
    with pytest.raises(SpecError) as info:
        load_sweep(spec)
    assert info.value.file == str(spec)
    assert info.value.line == line, str(info.value)
    assert words in info.value.message
    r = invoke("sweep", str(spec), "--out", str(tmp_path / "out"))
    assert r.exit_code != 0
    errors = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert errors == [f"Error: {info.value}"], r.output
    assert not (tmp_path / "out").exists()


def test_a_combination_that_does_not_fit_names_the_grid(tmp_path: Path) -> None:
    body = SPEC.replace(
        '"compactor.proactiveness" = [0, 50]',
        'pool = ["4MiB", "16MiB"]\n"phase.log.size" = ["2MiB"]',
    )
    with pytest.raises(SpecError) as info:
        load_sweep(write_spec(tmp_path, body))
    assert info.value.line == 4  # each value fits alone: the [grid] line
    assert "grid point pool = '4MiB', phase.log.size = '2MiB'" in info.value.message
    assert "too small for this workload" in info.value.message


def test_the_example_specs_load() -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    s = load_sweep(examples / "sweep-pinned-fraction.toml")
    assert len(s.tasks) == 64
    assert s.params == ["phase.chunk.fill", "pool"]
    f = load_fleet(examples / "fleet-desktops.toml")
    assert len(f.machines) == 48
    assert len(f.tasks) == 48 * 4
    for p in ("sweep-pinned-fraction.toml", "fleet-desktops.toml"):
        text = (examples / p).read_text(encoding="utf-8")
        assert text.startswith("#")
        assert "Contiguitas" in text


# -- rows and the results table -----------------------------------------------------------------
def test_flatten_record_joins_keys_with_dots_and_counts_free_blocks() -> None:
    w = parse_workload(TINY, "tiny.toml")
    record = play(w, InprocBackend(w, Design.PINNED), Design.PINNED).record.to_json()
    row = flatten_record(record)
    assert row["order9_after"] == record["order9_after"]
    assert row["costs.gpu_stall_ms"] == record["costs"]["gpu_stall_ms"]
    assert row["alloc.latency_us.p99"] == record["alloc"]["latency_us"]["p99"]
    assert [row[f"buddyinfo.{o}"] for o in range(11)] == record["buddyinfo"]
    assert not any(k.startswith("pageblock_types") for k in row)
    free2m = sum(n << (o - 9) for o, n in enumerate(record["buddyinfo"]) if o >= 9)
    assert row["free_blocks_end.2MiB"] == free2m
    assert row["free_blocks_end.1GiB"] == 0
    assert free_blocks([0] * 16 + [1] + [0] * 7, 8) == 2
    assert free_blocks([0] * 7, 8) == 0


def test_results_table_grows_columns_and_drops_a_cut_row(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    t = ResultsTable(path)
    t.add({"key": "a", "design": "pinned", "status": "failed", "error": "boom, twice"})
    t.add({"key": "b", "design": "pinned", "status": "ok", "error": "", "x.y": 1.5, "z": None})
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == ["a", "b"]
    assert rows[0]["error"] == "boom, twice"
    assert rows[0]["x.y"] == ""
    assert rows[1]["x.y"] == "1.5"
    assert rows[1]["z"] == ""
    with path.open("a", encoding="utf-8") as f:
        f.write("c,shmem-hook,o")  # an interrupted write
    again = ResultsTable(path)
    assert set(again.rows) == {"a", "b"}
    assert path.read_text(encoding="utf-8").count("\n") == 3
    assert cell(True) == "true"
    assert cell(0.1) == "0.1"
    assert cell(None) == ""


# -- on a real dask.distributed cluster ----------------------------------------------------------
@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A LocalCluster of 2 worker processes, one thread each, for the module."""
    with dask_client(workers=2) as c:
        yield c


def one_by_one(tasks: list[RunTask]) -> dict[str, dict[str, str]]:
    """The same runs, played here one after another without dask."""
    rows = {}
    for t in tasks:
        row = result_row(t, play(t.workload, InprocBackend(t.workload, Design(t.design)), t.design)
                         .record.to_json(), None)  # fmt: skip
        rows[t.key] = {k: cell(v) for k, v in row.items()}
    return rows


def test_sweep_on_local_cluster_gives_the_rows_of_one_by_one(tmp_path: Path, client: Any) -> None:
    s = load_sweep(write_spec(tmp_path, SPEC))
    table = ResultsTable(tmp_path / "out" / "results.csv")
    (tmp_path / "out").mkdir()
    seen: list[str] = []
    outcome = execute(s.tasks, table, client, lambda t, row: seen.append(t.key))
    assert (outcome.ok, outcome.failed, outcome.skipped) == (4, 0, 0)
    assert sorted(seen) == sorted(t.key for t in s.tasks)
    on_disk = {r["key"]: r for r in ResultsTable(table.path).rows.values()}
    expected = one_by_one(list(s.tasks))
    assert set(on_disk) == set(expected)
    for key, row in expected.items():
        assert comparable(on_disk[key]) == comparable(row)
        assert on_disk[key]["status"] == "ok"
    # Interrupted and resumed: only what is missing runs again.
    dropped = s.tasks[1].key
    table.drop([dropped])
    again = execute(s.tasks, ResultsTable(table.path), client)
    assert (again.skipped, again.ok) == (3, 1)
    assert comparable(ResultsTable(table.path).rows[dropped]) == comparable(expected[dropped])
    files = plot_sweep(list(on_disk.values()), s.params, ["pinned", "shmem-hook"],
                       ["order9_after", "costs.gpu_stall_ms"], tmp_path / "plots")  # fmt: skip
    assert [f.name for f in files] == ["order9_after.lines.png", "costs.gpu_stall_ms.lines.png"]


def test_a_run_that_raises_is_recorded_and_the_sweep_goes_on(tmp_path: Path, client: Any) -> None:
    s = load_sweep(write_spec(tmp_path, SPEC))
    table = ResultsTable(tmp_path / "results.csv")
    outcome = execute(s.tasks, table, client, fn=functools.partial(fail_for, "shmem-hook"))
    assert (outcome.ok, outcome.failed) == (2, 2)
    failed = [r for r in table.rows.values() if r["status"] == "failed"]
    assert {r["design"] for r in failed} == {"shmem-hook"}
    assert all(r["error"] == "RuntimeError: the model broke" for r in failed)
    assert all(r.get("order9_after", "") == "" for r in failed)
    # --retry-failed runs them again (here they now pass).
    retried = execute(s.tasks, table, client, retry_failed=True)
    assert (retried.skipped, retried.ok) == (2, 2)


def fail_for(design: str, task: RunTask) -> dict[str, Any]:
    if task.design == design:
        raise RuntimeError("the model broke")
    return run_task(task)


def kill_worker(attempts: str, always: bool, task: RunTask) -> dict[str, Any]:
    """A run that kills its worker process (every time, or only on its first attempt)."""
    if task.design == "shmem-hook" and task.params == (("compactor.proactiveness", 0),):
        with open(attempts, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        if always or Path(attempts).read_text(encoding="utf-8").count("\n") == 1:
            os._exit(1)
    return run_task(task)


@pytest.mark.parametrize("always", [True, False], ids=["dies-twice", "dies-once"])
def test_a_worker_that_dies_is_retried_once_then_failed(
    tmp_path: Path, client: Any, always: bool
) -> None:
    s = load_sweep(write_spec(tmp_path, SPEC))
    table = ResultsTable(tmp_path / "results.csv")
    attempts = tmp_path / "attempts"
    outcome = execute(
        s.tasks, table, client, fn=functools.partial(kill_worker, str(attempts), always)
    )
    pids = attempts.read_text(encoding="utf-8").split()
    assert len(pids) == 2
    assert pids[0] != pids[1]
    victim = next(r for r in table.rows.values() if r["design"] == "shmem-hook"
                  and r["compactor.proactiveness"] == "0")  # fmt: skip
    if always:
        assert (outcome.ok, outcome.failed) == (3, 1)
        assert victim["status"] == "failed"
        assert victim["error"].startswith("KilledWorker:"), victim["error"]
    else:
        assert (outcome.ok, outcome.failed) == (4, 0)
        assert victim["status"] == "ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_sweep_on_a_scheduler_started_by_hand(tmp_path: Path) -> None:
    """``dask scheduler`` and ``dask worker`` on loopback, then ``gemfs sweep --scheduler``."""
    dask = str(Path(sys.executable).with_name("dask"))
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
    }
    log = (tmp_path / "dask.log").open("wb")
    port = address.rsplit(":", 1)[1]
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    worker = None
    try:
        worker = subprocess.Popen(
            [dask, "worker", address, "--host", "127.0.0.1", "--nworkers", "1",
             "--nthreads", "1", "--no-dashboard", "--death-timeout", "60"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        spec = write_spec(tmp_path, SPEC.replace("[0, 50]", "[10]"))
        out = tmp_path / "out"
        r = invoke("sweep", str(spec), "--scheduler", address, "--out", str(out))
        assert r.exit_code == 0, r.output + (tmp_path / "dask.log").read_text()
        assert f"the scheduler at {address} (1 workers; a run whose worker dies is tried 1" in (
            " ".join(r.output.split())
        )
        rows = list(ResultsTable(out / "results.csv").rows.values())
        assert sorted(r["design"] for r in rows) == ["pinned", "shmem-hook"]
        assert all(r["status"] == "ok" and r["compactor.proactiveness"] == "10" for r in rows)
        expected = one_by_one(list(load_sweep(spec).tasks))
        for row in rows:
            assert comparable(row) == comparable(expected[row["key"]])
        # Run again: nothing left to do.
        r = invoke("sweep", str(spec), "--scheduler", address, "--out", str(out))
        assert r.exit_code == 0, r.output
        assert "2 already done, 0 ok" in " ".join(r.output.split())
    finally:
        if worker is not None:
            stop(worker)
        stop(scheduler)
        log.close()
    assert worker is not None
    assert worker.returncode is not None
    assert scheduler.returncode is not None


def test_sweep_with_a_scheduler_nobody_listens_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools.sweep, "CONNECT_TIMEOUT_S", 1.0)
    spec = write_spec(tmp_path, SPEC)
    r = invoke("sweep", str(spec), "--scheduler", f"tcp://127.0.0.1:{free_port()}",
               "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.exit_code != 0
    assert "Error: cannot reach the dask scheduler at tcp://127.0.0.1:" in r.output


# -- fleets ----------------------------------------------------------------------------------------
FLEET = """\
machines = 4
seed = 3
designs = ["pinned", "notifier"]
[draw]
pool = { dist = "choice", values = ["16MiB", "32MiB"] }
[[mix]]
workload = "tiny.toml"
weight = 2
[mix.draw]
"phase.churn.times" = { dist = "int", min = 1, max = 3 }
"phase.wait.ms" = { dist = "uniform", min = 100, max = 1000 }
"""


def test_fleet_draws_the_same_machines_from_the_same_seed(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, FLEET)
    f = load_fleet(spec)
    assert len(f.machines) == 4
    assert len(f.tasks) == 8
    assert f.machines == load_fleet(spec).machines
    for m in f.machines:
        params = dict(m.params)
        assert params["pool"] in ("16MiB", "32MiB")
        assert 1 <= params["phase.churn.times"] <= 3
        assert 100 <= params["phase.wait.ms"] <= 1000
    more = load_fleet(write_spec(tmp_path, FLEET.replace("machines = 4", "machines = 6")))
    assert more.machines[:4] == f.machines  # adding machines keeps the ones drawn before


def test_run_keys_do_not_depend_on_where_the_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path, FLEET)
    keys = [t.key for t in load_fleet(spec).tasks]
    sweep_keys = [t.key for t in load_sweep(write_spec(tmp_path / "s", SPEC)).tasks]
    monkeypatch.chdir(tmp_path)
    assert [t.key for t in load_fleet("spec.toml").tasks] == keys
    assert [t.key for t in load_sweep("s/spec.toml").tasks] == sweep_keys


@pytest.mark.parametrize(
    ("old", "new", "line", "words"),
    [
        ('"phase.churn.times"', '"phase.churn.tims"', 10, "unknown parameter"),
        ("max = 3 }", "max = 0 }", 10, "min <= max"),
        ('"choice"', '"poisson"', 5, "dist must be one of"),
        ("machines = 4", "machines = 0", 1, "machines must be"),
        ('values = ["16MiB", "32MiB"]', 'values = ["16MiB", "6MiB"]', 5, "multiple of"),
    ],
)
def test_bad_fleet_spec_is_one_error_with_file_and_line(
    tmp_path: Path, old: str, new: str, line: int, words: str
) -> None:
    spec = write_spec(tmp_path, FLEET.replace(old, new))
    with pytest.raises(SpecError) as info:
        load_fleet(spec)
    assert (info.value.line, info.value.file) == (line, str(spec)), str(info.value)
    assert words in info.value.message


def test_fleet_command_reports_shares_and_plots(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, FLEET)
    out = tmp_path / "out"
    r = invoke("fleet", str(spec), "--out", str(out), "--workers", "2")
    assert r.exit_code == 0, r.output
    rows = list(ResultsTable(out / "results.csv").rows.values())
    assert len(rows) == 8
    assert all(r["status"] == "ok" for r in rows)
    assert {r["machine"] for r in rows} == {"0", "1", "2", "3"}
    stats = fleet_stats(rows, ["pinned", "notifier"])
    for d in ("pinned", "notifier"):
        no2m = sum(r["free_blocks_end.2MiB"] == "0" for r in rows if r["design"] == d)
        assert stats[d]["no_free_2MiB"] == {"machines": 4, "none": no2m, "share": no2m / 4}
        assert stats[d]["no_free_1GiB"]["machines"] == 0  # no pool that large
    md = (out / "fleet.md").read_text(encoding="utf-8")
    assert "no free 2MiB block at the end" in md
    assert "n/a (no pool that large)" in md
    names = sorted(p.name for p in plot_fleet(rows, ["pinned", "notifier"], tmp_path / "p"))
    assert "no-free-block.png" in names
    assert "order9_free_mean.cdf.png" in names


def test_two_sweeps_do_not_write_one_directory(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    out = tmp_path / "out"
    with locked(out):
        r = invoke("sweep", str(spec), "--out", str(out))
    assert r.exit_code != 0
    assert f"Error: another gemfs sweep or fleet is writing {out}" in r.output


@pytest.mark.slow
def test_bench_sweep_prints_the_ratio_and_the_overhead() -> None:
    r = invoke("bench", "sweep", "--runs", "8", "--workers", "2", "--pool", "16MiB")
    assert r.exit_code == 0, r.output
    for words in ("ratio one after another / cluster", "engine overhead per run", "do nothing"):
        assert words in r.output
