"""``gemfs mount`` and ``gemfs umount``: thin click commands over gemfs.daemon / gemfs.mountproc."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from typing import IO, TYPE_CHECKING, NamedTuple

import click

from gemfs.mm.types import Design
from gemfs.mountproc import (
    MountError,
    check_fuse_device,
    check_gemfs_mount,
    check_mountpoint,
    report,
    server_args,
    start_server,
    unmount,
)

if TYPE_CHECKING:
    from gemfs import daemon

# The values of gemfs.mm.types.Design (not imported: this module must stay cheap to import;
# tests/test_designs.py checks that the two agree).
DESIGNS = (
    "pinned",
    "pinned-unmovable",
    "pinned-ttm",
    "pinned-in-movable",
    "illuminator",
    "defrag-mode",
    "longterm-pin",
    "confine",
    "shmem-hook",
    "gemfs",
    "notifier",
)


@click.command()
@click.argument("mountpoint")
@click.option("--pool", default="64MiB", show_default=True, help="Pool size, e.g. 256MiB, 1GiB.")
@click.option(
    "--design",
    default=Design.SHMEM_HOOK.value,
    show_default=True,
    type=click.Choice([d.value for d in Design]),
    help="Which design to model.",
)
@click.option(
    "--movablecore",
    metavar="SIZE|N%",
    help="longterm-pin: size of the movable region at the top of the pool, like the boot "
    "parameter (default 50%).",
)
@click.option(
    "--confine-granule",
    metavar="SIZE",
    help="confine: the step its region grows and shrinks by, a multiple of 4MiB "
    "(default 1GiB, or a 32nd of smaller pools).",
)
@click.option(
    "--ttm-pool",
    metavar="SIZE|N%",
    help="pinned-ttm: what TTM's page pools may hold, like ttm.page_pool_size=: a size or a "
    "share of the pool (default 50%, amdgpu's write-combined BOs), 0 for none (cached BOs, "
    "arm64). Example: --ttm-pool 0",
)
@click.option("--control", metavar="PATH", help="Unix socket for the driver and compactor.")
@click.option(
    "--allow-uid",
    "allow_uids",
    multiple=True,
    type=click.IntRange(0),
    help="Also let this uid connect to the control socket as a client or compactor "
    "(repeatable; the socket becomes 0666). Never as a driver: a driver maps the whole pool, "
    "so only root and the mount's owner may be one.",
)
@click.option(
    "--callback-timeout",
    type=click.FloatRange(0.001),
    default=None,
    help="Seconds a driver may take to answer a callback before it counts as -EAGAIN [2].",
)
@click.option("--foreground", "-f", is_flag=True, help="Stay attached; log to stderr.")
@click.option("--log", "log_file", metavar="FILE", help="Background mode: append the log here.")
@click.option("--debug", is_flag=True, help="Log at debug level.")
@click.option("--no-prefault", is_flag=True, help="Do not fault the whole pool in at start.")
@click.option("--test-faults", is_flag=True, hidden=True, help="Enable .gemfs/inject_fault.")
@click.option("--ready-fd", type=int, hidden=True, help="Report readiness on this fd.")
def mount(
    mountpoint: str,
    pool: str,
    design: str,
    movablecore: str | None,
    confine_granule: str | None,
    ttm_pool: str | None,
    control: str | None,
    allow_uids: tuple[int, ...],
    callback_timeout: float | None,
    foreground: bool,
    log_file: str | None,
    debug: bool,
    no_prefault: bool,
    test_faults: bool,
    ready_fd: int | None,
) -> None:
    """Mount gemfs on MOUNTPOINT (in the background unless --foreground).

    \b
    Example:
      mkdir -p /tmp/gem
      gemfs mount /tmp/gem --pool 16MiB --design shmem-hook --control /tmp/gem.sock
      cat /tmp/gem/.gemfs/buddyinfo"""
    # The server (this process, or the background child) reads these when it starts.
    if allow_uids:
        os.environ["GEMFS_ALLOW_UIDS"] = ",".join(str(u) for u in allow_uids)
    if callback_timeout is not None:
        os.environ["GEMFS_CALLBACK_TIMEOUT"] = str(callback_timeout)
    options = DesignOptions(movablecore, confine_granule, ttm_pool)
    try:
        _check_args(mountpoint, pool, design, options)
        if foreground:
            _serve_foreground(
                mountpoint,
                pool,
                design,
                options,
                control,
                debug,
                not no_prefault,
                test_faults,
                ready_fd,
            )
            return
        extra = [*(["--debug"] if debug else []), *(["--no-prefault"] if no_prefault else [])]
        extra += options.args()
        args = server_args(  # absolute paths: the daemon runs in "/"
            os.path.abspath(mountpoint),
            pool=pool,
            design=design,
            control=None if control is None else os.path.abspath(control),
            test_faults=test_faults,
            extra=extra,
        )
        out: IO[bytes] | int = open(log_file, "ab") if log_file else subprocess.DEVNULL
        try:
            start_server(args, output=out, new_session=True, cwd="/")
        finally:
            if not isinstance(out, int):
                out.close()
    except MountError as e:
        if ready_fd is not None:
            report(ready_fd, str(e))
        raise click.ClickException(str(e)) from None


class DesignOptions(NamedTuple):
    """The mount's design knobs: the regions of longterm-pin and confine (gemfs.mm.region) and
    pinned-ttm's page pools (gemfs.mm.ttm). None: the design's default."""

    movablecore: str | None
    confine_granule: str | None
    ttm_pool: str | None

    def given(self) -> dict[str, str]:
        """The knobs given, by name (Design.knob's names)."""
        return {k: v for k, v in self._asdict().items() if v is not None}

    def args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in self.given().items()]


def _check_args(mountpoint: str, pool: str, design: str, options: DesignOptions) -> None:
    from gemfs.mm.pool import check_memory, check_pool_size
    from gemfs.mm.region import confine_granule_pages, movablecore_pages
    from gemfs.mm.ttm import ttm_pool_pages
    from gemfs.mm.types import PAGE_SIZE, Design

    check_fuse_device()
    check_mountpoint(mountpoint)
    checks = {
        "movablecore": movablecore_pages,
        "confine_granule": confine_granule_pages,
        "ttm_pool": ttm_pool_pages,
    }
    try:
        size = check_pool_size(pool)
        check_memory(size)  # before the server starts: at once, one line
        d = Design.parse(design)
        for key, value in options.given().items():
            if d.knob != key:
                owner = next(x for x in Design if x.knob == key)
                opt = "--" + key.replace("_", "-")
                raise ValueError(f"{opt} applies to the {owner} design only")
            checks[key](value, size // PAGE_SIZE)
    except ValueError as e:
        raise MountError(str(e)) from None


def _serve_foreground(
    mountpoint: str,
    pool: str,
    design: str,
    options: DesignOptions,
    control: str | None,
    debug: bool,
    prefault: bool,
    test_faults: bool,
    ready_fd: int | None,
) -> None:
    import trio

    from gemfs import daemon

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s gemfs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    serve = functools.partial(
        daemon.serve,
        mountpoint,
        pool=pool,
        design=design,
        movablecore=options.movablecore,
        confine_granule=options.confine_granule,
        ttm_pool=options.ttm_pool,
        control_path=control,
        test_faults=test_faults,
        prefault=prefault,
        services=_control_services(control),
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            if ready_fd is not None:
                report(ready_fd)

    error: MountError | None = None
    try:
        trio.run(main)
    except* MountError as group:
        error = _first(group)
    if error is not None:
        raise error


def _control_services(control: str | None) -> list[daemon.Service]:
    """The control-socket server, when --control is given (uids from $GEMFS_ALLOW_UIDS)."""
    if not control:
        return []
    from gemfs.control.server import control_service

    uids = [int(u) for u in os.environ.get("GEMFS_ALLOW_UIDS", "").split(",") if u.strip()]
    timeout = float(os.environ.get("GEMFS_CALLBACK_TIMEOUT", "2.0"))
    return [
        functools.partial(control_service, path=control, allow_uids=uids, callback_timeout=timeout)
    ]


def _first(group: BaseExceptionGroup[MountError]) -> MountError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, MountError)
    return exc


@click.command()
@click.argument("mountpoint")
@click.option("--lazy", "-z", is_flag=True, help="Detach now, clean up when no longer busy.")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount a gemfs mount (the server then exits); other file systems are left alone.

    \b
    Example:
      gemfs umount /tmp/gem"""
    try:
        unmount(check_gemfs_mount(mountpoint), lazy=lazy)
    except MountError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":  # servers started by gemfs.mountproc: no need to import the whole CLI
    mount(prog_name="gemfs mount")
