"""CLI: `gemfs driver`, `gemfs compactor`, `gemfs gem ...` — the processes around the mount."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click

from gemfs.control.peer import CallError
from gemfs.mm.types import Design, parse_size


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _check_socket(path: str) -> None:
    if not os.path.exists(path):
        raise click.BadParameter(f"{path}: no such control socket", param_hint="--control")


@click.command("driver")
@click.option("--control", required=True, help="The mount's control socket.")
@click.option("--listen", default=None, help="Socket for clients (gemfs gem ...).")
@click.option(
    "--name",
    default="i915",
    show_default=True,
    help="The driver's name (in .gemfs/objects and the mount's peer list).",
)
@click.option(
    "--migratetype",
    type=click.Choice(["unmovable", "movable", "reclaimable"]),
    default=None,
    help="GEM pages' migrate type instead of the design's (an ablation).",
)
@click.option(
    "--policy",
    type=click.Choice(["wait-idle", "i915-2016", "per-page-flush"]),
    default="wait-idle",
    show_default=True,
    help="The migrate callback: wait for the GPU (wait-idle), the 2016 patch (-EBUSY when "
    "active, else drop the object's backing store), or wait-idle with a GPU cache flush per "
    "page (its cost comes from the mount's cost table: flush_page_us).",
)
@click.option(
    "--display",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="Is a display lit? It keeps the GPU 'in use' for runtime PM; with it off an idle GPU "
    "is not, and the i915-2016 callback answers -EBUSY.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def driver_cmd(
    control: str,
    listen: str | None,
    name: str,
    migratetype: str | None,
    policy: str,
    display: str,
    verbose: bool,
) -> None:
    """Run the driver daemon (i915's part): GEM objects, a simulated GPU, migrate callbacks.

    \b
    Example (after gemfs mount ... --control /tmp/gem.sock):
      gemfs driver --control /tmp/gem.sock --listen /tmp/i915.sock &
      GEMFS_DRIVER=/tmp/i915.sock gemfs gem create 1MiB"""
    import trio

    from driver.daemon import run_driver
    from driver.gem import DriverPolicy

    _check_socket(control)
    _logging(verbose)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            await run_driver(
                control, listen, name, migratetype, DriverPolicy.parse(policy), display == "on"
            )
            nursery.cancel_scope.cancel()

    _run_trio("driver", main)


def _run_trio(what: str, main: Callable[[], Awaitable[None]]) -> bool:
    """trio.run with the errors a user can cause (socket, protocol) as one line.

    The mount going away (unmounted: the core closes the connection) is how a background
    driver or compactor normally ends: one line, exit status 0, and False is returned."""
    import trio

    error: BaseException | None = None
    try:
        trio.run(main)
    except* (CallError, OSError) as eg:
        error = _leaf(eg)
    if error is None:
        return True
    if _core_gone(error):
        click.echo(f"{what}: the mount's control socket closed (unmounted); exiting", err=True)
        return False
    raise click.ClickException(f"{what}: {error}")


def _core_gone(exc: BaseException) -> bool:
    """Did the core close the connection under us (as opposed to refusing it at the start)?"""
    if isinstance(exc, CallError):
        return exc.errno in ("ENOTCONN", "ECONNRESET", "EPIPE")
    return isinstance(exc, ConnectionResetError | BrokenPipeError)


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _cancel_on_signal(scope: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


@click.command("compactor")
@click.option("--control", required=True, help="The mount's control socket.")
@click.option(
    "--order",
    default=-1,
    show_default=True,
    type=click.IntRange(-1, 10),
    help="Order work at every wake (kcompactd_do_work) while no free block of this order "
    "exists (-1: only the order a failed hugetlb/kernel allocation leaves, and proactive).",
)
@click.option(
    "--proactiveness",
    default=None,
    type=click.IntRange(0, 100),
    help="0..100; default: the mount's .gemfs/compaction_proactiveness knob (20), read live.",
)
@click.option("--once", is_flag=True, help="Compact the whole pool once and exit.")
@click.option(
    "--interval-ms",
    default=500,
    show_default=True,
    type=click.IntRange(1, 3_600_000),
    help="How often it wakes to check the fragmentation score (kcompactd: 500 ms).",
)
@click.option(
    "--clock",
    type=click.Choice(["wall", "model"]),
    default="wall",
    show_default=True,
    help="Wake on the wall clock, or when the mount's modelled clock reaches each interval "
    "(a workload player drives it).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def compactor_cmd(
    control: str,
    order: int,
    proactiveness: int | None,
    once: bool,
    interval_ms: int,
    clock: str,
    verbose: bool,
) -> None:
    """Run kcompactd's part from outside: proactive compaction, or one full pass (--once).

    \b
    Examples:
      gemfs compactor --control /tmp/gem.sock --once      # echo 1 > compact_memory
      gemfs compactor --control /tmp/gem.sock --proactiveness 20 &"""
    import trio

    from tools.compactor import CompactorStats, run_compactor

    _check_socket(control)
    _logging(verbose)
    result: list[CompactorStats] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            result.append(
                await run_compactor(
                    control,
                    order=order,
                    proactiveness=proactiveness,
                    once=once,
                    interval=interval_ms / 1000,
                    model_clock=clock == "model",
                )
            )
            nursery.cancel_scope.cancel()

    if not _run_trio("compactor", main):
        return
    if result:
        s = result[0]
        click.echo(
            f"compactor: passes {s.passes} migrated {s.migrated} failed {s.failed} "
            f"wakeups {s.wakeups} deferred {s.deferred} results {','.join(s.results)}"
        )


# -- gem: the ioctls of a tiny i915 ------------------------------------------------------------
@click.group("gem")
@click.option(
    "--driver",
    "driver_sock",
    envvar="GEMFS_DRIVER",
    metavar="PATH",
    help="The driver's --listen socket (or $GEMFS_DRIVER).",
)
@click.pass_context
def gem(ctx: click.Context, driver_sock: str | None) -> None:
    """Talk to the driver daemon: create objects, execute batches, wait, close.

    \b
    Example (a driver started with --listen /tmp/i915.sock):
      export GEMFS_DRIVER=/tmp/i915.sock
      gemfs gem create 1MiB --path /bo-1
      gemfs gem exec 1 --write --duration-ms 50"""
    ctx.obj = driver_sock


def _call(ctx: click.Context, op: str, args: dict[str, Any]) -> Any:
    from gemfs.control.client import SyncClient

    if not ctx.obj:
        raise click.UsageError(
            "no driver socket: give gemfs gem --driver PATH (the driver's --listen) "
            "or set GEMFS_DRIVER"
        )
    try:
        with SyncClient(ctx.obj, name="gemfs-gem") as c:
            return c.call(op, args)
    except CallError as e:
        raise click.ClickException(f"gem {op}: {e}") from None
    except OSError as e:
        raise click.ClickException(f"gem {op}: {e}") from None


@gem.command("create")
@click.argument("size")
@click.option("--path", default=None, help="File name on the mount (default: generated).")
@click.pass_context
def gem_create(ctx: click.Context, size: str, path: str | None) -> None:
    """Create a GEM object of SIZE (e.g. 1MiB); prints its id and path.

    \b
    Example:
      gemfs gem --driver /tmp/i915.sock create 1MiB --path /bo-1
      {"obj": 1, "path": "/bo-1", "pages": 256}"""
    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="SIZE") from None
    args: dict[str, Any] = {"size": nbytes}
    if path:
        args["path"] = path
    r = _call(ctx, "create", args)
    click.echo(json.dumps(r))


@gem.command("exec")
@click.argument("objs", nargs=-1, type=int, required=True)
@click.option(
    "--duration-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="How long the GPU stays busy on the objects (they stay bound, pinned, after).",
)
@click.option("--write", is_flag=True, help="The batch writes the objects.")
@click.pass_context
def gem_exec(ctx: click.Context, objs: tuple[int, ...], duration_ms: float, write: bool) -> None:
    """Execute a batch on OBJS: bind (pin), read through the GTT, optionally write.

    \b
    Example:
      gemfs gem exec 1 2 3 --write --duration-ms 50   # prints data_errors and checksums"""
    r = _call(ctx, "exec", {"objs": list(objs), "duration_ms": duration_ms, "write": write})
    click.echo(json.dumps(r))


@gem.command("wait")
@click.argument("obj", type=int)
@click.pass_context
def gem_wait(ctx: click.Context, obj: int) -> None:
    """Wait until the GPU is idle on OBJ.

    \b
    Example:
      gemfs gem wait 1"""
    _call(ctx, "wait", {"obj": obj})


@gem.command("close")
@click.argument("obj", type=int)
@click.option("--keep-file", is_flag=True, help="Keep the file on the mount.")
@click.pass_context
def gem_close(ctx: click.Context, obj: int, keep_file: bool) -> None:
    """Close OBJ (its file is removed unless --keep-file).

    \b
    Example:
      gemfs gem close 1 --keep-file"""
    _call(ctx, "close", {"obj": obj, "unlink": not keep_file})


@gem.command("stats")
@click.pass_context
def gem_stats(ctx: click.Context) -> None:
    """Print the driver's counters (batches, data errors, stalls, callbacks).

    \b
    Example:
      gemfs gem stats    # "migrate_calls": 2, "migrate_pages": 512, "data_errors": 0"""
    click.echo(json.dumps(_call(ctx, "stats", {}), indent=1))


@click.command("stress")
@click.option(
    "--minutes",
    type=click.FloatRange(0.05),
    default=1.0,
    show_default=True,
    help="How long to run.",
)
@click.option(
    "--design",
    default=Design.SHMEM_HOOK.value,
    show_default=True,
    type=click.Choice([d.value for d in Design]),
    help="The design of the mount under stress.",
)
@click.option(
    "--workers",
    default=3,
    show_default=True,
    type=click.IntRange(1, 16),
    help="File I/O processes working on the mount at once.",
)
@click.option(
    "--seed",
    default=1,
    show_default=True,
    type=int,
    help="Seed of the workers' and the fault injector's choices.",
)
@click.option(
    "--driver-policy",
    type=click.Choice(["wait-idle", "i915-2016", "per-page-flush"]),
    default="wait-idle",
    show_default=True,
    help="The driver's migrate callback (gemfs driver --policy): i915-2016 drops idle objects "
    "whole, and the GPU thread's next batch re-faults them.",
)
def stress_cmd(minutes: float, design: str, workers: int, seed: int, driver_policy: str) -> None:
    """Concurrent file I/O, GPU batches and compaction with faults injected; checks every byte.

    \b
    Example:
      gemfs stress --minutes 10 --design gemfs   # ends with: clean: 0 bytes lost"""
    from driver.gem import DriverPolicy
    from gemfs.mm.types import Design
    from tools.stress import run_stress

    rep = run_stress(
        minutes * 60,
        Design.parse(design),
        workers=workers,
        seed=seed,
        policy=DriverPolicy.parse(driver_policy),
    )
    rows = [
        ("duration (s)", f"{rep.seconds:.0f}"),
        ("file operations", rep.file_ops),
        ("GPU batches / objects", f"{rep.gpu_batches} / {rep.gpu_objects}"),
        ("pages migrated / failed", f"{rep.migrations} / {rep.migrate_fail}"),
        ("owner callbacks / timeouts", f"{rep.callbacks} / {rep.callback_timeouts}"),
        ("objects dropped by callbacks", rep.dropped_objects),
        ("migrations aborted (peer died)", rep.aborted),
        ("explicit compactions", rep.compactions),
        ("driver kills / compactor kills", f"{rep.driver_kills} / {rep.compactor_kills}"),
        ("ENOSPC answers", rep.enospc),
        ("bytes checked", rep.bytes_checked),
        ("objects checked / bad", f"{rep.objects_checked} / {rep.objects_bad}"),
        ("objects torn by a killed batch", rep.torn_objects),
        ("GPU data errors", rep.data_errors),
        ("bytes lost", rep.bytes_lost),
    ]
    for k, v in rows:
        click.echo(f"{k:<34} {v}")
    for e in rep.errors[:20]:
        click.echo(f"error: {e}", err=True)
    if not rep.clean:
        raise click.ClickException("stress run was not clean")
    click.echo("clean: 0 bytes lost")
