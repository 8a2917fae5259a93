"""The README's "Using it" session runs as written and shows what it claims: a fragmented pool,
a compaction through the driver's callbacks, and a clean exit of everything at umount."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gemfs.mountproc import is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.e2e]

README = Path(__file__).resolve().parent.parent / "README.md"


def using_it_session() -> str:
    text = README.read_text()
    section = text[text.index("## Using it") :]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m is not None, "no shell session under 'Using it'"
    return m.group(1)


def buddyinfo(line: str) -> list[int]:
    return [int(x) for x in line.split()[4:]]


@pytest.mark.skipif(shutil.which("getfattr") is None, reason="getfattr (attr) is not installed")
def test_readme_session_fragments_and_compacts_through_the_driver(tmp_path: Path) -> None:
    script = using_it_session()
    gemfs = f"{shlex.quote(sys.executable)} -m gemfs_cli"
    for old, new in (
        ("/tmp/gem.sock", tmp_path / "gem.sock"),
        ("/tmp/i915.sock", tmp_path / "i915.sock"),
        ("/tmp/gem", tmp_path / "gem"),
        (".venv/bin/gemfs", gemfs),
    ):
        script = script.replace(old, str(new))
    mnt = tmp_path / "gem"
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    before, after = (buddyinfo(ln) for ln in out.splitlines() if ln.startswith("Node 0"))
    assert sum(before) > 0
    assert (before[9], before[10]) == (0, 1), out  # free memory, but in holes
    assert after[9] + 2 * after[10] > before[9] + 2 * before[10], out  # huge pages came back
    frames = re.findall(r'user\.gemfs\.frames="([^"]*)"', out)
    assert len(frames) == 2, out
    assert frames[0] != frames[1], out  # bo-1 moved
    counters = dict(re.findall(r"^(pgmigrate_success|gem_migrate_callbacks) (\d+)$", out, re.M))
    assert int(counters["pgmigrate_success"]) > 0
    assert int(counters["gem_migrate_callbacks"]) > 0  # through the driver's callbacks
    assert '"data_errors": 0' in out
    assert "compactor: the mount's control socket closed (unmounted); exiting" in out
    assert not is_mounted(str(mnt))
