"""``gemfs record`` and ``gemfs replay``: a real kernel's page allocator, traced, then replayed in
the model (logic in tools/record.py, tools/tracefile.py and tools/replay.py)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import cast

import click

from gemfs.mm.types import Design, parse_size
from tools.record import DEFAULT_BUFFER_KB, Recorder, RecordStats, RecordUnavailable
from tools.replay import (
    DEFAULT_MAX_POOL,
    Placement,
    ReplayError,
    format_table,
    replay,
    write_outputs,
)
from tools.tracefile import TraceFormatError, read_trace


def _progress(stats: RecordStats) -> None:
    sys.stderr.write(
        f"\rrecording: {stats.seconds:5.1f} s, {stats.events:,} events, "
        f"{stats.bytes_in / 1e6:.1f} MB, {stats.snapshots} snapshots, {stats.lost:,} lost "
    )
    sys.stderr.flush()


@click.command("record", context_settings={"ignore_unknown_options": True})
@click.option("--duration", type=float, metavar="S", help="Seconds to record (default: 10).")
@click.option(
    "--out",
    default="gemfs.trace.gz",
    show_default=True,
    metavar="FILE",
    help="Where the record goes (gzip'd text: the events, then the snapshots).",
)
@click.option(
    "--buffer-kb",
    type=click.IntRange(64),
    default=DEFAULT_BUFFER_KB,
    show_default=True,
    help="Ring buffer per CPU; events it overwrites before being read are counted as lost.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.05),
    default=1.0,
    show_default=True,
    help="Seconds between snapshots of buddyinfo, pagetypeinfo, vmstat and zoneinfo.",
)
@click.option(
    "--kpageflags",
    is_flag=True,
    help="Also snapshot the free runs of /proc/kpageflags (the kernel's exact free layout; "
    "slow on a big machine, so taken only as often as it costs a quarter of the interval).",
)
@click.option(
    "--pfn-range",
    metavar="LO:HI",
    help="Record page events of these frames only (a tracefs filter) and snapshot their "
    "kpageflags every time: a window of a zone too large to replay whole.",
)
@click.option(
    "--guest",
    is_flag=True,
    help="Record in a QEMU guest instead (the host's kernel, TCG, 256 MiB) running the "
    "fragmenting program of gemfs calibrate; needs no root.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record_cmd(
    duration: float | None,
    out: str,
    buffer_kb: int,
    interval: float,
    kpageflags: bool,
    pfn_range: str | None,
    guest: bool,
    command: tuple[str, ...],
) -> None:
    """Record the kernel's page allocator (tracefs, as root) while COMMAND runs or for S seconds.

    Example: gemfs record --duration 30 --out build.trace.gz -- make -j2
    """
    if guest:
        _record_guest(Path(out))
        return
    if duration is None and not command:
        duration = 10.0
    span: tuple[int, int] | None = None
    if pfn_range is not None:
        try:
            lo, hi = (int(x, 0) for x in pfn_range.split(":"))
        except ValueError:
            raise click.BadParameter(
                "expected LO:HI (frame numbers)", param_hint="--pfn-range"
            ) from None
        if not 0 <= lo < hi:
            raise click.BadParameter("expected LO < HI", param_hint="--pfn-range")
        span = (lo, hi)
    try:
        recorder = Recorder(
            Path(out),
            buffer_kb=buffer_kb,
            interval=interval,
            progress=_progress,
            kpageflags=kpageflags,
            pfn_range=span,
        )
        stats = recorder.run(duration, command)
    except RecordUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    sys.stderr.write("\n")
    click.echo(
        f"{out}: {stats.events:,} events in {stats.seconds:.1f} s, {stats.snapshots} snapshots"
        + (f"; not on this kernel: {', '.join(stats.missing)}" if stats.missing else "")
    )
    if stats.lost:
        click.echo(
            f"warning: {stats.lost:,} events were lost (the ring buffer overflowed before it "
            "was read); the replay will not match the kernel -- record again with a larger "
            "--buffer-kb or a shorter run",
            err=True,
        )
    if stats.command_status:
        raise SystemExit(stats.command_status)


def _record_guest(out: Path) -> None:
    from tools.calibrate.guest import GuestError
    from tools.record_guest import record_guest

    log_dir = Path(tempfile.mkdtemp(prefix="gemfs-record-guest-"))
    sys.stderr.write(f"booting the guest (logs in {log_dir}) ...\n")
    try:
        got = record_guest(out, log_dir)
    except GuestError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{out}: the guest's trace, recorded in {got.total_s:.0f} s")


@click.command("replay")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--design",
    "designs",
    multiple=True,
    type=click.Choice([d.value for d in Design]),
    help="Replay under this design (repeatable; default pinned, the status quo).",
)
@click.option(
    "--placement",
    type=click.Choice(["model", "kernel"]),
    default="model",
    show_default=True,
    help="model: the model's allocator places every allocation; kernel: take the kernel's frames.",
)
@click.option("--zone", metavar="NAME", help="Zone to replay (default: the largest).")
@click.option(
    "--max-pool",
    default=f"{DEFAULT_MAX_POOL >> 30}GiB",
    show_default=True,
    help="Refuse a zone larger than this (record a window with --pfn-range instead).",
)
@click.option("--out", metavar="DIR", help="Write report.txt, replay.json and plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def replay_cmd(
    file: str,
    designs: tuple[str, ...],
    placement: str,
    zone: str | None,
    max_pool: str,
    out: str | None,
    as_json: bool,
) -> None:
    """Replay a trace (gemfs record, tracefs, trace-cmd report, perf script) in the model and show
    the kernel against the model over time.

    Example: gemfs replay build.trace.gz --placement kernel --out out/replay"""
    try:
        trace = read_trace(file)
        results = replay(
            trace,
            designs or ("pinned",),
            cast(Placement, placement),
            zone,
            parse_size(max_pool),
        )
    except (TraceFormatError, ReplayError) as exc:
        raise click.ClickException(str(exc)) from None
    if trace.lost:
        click.echo(f"warning: the trace lost {trace.lost:,} events", err=True)
    if as_json:
        import json

        click.echo(json.dumps([r.to_json() for r in results], indent=1))
    else:
        click.echo(format_table(results))
    if out:
        for path in write_outputs(results, Path(out)):
            click.echo(f"wrote {path}", err=True)
