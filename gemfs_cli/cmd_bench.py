"""`gemfs bench ...`: benchmarks that print numbers (and a ratio against a baseline)."""

from __future__ import annotations

import os
from pathlib import Path

import click

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@click.group()
def bench() -> None:
    """Benchmarks: print figures and ratios against a baseline measured in the same run.

    \b
    Examples:
      gemfs bench mm          # the model's allocator and compaction speed
      gemfs bench io          # file I/O on gemfs against tmpfs (root)
      gemfs bench migrate     # pages/s through the driver's callbacks
      gemfs bench scale       # a content-free pool from 1 GiB to 128 GiB"""


@bench.command("mm")
@click.option("--size", default="4GiB", show_default=True, help="Pool size for the main figures.")
@click.option("--big", default="16GiB", show_default=True, help="Large pool that must run at all.")
@click.option(
    "--probes",
    default=400,
    show_default=True,
    type=click.IntRange(1),
    help="Direct-compaction attempts per design on the fragmented pool.",
)
@click.option(
    "--desktop",
    "desktop",
    multiple=True,
    type=click.IntRange(1, 64),
    help="Also play examples/desktop.toml scaled by this factor (pool and counts) under "
    "pinned, in process, and print its CPU time (repeatable: --desktop 4 --desktop 16).",
)
def bench_mm_cmd(size: str, big: str, probes: int, desktop: tuple[int, ...]) -> None:
    """Allocator, object allocation, migration, full and direct compaction speed of the model.

    Example: gemfs bench mm --size 1GiB --big 4GiB --desktop 1 --desktop 4"""
    from pathlib import Path

    from gemfs.mm.pool import check_pool_size
    from gemfs.mm.types import Design
    from tools.bench_mm import bench_direct_compaction, bench_mm, play_scaled

    for s in (size, big):
        try:
            check_pool_size(s)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    for f in bench_mm(size, big):
        value = f"{f.value:,.3f}" if f.unit == "s" else f"{f.value:,.0f}"
        if f.unit == "bytes/frame":
            value = f"{f.value:.1f}"
        click.echo(f"{f.name:<42} {value:>14} {f.unit:<12} {f.note}")
    for design in (Design.PINNED, Design.SHMEM_HOOK):
        p = bench_direct_compaction(size, design, probes)
        note = (
            f"{p.succeeded}/{p.attempts} got a block; per attempt "
            f"{p.migrate_scanned // p.attempts:,} + {p.free_scanned // p.attempts:,} pages "
            f"scanned, {p.migrated // p.attempts:,} moved"
        )
        name = f"direct compaction {size}, {design.value}"
        click.echo(f"{name:<42} {p.rate:>14,.0f} {'attempts/s':<12} {note}")
    examples = Path(__file__).resolve().parent.parent / "examples" / "desktop.toml"
    times = {}
    for factor in desktop:
        cpu, got = play_scaled(examples, factor)
        times[factor] = cpu
        name = f"desktop x{factor}, pinned, in process"
        click.echo(f"{name:<42} {cpu:>14,.1f} {'s CPU':<12} {got} probes got a block")
    for a, b in zip(sorted(times), sorted(times)[1:], strict=False):
        ratio = times[b] / times[a] if times[a] else float("inf")
        click.echo(f"{f'desktop x{b} / x{a}':<42} {ratio:>14.2f} {'x':<12} pool x{b // a}")


@bench.command("io")
@click.option("--size", default="256MiB", show_default=True, help="File size.")
@click.option("--pool", default="512MiB", show_default=True, help="gemfs pool size.")
@click.option("--rounds", default=3, show_default=True, help="Runs per figure (median).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--floor",
    is_flag=True,
    help="Also read with O_DIRECT from the barest pyfuse3 server (one memfd-backed file), "
    "interleaved: the ceiling of gemfs's FUSE binding on this machine.",
)
def bench_io_cmd(size: str, pool: str, rounds: int, as_json: bool, floor: bool) -> None:
    """Sequential 1 MiB and random 4 KiB file I/O on gemfs against a kernel tmpfs.

    Example: gemfs bench io --size 256MiB --pool 512MiB --rounds 5 --floor"""
    from tools.bench_io import BenchError, bench_io, format_table

    try:
        result = bench_io(size=size, pool=pool, rounds=rounds, floor=floor)
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.to_json() if as_json else format_table(result))


