"""``gemfs run``, ``gemfs top`` and ``gemfs demo`` through click's runner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gemfs.mm import MemoryManager
from gemfs.mm.types import Design
from gemfs_cli.main import main
from tests.test_report import check_png
from tests.workloads import EXAMPLES, SMALL, write_small
from tools.backend import Backend
from tools.inproc_backend import InprocBackend
from tools.player import NONDETERMINISTIC, RunRecord, play
from tools.report import PLOTS, SECTIONS
from tools.runner import run_designs, seeded
from tools.workload import Workload, parse_workload


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
    assert "allocations succeeded" in r.output
    assert "drain after idle" in r.output
    assert "harness (wall clock" in r.output
    assert "backend inproc; seeds 5; gemfs " in r.output
    assert "; driver wait-idle; cost table" in r.output  # the records name the policy
    assert "- driver policy: wait-idle" in (out / "report.md").read_text()
    assert {d["provenance"]["driver_policy"] for d in data} == {"wait-idle"}
    assert str(out / "report.md") in r.output


def test_run_display_off_reaches_the_driver_and_the_report(tmp_path: Path) -> None:
    workload = write_small(tmp_path)
    out, records = tmp_path / "report", tmp_path / "out.json"
    args = ["run", str(workload), "--inproc", "--design", "shmem-hook", "--json", str(records)]
    r = invoke(*args, "--out", str(out), "--driver-policy", "i915-2016", "--display", "off")
    assert r.exit_code == 0, r.output
    data = json.loads(records.read_text())
    assert [d["provenance"]["display"] for d in data] == ["off"]
    assert "; driver i915-2016, display off; cost table" in r.output
    assert "- driver policy: i915-2016, display off" in (out / "report.md").read_text()
    r = invoke(*args, "--out", str(out), "--display", "dim")
    assert r.exit_code == 2
    assert "--display" in r.output


def test_run_default_designs_are_all_of_them(tmp_path: Path) -> None:
    workload = write_small(tmp_path)
    records = tmp_path / "out.json"
    r = invoke("run", str(workload), "--inproc", "--json", str(records), "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    designs = [d["design"] for d in json.loads(records.read_text())]
    assert designs == [d.value for d in Design]


def deterministic(record: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in record.items() if k not in NONDETERMINISTIC}


def test_run_seeds_plays_each_design_under_consecutive_seeds(tmp_path: Path) -> None:
    workload = write_small(tmp_path)
    out, records = tmp_path / "report", tmp_path / "out.json"
    r = invoke(
        "run", str(workload), "--inproc", "--seeds", "2", "--design", "pinned",
        "--design", "notifier", "--json", str(records), "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(records.read_text())
    assert [(d["design"], d["seed"]) for d in data] == [
        ("pinned", 5), ("pinned", 6), ("notifier", 5), ("notifier", 6),
    ]  # fmt: skip
    assert json.loads((out / "runs.json").read_text()) == data
    # Each record is exactly what playing that seed gives: the seed reached the player.
    w = parse_workload(SMALL, str(workload))
    for d in data:
        ws = dataclasses.replace(w, seed=d["seed"])
        design = Design(d["design"])
        alone = play(ws, InprocBackend(ws, design), design).record.to_json()
        assert deterministic(d) == deterministic(alone), (d["design"], d["seed"])
    # And the seeds differ: a second seed is a different run, not a copy.
    assert data[0]["buddyinfo"] != data[1]["buddyinfo"]
    assert data[0]["seed"] + 1 == data[1]["seed"]
    for name in PLOTS:
        check_png(out / name)
    text = (out / "report.md").read_text()
    assert "- seeds: 5, 6 (2 per design)" in text
    assert "- backend: inproc" in text
    assert "seeds 5, 6;" in r.output
    assert "2 design(s) × 2 seed(s)" in r.output


def records(out: Path) -> list[RunRecord]:
    """The records a run wrote to ``out``/runs.json."""
    return [RunRecord.from_json(d) for d in json.loads((out / "runs.json").read_text())]


def test_run_output_is_full_width_when_piped(tmp_path: Path) -> None:
    r = invoke("run", str(write_small(tmp_path)), "--inproc", "--seeds", "2",
               "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # Not wrapped at 80 columns: every label whole on one line, all designs in one header.
    for section in SECTIONS:
        for metric in section.metrics:
            if metric.own and not metric.shown(records(tmp_path / "o")):
                continue  # a design's own row, which no record here has
            assert any(metric.label in line for line in lines), metric.label
    assert max(len(line) for line in lines) > 80
    header = next(line for line in lines if line.lstrip().startswith("metric"))
    assert header.split() == ["metric", *(d.value for d in Design)]


def test_run_seeds_must_be_positive(tmp_path: Path) -> None:
    r = invoke("run", str(write_small(tmp_path)), "--inproc", "--seeds", "0")
    assert r.exit_code == 2
    assert "--seeds" in one_error_line(r)


class Recorder:
    """A backend factory that notes which workload seed and design each backend was made for."""

    def __init__(self) -> None:
        self.made: list[tuple[str, int]] = []

    def __call__(self, workload: Workload, design: Design) -> Backend:
        self.made.append((design.value, workload.seed))
        return InprocBackend(workload, design)


def test_run_designs_seed_loop() -> None:
    w = parse_workload(SMALL, "small.toml")
    assert [x.seed for x in seeded(w, 3)] == [5, 6, 7]
    assert [dataclasses.replace(x, seed=5) for x in seeded(w, 3)] == [w] * 3
    with pytest.raises(ValueError, match="at least 1"):
        seeded(w, 0)
    factory = Recorder()
    ticks: list[tuple[Design, int, str]] = []
    results = run_designs(
        w, [Design.GEMFS, Design.PINNED], factory, lambda *a: ticks.append(a), seeds=2
    )
    expected = [("gemfs", 5), ("gemfs", 6), ("pinned", 5), ("pinned", 6)]
    assert factory.made == expected
    assert [(r.record.design, r.record.seed) for r in results] == expected
    assert len(ticks) == 4 * w.ticks
    assert [(d.value, s) for d, s, _ in ticks[:: w.ticks]] == expected


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
        "demo", "--workload", str(write_small(tmp_path)), "--design", "gemfs", "--out", str(out),
        "--seeds", "1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"report: {out / 'report.md'}" in r.output.replace("\n", "")
    assert (out / "report.md").is_file()


def test_demo_plays_three_seeds_by_default(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = invoke(
        "demo", "--workload", str(write_small(tmp_path)), "--design", "notifier", "--inproc",
        "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    runs = json.loads((out / "runs.json").read_text())
    assert [(x["design"], x["seed"]) for x in runs] == [("notifier", s) for s in (5, 6, 7)]
    assert "seeds 5, 6, 7" in r.output
    assert "- seeds: 5, 6, 7 (3 per design)" in (out / "report.md").read_text()


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
