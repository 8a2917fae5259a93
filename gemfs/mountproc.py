"""Starting, checking and stopping gemfs servers as processes.

No pyfuse3, no trio, no numpy: the CLI's background mode, the pytest plugin and the benchmarks
import this, and it must stay cheap. A server started here is ``python -m gemfs_cli.cmd_mount
--foreground --ready-fd N`` (``gemfs mount`` without importing the whole CLI); it writes one
line to fd N, ``ready`` once the mount serves or ``error: <reason>`` when it cannot mount, then
closes it.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

READY = "ready"
START_TIMEOUT = 30.0


class MountError(Exception):
    """Mounting failed; the message is one line meant for the user."""


def check_fuse_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing (is the fuse kernel module loaded?)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not readable and writable by this user")


def check_mountpoint(path: str) -> str:
    """The absolute mount point, or MountError when it is missing, not a directory or busy."""
    p = os.path.abspath(path)
    if not os.path.lexists(p):
        raise MountError(f"mount point {path} does not exist")
    if not os.path.isdir(p):
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(p):
        raise MountError(f"mount point {path} is busy (already a mount point)")
    return p


def report(fd: int, error: str | None = None) -> None:
    """Server side: tell whoever started us that the mount is ready, or why it failed."""
    line = READY if error is None else "error: " + " ".join(error.split())
    try:
        os.write(fd, (line + "\n").encode())
        os.close(fd)
    except OSError:
        pass  # the starter went away; nothing to tell


def server_args(
    mountpoint: str,
    *,
    pool: str | int = "64MiB",
    design: str = "shmem-hook",
    control: str | None = None,
    test_faults: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """Arguments of ``gemfs mount`` for a foreground server."""
    args = [os.fspath(mountpoint), "--pool", str(pool), "--design", design]
    if control is not None:
        args += ["--control", control]
    if test_faults:
        args.append("--test-faults")
    return [*args, *extra]


def start_server(
    args: Sequence[str],
    *,
    output: IO[bytes] | int | None = subprocess.DEVNULL,
    new_session: bool = False,
    cwd: str | None = None,
    timeout: float = START_TIMEOUT,
) -> subprocess.Popen[bytes]:
    """Start ``gemfs mount --foreground ARGS`` and return once its mount is ready.

    The server's stdout and stderr (its log) go to ``output``. On failure the process has been
    reaped and MountError carries the server's own reason.
    """
    r, w = os.pipe()
    try:
        cmd = [sys.executable, "-m", "gemfs_cli.cmd_mount", "--foreground", "--ready-fd", str(w)]
        proc = subprocess.Popen(
            [*cmd, *args],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=new_session,
            cwd=cwd,
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        line = _read_line(r, timeout)
    finally:
        os.close(r)
    if line == READY:
        return proc
    if line is None:
        stop(proc)
        raise MountError(f"the server did not get ready within {timeout:g} s")
    rc = proc.wait(timeout=timeout)
    if line.startswith("error: "):
        raise MountError(line[len("error: ") :])
    raise MountError(f"the server exited with status {rc} before the mount was ready")


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from fd ("" at EOF without one); None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM (the server unmounts and exits 0), SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def is_mounted(path: str) -> bool:
    """Is something mounted on path? Reads /proc/self/mountinfo: unlike os.path.ismount it
    never touches the mount itself, so it answers even when the server hangs or died."""
    path = os.path.abspath(path)  # resolve links in the parent only: never stat the mount
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return mount_device(target) is not None


def mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of what is mounted on mountpoint (the top of the stack), from
    /proc/self/mountinfo: a stat of a FUSE mount point would wait for its server to answer."""
    entry = mount_entry(mountpoint)
    return None if entry is None else entry[0]


def mount_entry(mountpoint: str) -> tuple[str, str, str] | None:
    """(``major:minor``, file system type, source) of the top mount on mountpoint (an
    absolute path), from /proc/self/mountinfo; None when nothing is mounted there."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                    # after the optional fields, " - " then fstype and source
                    rest = fields[fields.index("-", 6) + 1 :] if "-" in fields[6:] else []
                    fstype, source = [*rest, "", ""][:2]
                    found = (fields[2], fstype, _unescape(source))
    except OSError:
        return None
    return found


GEMFS_FSTYPE = "fuse.gemfs"  # mount_options(): subtype=gemfs


def check_gemfs_mount(path: str) -> str:
    """The mount point's resolved path if a gemfs mount sits on top of it, else MountError."""
    p = os.path.abspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    entry = mount_entry(target)
    if entry is None:
        raise MountError(f"{path} is not a mount point")
    if entry[1] != GEMFS_FSTYPE:
        raise MountError(f"{path} is not a gemfs mount (it is {entry[1] or 'unknown'})")
    return target


def control_socket_in_use(path: str, timeout: float = 2.0) -> bool:
    """Does a live server listen on the Unix socket at path? A socket file whose server died
    refuses the connection (stale: safe to replace); anything that accepts is live."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False  # not a socket at all: the server's bind reports that itself
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. EAGAIN (a full backlog) or a timeout: someone is there
    return True


def _unescape(field: str) -> str:
    r"""mountinfo octal-escapes space, tab, newline and backslash (``\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """``fusermount3 -u`` (``-z``: lazy); MountError with its message when it fails."""
    cmd = [fusermount(), "-u", *(["-z"] if lazy else []), os.fspath(mountpoint)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise MountError("fusermount3 not found (install fuse3)") from None
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()
        raise MountError(msg[-1] if msg else f"{cmd[0]} failed with status {res.returncode}")
