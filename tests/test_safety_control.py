"""Issue 10 on the control socket: what another uid may get, errno answers, a live socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemfs.control.client import SyncClient
from gemfs.control.peer import CallError
from gemfs.testing import GemfsMount, mount_gemfs

pytestmark = pytest.mark.mount

NOBODY = 65534


@pytest.fixture(scope="module")
def top() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp_path is root's 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts with allow_other and acts as uid 65534")
    d = Path(tempfile.mkdtemp(prefix="gemfs-safety-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_mount(top: Path) -> Iterator[tuple[GemfsMount, Path]]:
    ctl = top / "ctl.sock"
    extra = ("--allow-uid", str(NOBODY))
    with mount_gemfs(top / "mnt", pool="16MiB", control=str(ctl), extra=extra) as m:
        yield m, ctl


def as_uid(uid: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python code that imports what it needs, then drops to uid/gid ``uid`` (no groups,
    no capabilities) and calls ``main(*args)``."""
    prog = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import os, sys
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
        main(*sys.argv[1:])
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prog, *args], capture_output=True, text=True, timeout=60
    )


def test_allowed_uid_cannot_reach_a_root_only_file(shared_mount: tuple[GemfsMount, Path]) -> None:
    m, ctl = shared_mount
    secret = m.path / "secret"
    secret.write_bytes(b"TOPSECRET" * 500)
    secret.chmod(0o600)
    res = as_uid(
        NOBODY,
        """
        import errno
        from gemfs.control.client import SyncClient
        from gemfs.control.peer import CallError

        def refused(fn):
            try:
                fn()
            except CallError as e:
                return e.errno
            except OSError as e:
                return errno.errorcode[e.errno]
            return "allowed"

        def main(mnt, ctl, secret):
            print("read", refused(lambda: open(secret, "rb").read()))
            print("driver", refused(lambda: SyncClient(ctl, role="driver")))
            for role in ("client", "compactor"):
                c = SyncClient(ctl, role=role)
                print(role, "memfd", c.info["memfd"])
                if role == "client":
                    print("open", refused(lambda: c.call("open", {"path": "/secret"})))
                    print("create", refused(lambda: c.call("create", {"path": "/x", "size": 1})))
                c.close()
        """,
        str(m.path),
        str(ctl),
        str(secret),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "read EACCES",  # through the mount: the mode bits
        "driver EACCES",  # no driver role, so no pool memfd
        "client memfd False",
        "open EPERM",  # needs write permission
        "create EACCES",  # "/" is root's 0755, as open(O_CREAT) would find
        "compactor memfd False",
    ]
    assert secret.read_bytes() == b"TOPSECRET" * 500
    # root and the mount's own uid still attach as drivers and get the pool
    with SyncClient(str(ctl), role="driver") as c:
        assert c.info["memfd"] is True
    res = as_uid(
        NOBODY - 1,
        """
        from gemfs.control.client import SyncClient
        from gemfs.control.peer import CallError
        def main(ctl):
            try:
                SyncClient(ctl)
            except CallError as e:
                print(e.errno)
        """,
        str(ctl),
    )
    assert res.stdout.split() in (["EACCES"], ["ECONNREFUSED"]), res.stderr


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/dup", "EEXIST"),
        ("/" + "n" * 256, "ENAMETOOLONG"),
        ("/missing/f", "ENOENT"),
        ("/dup/f", "ENOTDIR"),
        ("/a/../b", "EINVAL"),
        ("/.gemfs/f", "EPERM"),
    ],
)
def test_create_answers_the_errno(
    shared_mount: tuple[GemfsMount, Path], path: str, code: str
) -> None:
    m, ctl = shared_mount
    with SyncClient(str(ctl)) as c:
        if not (m.path / "dup").exists():
            c.call("create", {"path": "/dup", "size": 4096})
        with pytest.raises(CallError) as e:
            c.call("create", {"path": path, "size": 4096})
        assert e.value.errno == code
        assert c.call("check")["ok"]
    assert "Traceback" not in m.log()


def test_second_mount_refuses_a_live_control_socket(
    shared_mount: tuple[GemfsMount, Path], top: Path
) -> None:
    m, ctl = shared_mount
    mp = top / "second"
    mp.mkdir(exist_ok=True)
    t = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemfs_cli",
            "mount",
            str(mp),
            "--pool",
            "4MiB",
            "--control",
            str(ctl),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - t < 20
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"Error: control socket {ctl} is in use by a live server"
    ]
    assert not os.path.ismount(mp)
    with SyncClient(str(ctl)) as c:  # the first server still owns it
        assert c.call("stats")["peers"] is not None
    assert (m.path / ".gemfs" / "pool").read_text().count(f"control {ctl}") == 1


def test_stale_control_socket_is_replaced(top: Path) -> None:
    ctl = top / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(ctl))  # bound, never listening: what a killed server leaves
    with mount_gemfs(top / "m3", pool="4MiB", control=str(ctl)), SyncClient(str(ctl)) as c:
        assert c.call("check")["ok"]
