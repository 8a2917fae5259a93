"""Issue 10, item 11: what ``gemfs run`` prints and draws, as a user sees it.

The results table in a real terminal of 80 and of 120 columns (a pty of that size): within the
width, every metric's values on the label's line (no cell wrapped onto more lines); the stack's
pageblock map marks the mixed pageblocks; the plots' x axis is modelled time.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure

import tools.report
from gemfs.mm.types import Design
from gemfs_cli.main import main
from tests.workloads import BUSY, EXAMPLES
from tools.inproc_backend import InprocBackend
from tools.player import RunRecord, play
from tools.report import SECTIONS, TIME_LABEL, plot_pageblocks, write_report
from tools.workload import parse_workload

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DESIGNS = ["pinned", "shmem-hook", "gemfs", "notifier"]  # the thread's four, named on the line


def run_in_terminal(args: list[str], columns: int) -> str:
    """stdout of ``gemfs ARGS`` written to a pty of ``columns`` columns, escapes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemfs_cli", *args],
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r", "")


@pytest.mark.parametrize("columns", [80, 120])
def test_results_table_in_a_terminal(tmp_path: Path, columns: int) -> None:
    designs = [arg for d in DESIGNS for arg in ("--design", d)]
    workload = str(EXAMPLES / "compaction-test.toml")
    text = run_in_terminal(["run", workload, "--inproc", "--out", str(tmp_path), *designs], columns)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= columns, text
    header = next(line for line in lines if line.split()[:1] == ["metric"])
    assert header.split() == ["metric", *DESIGNS]
    # Every metric on one line with one value per design: no label or cell wrapped.
    by_label = {}
    for section in SECTIONS:
        for metric in section.metrics:
            if metric.own:  # pin-time migration, confine's region: not these designs'
                assert not any(x.strip().startswith(metric.label) for x in lines), metric.label
                continue
            line = next((x for x in lines if x.strip().startswith(metric.label)), None)
            assert line is not None, (metric.label, text)
            by_label[metric.label] = line.strip()[len(metric.label) :].split()
            assert len(by_label[metric.label]) == len(DESIGNS), (metric.label, line)
    # The values a user reads (compaction_test: the pins keep pinned from compacting).
    assert by_label["drain after idle: blocks got"] == ["0", "51", "51", "51"]
    assert by_label["drain stopped at a failure"] == ["yes"] * 4
    assert by_label["pages migrated"] == ["0", "13056", "13056", "13056"]
    assert by_label["data errors"] == ["0"] * 4


@pytest.mark.mount
@pytest.mark.e2e
def test_stack_pageblock_map_marks_the_mixed_pageblocks(tmp_path: Path) -> None:
    wl = tmp_path / "busy.toml"
    wl.write_text(BUSY)
    js, out = tmp_path / "runs.json", tmp_path / "out"
    r = CliRunner().invoke(
        main, ["run", str(wl), "--design", "pinned", "--json", str(js), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    [data] = json.loads(js.read_text())
    assert data["backend"] == "stack"
    assert data["pageblock_mixed"] == [3, 4, 9, 10]  # as in process (tests/test_parity.py)
    assert data["mixed_pageblocks"] == 4
    record = RunRecord(**data)
    with_marks, without = tmp_path / "with.png", tmp_path / "without.png"
    plot_pageblocks([record], with_marks)
    plot_pageblocks([dataclasses.replace(record, pageblock_mixed=[])], without)
    assert with_marks.read_bytes() != without.read_bytes()  # the markers are drawn


def test_plots_run_on_modelled_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = parse_workload(BUSY, "busy.toml")
    results = [play(w, InprocBackend(w, d), d) for d in (Design.PINNED, Design.NOTIFIER)]
    figures: dict[str, Figure] = {}
    save = tools.report._save

    def keep(fig: Figure, path: Path) -> None:
        figures[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(tools.report, "_save", keep)
    write_report(w, results, tmp_path)
    end = max(p.time_s for res in results for p in res.timeline)
    assert end > 0
    for name in ("score.png", "order9.png"):
        ax = figures[name].axes[0]
        assert ax.get_xlabel() == TIME_LABEL == "modelled time (s)"
        xs = [float(x) for line in ax.get_lines() for x in np.asarray(line.get_xdata())]
        assert max(xs) == pytest.approx(end)  # the player's modelled clock, not wall seconds
        assert min(xs) == 0