@bench.command("migrate")
@click.option(
    "--pages",
    default=16384,
    show_default=True,
    type=click.IntRange(256),
    help="Pages to migrate through the driver's callbacks.",
)
@click.option(
    "--batch",
    default=512,
    show_default=True,
    type=click.IntRange(2, 65536),
    help="Pages per call in the batched figure.",
)
def bench_migrate_cmd(pages: int, batch: int) -> None:
    """Pages/s migrated through the driver's callbacks: one page per round trip vs batched.

    Example: gemfs bench migrate --pages 16384 --batch 512"""
    from tools.bench_migrate import bench_migrate

    f = bench_migrate(pages=pages, batch=batch)
    click.echo(f"{'one page per round trip':<42} {f.single_pages_s:>12,.0f} pages/s")
    click.echo(f"{f'batched ({f.batch} pages a call)':<42} {f.batched_pages_s:>12,.0f} pages/s")
    click.echo(f"{'ratio batched / one page':<42} {f.batched_pages_s / f.single_pages_s:>12.1f} x")
    click.echo(f"{f'batched ({f.big_batch} pages a call)':<42} {f.big_pages_s:>12,.0f} pages/s")
    click.echo(f"{'callback round trip, one page, p50':<42} {f.single_p50_us:>12,.0f} us")
    click.echo(f"{'callback round trip, batched, p50':<42} {f.p50_us:>12,.0f} us")
    click.echo(f"{'callback round trip, batched, p99':<42} {f.p99_us:>12,.0f} us")
    click.echo(f"{'baseline: in-process, batched':<42} {f.inproc_pages_s:>12,.0f} pages/s")
    click.echo(f"{'ratio socket / in-process':<42} {f.batched_pages_s / f.inproc_pages_s:>12.2f}")


@bench.command("scale")
@click.option(
    "--sizes",
    default="1GiB,4GiB,16GiB,64GiB,128GiB",
    show_default=True,
    help="Comma-separated pool sizes (content-free model, each in a fresh process).",
)
def bench_scale_cmd(sizes: str) -> None:
    """RSS, bytes per frame, time per sample, per GPU batch and per direct-compaction attempt,
    for content-free pools of each size, with ratios to the first.

    Example: gemfs bench scale --sizes 1GiB,16GiB"""
    from tools.bench_scale import bench_scale, format_scale

    chosen = tuple(s.strip() for s in sizes.split(",") if s.strip())
    try:
        rows = bench_scale(chosen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--sizes") from None
    click.echo(format_scale(rows))


@bench.command("sweep")
@click.option(
    "--runs",
    default=64,
    show_default=True,
    type=click.IntRange(4),
    help="Runs in the sweep (every design, seeds in turn).",
)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes of the local dask cluster.",
)
@click.option("--pool", default="32MiB", show_default=True, help="Pool of each run.")
@click.option(
    "--workload",
    type=click.Path(exists=True, dir_okay=False),
    help="Workload of every run (default: examples/compaction-test.toml).",
)
def bench_sweep_cmd(runs: int, workers: int, pool: str, workload: str | None) -> None:
    """A sweep on a local dask cluster against the same runs one after another.

    Example: gemfs bench sweep --runs 64 --workers 2"""
    from tools.bench_sweep import bench_sweep

    path = Path(workload) if workload else EXAMPLES / "compaction-test.toml"
    if not path.is_file():
        raise click.ClickException(f"{path} not found (run from a source checkout)")
    load0 = os.getloadavg()[0]
    b = bench_sweep(path, pool=pool, runs=runs, workers=workers)
    load1 = os.getloadavg()[0]
    click.echo(f"{'runs (every design, seeds in turn)':<46} {b.runs:>10} of {path.name} at {pool}")
    click.echo(f"{'local cluster start-up':<46} {b.startup_s:>10.2f} s   {b.workers} workers")
    click.echo(f"{'one after another, in this process':<46} {b.serial_s:>10.2f} s")
    click.echo(f"{'on the cluster (dask.distributed)':<46} {b.dask_s:>10.2f} s")
    click.echo(f"{'ratio one after another / cluster':<46} {b.speedup:>10.2f} x")
    click.echo(
        f"{'baseline: plain process pool, no dask':<46} {b.processes_s:>10.2f} s   "
        f"ratio {b.serial_s / b.processes_s:.2f} x (what the cores allow)"
    )
    click.echo(f"{'time a worker spent per run, playing':<46} {1000 * b.play_s / b.runs:>10.0f} ms")
    click.echo(
        f"{'engine overhead per run (workers idle or busy)':<46} {b.overhead_ms:>10.0f} ms"
        "   (workers × wall − playing) / runs"
    )
    click.echo(f"{'engine time per run, tasks that do nothing':<46} {b.noop_ms:>10.1f} ms")
    click.echo(
        f"{'load average, before / after (1 min)':<46} {load0:>10.2f} / {load1:.2f} "
        f"on {os.cpu_count()} cores"
    )
