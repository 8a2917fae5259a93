"""``gemfs top``: the live pool — buddyinfo, fragmentation score, counters — for a terminal.

Two sources give the same :class:`TopSnapshot`: a mount's ``.gemfs`` files (``buddyinfo``,
``vmstat``, ``pagetypeinfo``, in the kernel's formats, parsed with :mod:`gemfs.mm.vmstat`), or
the core's ``stats`` call over the control socket.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.columns import Columns
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gemfs.mm.types import NR_ORDERS, PAGE_SIZE, PAGEBLOCK_ORDER, MigrateType
from gemfs.mm.vmstat import (
    fragmentation_index,
    fragmentation_score,
    parse_buddyinfo,
    parse_pagetypeinfo,
    parse_vmstat,
    unusable_index,
)

# Counters worth a glance; the rest are in .gemfs/vmstat.
TOP_COUNTERS = (
    "nr_free_pages",
    "nr_gem_pages",
    "nr_gem_pinned",
    "nr_kernel_pages",
    "pgmigrate_success",
    "pgmigrate_fail",
    "pgmigrate_eagain",
    "compact_stall",
    "compact_success",
    "compact_fail",
    "compact_daemon_wake",
    "proactive_compact_trigger",
    "gem_migrate_callbacks",
    "gem_invalidate_callbacks",
    "gem_callback_timeouts",
)


class TopError(Exception):
    """The pool cannot be read (one line for the user)."""


@dataclass(frozen=True, slots=True)
class TopSnapshot:
    source: str
    buddyinfo: list[int]
    vmstat: dict[str, int]
    pageblocks: dict[str, int] = field(default_factory=dict)

    @property
    def free_pages(self) -> int:
        return sum(n << o for o, n in enumerate(self.buddyinfo))

    @property
    def score(self) -> int:
        return fragmentation_score(self.buddyinfo)


Reader = Callable[[], TopSnapshot]


def mount_reader(mountpoint: str) -> Reader:
    """Read a mount's ``.gemfs`` statistics files."""
    stats = Path(mountpoint) / ".gemfs"
    if not (stats / "buddyinfo").is_file():
        raise TopError(f"{mountpoint} is not a gemfs mount (no .gemfs/buddyinfo)")

    def read() -> TopSnapshot:
        try:
            buddy = parse_buddyinfo((stats / "buddyinfo").read_text())
            vm = parse_vmstat((stats / "vmstat").read_text())
            pti = stats / "pagetypeinfo"
            blocks = parse_pagetypeinfo(pti.read_text())[1] if pti.is_file() else {}
        except (OSError, ValueError) as e:
            raise TopError(f"cannot read {stats}: {e}") from None
        return TopSnapshot(str(mountpoint), buddy, vm, {k.lower(): v for k, v in blocks.items()})

    return read


def control_reader(path: str) -> Reader:
    """Ask the core for its statistics over the control socket."""
    try:
        client_mod = importlib.import_module("gemfs.control.client")
    except ImportError as e:
        raise TopError(f"reading over the control socket is not available ({e})") from None
    try:
        client: Any = client_mod.SyncClient(path, name="gemfs-top")
    except Exception as e:
        raise TopError(f"cannot connect to {path}: {e}") from None

    def read() -> TopSnapshot:
        try:
            s = client.call("stats")
        except Exception as e:
            raise TopError(f"{path}: {e}") from None
        blocks = s.get("pageblocks", [])
        return TopSnapshot(
            path,
            [int(n) for n in s["free"]],
            {str(k): int(v) for k, v in s["vmstat"].items()},
            {mt.name.lower(): int(blocks[mt]) for mt in MigrateType if mt < len(blocks)},
        )

    return read


def render(snap: TopSnapshot) -> Group:
    """What one refresh shows: a header line, the orders table, pageblocks and counters."""
    free = snap.free_pages
    head = Text.assemble(
        ("gemfs top ", "bold"),
        (snap.source, "cyan"),
        f"   free {free} pages ({free * PAGE_SIZE >> 20} MiB)   fragmentation score ",
        (str(snap.score), "bold red" if snap.score > 50 else "bold green"),
    )
    orders = Table(title="buddyinfo", title_justify="left", box=box.SIMPLE_HEAD)
    orders.add_column("order", justify="right")
    orders.add_column("free blocks", justify="right")
    orders.add_column("pages", justify="right")
    orders.add_column("unusable", justify="right")
    orders.add_column("extfrag", justify="right")
    for o, n in enumerate(snap.buddyinfo[:NR_ORDERS]):
        orders.add_row(
            str(o),
            str(n),
            str(n << o),
            f"{unusable_index(snap.buddyinfo, o):.3f}",
            f"{fragmentation_index(snap.buddyinfo, o):.3f}",
            style="bold" if o == PAGEBLOCK_ORDER else "",
        )
    side = Table(title="counters", title_justify="left", box=box.SIMPLE_HEAD, show_header=False)
    side.add_column("name")
    side.add_column("value", justify="right")
    for name, value in snap.pageblocks.items():
        side.add_row(f"pageblocks {name}", str(value))
    for name in TOP_COUNTERS:
        if name in snap.vmstat:
            side.add_row(name, str(snap.vmstat[name]))
    return Group(head, Columns([orders, side], padding=(0, 3)))
