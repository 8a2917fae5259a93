"""``gemfs sweep`` and ``gemfs fleet``: thin click commands over tools/sweep.py and fleet.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tools.sweep import (
    Outcome,
    ResultsTable,
    Row,
    RunTask,
    SpecError,
    SweepError,
    dask_client,
    execute,
    locked,
    scheduler_retries,
    write_meta,
)

_SCHEDULER = click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="An existing dask scheduler (e.g. tcp://host:8786) whose workers have gemfs installed "
    "(default: a local cluster of one worker process per core).",
)
_WORKERS = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes of the local cluster (default: one per core).",
)
_RETRY = click.option(
    "--retry-failed", is_flag=True, help="Run again the runs that results.csv has as failed."
)


def _run(
    tasks: Sequence[RunTask],
    out: Path,
    scheduler: str | None,
    workers: int | None,
    retry_failed: bool,
    title: str,
) -> tuple[Outcome, ResultsTable]:
    """Run the tasks on dask with a progress bar; rows stream into OUT/results.csv."""
    if scheduler and workers:
        raise click.UsageError("--workers sizes the local cluster: drop it with --scheduler")
    console = Console(stderr=True, highlight=False)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    ok = failed = 0
    try:
        with locked(out), dask_client(scheduler, workers) as client:
            table = ResultsTable(out / "results.csv")  # read under the lock
            nworkers = len(client.nthreads())
            where = f"the scheduler at {scheduler}" if scheduler else "a local cluster"
            retries = scheduler_retries(client)
            console.print(
                f"{len(tasks)} runs on {where} ({nworkers} workers; a run whose worker dies is "
                f"tried {retries} more time(s)); results: {table.path}"
            )
            done = sum(
                1
                for t in tasks
                if t.key in table.rows
                and not (retry_failed and table.rows[t.key]["status"] == "failed")
            )
            if done:
                console.print(f"{done} of them already in {table.path.name}: not run again")
            with Progress(*columns, console=console) as bar:
                task = bar.add_task(title, total=len(tasks), completed=done)

                def on_row(t: RunTask, row: Row) -> None:
                    nonlocal ok, failed
                    ok += row["status"] == "ok"
                    failed += row["status"] != "ok"
                    label = f"{title}: {ok} ok" + (f", [red]{failed} failed[/]" if failed else "")
                    bar.update(task, advance=1, description=label)

                outcome = execute(tasks, table, client, on_row, retry_failed=retry_failed)
    except SweepError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        done_rows = len(ResultsTable(out / "results.csv").rows)
        console.print(
            f"interrupted: {done_rows} runs are in {out / 'results.csv'}; "
            "the same command resumes without redoing them"
        )
        raise SystemExit(130) from None
    for err in outcome.errors[:5]:
        console.print(f"[red]failed[/]: {err}")
    if len(outcome.errors) > 5:
        console.print(f"… and {len(outcome.errors) - 5} more (the error column of results.csv)")
    return outcome, table


@click.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Result directory (default: out/sweep-<spec name>); results.csv there is resumed.",
)
@_SCHEDULER
@_WORKERS
@_RETRY
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Column to tabulate and plot (repeatable; default: the spec's metrics).",
)
def sweep(
    spec: str,
    out: str | None,
    scheduler: str | None,
    workers: int | None,
    retry_failed: bool,
    metrics: tuple[str, ...],
) -> None:
    """Play a workload over a grid of parameters × designs × seeds on dask.distributed.

    SPEC names a workload, designs, seeds and a [grid] of dotted workload paths, e.g.
    "compactor.proactiveness" = [0, 20] or "phase.scanout.count" = [1, 3]. One row per run goes
    to OUT/results.csv as it finishes; run the same command again to resume.

    \b
    Examples:
      gemfs sweep examples/sweep-pinned-fraction.toml --out out/sweep
      gemfs sweep spec.toml --scheduler tcp://127.0.0.1:8786   # an existing cluster"""
    from tools.sweep import load_sweep

    try:
        s = load_sweep(spec)
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    out_dir = Path(out) if out else Path("out") / f"sweep-{s.name}"
    outcome, table = _run(s.tasks, out_dir, scheduler, workers, retry_failed, s.name)
    from tools.sweep_report import plot_sweep, summary

    keys = {t.key for t in s.tasks}
    rows = [r for k, r in table.rows.items() if k in keys]
    chosen = list(metrics) or list(s.metrics)
    designs = [d.value for d in s.designs]
    console = Console(highlight=False)
    for metric in chosen[:3]:
        t = Table(title=f"{metric} (mean over seeds)", box=box.SIMPLE_HEAD)
        for p in s.params:
            t.add_column(p)
        for d in designs:
            t.add_column(d, justify="right")
        for point, per in summary(rows, s.params, designs, metric):
            t.add_row(*point, *("–" if per[d] is None else f"{per[d]:.4g}" for d in designs))
        console.print(t)
    plots = plot_sweep(rows, s.params, designs, chosen, out_dir / "plots")
    write_meta(
        out_dir,
        "sweep",
        s.file,
        outcome,
        {"workload": s.workload_file, "grid": [[p, list(v)] for p, v in s.grid]},
    )
    console.print(
        f"{outcome.total} runs: {outcome.skipped} already done, {outcome.ok} ok, "
        f"{outcome.failed} failed, in {outcome.wall_s:.1f} s; results: {table.path}; "
        f"{len(plots)} plots in {out_dir / 'plots'}"
    )


@click.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Result directory (default: out/fleet-<spec name>); results.csv there is resumed.",
)
@_SCHEDULER
@_WORKERS
@_RETRY
@click.option(
    "--machines",
    type=click.IntRange(min=1),
    default=None,
    help="Play only the first N machines of the spec's fleet (each machine's draws stay the same).",
)
def fleet(
    spec: str,
    out: str | None,
    scheduler: str | None,
    workers: int | None,
    retry_failed: bool,
    machines: int | None,
) -> None:
    """Play a fleet of simulated machines (workload mix, pool size, uptime drawn from SPEC)
    under each design, and report per design the share with no free 2 MiB / 16 MiB / 1 GiB
    block at the end and the distributions of free huge pages, failures and GPU stall.

    Example: gemfs fleet examples/fleet-desktops.toml --machines 12"""
    from tools.fleet import load_fleet

    try:
        f = load_fleet(spec, machines)
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    out_dir = Path(out) if out else Path("out") / f"fleet-{f.name}"
    outcome, table = _run(f.tasks, out_dir, scheduler, workers, retry_failed, f.name)
    from tools.sweep_report import fleet_markdown, fleet_stats, plot_fleet, write_json

    keys = {t.key for t in f.tasks}
    rows = [r for k, r in table.rows.items() if k in keys]
    stats = fleet_stats(rows, f.designs)
    intro = f"{len(f.machines)} machines × {len(f.designs)} designs. {f.description}".strip()
    md = fleet_markdown(f"fleet {f.name}", intro, stats)
    (out_dir / "fleet.md").write_text(md, encoding="utf-8")
    write_json(out_dir / "fleet-stats.json", stats)
    plots = plot_fleet(rows, f.designs, out_dir / "plots")
    write_meta(out_dir, "fleet", f.file, outcome, {"machines": len(f.machines)})
    click.echo(md)
    click.echo(
        f"{outcome.total} runs: {outcome.skipped} already done, {outcome.ok} ok, "
        f"{outcome.failed} failed, in {outcome.wall_s:.1f} s; results: {table.path}; "
        f"report: {out_dir / 'fleet.md'}; {len(plots)} plots in {out_dir / 'plots'}"
    )
