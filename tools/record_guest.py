"""Record a real kernel's page allocator in the QEMU guest: the trace ``gemfs replay`` reads.

One boot of the host's Debian kernel (as ``gemfs calibrate`` does, see tools/calibrate/guest.py,
whose building blocks this reuses) with an /init that mounts tracefs, enables the events
``gemfs record`` enables, takes /proc snapshots every second (each one announced in the trace by a
``tracing_mark_write: gemfs-snapshot N`` line, so the replay knows exactly which events came
before it), runs the fragmenting program (``fragment.c``: fill a share of free memory in 1 MiB
anonymous chunks, free every other chunk, ``compact_memory``, a huge-page probe) with page-cache
traffic around it, and sends the whole record -- the same text format as ``gemfs record`` writes
(tools/record.py) -- gzip'd and base64'd over the second serial port.

A shell in the guest writes the record, so its format is kept simple: ``#@`` lines frame the
snapshots and end the file (``#@eof``), everything else is the kernel's own ``trace`` text.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.calibrate.guest import (
    GuestError,
    GuestUnavailable,
    build_fragment,
    find_busybox,
    find_kernel,
    find_tool,
    make_initramfs,
)
from tools.record import EVENTS

BEGIN = "@@GEMFS-TRACE-BEGIN"
END = "@@GEMFS-TRACE-END"
SNAPSHOT_FILES = ("buddyinfo", "pagetypeinfo", "vmstat", "zoneinfo")


@dataclass(frozen=True)
class GuestTrace:
    """What one boot recorded: the record (plain text), where it is, and how long it took."""

    path: Path
    text: str
    total_s: float
    console_log: Path


def init_script(memory_fill: float = 0.6, chunk_kib: int = 1024, buffer_kb: int = 24576) -> str:
    """The guest's /init: trace the fragmenting program and send the record over ttyS1."""
    enable = "\n".join(
        f"echo 1 > $T/events/{e.replace(':', '/')}/enable 2>/dev/null || "
        f'echo "# event {e} not available"'
        for e in EVENTS
    )
    files = " ".join(SNAPSHOT_FILES)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tracefs nodev /sys/kernel/tracing
T=/sys/kernel/tracing
out=/dev/ttyS1
echo 3 > /proc/sys/vm/drop_caches
echo 1 > /proc/sys/vm/compact_memory
echo {buffer_kb} > $T/buffer_size_kb
echo > $T/trace
: > /tmp/head
{enable} > /tmp/head
snap() {{
    echo "gemfs-snapshot $1" > $T/trace_marker
    {{
        echo "#@snapshot $1"
        for f in {files}; do echo "#@file /proc/$f"; cat /proc/$f; done
        echo "#@end"
    }} >> /tmp/snaps
}}
: > /tmp/snaps
echo 1 > $T/tracing_on
snap 0
( n=1; while [ ! -e /tmp/stop ]; do sleep 1; snap $n; n=$((n+1)); done; echo $n > /tmp/last ) &
loop=$!
dd if=/dev/zero of=/tmp/cache-a bs=64k count=160 2>/dev/null
/bin/fragment -n trace -c {chunk_kib} -f {memory_fill:.4f} -p none > /tmp/fragment.out 2>&1
rm /tmp/cache-a
dd if=/dev/zero of=/tmp/cache-b bs=64k count=160 2>/dev/null
sleep 1
touch /tmp/stop
wait $loop
snap $(cat /tmp/last)
echo 0 > $T/tracing_on
echo "{BEGIN}" > $out
{{
    echo "# gemfs-record 1"
    echo "# source guest kernel $(uname -r)"
    cat /tmp/head
    cat /tmp/snaps
    cat $T/trace
    lost=0
    for s in $T/per_cpu/cpu*/stats; do
        o=$(sed -n 's/^overrun: //p' $s); lost=$((lost + o))
    done
    echo "#@lost $lost"
    echo "#@eof"
}} | gzip -c | base64 > $out
echo "{END}" > $out
cat /tmp/fragment.out
poweroff -f
"""


def decode_output(text: str, where: str) -> str:
    """The record between the BEGIN/END markers of the serial output, decoded."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise GuestError(f"the guest sent no complete trace; see {where}")
    body = text[start + len(BEGIN) : end].replace("\r", "")
    try:
        return gzip.decompress(base64.b64decode("".join(body.split()))).decode()
    except (binascii.Error, OSError, EOFError, UnicodeDecodeError) as exc:
        raise GuestError(f"the guest's trace does not decode ({exc}); see {where}") from exc


def record_guest(
    out: Path,
    log_dir: Path,
    *,
    memory_mib: int = 256,
    fill: float = 0.6,
    timeout_s: float = 300.0,
    kernel: Path | None = None,
) -> GuestTrace:
    """Boot once (TCG), record the fragmenting program, write the record gzip'd to ``out``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    kernel = kernel or find_kernel()
    qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")
    busybox = find_busybox()
    console = log_dir / "record-console.log"
    data = log_dir / "record-serial.log"
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gemfs-record-guest-") as tmp:
        work = Path(tmp)
        fragment = build_fragment(work, log_dir)
        initrd = work / "initrd.cpio"
        initrd.write_bytes(
            make_initramfs(busybox.read_bytes(), fragment.read_bytes(), init_script(fill))
        )
        argv = [
            str(qemu),
            *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
            *("-accel", "tcg", "-cpu", "max", "-m", str(memory_mib)),
            *("-kernel", str(kernel), "-initrd", str(initrd)),
            *("-append", "console=ttyS0 quiet panic=-1 rdinit=/init"),
            *("-chardev", f"file,id=con,path={console}", "-serial", "chardev:con"),
            *("-chardev", f"file,id=data,path={data}", "-serial", "chardev:data"),
        ]
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"guest still running after {timeout_s:.0f} s; see {console}") from exc
        except OSError as exc:
            raise GuestUnavailable(f"cannot start QEMU: {exc}") from exc
    if proc.returncode != 0:
        first = proc.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise GuestError(f"QEMU exited with status {proc.returncode}: {first}; see {console}")
    text = decode_output(data.read_text(errors="replace"), str(data))
    out.write_bytes(gzip.compress(text.encode()))
    return GuestTrace(out, text, time.monotonic() - start, console)
