"""Reading page-allocator traces: tracefs ``trace`` text, ``trace-cmd report``, ``perf script``.

A trace file is either a record written by ``gemfs record`` (or the QEMU guest, see
tools/record_guest.py), gzip'd or not, or a plain text trace from another tool. A record is the
kernel's own trace text plus ``#@`` lines:

    # gemfs-record 1                first line
    #@snapshot N                    /proc files at the moment the trace shows
    #@file /proc/buddyinfo          ``tracing_mark_write: gemfs-snapshot N``
    ...its text...
    #@end
    #@lost N                        events the ring buffer overwrote (overrun)
    #@eof                           last line: anything shorter is a truncated file

Any line that is neither a comment, a blank, an ``#@`` line, a ``CPU:N [LOST M EVENTS]`` line
nor an event line is refused with the file, the line number and what was expected; so are the
events this replay depends on (mm_page_alloc, mm_page_free, mm_page_alloc_extfrag,
mm_migrate_pages, mm_compaction_*, the GPU drivers' bo-create/destroy events) when a field
they need is missing or not a number.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.calibrate.procfs import (
    BuddyInfo,
    PageTypeInfo,
    ProcParseError,
    parse_buddyinfo,
    parse_pagetypeinfo,
    parse_vmstat,
)

RECORD_MAGIC = "# gemfs-record 1"
SNAPSHOT_MARK = "gemfs-snapshot"

# tracefs `trace` / trace_pipe and trace-cmd report: "comm-pid [cpu] flags ts: event: body"
_FTRACE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:[\w.]{4,5}\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[\w:]+):\s*(?P<body>.*)$"
)
# perf script: "comm pid [cpu] ts: [period] sys:event: body"
_PERF = re.compile(
    r"^\s*(?P<comm>.*?)\s+(?P<pid>\d+)(?:/\d+)?\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+\.\d+):\s+"
    r"(?:\d+\s+)?(?P<event>\w+:\w+):\s*(?P<body>.*)$"
)
_LOST = re.compile(r"^CPU:\s*(\d+)\s+\[LOST (\d+) EVENTS\]\s*$")
_FIELD = re.compile(r"(\w+)=(\S*)")

NEEDED: Mapping[str, tuple[str, ...]] = {
    "mm_page_alloc": ("pfn", "order", "migratetype"),
    "mm_page_free": ("pfn", "order"),
    "mm_page_alloc_extfrag": (
        "pfn",
        "alloc_order",
        "fallback_order",
        "alloc_migratetype",
        "fallback_migratetype",
    ),
    "mm_migrate_pages": ("nr_succeeded", "nr_failed"),
    "mm_compaction_begin": ("zone_start", "zone_end"),
    "mm_compaction_end": ("zone_start", "zone_end", "status"),
    "mm_compaction_try_to_compact_pages": ("order",),
    "mm_compaction_kcompactd_wake": ("order",),
    "mm_compaction_migratepages": ("nr_migrated", "nr_failed"),
    "i915_gem_object_create": ("obj", "size"),
    "i915_gem_object_destroy": ("obj",),
    "xe_bo_create": ("size",),
    "amdgpu_bo_create": ("bo", "pages", "type"),
}
"""The events the replay reads, and the fields each must carry."""
NUMERIC = frozenset(
    {
        "pfn",
        "order",
        "migratetype",
        "alloc_order",
        "fallback_order",
        "alloc_migratetype",
        "fallback_migratetype",
        "nr_succeeded",
        "nr_failed",
        "nr_migrated",
        "zone_start",
        "zone_end",
        "migrate_pfn",
        "free_pfn",
        "change_ownership",
        "size",
        "pages",
        "type",
    }
)


class TraceFormatError(ValueError):
    """A trace file that cannot be read as a whole; the message names file, line and expectation."""

    def __init__(self, path: str, line: int, expected: str, got: str = "") -> None:
        where = f"{path}:{line}" if line else path
        shown = f", got {got[:80]!r}" if got else ""
        super().__init__(f"{where}: expected {expected}{shown}")
        self.path, self.line, self.expected = path, line, expected


@dataclass(frozen=True, slots=True)
class Event:
    """One trace line: who, where, when, which event and its fields (numbers already parsed)."""

    line: int
    ts: float
    cpu: int
    comm: str
    pid: int
    name: str
    fields: Mapping[str, int | str]

    def int(self, key: str) -> int:
        value = self.fields[key]
        assert isinstance(value, int)
        return value


@dataclass(frozen=True)
class Snapshot:
    """The /proc files taken at one snapshot (text as read), parsed on demand."""

    index: int
    files: Mapping[str, str]

    @property
    def buddyinfo(self) -> BuddyInfo:
        return parse_buddyinfo(self.files["/proc/buddyinfo"])

    @property
    def pagetypeinfo(self) -> PageTypeInfo | None:
        text = self.files.get("/proc/pagetypeinfo")
        return parse_pagetypeinfo(text) if text else None

    @property
    def vmstat(self) -> dict[str, int]:
        text = self.files.get("/proc/vmstat")
        return parse_vmstat(text) if text else {}

    @property
    def free_runs(self) -> list[tuple[int, int]] | None:
        """Runs of free (buddy) pages from /proc/kpageflags, when the record has them."""
        text = self.files.get("kpageflags-free")
        if text is None:
            return None
        out = []
        for line in text.splitlines():
            start, _, length = line.partition(" ")
            out.append((int(start), int(length)))
        return out

    @property
    def zones(self) -> dict[str, Zone]:
        text = self.files.get("/proc/zoneinfo")
        return parse_zoneinfo(text) if text else {}


@dataclass(frozen=True)
class Zone:
    name: str
    node: int
    start_pfn: int
    spanned: int
    present: int
    managed: int

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.spanned


def pcp_pages(text: str, zone: str) -> int | None:
    """Pages on the per-CPU lists of ``zone`` (node 0), summed over CPUs, from /proc/zoneinfo:
    free pages that buddyinfo does not count."""
    m = re.search(rf"^Node 0, zone\s+{re.escape(zone)}\s*$(.*?)(?=^Node |\Z)", text, re.M | re.S)
    if m is None:
        return None
    counts = re.findall(r"^\s+count:\s+(\d+)", m.group(1), re.M)
    return sum(int(c) for c in counts) if counts else None


def parse_zoneinfo(text: str) -> dict[str, Zone]:
    """Zones with memory (present > 0) by name, from /proc/zoneinfo (node 0 first wins)."""
    out: dict[str, Zone] = {}
    cur: dict[str, int] = {}
    name, node = "", 0

    def done() -> None:
        if name and cur.get("present", 0) > 0 and name not in out and "start_pfn" in cur:
            out[name] = Zone(
                name, node, cur["start_pfn"], cur["spanned"], cur["present"], cur["managed"]
            )

    for raw in text.splitlines():
        m = re.match(r"^Node (\d+), zone\s+(\S+)", raw)
        if m:
            done()
            node, name, cur = int(m.group(1)), m.group(2), {}
            continue
        parts = raw.replace(":", " ").split()
        if len(parts) == 2 and parts[0] in ("spanned", "present", "managed", "start_pfn"):
            if parts[0] not in cur:
                cur[parts[0]] = int(parts[1])
    done()
    return out


@dataclass
class Trace:
    """A whole trace file, read and checked."""

    path: str
    events: list[Event] = field(default_factory=list)
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    snapshot_at: dict[int, int] = field(default_factory=dict)
    """Snapshot index -> position in ``events`` of its marker (events before it came first)."""
    lost: int = 0
    record: bool = False
    source: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def complete_snapshots(self) -> list[int]:
        """Snapshots that the trace also marks, in order."""
        return sorted(i for i in self.snapshots if i in self.snapshot_at)


def _open_text(path: Path) -> str:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise TraceFormatError(
                str(path), 0, "a complete gzip stream (the file is truncated or corrupt)", str(exc)
            ) from None
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise TraceFormatError(str(path), 0, "UTF-8 text", str(exc)) from None


def _value(key: str, raw: str) -> int | str:
    if key not in NUMERIC:
        return raw
    text = raw.rstrip(",")
    try:
        return int(text, 16) if text.startswith(("0x", "0X")) else int(text)
    except ValueError:
        return raw


def parse_line(text: str) -> re.Match[str] | None:
    return _FTRACE.match(text) or _PERF.match(text)


def _fields(body: str) -> dict[str, int | str]:
    return {k: _value(k, v) for k, v in _FIELD.findall(body)}


MAX_EVENTS = 2_000_000
"""Events read at most (about 1 GB in memory): a longer trace is refused, not half-replayed."""


def read_trace(path: Path | str, max_events: int = MAX_EVENTS) -> Trace:
    """Read a trace file whole; TraceFormatError on anything malformed or truncated."""
    path = Path(path)
    try:
        text = _open_text(path)
    except OSError as exc:
        raise TraceFormatError(str(path), 0, "a readable file", exc.strerror or str(exc)) from None
    return parse_trace(text, str(path), max_events)


def parse_trace(text: str, name: str = "<trace>", max_events: int = MAX_EVENTS) -> Trace:
    trace = Trace(name)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    trace.record = bool(lines) and lines[0] == RECORD_MAGIC
    it: Iterator[tuple[int, str]] = enumerate(lines, 1)
    eof = False
    for no, line in it:
        if eof:
            if line.strip():
                raise TraceFormatError(name, no, "nothing after '#@eof'", line)
            continue
        if line.startswith("#@"):
            word, _, rest = line[2:].partition(" ")
            if word == "snapshot":
                _read_snapshot(trace, it, no, rest, name)
            elif word == "lost":
                trace.lost += _number(rest, name, no, "'#@lost N'")
            elif word == "eof":
                eof = True
            else:
                raise TraceFormatError(name, no, "'#@snapshot', '#@lost' or '#@eof'", line)
            continue
        if line.startswith("#"):
            if line.startswith("# source "):
                trace.source = line.removeprefix("# source ")
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if lost := _LOST.match(stripped):
            trace.lost += int(lost.group(2))
            continue
        if stripped.startswith("CPU ") or stripped.startswith("cpus="):  # trace-cmd headers
            continue
        m = parse_line(line)
        if m is None:
            raise TraceFormatError(name, no, "'TASK-PID [CPU] TIMESTAMP: EVENT: FIELDS'", line)
        event = m.group("event").rpartition(":")[2]
        body = m.group("body")
        fields = _fields(body)
        need = NEEDED.get(event)
        if need is not None:
            for key in need:
                value = fields.get(key)
                if value is None:
                    raise TraceFormatError(name, no, f"{event} with a field {key}=", line)
                if key in NUMERIC and not isinstance(value, int):
                    raise TraceFormatError(name, no, f"a number in {key}= of {event}", line)
        if event == "tracing_mark_write" or event == "print":
            words = body.split()
            if len(words) == 2 and words[0] == SNAPSHOT_MARK:
                index = _number(words[1], name, no, f"'{SNAPSHOT_MARK} N'")
                trace.snapshot_at[index] = len(trace.events)
            continue
        trace.counts[event] = trace.counts.get(event, 0) + 1
        if len(trace.events) >= max_events:
            raise TraceFormatError(
                name,
                no,
                f"at most {max_events:,} events (record a shorter run, or a window of frames "
                "with gemfs record --pfn-range)",
            )
        comm = m.group("comm").strip()
        trace.events.append(
            Event(no, float(m.group("ts")), int(m.group("cpu")), comm, int(m.group("pid")),
                  event, fields)
        )  # fmt: skip
    if trace.record and not eof:
        raise TraceFormatError(
            name, len(lines), "'#@eof' as the last line (the record is truncated)"
        )
    if not trace.events:
        raise TraceFormatError(name, len(lines), "at least one event line")
    for index, snap in trace.snapshots.items():
        try:
            snap.buddyinfo  # noqa: B018 - parse now, so a bad snapshot is refused up front
        except (KeyError, ProcParseError) as exc:
            raise TraceFormatError(
                name, 0, f"/proc/buddyinfo in snapshot {index}", str(exc)
            ) from None
    return trace


def _number(text: str, name: str, no: int, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise TraceFormatError(name, no, what, text) from None


def _read_snapshot(
    trace: Trace, it: Iterator[tuple[int, str]], start: int, rest: str, name: str
) -> None:
    index = _number(rest, name, start, "'#@snapshot N'")
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for no, line in it:
        if line == "#@end":
            trace.snapshots[index] = Snapshot(index, {k: "\n".join(v) for k, v in files.items()})
            return
        if line.startswith("#@file "):
            current = files.setdefault(line.removeprefix("#@file ").strip(), [])
        elif line.startswith("#@"):
            raise TraceFormatError(name, no, f"'#@file PATH' or '#@end' in snapshot {index}", line)
        elif current is None:
            raise TraceFormatError(name, no, f"'#@file PATH' opening snapshot {index}", line)
        else:
            current.append(line)
    raise TraceFormatError(name, start, f"'#@end' closing snapshot {index} (the file ends first)")
