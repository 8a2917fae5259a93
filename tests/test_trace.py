"""The model's tracepoints against lines from real kernel traces, field for field.

The guest lines come from a trace of Debian 12's 6.1 kernel in the QEMU guest
(tools/record_guest.py, the fragmenting program), the host lines from this machine's 6.18
(a tracefs instance, compact_memory).
Each real line is parsed, the same values are given to :class:`gemfs.mm.trace.Tracer` with the same
task, CPU and time, and the two lines must be equal but for the hashed ``page=`` pointer (a kernel
address) and the irq/preempt flags column (the model has no interrupts)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from click.testing import CliRunner

from gemfs.fs import GemFS
from gemfs.mm.compaction import CompactResult
from gemfs.mm.core import MemoryManager
from gemfs.mm.trace import PassPoint, Tracer, hashed_pointer, task_of
from gemfs.mm.types import Design, MigrateMode, MigrateType
from gemfs_cli.main import main
from tests.test_cli_run import one_error_line
from tests.test_fs_unit import CTX, create, gemfs_file, read_proc, write_proc
from tools.tracefile import parse_line, parse_trace

GUEST_LINES = [
    "            init-1       [000] .....     6.294958: mm_page_alloc: page=0000000024885aba "
    "pfn=0x4398 order=0 migratetype=0 gfp_flags=GFP_KERNEL",
    "             cat-84      [000] .....     6.372171: mm_page_free: page=00000000950b3e7d "
    "pfn=0x4399 order=0",
    "            init-88      [000] d..3.     8.707722: mm_page_alloc_extfrag: "
    "page=00000000deaaf9f1 pfn=0x9800 alloc_order=0 fallback_order=10 pageblock_order=9 "
    "alloc_migratetype=0 fallback_migratetype=1 fragmenting=0 change_ownership=1",
    "        fragment-91      [000] .....     8.746678: mm_compaction_begin: zone_start=0x1000 "
    "migrate_pfn=0x1000 free_pfn=0xfe00 zone_end=0xffe0, mode=sync",
    "        fragment-91      [000] .....     9.303681: mm_compaction_end: zone_start=0x1000 "
    "migrate_pfn=0x6e00 free_pfn=0x6f40 zone_end=0xffe0, mode=sync status=complete",
    "        fragment-91      [000] .....     8.748382: mm_compaction_migratepages: "
    "nr_migrated=32 nr_failed=0",
    "        fragment-91      [000] .....     8.748282: mm_migrate_pages: nr_succeeded=32 "
    "nr_failed=0 nr_thp_succeeded=0 nr_thp_failed=0 nr_thp_split=0 mode=MIGRATE_SYNC "
    "reason=compaction",
]
HOST_LINES = [  # Linux 6.18: mm_migrate_pages gained nr_split
    "            bash-26163   [001] .....  2224.355039: mm_migrate_pages: nr_succeeded=471 "
    "nr_failed=0 nr_thp_succeeded=0 nr_thp_failed=0 nr_thp_split=0 nr_split=0 "
    "mode=MIGRATE_SYNC reason=compaction",
    "          python-28808   [001] .....  2424.905317: mm_page_free: page=00000000b25753a3 "
    "pfn=0x30240a order=0",
]
STATUS = {"complete": 5, "success": 8, "skipped": 1, "continue": 4}


def _normalise(line: str) -> str:
    line = re.sub(r"page=[0-9a-f]{16}", "page=PTR", line)
    return re.sub(r"\] [\w.]{5} ", "] FLAGS ", line)


def _model_line(real: str, *, nr_split: bool) -> str:
    m = parse_line(real)
    assert m is not None, real
    comm, pid, cpu, ts = m["comm"].strip(), int(m["pid"]), int(m["cpu"]), float(m["ts"])
    event = m["event"]
    f = {k: v.rstrip(",") for k, v in re.findall(r"(\w+)=(\S+)", m["body"])}
    num = {
        k: int(v, 16) if v.startswith("0x") else int(v)
        for k, v in f.items()
        if k != "page" and re.fullmatch(r"0x[0-9a-f]+|\d+", v)
    }
    t = Tracer(lambda: ts, comm=comm, pid=pid, cpu=cpu, nr_split=nr_split)
    if event == "mm_page_alloc":
        t.mm_page_alloc(num["pfn"], num["order"], num["migratetype"], f["gfp_flags"])
    elif event == "mm_page_free":
        t.mm_page_free(num["pfn"], num["order"])
    elif event == "mm_page_alloc_extfrag":
        t.mm_page_alloc_extfrag(
            num["pfn"],
            num["alloc_order"],
            num["fallback_order"],
            num["alloc_migratetype"],
            num["fallback_migratetype"],
            bool(num["change_ownership"]),
        )
    elif event == "mm_compaction_begin":
        args = (num["zone_start"], num["migrate_pfn"], num["free_pfn"], num["zone_end"])
        t.mm_compaction_begin(*args, f["mode"] == "sync")
    elif event == "mm_compaction_end":
        args = (num["zone_start"], num["migrate_pfn"], num["free_pfn"], num["zone_end"])
        t.mm_compaction_end(*args, f["mode"] == "sync", STATUS[f["status"]])
    elif event == "mm_compaction_migratepages":
        t.mm_compaction_migratepages(num["nr_migrated"], num["nr_failed"])
    elif event == "mm_migrate_pages":
        mode = MigrateMode[f["mode"].removeprefix("MIGRATE_")]
        t.mm_migrate_pages(num["nr_succeeded"], num["nr_failed"], mode, f["reason"])
    else:  # pragma: no cover
        raise AssertionError(event)
    return t.lines[-1]


@pytest.mark.parametrize("real", GUEST_LINES)
def test_model_prints_like_the_guest_kernel(real: str) -> None:
    assert _normalise(_model_line(real, nr_split=False)) == _normalise(real)


@pytest.mark.parametrize("real", HOST_LINES)
def test_model_prints_like_this_machines_kernel(real: str) -> None:
    assert _normalise(_model_line(real, nr_split=True)) == _normalise(real)


def test_pointer_is_hashed_like_ftrace() -> None:
    assert re.fullmatch(r"00000000[0-9a-f]{8}", hashed_pointer(0x4398))
    assert hashed_pointer(1) == hashed_pointer(1) != hashed_pointer(2)


def test_model_trace_reads_as_a_kernel_trace() -> None:
    mm = MemoryManager("8MiB")
    mm.tracer = Tracer(lambda: mm.clock.now, capacity=1 << 16)
    obj = mm.create_object(64 << 10, path="/a")
    pfn = mm.alloc_kernel(2, MigrateType.UNMOVABLE)
    mm.free_kernel(pfn)
    mm.destroy_object(obj)
    mm.compact()
    text = "\n".join(mm.tracer.lines) + "\n"
    trace = parse_trace(text, "model")
    assert trace.counts["mm_page_alloc"] == 16 + 1
    assert trace.counts["mm_page_free"] == 16 + 1
    assert trace.counts["mm_compaction_begin"] == trace.counts["mm_compaction_end"] == 1
    free = next(e for e in trace.events if e.name == "mm_page_free")
    assert free.fields["pfn"] == pfn
    assert free.fields["order"] == 2


def test_tracer_buffer_is_bounded_and_counts_lost_lines() -> None:
    t = Tracer(lambda: 1.5, capacity=3)
    for pfn in range(5):
        t.mm_page_free(pfn, 0)
    assert t.written == 5
    assert t.lost == 2
    lines, cursor, lost = t.read(0)
    assert lost == 2
    assert cursor == 5
    assert len(lines) == 3
    assert "pfn=0x2 " in lines[0]
    assert t.read(cursor) == ([], 5, 0)


async def read_pipe(fs: GemFS, *, nonblock: bool = False, size: int = 1 << 20) -> str:
    """One read(2) of trace_pipe (a pipe: reading until the end would never end)."""
    node = await gemfs_file(fs, "trace_pipe")
    flags = os.O_RDONLY | (os.O_NONBLOCK if nonblock else 0)
    fi = await fs.open(node.ino, flags, CTX)
    assert fi.direct_io
    assert fi.nonseekable
    try:
        with trio.fail_after(60):  # (the mock clock: a read that never wakes fails at once)
            return (await fs.read(fi.fh, 0, size)).decode()
    finally:
        await fs.release(fi.fh)


async def test_trace_pipe_on_the_mount(autojump_clock: trio.testing.MockClock) -> None:
    mm = MemoryManager("8MiB")
    fs = GemFS(mm, uid=0, gid=0)
    assert await read_proc(fs, "tracing_on") == "0\n"
    with pytest.raises(pyfuse3.FUSEError) as info:  # nothing there, and O_NONBLOCK
        await read_pipe(fs, nonblock=True)
    assert info.value.errno == errno.EAGAIN
    await write_proc(fs, "tracing_on", "1")
    _, fh = await create(fs, b"traced")
    await fs.write(fh, 0, bytes(3 * 4096))
    text = await read_pipe(fs)
    trace = parse_trace(text, "trace_pipe")
    assert trace.counts == {"mm_page_alloc": 3}
    # turned on by hand (no run): the mount's design, seed 0
    assert {(e.comm, e.pid) for e in trace.events} == {("shmem-hook", 0)}
    # consumed, as the kernel's trace_pipe: a second read waits for the next line
    got: list[str] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            got.append(await read_pipe(fs))

        nursery.start_soon(reader)
        await trio.sleep(5)  # (the mock clock: no real time)
        assert got == []
        await fs.write(fh, 3 * 4096, bytes(4096))
    assert parse_trace(got[0], "trace_pipe").counts == {"mm_page_alloc": 1}
    # a short read leaves the rest for the next one
    await fs.write(fh, 4 * 4096, bytes(2 * 4096))
    first = await read_pipe(fs, size=40)
    rest = await read_pipe(fs)
    assert len(first) == 40
    assert parse_trace(first + rest, "trace_pipe").counts == {"mm_page_alloc": 2}
    await write_proc(fs, "tracing_on", "0")
    assert fs.mm.tracer is None
    mm.close()


def test_run_trace_file(tmp_path: Path) -> None:
    out = tmp_path / "run.trace"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "examples/compaction-test.toml",
            "--inproc",
            "--design",
            "shmem-hook",
            "--trace",
            str(out),
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 0, result.output
    trace = parse_trace(out.read_text(), str(out))
    assert trace.counts["mm_page_alloc"] > 1000
    assert {(e.comm, e.pid) for e in trace.events} == {task_of(Design.SHMEM_HOOK, 1)}
    assert f"trace: {len(trace.events)} lines in {out}" in result.output


def test_run_trace_to_an_unwritable_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "missing" / "run.trace"
    for backend in (["--inproc"], []):  # refused before any run starts (a stack included)
        result = CliRunner().invoke(
            main, ["run", "examples/compaction-test.toml", *backend, "--trace", str(bad)]
        )
        line = one_error_line(result)
        assert line == f"Error: cannot write the trace to {bad}: No such file or directory"
        assert not (tmp_path / "report").exists()


def test_task_label_rule() -> None:
    """comm is the design (cut to the kernel's 15 characters), pid the run's seed."""
    assert task_of(Design.NOTIFIER, 11) == ("notifier", 11)
    assert task_of(Design.PINNED_IN_MOVABLE)[1] == 0
    assert all(len(task_of(d)[0]) <= 15 for d in Design)
    assert task_of(Design.PINNED_IN_MOVABLE)[0] == Design.PINNED_IN_MOVABLE.value[:15]
    with pytest.raises(ValueError, match="negative"):
        task_of(Design.GEMFS, -1)


def test_consumed_lines_leave_the_buffer() -> None:
    """trace_pipe consumes: what was read is gone (memory too), overruns still count."""
    t = Tracer(lambda: 0.0, capacity=4)
    for pfn in range(3):
        t.mm_page_free(pfn, 0)
    lines, cursor, lost = t.consume(0)
    assert (len(lines), cursor, lost, len(t.lines), t.lost) == (3, 3, 0, 0, 0)
    for pfn in range(6):
        t.mm_page_free(pfn, 0)
    lines, cursor, lost = t.consume(cursor)
    assert (len(lines), cursor, lost, t.lost) == (4, 9, 2, 2)
    assert "pfn=0x2 " in lines[0]


@pytest.mark.parametrize("result", list(CompactResult))
def test_every_compaction_result_prints(result: CompactResult) -> None:
    """mm_compaction_end has a status for every result a pass ends with (partial_skipped too)."""
    t = Tracer(lambda: 0.0)
    t.compaction_end(PassPoint(3, 2, MigrateMode.SYNC, result), 1 << 13)
    assert t.lines[-1].endswith(f"mode=sync status={result.value}")
    (event,) = parse_trace(t.lines[-1] + "\n", "t").events
    assert event.fields["status"] == result.value
