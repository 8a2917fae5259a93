"""``gemfs run``, ``gemfs top`` and ``gemfs demo`` through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gemfs.cli import main
from gemfs.mm import MemoryManager
from tests.workloads import EXAMPLES, write_small


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Result) -> str:
    """The command failed with exactly one "Error:" line and no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("command", ["run", "top", "demo"])
def test_help(command: str) -> None:
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage: " in r.output


def test_run_inproc_writes_records_and_report(tmp_path: Path) -> None:
    workload = write_small(tmp_path)
    out, records = tmp_path / "report", tmp_path / "out.json"
    r = invoke(
        "run", str(workload), "--inproc", "--design", "pinned", "--design", "shmem-hook",
        "--json", str(records), "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(records.read_text())
    assert [d["design"] for d in data] == ["pinned", "shmem-hook"]
    for d in data:
        for key in ("pool_pages", "free_pages", "order9_ideal", "order9_before", "order9_after"):
            assert isinstance(d[key], int)
        assert set(d["migrations"]) == {"success", "fail", "eagain"}
        assert d["data_errors"] == 0
    assert (out / "report.md").is_file()
    assert (out / "runs.json").is_file()
    assert json.loads((out / "runs.json").read_text()) == data
    assert "order-9 probes succeeded / tried" in r.output
    assert str(out / "report.md") in r.output


def test_run_default_designs_are_all_four(tmp_path: Path) -> None:
    workload = write_small(tmp_path)
    records = tmp_path / "out.json"
    r = invoke("run", str(workload), "--inproc", "--json", str(records), "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    designs = [d["design"] for d in json.loads(records.read_text())]
    assert designs == ["pinned", "shmem-hook", "gemfs", "notifier"]


def test_run_unknown_design() -> None:
    r = invoke("run", str(EXAMPLES / "desktop.toml"), "--inproc", "--design", "bogus")
    assert r.exit_code == 2
    assert "'bogus' is not one of" in one_error_line(r)


def test_run_missing_workload(tmp_path: Path) -> None:
    r = invoke("run", str(tmp_path / "nope.toml"), "--inproc")
    assert r.exit_code == 2
    assert "does not exist" in one_error_line(r)


def test_run_bad_workload_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('pool = "32MiB"\nseeed = 1\n[[phase]]\nkind = "compact"\n')
    r = invoke("run", str(bad), "--inproc")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert line.startswith(f"Error: {bad}:2: ")
    assert "unknown key 'seeed'" in line
    assert r.output.strip() == line


def test_run_without_stack_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tools.stack_backend", None)
    r = invoke("run", str(write_small(tmp_path)))
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "stack backend is not available" in line
    assert "--inproc" in line
    assert r.output.strip() == line


def test_run_inproc_and_mount_conflict(tmp_path: Path) -> None:
    r = invoke("run", str(write_small(tmp_path)), "--inproc", "--mount", str(tmp_path))
    assert r.exit_code == 2
    assert "--mount needs the multi-process stack" in one_error_line(r)


def test_demo_runs_and_says_where_the_report_is(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = invoke(
        "demo", "--workload", str(write_small(tmp_path)), "--design", "gemfs", "--out", str(out)
    )
    assert r.exit_code == 0, r.output
    assert f"report: {out / 'report.md'}" in r.output.replace("\n", "")
    assert (out / "report.md").is_file()


def test_demo_bad_design() -> None:
    r = invoke("demo", "--design", "nope")
    assert r.exit_code == 2
    one_error_line(r)


@pytest.fixture
def fake_mount(tmp_path: Path) -> Path:
    """A directory laid out like a mount's .gemfs, with a fragmented pool's statistics."""
    mm = MemoryManager("16MiB", design="pinned")
    try:
        objs = [mm.create_object(256 << 10) for _ in range(40)]
        for obj in objs[::2]:
            mm.destroy_object(obj)
        stats = tmp_path / "mnt" / ".gemfs"
        stats.mkdir(parents=True)
        (stats / "buddyinfo").write_text(mm.buddyinfo())
        (stats / "vmstat").write_text(mm.vmstat_text())
        (stats / "pagetypeinfo").write_text(mm.pagetypeinfo())
        score = mm.fragmentation_score()
        (tmp_path / "score").write_text(str(score))
    finally:
        mm.close()
    return tmp_path / "mnt"


def test_top_once_on_a_mount(fake_mount: Path) -> None:
    r = invoke("top", str(fake_mount), "--once")
    assert r.exit_code == 0, r.output
    score = (fake_mount.parent / "score").read_text()
    assert f"fragmentation score {score}" in r.output
    assert "buddyinfo" in r.output
    assert "nr_free_pages" in r.output
    assert "reclaimable" in r.output  # pageblocks per migrate type


def test_top_needs_exactly_one_source(tmp_path: Path) -> None:
    r = invoke("top")
    assert r.exit_code == 2
    assert "either MOUNTPOINT or --control" in one_error_line(r)
    r = invoke("top", str(tmp_path), "--control", str(tmp_path / "sock"))
    assert r.exit_code == 2
    one_error_line(r)


def test_top_not_a_mount(tmp_path: Path) -> None:
    r = invoke("top", str(tmp_path), "--once")
    assert r.exit_code == 1
    assert "is not a gemfs mount" in one_error_line(r)


def test_top_control_socket_missing(tmp_path: Path) -> None:
    r = invoke("top", "--control", str(tmp_path / "control.sock"), "--once")
    assert r.exit_code == 1
    assert str(tmp_path / "control.sock") in one_error_line(r)
