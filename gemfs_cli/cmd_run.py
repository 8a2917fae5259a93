"""``gemfs run``, ``gemfs demo`` and ``gemfs top``: thin click commands over tools/."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from driver.gem import DriverPolicy
from gemfs.mm.pool import PoolTooLarge
from gemfs.mm.types import Design, MigrateType, format_size
from tools.player import RunRecord, RunResult
from tools.runner import (
    BackendFactory,
    BackendUnavailable,
    TraceWriter,
    default_jobs,
    inproc_factory,
    run_designs,
    stack_factory,
)
from tools.top import Reader, TopError, control_reader, mount_reader, render
from tools.workload import Workload, WorkloadError, load_workload

DESIGN_CHOICE = click.Choice([d.value for d in Design])
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# The 2016 thread's four designs: what `gemfs demo` compares unless told otherwise.
THREAD = (Design.PINNED, Design.SHMEM_HOOK, Design.GEMFS, Design.NOTIFIER)


def _designs(values: Sequence[str], default: Sequence[Design] = tuple(Design)) -> list[Design]:
    chosen = [Design(v) for v in values] or list(default)
    return list(dict.fromkeys(chosen))  # in the order given, once each


def _load(path: str, pool: int | None = None) -> Workload:
    try:
        return load_workload(path, pool)
    except WorkloadError as e:
        raise click.ClickException(str(e)) from None


def _on_mount(mount: str, workload: str, designs: tuple[str, ...]) -> tuple[Workload, list[Design]]:
    """The workload as it plays on an existing mount: the mount's pool and its design."""
    from tools.stack_backend import StackError, mount_info

    try:
        info = mount_info(mount)
    except StackError as e:
        raise click.ClickException(str(e)) from None
    others = [d for d in designs if d != info.design.value]
    if others:
        raise click.ClickException(
            f"{mount} runs design {info.design.value}, not {others[0]}: a mount plays the design "
            f"it was mounted with (leave out --design, or mount with --design {others[0]})"
        )
    w = _load(workload, pool=info.pool)
    file_pool = _load(workload).pool
    if file_pool != info.pool:
        click.echo(
            f"playing on {mount}'s pool of {info.pool_human} "
            f"(the workload file asks for {format_size(file_pool)})",
            err=True,
        )
    return w, [info.design]


def _play(
    workload: Workload,
    designs: list[Design],
    factory: BackendFactory,
    seeds: int,
    console: Console,
    jobs: int = 1,
) -> list[RunResult]:
    total = workload.ticks * len(designs) * seeds
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(workload.name, total=total)

        def tick(design: Design, seed: int, phase: str) -> None:
            bar.update(task, advance=1, description=f"{design.value} seed {seed}: {phase}")

        try:
            return run_designs(workload, designs, factory, tick, seeds=seeds, jobs=jobs)
        except (BackendUnavailable, PoolTooLarge) as e:
            raise click.ClickException(str(e)) from None


def _run_and_report(
    workload: Workload,
    designs: list[Design],
    factory: BackendFactory,
    seeds: int,
    out: Path,
    json_file: str | None,
    jobs: int = 1,
) -> None:
    t0 = time.perf_counter()
    results = _play(workload, designs, factory, seeds, Console(stderr=True), jobs)
    elapsed = time.perf_counter() - t0
    records = [r.record for r in results]
    # matplotlib: only when reporting
    from tools.report import (
        HARNESS,
        provenance,
        provenance_line,
        rich_table,
        summary_table,
        table_width,
        widen,
        write_report,
    )

    files = write_report(workload, results, out)
    if json_file:
        Path(json_file).write_text(json.dumps([r.to_json() for r in records], indent=1) + "\n")
    console = Console(highlight=False)
    width = table_width(console)  # the terminal's; full width when piped to a file
    table = rich_table(records, title=f"{workload.name}: {workload.description}", width=width)
    harness = rich_table(
        records, title=HARNESS.title, sections=(HARNESS,), headings=False, width=width
    )
    side = summary_table(records, width)
    widen(console, table, harness, side)
    console.print(table)
    console.print(side)
    console.print(harness)
    console.print(provenance_line(provenance(workload, records)))
    if note := _too_small(workload, records):
        console.print(note)
    console.print(
        f"{len(designs)} design(s) × {seeds} seed(s) in {elapsed:.1f} s; report: {files.markdown}"
        + (f"; records: {json_file}" if json_file else "")
    )


def _too_small(workload: Workload, records: Sequence[RunRecord]) -> str | None:
    """A line when allocations failed: the pool was too small for what the workload asked."""
    failed = {r.design: 0 for r in records}
    for r in records:
        failed[r.design] += r.alloc_failures
    if not any(failed.values()):
        return None
    per = ", ".join(f"{d} {n}" for d, n in failed.items() if n)
    return (
        f"note: the pool ({format_size(workload.pool)}) was too small for this workload: "
        f"allocations failed even after dropping page cache ({per}; "
        '"allocation failures" in the table); give it a larger pool'
    )


