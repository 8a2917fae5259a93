"""Issue 10, item 8: ``gemfs run --mount M`` as a newcomer meets it, on real mounts.

Every failure is one line without a traceback (a mount of another design, a driver already
attached, a driver that exits under the run: its log kept and named); the run reports the
mount's pool, removes its files afterwards, and a second run on the same mount works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gemfs.control.client import SyncClient
from gemfs.testing import GemfsMount
from gemfs_cli.main import main

pytestmark = [pytest.mark.mount, pytest.mark.e2e]

MountFactory = Callable[..., GemfsMount]

SMALL = """\
name = "first-hour"
pool = "16MiB"
seed = 3

[compactor]
proactiveness = 0

[[phase]]
kind = "page-cache"
tag = "cache"
count = 6
size = "1MiB"

[[phase]]
kind = "create"
tag = "buf"
count = 8
size = "256KiB"
bind = true

[[phase]]
kind = "free"
tag = "cache"
all = true

[[phase]]
kind = "compact"
"""

# A run that lasts long enough to lose its driver on the way.
LONG = """\
pool = "16MiB"

[compactor]
proactiveness = 0

[[phase]]
kind = "create"
tag = "buf"
count = 4
size = "64KiB"

[[phase]]
kind = "gpu"
tag = "buf"
repeat = 200000
"""


def invoke(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(main, [os.fspath(a) for a in args])


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


def entries(m: GemfsMount) -> list[str]:
    return sorted(p.name for p in Path(m).iterdir() if p.name != ".gemfs")


@pytest.fixture
def workload(tmp_path: Path) -> Path:
    path = tmp_path / "first-hour.toml"
    path.write_text(SMALL)
    return path


@pytest.fixture
def hook_mount(gemfs_mount_factory: MountFactory, tmp_path: Path) -> GemfsMount:
    """A 32MiB shmem-hook mount with a control socket (twice the workload's pool)."""
    ctl = tmp_path / "ctl.sock"
    return gemfs_mount_factory(pool="32MiB", design="shmem-hook", control=str(ctl))


def test_run_on_a_mount_reports_its_pool_and_leaves_nothing_behind(
    hook_mount: GemfsMount, workload: Path, tmp_path: Path
) -> None:
    (Path(hook_mount) / "mine").write_bytes(b"the user's own file\n")
    for attempt in (1, 2):  # a second run on the same mount finds no leftovers to trip over
        out, js = tmp_path / f"out{attempt}", tmp_path / f"runs{attempt}.json"
        r = invoke("run", workload, "--mount", hook_mount, "--out", out, "--json", js)
        assert r.exit_code == 0, r.output
        note = f"playing on {hook_mount.path}'s pool of 32MiB (the workload file asks for 16MiB)"
        assert note in r.output
        [record] = json.loads(js.read_text())
        assert record["design"] == "shmem-hook"  # the mount's design, without --design
        assert record["pool_pages"] == 8192  # 32MiB: the mount's pool, not the file's 16MiB
        assert record["data_errors"] == 0
        assert "pool 32MiB (8192 pages of 4096 bytes)" in (out / "report.md").read_text()
        assert entries(hook_mount) == ["mine"]  # the run's objects and cache files are gone
    assert (Path(hook_mount) / "mine").read_bytes() == b"the user's own file\n"
    assert "objects 1\n" in hook_mount.read_stat("pool")


def test_run_on_a_mount_of_another_design_is_one_line(
    hook_mount: GemfsMount, workload: Path
) -> None:
    r = invoke("run", workload, "--mount", hook_mount, "--design", "pinned")
    assert r.exit_code == 1
    assert one_error_line(r.output) == (
        f"Error: {hook_mount.path} runs design shmem-hook, not pinned: a mount plays the design it "
        "was mounted with (leave out --design, or mount with --design pinned)"
    )


def test_run_on_a_mount_without_a_control_socket_is_one_line(
    gemfs_mount_factory: MountFactory,
    workload: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = gemfs_mount_factory(pool="16MiB")
    scratch = tmp_path / "scratch"  # where the run's work directory goes
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = invoke("run", workload, "--mount", m)
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert line == f"Error: {m.path} has no control socket (mount it with --control PATH)"
    assert list(scratch.iterdir()) == []  # no log to keep: its work directory went too


def test_run_on_a_directory_that_is_not_a_mount_is_one_line(tmp_path: Path, workload: Path) -> None:
    r = invoke("run", workload, "--mount", tmp_path)
    assert r.exit_code == 1
    assert one_error_line(r.output) == (
        f"Error: {tmp_path} is not a gemfs mount (no readable .gemfs/pool)"
    )


def test_run_on_a_mount_with_a_driver_attached_is_one_line(
    hook_mount: GemfsMount, workload: Path, tmp_path: Path
) -> None:
    ctl = tmp_path / "ctl.sock"
    driver = subprocess.Popen(
        [sys.executable, "-m", "gemfs_cli", "driver", "--control", ctl, "--listen", tmp_path / "d"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid = wait_for_driver(ctl, driver)
        r = invoke("run", workload, "--mount", hook_mount)
        assert r.exit_code == 1
        assert one_error_line(r.output) == (
            f"Error: {hook_mount.path} already has a driver attached (i915, pid {pid}); "
            "stop it or use another mount"
        )
        assert entries(hook_mount) == []
    finally:
        driver.terminate()
        driver.wait(30)


def wait_for_driver(ctl: Path, proc: subprocess.Popen[bytes] | None = None) -> int:
    """The pid of the driver attached to the control socket (waits for one to attach)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with SyncClient(str(ctl)) as c:
            pids = [p["pid"] for p in c.call("stats")["peers"] if p["role"] == "driver"]
        if pids:
            return int(pids[0])
        assert proc is None or proc.poll() is None, "the driver exited at start"
        time.sleep(0.05)
    raise AssertionError("no driver attached")


def test_driver_killed_under_a_run_is_one_line_naming_its_kept_log(
    hook_mount: GemfsMount, tmp_path: Path
) -> None:
    long = tmp_path / "long.toml"
    long.write_text(LONG)
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gemfs_cli",
            "run",
            long,
            "--mount",
            hook_mount.path,
            "--out",
            tmp_path,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = wait_for_driver(tmp_path / "ctl.sock")
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, out + err
    line = one_error_line(err)
    m = re.fullmatch(r"Error: the driver was killed by SIGKILL during the run; log: (\S+)", line)
    assert m, line
    log = Path(m.group(1))
    try:
        assert log.name == "driver.log"
        assert log.is_file()  # kept, so the user can read it
    finally:
        shutil.rmtree(log.parent)
    assert entries(hook_mount) == []  # the run's files went with it
