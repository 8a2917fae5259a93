"""Issue 10 at the command line: a pool the machine cannot hold, and umount of other mounts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemfs.control.client import SyncClient
from gemfs.mm.pool import PagePool, PoolTooLarge, memory_available
from gemfs.mm.types import MAX_BLOCK_PAGES, PAGE_SIZE
from gemfs.mountproc import is_mounted, mount_entry
from gemfs.testing import mount_gemfs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UNIT = MAX_BLOCK_PAGES * PAGE_SIZE


def too_big() -> str:
    """A pool size (in MiB) larger than what this machine has available."""
    have = memory_available()
    if have is None:
        pytest.skip("no MemAvailable here")
    nbytes = (have[0] + (1 << 30)) // UNIT * UNIT + UNIT
    return f"{nbytes >> 20}MiB"


def too_big_for_a_model() -> str:
    """A pool whose content-free model (16 bytes a frame) is more than this machine has."""
    have = memory_available()
    if have is None:
        pytest.skip("no MemAvailable here")
    frames = (have[0] + (1 << 30)) // 16
    nbytes = frames * PAGE_SIZE // UNIT * UNIT + UNIT
    return f"{nbytes >> 20}MiB"


def gemfs(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gemfs_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


NEEDS = re.compile(
    r"^Error: a pool of \d+[MGT]iB needs [\d.]+ GiB of memory; only [\d.]+ GiB is available "
    r"\(.+\)$"
)


@pytest.mark.parametrize("mode", [(), ("--foreground",)], ids=["background", "foreground"])
def test_mount_refuses_a_pool_larger_than_memory(tmp_path: Path, mode: tuple[str, ...]) -> None:
    size = too_big()
    t = time.monotonic()
    res = gemfs("mount", tmp_path, "--pool", size, *mode)
    assert time.monotonic() - t < 10  # at once, not after a 30 s start-up timeout
    assert NEEDS.match(one_error_line(res))
    assert not is_mounted(str(tmp_path))


def test_run_inproc_refuses_a_pool_larger_than_memory(tmp_path: Path) -> None:
    text = (EXAMPLES / "compaction-test.toml").read_text()
    workload = tmp_path / "big.toml"
    big = too_big_for_a_model()  # a run in process keeps no frame content: 16 bytes a frame
    workload.write_text(re.sub(r'(?m)^pool = ".*"$', f'pool = "{big}"', text, count=1))
    res = gemfs("run", workload, "--inproc", "--design", "pinned", "--out", tmp_path / "out")
    assert NEEDS.match(one_error_line(res))


def test_pool_model_refuses_too() -> None:
    with pytest.raises(PoolTooLarge, match="is available"):
        PagePool(too_big())


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mp = tmp_path / "tmpfs"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "gemfs-test", str(mp)], check=True)
    try:
        yield mp
    finally:
        subprocess.run(["umount", str(mp)], check=False)


def test_umount_leaves_other_file_systems_alone(tmpfs: Path) -> None:
    line = one_error_line(gemfs("umount", tmpfs))
    assert line == f"Error: {tmpfs} is not a gemfs mount (it is tmpfs)"
    assert is_mounted(str(tmpfs))
    line = one_error_line(gemfs("umount", "/proc"))
    assert line == "Error: /proc is not a gemfs mount (it is proc)"
    assert is_mounted("/proc")
    line = one_error_line(gemfs("umount", "--lazy", tmpfs))
    assert "not a gemfs mount" in line
    assert is_mounted(str(tmpfs))


def test_mount_entry_reads_the_type(tmpfs: Path) -> None:
    entry = mount_entry(str(tmpfs))
    assert entry is not None
    assert entry[1:] == ("tmpfs", "gemfs-test")


def test_background_compactor_exits_cleanly_at_umount(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl.sock"
    with mount_gemfs(tmp_path / "mnt", pool="8MiB", control=str(ctl)) as m:
        comp = subprocess.Popen(
            [sys.executable, "-m", "gemfs_cli", "compactor", "--control", str(ctl)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with SyncClient(str(ctl)) as c:
                deadline = time.monotonic() + 30
                while not any(p["role"] == "compactor" for p in c.call("stats")["peers"]):
                    assert comp.poll() is None, comp.communicate()
                    assert time.monotonic() < deadline, "the compactor never connected"
                    time.sleep(0.05)
            res = gemfs("umount", m.path)
            assert res.returncode == 0, res.stderr
            _, err = comp.communicate(timeout=30)
        finally:
            if comp.poll() is None:
                comp.kill()
                comp.wait()
    assert comp.returncode == 0, err
    assert err.strip().splitlines() == [
        "compactor: the mount's control socket closed (unmounted); exiting"
    ]