@click.command()
@click.argument("workload", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--design",
    "designs",
    multiple=True,
    type=DESIGN_CHOICE,
    help="Design to run (repeatable; default: every design, or with --mount the mount's).",
)
@click.option("--inproc", is_flag=True, help="Run in this process on the model (no FUSE).")
@click.option("--mount", metavar="M", help="Use this existing gemfs mount (not with --inproc).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Report directory (default: out/<workload name>).",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Play each design this many times, with the workload's seed, seed + 1, ….",
)
@click.option("--json", "json_file", metavar="FILE", help="Also write the records here.")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Runs played at once (default: one per core, at most 4; 1 with --mount).",
)
@click.option(
    "--gem-migratetype",
    type=click.Choice(["unmovable", "movable", "reclaimable"]),
    default=None,
    help="Allocate GEM pages with this migrate type instead of the design's (an ablation; "
    "the workload's [driver] migratetype does the same).",
)
@click.option(
    "--driver-policy",
    type=click.Choice(["wait-idle", "i915-2016", "per-page-flush"]),
    default=None,
    help="The driver's migrate callback (the workload's [driver] policy does the same).",
)
@click.option(
    "--display",
    type=click.Choice(["on", "off"]),
    default=None,
    help="Is a display lit (the workload's [driver] display does the same)? Off: an idle GPU "
    "is not in use for runtime PM, and the i915-2016 callback refuses to drop objects.",
)
@click.option(
    "--trace",
    "trace_file",
    metavar="FILE",
    help="Write the model's tracepoints here, in the kernel's ftrace text (both backends: "
    "the same lines; each names its run as DESIGN-SEED).",
)
def run(
    workload: str,
    designs: tuple[str, ...],
    inproc: bool,
    mount: str | None,
    out: str | None,
    seeds: int,
    json_file: str | None,
    jobs: int | None,
    gem_migratetype: str | None,
    driver_policy: str | None,
    display: str | None,
    trace_file: str | None,
) -> None:
    """Play a WORKLOAD file under each design and compare them side by side.

    The format of a workload file: examples/README.md.

    \b
    Examples:
      gemfs run examples/compaction-test.toml --inproc
      gemfs run examples/desktop.toml --seeds 3 --out out/desktop
      gemfs run examples/desktop.toml --inproc --design pinned --gem-migratetype movable
      gemfs run examples/compaction-test.toml --mount /tmp/gem   # an existing mount"""
    if inproc and mount:
        raise click.UsageError("--mount needs the multi-process stack; drop --inproc")
    try:
        factory = inproc_factory() if inproc else stack_factory(mount)
    except BackendUnavailable as e:
        raise click.ClickException(str(e)) from None
    if mount:
        w, chosen = _on_mount(mount, workload, designs)
    else:
        w, chosen = _load(workload), _designs(designs)
    if gem_migratetype:
        w = dataclasses.replace(w, gem_migratetype=MigrateType.parse(gem_migratetype))
    out_dir = Path(out) if out else Path("out") / w.name
    writer = _trace_writer(trace_file)  # opened now: an unwritable FILE stops us before a run
    if writer is not None:
        factory = writer.factory(factory)
    if jobs is None:
        jobs = 1 if mount or writer else default_jobs()
    elif mount and jobs > 1:
        raise click.UsageError("--mount plays on one existing mount: --jobs must be 1")
    if driver_policy:
        w = w.with_driver_policy(DriverPolicy.parse(driver_policy))
    if display:
        w = dataclasses.replace(w, display_on=display == "on")
    try:
        _run_and_report(w, chosen, factory, seeds, out_dir, json_file, jobs)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        click.echo(f"trace: {writer.lines} lines in {writer.path}", err=True)
        if writer.lost:
            click.echo(
                f"warning: the mount's trace buffer overwrote {writer.lost} events before they "
                "were read (CPU:0 [LOST N EVENTS] lines in the trace)",
                err=True,
            )


def _trace_writer(path: str | None) -> TraceWriter | None:
    if path is None:
        return None
    try:
        return TraceWriter(Path(path))
    except OSError as e:
        raise click.ClickException(f"cannot write the trace to {path}: {e.strerror}") from None


@click.command()
@click.option(
    "--workload",
    "workload_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Workload file (default: examples/desktop.toml).",
)
@click.option(
    "--design",
    "designs",
    multiple=True,
    type=DESIGN_CHOICE,
    help="Design to run (repeatable; default: the thread's four).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="out/demo",
    show_default=True,
    help="Report directory.",
)
@click.option(
    "--inproc", is_flag=True, help="Run the model in this process (no mount, no daemons)."
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Play each design this many times, with the workload's seed, seed + 1, ….",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Runs played at once (default: one per core, at most 4).",
)
def demo(
    workload_path: str | None,
    designs: tuple[str, ...],
    out: str,
    inproc: bool,
    seeds: int,
    jobs: int | None,
) -> None:
    """Run the desktop workload under the thread's four designs (pinned, shmem-hook, gemfs,
    notifier; --design for others) on the real stack, several seeds each, and compare them.

    \b
    Examples:
      gemfs demo                       # what `make demo` runs (about 65 s)
      gemfs demo --inproc --seeds 1    # the model alone, in a few seconds"""
    path = Path(workload_path) if workload_path else EXAMPLES / "desktop.toml"
    if not path.is_file():
        raise click.ClickException(f"{path} not found (run from a source checkout)")
    w = _load(str(path))
    try:
        factory = inproc_factory() if inproc else stack_factory(None)
    except BackendUnavailable as e:
        raise click.ClickException(str(e)) from None
    chosen = _designs(designs, THREAD)
    _run_and_report(w, chosen, factory, seeds, Path(out), None, jobs or default_jobs())


@click.command()
@click.argument("mountpoint", required=False)
@click.option("--control", metavar="PATH", help="Read the pool over this control socket.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
def top(mountpoint: str | None, control: str | None, interval: float, once: bool) -> None:
    """Show the live pool of MOUNTPOINT (or --control PATH): buddyinfo, score, counters.

    \b
    Examples:
      gemfs top /tmp/gem
      gemfs top --control /tmp/gem.sock --once"""
    if (mountpoint is None) == (control is None):
        raise click.UsageError("give either MOUNTPOINT or --control PATH")
    try:
        read: Reader = control_reader(control) if control else mount_reader(str(mountpoint))
        console = Console()
        if once:
            console.print(render(read()))
            return
        with Live(render(read()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(read()), refresh=True)
    except TopError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass
