"""pytest plugin: mount gemfs for real in tests (registered as the ``gemfs`` pytest11 plugin).

Fixtures (function scope):

``gemfs_mount``
    A fresh mount (64MiB pool, default design) in a temporary directory: a :class:`GemfsMount`,
    which is ``os.PathLike`` (``Path(gemfs_mount)``, ``open(gemfs_mount / "f", "w")``,
    ``os.listdir(gemfs_mount)`` all work) and carries ``path``, ``proc`` (the server process),
    ``log_path``, ``gemfs_dir``, ``read_stat(name)``, ``write_knob(name, value)`` and ``log()``.
``gemfs_mount_factory``
    ``factory(pool="64MiB", design="shmem-hook", test_faults=False, control=None, extra=())``
    mounts one more; every mount it made is unmounted at teardown.

For other scopes (one mount per module, say) use :func:`mount_gemfs` in your own fixture::

    @pytest.fixture(scope="module")
    def mnt(tmp_path_factory):
        with mount_gemfs(tmp_path_factory.mktemp("gemfs") / "mnt") as m:
            yield m

Each mount is a real server process (``python -m gemfs_cli.cmd_mount --foreground``). Setup returns
once the server reported the mount ready; teardown unmounts (``fusermount3 -u``; SIGTERM, which
makes the server unmount lazily, when that fails), checks that the server exited with status 0
and fails the test with the server's log when it did not.

This module is imported by every pytest run in an environment where gemfs is installed: it must
stay cheap (no pyfuse3, trio or numpy at import).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gemfs.mountproc import (
    MountError,
    is_mounted,
    server_args,
    start_server,
    stop,
    unmount,
)

EXIT_TIMEOUT = 20.0


@dataclass
class GemfsMount:
    """A mounted gemfs served by a child process; ``os.PathLike`` (its mount point), so
    ``Path(m)``, ``open(m / "f")`` and ``os.listdir(m)`` work.

    ``path``: the mount point. ``proc``: the server process. ``log_path``: its log.
    """

    path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    closed: bool = field(default=False, repr=False)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str | os.PathLike[str]) -> Path:
        return self.path / name

    @property
    def gemfs_dir(self) -> Path:
        """The mount's ``.gemfs`` directory (stats files and knobs)."""
        return self.path / ".gemfs"

    def read_stat(self, name: str) -> str:
        return (self.gemfs_dir / name).read_text()

    def write_knob(self, name: str, value: str | int) -> None:
        with open(self.gemfs_dir / name, "w") as f:
            f.write(f"{value}\n")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def close(self) -> int:
        """Unmount, wait for the server, and return its exit status."""
        if self.proc.poll() is None:
            if is_mounted(str(self.path)):
                try:
                    unmount(str(self.path))
                except MountError:
                    stop(self.proc, EXIT_TIMEOUT)  # busy: SIGTERM unmounts lazily
            try:
                self.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop(self.proc, EXIT_TIMEOUT)
        if is_mounted(str(self.path)):  # the server is gone; do not leave a dead mount
            with contextlib.suppress(MountError):
                unmount(str(self.path), lazy=True)
        self.closed = True
        return self.proc.wait()

    def check_exit(self) -> None:
        """Close (if not yet) and fail the test unless the server exited with status 0."""
        rc = self.close()
        if rc != 0:
            pytest.fail(
                f"gemfs server on {self.path} exited with status {rc}\n"
                f"--- server log ---\n{self.log()}",
                pytrace=False,
            )


@contextlib.contextmanager
def mount_gemfs(
    mountpoint: str | os.PathLike[str],
    *,
    pool: str | int = "64MiB",
    design: str = "shmem-hook",
    test_faults: bool = False,
    control: str | None = None,
    extra: Sequence[str] = (),
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[GemfsMount]:
    """Mount gemfs on ``mountpoint`` (created if missing) for the duration of the block.

    ``pool`` (e.g. "256MiB") and ``design`` (pinned, shmem-hook, gemfs, notifier) as for
    ``gemfs mount``; ``control``: a control socket path; ``test_faults``: enable
    .gemfs/inject_fault; ``extra``: more ``gemfs mount`` options; ``log_path``: the server's
    log (default: next to the mount point). Yields a :class:`GemfsMount`; on leaving, unmounts
    and fails the test with the log unless the server exited with status 0."""
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path is not None else mp.with_name(mp.name + ".log")
    args = server_args(
        str(mp), pool=pool, design=design, control=control, test_faults=test_faults, extra=extra
    )
    with open(log, "wb") as out:
        try:
            proc = start_server(args, output=out)
        except MountError as e:
            text = log.read_text(errors="replace")
            pytest.fail(f"gemfs did not mount on {mp}: {e}\n--- server log ---\n{text}")
    m = GemfsMount(mp, proc, log)
    try:
        if not is_mounted(str(mp)):
            pytest.fail(f"gemfs reported ready but {mp} is not mounted\n{m.log()}")
        yield m
    finally:
        m.check_exit()


@pytest.fixture
def gemfs_mount_factory(tmp_path: Path) -> Iterator[Callable[..., GemfsMount]]:
    """Mount more gemfs: ``factory(pool="64MiB", design="shmem-hook", *, test_faults=False,
    control=None, extra=())`` returns one more GemfsMount under tmp_path (``control``: a
    control socket path; ``extra``: more ``gemfs mount`` options). All are unmounted at
    teardown, and the test fails with the server's log if one did not exit with status 0."""
    with contextlib.ExitStack() as stack:
        count = 0

        def factory(
            pool: str | int = "64MiB",
            design: str = "shmem-hook",
            *,
            test_faults: bool = False,
            control: str | None = None,
            extra: Sequence[str] = (),
        ) -> GemfsMount:
            nonlocal count
            count += 1
            cm = mount_gemfs(
                tmp_path / f"gemfs{count}",
                pool=pool,
                design=design,
                test_faults=test_faults,
                control=control,
                extra=extra,
            )
            return stack.enter_context(cm)

        yield factory


@pytest.fixture
def gemfs_mount(gemfs_mount_factory: Callable[..., GemfsMount]) -> GemfsMount:
    """A fresh gemfs mount (64MiB pool, shmem-hook design) for one test, unmounted after it.
    The value is a GemfsMount and os.PathLike: ``Path(gemfs_mount)``, ``gemfs_mount / "f"``.
    Attributes: ``path``, ``proc`` (server process), ``log_path``, ``gemfs_dir`` (.gemfs);
    methods ``read_stat(name)``, ``write_knob(name, value)``, ``log()``. Other scopes: use
    ``gemfs.testing.mount_gemfs(mountpoint, pool=..., design=...)`` in your own fixture."""
    return gemfs_mount_factory()
