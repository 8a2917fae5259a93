"""Issue 10, item 15: ``gemfs bench io`` measures O_DIRECT sequential reads and dbench-like small
writes on gemfs against a kernel tmpfs in the same run (a small, quick run here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemfs_cli.main import main
from tools.bench_io import Figure, IoResult, format_table

pytestmark = [pytest.mark.mount]


@pytest.mark.skipif(os.geteuid() != 0, reason="bench io mounts a tmpfs: needs root")
def test_bench_io_measures_o_direct_reads_and_small_writes_against_tmpfs() -> None:
    r = CliRunner().invoke(
        main, ["bench", "io", "--size", "8MiB", "--pool", "64MiB", "--rounds", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    figures = {f["name"]: f for f in data["figures"]}
    assert list(figures) == [
        "seq write",
        "seq read cold",
        "seq read warm",
        "seq read O_DIRECT",
        "rand read 4K warm",
        "rand read 4K cold",
        "small writes",
    ]
    for f in figures.values():
        assert f["gemfs"] > 0, f
        assert f["tmpfs"] > 0, f
        assert f["ratio"] == round(f["gemfs"] / f["tmpfs"], 3)
    assert figures["seq read O_DIRECT"]["target"] == 0.6
    assert figures["seq read O_DIRECT"]["unit"] == figures["small writes"]["unit"] == "MB/s"
    assert set(data["slowest_write_ms"]) == {"gemfs", "tmpfs"}
    assert all(v > 0 for v in data["slowest_write_ms"].values())


def test_the_table_prints_the_ratio_and_the_slowest_write() -> None:
    result = IoResult(8 << 20, "16MiB", 1)
    result.figures.append(Figure("seq read O_DIRECT", "MB/s", 1800.0, 3000.0, 0.6))
    result.slowest_write_ms = {"gemfs": 9.0, "tmpfs": 0.25}
    lines = format_table(result).splitlines()
    assert lines[2].split() == ["seq", "read", "O_DIRECT", "(MB/s)", "1,800", "3,000", "0.60",
                                ">=", "0.60", "ok"]  # fmt: skip
    assert lines[3].split() == ["slowest", "small", "write", "(ms)", "9.00", "0.25"]


@pytest.mark.skipif(os.geteuid() != 0, reason="bench io mounts a tmpfs: needs root")
def test_bench_io_on_a_pool_too_small_is_one_line() -> None:
    r = CliRunner().invoke(
        main, ["bench", "io", "--size", "32MiB", "--pool", "16MiB", "--rounds", "1"]
    )
    assert r.exit_code == 1
    assert r.output.strip() == "Error: seq write on gemfs: No space left on device"


@pytest.mark.skipif(os.geteuid() != 0, reason="bench io mounts a tmpfs: needs root")
def test_bench_io_floor_reads_the_bare_pyfuse3_server_in_the_same_run() -> None:
    """--floor: O_DIRECT reads from tools/pyfuse3_floor.py's file, interleaved with gemfs and
    tmpfs; its figure is printed against the same tmpfs median, with gemfs/floor."""
    args = ["bench", "io", "--size", "8MiB", "--pool", "64MiB", "--rounds", "1", "--floor"]
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["floor_o_direct"] > 0
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("O_DIRECT bare pyfuse3"))
    floor, tmpfs, ratio = (float(v.replace(",", "")) for v in line.split()[4:7])
    assert ratio == pytest.approx(floor / tmpfs, abs=0.006)
    assert "gemfs/floor" in line


def test_the_floor_server_serves_its_pattern(tmp_path: Path) -> None:
    """The floor's file holds byte i = i % 251, read back with O_DIRECT across requests; the
    server unmounts when bench io is done with it."""
    import mmap

    from tools.bench_io import _floor_server
    from tools.pyfuse3_floor import pattern

    size = 3 << 20
    with _floor_server(str(tmp_path), size) as path:
        buf = mmap.mmap(-1, 1 << 20)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        got = b""
        while n := os.readv(fd, [buf]):
            got += buf[:n]
        os.close(fd)
    assert got == pattern(size)
    assert pattern(300)[250:253] == bytes([250, 0, 1])
    assert not os.path.ismount(tmp_path / "floor")
