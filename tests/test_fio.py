"""An outside tool against the mount: fio writes with verification, several jobs at once."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable

import pytest

from gemfs.testing import GemfsMount

pytestmark = pytest.mark.mount

FIO = shutil.which("fio")


@pytest.mark.skipif(FIO is None, reason="fio is not installed (make test installs it)")
@pytest.mark.parametrize("rw", ["write", "randwrite"])
def test_fio_verify(gemfs_mount_factory: Callable[..., GemfsMount], rw: str) -> None:
    m = gemfs_mount_factory(pool="256MiB")
    assert FIO is not None
    r = subprocess.run(
        [
            FIO,
            "--name=gemfs",
            f"--directory={m.path}",
            f"--rw={rw}",
            "--bs=4k,64k",
            "--size=16m",
            "--numjobs=4",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--ioengine=psync",
            "--group_reporting",
            "--output-format=json",
            "--verify_state_save=0",
            "--randrepeat=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout[r.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 2 * 16 << 20
    # The verify pass read the data back (fio verifies each block's last version).
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] // 2
