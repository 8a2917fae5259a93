"""``gemfs run --trace FILE`` on both backends, as a user runs it: the same workload, designs and
seeds give the same trace, line for line, in process and on the real stack (a FUSE mount, a
driver process, a compactor process on the modelled clock, the lines read through the mount's
``.gemfs/trace_pipe``).

Why equal and not close: the records of both backends are equal (tests/test_parity.py), the
tracepoints are made by the same model code on the same modelled clock, and the label of each
line follows one rule (gemfs.mm.trace.task_of: design and seed). The passes the compactor process
runs are printed by the core from what it tells it (the ``trace_pass`` op), as the in-process
kcompactd's passes are printed by the model.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemfs.control.client import SyncClient
from gemfs.control.peer import CallError
from gemfs.mm.trace import task_of
from gemfs.mm.types import PAGE_SIZE, Design
from gemfs.testing import GemfsMount
from gemfs_cli.main import main
from tests.test_cli_run import one_error_line
from tests.workloads import BUSY, write_small
from tools.tracefile import parse_trace

pytestmark = [pytest.mark.e2e, pytest.mark.mount]

DESIGNS = ("pinned", "notifier")  # pinned: kcompactd's passes move pages; notifier: callbacks
SEEDS = 2


def _run(tmp_path: Path, workload: Path, name: str, *backend: str) -> list[str]:
    trace = tmp_path / f"{name}.trace"
    args = ["run", str(workload), *backend, "--trace", str(trace), "--seeds", str(SEEDS)]
    for design in DESIGNS:
        args += ["--design", design]
    args += ["--out", str(tmp_path / f"report-{name}")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = trace.read_text().splitlines()
    assert f"trace: {len(lines) - 2} lines in {trace}" in result.output  # (less the header)
    return lines


def test_same_trace_in_process_and_on_the_stack(tmp_path: Path) -> None:
    workload = write_small(tmp_path, BUSY, "busy.toml")
    inproc = _run(tmp_path, workload, "inproc", "--inproc")
    stack = _run(tmp_path, workload, "stack")
    assert stack == inproc
    # ... and the lines say something: allocations, frees, fallbacks, compaction passes (the
    # core's, kcompactd's and the probes' direct ones) that moved pages.
    trace = parse_trace("\n".join(stack) + "\n", "stack.trace")
    assert trace.lost == 0
    assert len(trace.events) == len(stack) - 2 > 100_000
    counts = trace.counts
    assert counts["mm_page_alloc"] > 10_000
    assert counts["mm_page_free"] > 10_000
    assert counts["mm_page_alloc_extfrag"] > 0
    assert counts["mm_compaction_begin"] == counts["mm_compaction_end"] > 0
    assert counts["mm_migrate_pages"] == counts["mm_compaction_migratepages"] > 0
    moved = sum(e.int("nr_succeeded") for e in trace.events if e.name == "mm_migrate_pages")
    assert moved > 0
    # One task per run: the design as comm, the seed as pid, runs one after the other.
    tasks = Counter((e.comm, e.pid) for e in trace.events)
    assert set(tasks) == {(d, 11 + k) for d in DESIGNS for k in range(SEEDS)}
    order = list(dict.fromkeys((e.comm, e.pid) for e in trace.events))
    assert order == [(d, 11 + k) for d in DESIGNS for k in range(SEEDS)]
    # Each run's lines are in time order, as a kernel's trace of one CPU is.
    for task in tasks:
        times = [e.ts for e in trace.events if (e.comm, e.pid) == task]
        assert times == sorted(times)


def test_trace_op_labels_the_lines_by_the_rule(
    gemfs_mount_factory: Callable[..., GemfsMount], tmp_path: Path
) -> None:
    """The control socket's ``trace`` op turns tracing on with a run's seed; tracing_on by hand
    labels with seed 0; both by task_of. The lines come at .gemfs/trace_pipe."""
    ctl = tmp_path / "ctl.sock"
    m = gemfs_mount_factory("16MiB", "notifier", control=str(ctl))
    pipe = m.gemfs_dir / "trace_pipe"
    with SyncClient(str(ctl)) as c:
        assert c.call("trace", {"on": True, "seed": 7}) == {"written": 0, "lost": 0}
        assert m.read_stat("tracing_on").strip() == "1"
        with pytest.raises(CallError) as e:  # someone traces already
            c.call("trace", {"on": True, "seed": 8})
        assert e.value.errno == "EBUSY"
        with pytest.raises(CallError) as e:
            c.call("trace", {"on": "yes"})
        assert e.value.errno == "EINVAL"
        c.call("create", {"path": "/f", "size": 3 * PAGE_SIZE, "mt": "movable"})
        text = _read_pipe(pipe)
        trace = parse_trace(text, "trace_pipe")
        assert trace.counts == {"mm_page_alloc": 3}
        assert {(e.comm, e.pid) for e in trace.events} == {task_of(Design.NOTIFIER, 7)}
        assert {(e.comm, e.pid) for e in trace.events} == {("notifier", 7)}
        assert c.call("trace", {"on": False}) == {"written": 3, "lost": 0}
        assert m.read_stat("tracing_on").strip() == "0"
        m.write_knob("tracing_on", 1)  # by hand: no run, seed 0
        c.call("alloc", {"order": 1, "mt": "unmovable"})
        trace = parse_trace(_read_pipe(pipe), "trace_pipe")
        assert {(e.comm, e.pid) for e in trace.events} == {("notifier", 0)}
        assert trace.counts["mm_page_alloc"] == 1
        assert c.call("trace", {"on": False}) == {"written": len(trace.events), "lost": 0}


def _read_pipe(pipe: Path) -> str:
    """What trace_pipe holds now (O_NONBLOCK: EAGAIN once it is empty)."""
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    chunks = []
    try:
        while True:
            try:
                chunks.append(os.read(fd, 1 << 16))
            except BlockingIOError:
                return b"".join(chunks).decode()
    finally:
        os.close(fd)


def test_run_trace_on_an_existing_mount(
    gemfs_mount_factory: Callable[..., GemfsMount], tmp_path: Path
) -> None:
    """``--mount M --trace FILE``: the run's lines from M, labelled by the rule; a mount that
    someone traces already is refused in one line, and the run leaves M untraced."""
    ctl = tmp_path / "ctl.sock"
    m = gemfs_mount_factory("32MiB", "notifier", control=str(ctl))
    workload = write_small(tmp_path)
    out = tmp_path / "run.trace"
    args = ["run", str(workload), "--mount", str(m.path), "--trace", str(out)]
    args += ["--out", str(tmp_path / "report")]
    m.write_knob("tracing_on", 1)
    line = one_error_line(CliRunner().invoke(main, args))
    assert "is being traced already (.gemfs/tracing_on is 1)" in line
    m.write_knob("tracing_on", 0)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    trace = parse_trace(out.read_text(), str(out))
    assert {(e.comm, e.pid) for e in trace.events} == {("notifier", 5)}  # SMALL's seed
    assert trace.counts["mm_page_alloc"] > 1000
    assert m.read_stat("tracing_on").strip() == "0"
