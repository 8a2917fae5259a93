"""The kernel side of ``gemfs calibrate``: run the model's fragmentation pattern on real Linux.

One QEMU boot of the host's Debian kernel with a throw-away initramfs (busybox-static, a static
build of ``fragment.c`` and a small ``/init``) runs the requested scenarios one after another, each
in a fresh process, and powers off. Each scenario fills 80% of free memory with anonymous chunks
of 4 KiB pages, frees every other chunk, optionally long-term pins (io_uring fixed buffers, i.e.
FOLL_LONGTERM) none/all/half of the survivors, then records /proc/buddyinfo, /proc/pagetypeinfo
and /proc/vmstat before and after ``echo 1 > /proc/sys/vm/compact_memory`` and how many 2 MiB
huge pages ``/proc/sys/vm/nr_hugepages`` could then get.

The guest has two serial ports: ttyS0 is the console (kernel messages and progress lines, kept as
``guest-console.log``); ttyS1 carries only the program's output (``guest-results.log``), so
kernel messages can never split a data line. Both files stay in ``log_dir``.

Before and after: "before" is the state right after fill/free/pin, "after" right after
``compact_memory``; order-9 counts come from buddyinfo (an order-10 block counts as two) and the
ideal is free_pages // 512 from the same buddyinfo. The hugepage probe (write a number larger
than memory to ``nr_hugepages``, read back, write 0) runs once, after the "after" dump: writing
``nr_hugepages`` makes the allocator reclaim and compact by itself, so probing before
``compact_memory`` would disturb what compact_memory is measured on. The ``*-nocompact``
scenarios skip ``compact_memory``, so their probe shows what the allocator alone gets from the
fragmented state.

Between scenarios /init drops caches and runs ``compact_memory`` so that each starts from a
compacted machine; the previous scenario's process has already unregistered its buffers (which
unpins synchronously) and exited.

Acceleration: KVM (``-cpu host``) when /dev/kvm answers, else TCG (``-cpu max``). A KVM guest
that exits at once or does not reach /init within ``KVM_LIVENESS_S`` seconds (some nested or
emulated /dev/kvm devices accept the ioctls and then spin) is killed and the boot is redone
with TCG; that verdict is remembered for the rest of the process. ``GEMFS_QEMU_ACCEL=kvm|tcg``
forces one.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tools.calibrate.procfs import (
    PAGEBLOCK_ORDER,
    BuddyInfo,
    PageTypeInfo,
    parse_buddyinfo,
    parse_pagetypeinfo,
    parse_vmstat,
    vmstat_delta,
)

PinMode = Literal["none", "all", "half"]
Accel = Literal["kvm", "tcg"]

FRAGMENT_SOURCE = Path(__file__).with_name("fragment.c")
REQUIRED_KERNEL_CONFIG = ("CONFIG_IO_URING", "CONFIG_COMPACTION", "CONFIG_HUGETLBFS")
KVM_LIVENESS_S = 10.0
"""A KVM guest reaches /init in about a second; one silent for this long is not going to."""
BOOT_TIMEOUT_S = 90.0
"""TCG reaches /init in 2-3 s of guest time; allow for a slow, loaded host."""
SCENARIO_BUDGET_S = 40.0
"""Timeout per scenario at 512 MiB under TCG (measured 3-6 s); scaled with memory."""

MARK = "@@GEMFS-"


class GuestError(RuntimeError):
    """The guest could not be built, booted or did not finish; the message is one line."""


class GuestUnavailable(GuestError):
    """This host cannot run the guest at all: a tool or the kernel is missing or unusable."""


RHYTHM_MAX = 64


def check_rhythm(text: str, what: str) -> str:
    """A rhythm: 1 to 64 characters of 0 and 1, applied to indices modulo its length."""
    if not 1 <= len(text) <= RHYTHM_MAX or set(text) - {"0", "1"}:
        raise ValueError(f"{what} rhythm {text!r}: 1 to {RHYTHM_MAX} characters of 0 and 1")
    return text


PIN_RHYTHMS: Mapping[str, str] = {"none": "0", "all": "1", "half": "10"}


@dataclass(frozen=True)
class Scenario:
    """One fragmentation pattern: chunk size, share of free memory filled, which chunks to free
    (``free``: a rhythm over chunk indices, "01" frees the odd ones), which survivors to pin
    (``pin``: none / all / half, or ``pin_rhythm`` over survivors: "10" is half, "0001" every
    fourth).

    ``compact=False`` skips ``compact_memory``: the hugepage probe then shows what the allocator's
    own direct compaction and reclaim get from the fragmented state."""

    name: str
    chunk_kib: int
    fill: float = 0.8
    pin: PinMode = "none"
    compact: bool = True
    free: str = "01"
    pin_rhythm: str = ""
    pattern: str = ""  # the --pattern text this scenario came from, if any

    def __post_init__(self) -> None:
        if self.chunk_kib < 4 or self.chunk_kib % 4:
            raise ValueError(f"chunk {self.chunk_kib} KiB is not a positive multiple of 4 KiB")
        if not 0.0 < self.fill < 1.0:
            raise ValueError(f"fill {self.fill} not in (0, 1)")
        check_rhythm(self.free, "free")
        if self.pin_rhythm:
            check_rhythm(self.pin_rhythm, "pin")

    @property
    def pins(self) -> str:
        """The pin rhythm over survivors."""
        return self.pin_rhythm or PIN_RHYTHMS[self.pin]

    def argv(self) -> list[str]:
        args = ["-n", self.name, "-c", str(self.chunk_kib), "-f", f"{self.fill:.4f}"]
        args += ["-p", self.pin, "-F", self.free, "-P", self.pins]
        return [*args, *([] if self.compact else ["-N"])]


def parse_pattern(text: str, name: str) -> Scenario:
    """``chunk=512KiB,fill=0.7,free=011,pin=01,compact=no`` → a Scenario (every key optional:
    chunk 1MiB, fill 0.8, free 01, pin 0, compact yes). ValueError says what is wrong."""
    fields = {"chunk": "1MiB", "fill": "0.8", "free": "01", "pin": "0", "compact": "yes"}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(f"pattern {text!r}: {part!r} is not one of {', '.join(fields)}=...")
        fields[key] = value.strip()
    size = _size_bytes(fields["chunk"])
    if size % 4096:
        raise ValueError(f"pattern {text!r}: chunk {fields['chunk']} is not whole 4 KiB pages")
    try:
        fill = float(fields["fill"])
    except ValueError:
        raise ValueError(f"pattern {text!r}: fill {fields['fill']!r} is not a number") from None
    if fields["compact"] not in ("yes", "no"):
        raise ValueError(f"pattern {text!r}: compact must be yes or no")
    pin = check_rhythm(fields["pin"], "pin")
    mode: PinMode = "none" if set(pin) == {"0"} else "all" if set(pin) == {"1"} else "half"
    return Scenario(
        name,
        size >> 10,
        fill=fill,
        pin=mode,
        compact=fields["compact"] == "yes",
        free=check_rhythm(fields["free"], "free"),
        pin_rhythm=pin,
        pattern=text,
    )


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r} (e.g. 512KiB)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _scenarios(*items: Scenario) -> dict[str, Scenario]:
    return {s.name: s for s in items}


SCENARIOS: Mapping[str, Scenario] = _scenarios(
    Scenario("movable", 1024, pin="none"),
    Scenario("pinned", 1024, pin="all"),
    Scenario("mixed", 1024, pin="half"),
    Scenario("movable-64k", 64, pin="none"),
    Scenario("pinned-64k", 64, pin="all"),
    Scenario("mixed-64k", 64, pin="half"),
    Scenario("movable-nocompact", 1024, pin="none", compact=False),
    Scenario("pinned-nocompact", 1024, pin="all", compact=False),
    Scenario("mixed-nocompact", 1024, pin="half", compact=False),
)
"""Scenario name → parameters. The first five are the calibration set (see DEFAULT_SCENARIOS)."""

DEFAULT_SCENARIOS = (
    "movable",
    "pinned",
    "mixed",
    "movable-64k",
    "movable-nocompact",
    "pinned-nocompact",
    "mixed-nocompact",
)


@dataclass(frozen=True)
class KernelSnapshot:
    """The kernel's view at one moment (before or after compaction)."""

    buddyinfo: BuddyInfo
    pagetypeinfo: PageTypeInfo
    vmstat: Mapping[str, int]
    mem_free_kib: int

    @property
    def free_pages(self) -> int:
        """Free pages on the buddy free lists (the sum over buddyinfo, same instant as it)."""
        return self.buddyinfo.free_pages()

    @property
    def order9_blocks(self) -> int:
        """Free 2 MiB blocks, all zones, an order-10 block counting as two."""
        return self.buddyinfo.huge_blocks(order=PAGEBLOCK_ORDER)

    @property
    def ideal_order9(self) -> int:
        """Free 2 MiB blocks if all free memory were contiguous: free_pages // 512."""
        return self.free_pages >> PAGEBLOCK_ORDER

    @property
    def order9_fraction(self) -> float:
        return self.order9_blocks / self.ideal_order9 if self.ideal_order9 else 0.0

    def order9_blocks_by_zone(self) -> dict[str, int]:
        return {
            zone: self.buddyinfo.huge_blocks(zone, PAGEBLOCK_ORDER)
            for zone in self.buddyinfo.zone_names()
        }


class Order9Snapshot(Protocol):
    """What both sides' snapshots tell about 2 MiB blocks."""

    @property
    def order9_blocks(self) -> int: ...

    @property
    def ideal_order9(self) -> int: ...

    @property
    def order9_fraction(self) -> float: ...


class Order9Outcome:
    """The derived figures the kernel's and the model's results share (one definition)."""

    def _sides(self) -> tuple[Order9Snapshot, Order9Snapshot, int]:
        """(before compaction, after compaction, huge pages obtained)."""
        raise NotImplementedError

    @property
    def ideal_order9(self) -> int:
        """free_pages // 512 after compaction: the most 2 MiB blocks the free memory could be."""
        return self._sides()[1].ideal_order9

    @property
    def order9_before(self) -> int:
        return self._sides()[0].order9_blocks

    @property
    def order9_after(self) -> int:
        return self._sides()[1].order9_blocks

    @property
    def fraction_before(self) -> float:
        return self._sides()[0].order9_fraction

    @property
    def fraction_after(self) -> float:
        return self._sides()[1].order9_fraction

    @property
    def recovered_fraction(self) -> float:
        """Share of the missing 2 MiB blocks that compaction won back:
        (after − before) / (ideal − before). Unlike ``fraction_after`` it ignores the free memory
        the scenario never touched (the 20% left unfilled stays in large blocks throughout)."""
        missing = self.ideal_order9 - self.order9_before
        return (self.order9_after - self.order9_before) / missing if missing > 0 else 1.0

    @property
    def hugepages_fraction(self) -> float:
        huge = self._sides()[2]
        return huge / self.ideal_order9 if self.ideal_order9 else 0.0


@dataclass(frozen=True)
class KernelResult(Order9Outcome):
    """One scenario as the real kernel played it."""

    scenario: Scenario
    mem_total_kib: int
    mem_free_start_kib: int
    chunk_bytes: int
    chunks_allocated: int
    chunks_freed: int
    chunks_kept: int
    chunks_pinned: int
    pinned_bytes: int
    rings: int
    fill_ms: float
    pin_ms: float
    compact_ms: float
    before: KernelSnapshot
    after: KernelSnapshot
    hugepages_requested: int
    hugepages_obtained: int
    hugepages_ms: float
    phase_pages: int | None = None  # where the chunk stream starts in its pageblock (pagemap)
    phase_chunks: int = 0  # chunks at that phase
    contiguous_chunks: int = 0  # chunks whose frames are consecutive

    @property
    def vmstat_delta(self) -> dict[str, int]:
        """Counter changes across compact_memory (compact_*, pgmigrate_*, nr_free_pages...)."""
        return vmstat_delta(self.before.vmstat, self.after.vmstat)

    def _sides(self) -> tuple[Order9Snapshot, Order9Snapshot, int]:
        return self.before, self.after, self.hugepages_obtained


@dataclass(frozen=True)
class GuestRun:
    """One boot: how it went and what each scenario gave."""

    results: dict[str, KernelResult]
    accel: Accel
    boot_s: float
    """Host seconds from starting QEMU to the guest's /init printing its first line."""
    guest_boot_s: float
    """The guest's own uptime at that line."""
    total_s: float
    console_log: Path
    results_log: Path
    kvm_fallback: str | None = None
    """Why KVM was not used, when it was tried or ruled out."""
    scenario_s: dict[str, float] = field(default_factory=dict)
    """Guest seconds per scenario (from its uptime stamps)."""


# --------------------------------------------------------------------------------------------
# Parsing the guest's output


def _key_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


def _int(table: Mapping[str, str], key: str, section: str) -> int:
    try:
        return int(table[key])
    except (KeyError, ValueError) as exc:
        raise GuestError(f"guest output: no integer {key!r} in section {section!r}") from exc


def _float(table: Mapping[str, str], key: str, section: str) -> float:
    try:
        return float(table[key])
    except (KeyError, ValueError) as exc:
        raise GuestError(f"guest output: no number {key!r} in section {section!r}") from exc


def _snapshot(sections: Mapping[str, str], phase: str) -> KernelSnapshot:
    try:
        mem = _key_values(sections[f"meminfo.{phase}"])
        return KernelSnapshot(
            buddyinfo=parse_buddyinfo(sections[f"buddyinfo.{phase}"]),
            pagetypeinfo=parse_pagetypeinfo(sections[f"pagetypeinfo.{phase}"]),
            vmstat=parse_vmstat(sections[f"vmstat.{phase}"]),
            mem_free_kib=_int(mem, "MemFree", f"meminfo.{phase}"),
        )
    except KeyError as exc:
        raise GuestError(f"guest output: section {exc.args[0]!r} missing") from exc
    except ValueError as exc:
        raise GuestError(f"guest output: {exc}") from exc


def build_result(scenario: Scenario, sections: Mapping[str, str]) -> KernelResult:
    """Turn one scenario's output sections (name → raw text) into a KernelResult."""
    for name in ("params", "chunks", "compact", "hugepages"):
        if name not in sections:
            raise GuestError(f"guest output for {scenario.name}: section {name!r} missing")
    params = _key_values(sections["params"])
    chunks = _key_values(sections["chunks"])
    compact = _key_values(sections["compact"])
    huge = _key_values(sections["hugepages"])
    phase = _key_values(sections.get("phase", ""))
    return KernelResult(
        scenario=scenario,
        mem_total_kib=_int(params, "MemTotal", "params"),
        mem_free_start_kib=_int(params, "MemFree", "params"),
        chunk_bytes=_int(params, "chunk_bytes", "params"),
        chunks_allocated=_int(chunks, "allocated", "chunks"),
        chunks_freed=_int(chunks, "freed", "chunks"),
        chunks_kept=_int(chunks, "kept", "chunks"),
        chunks_pinned=_int(chunks, "pinned", "chunks"),
        pinned_bytes=_int(chunks, "pinned_bytes", "chunks"),
        rings=_int(chunks, "rings", "chunks"),
        fill_ms=_float(chunks, "fill_ms", "chunks"),
        pin_ms=_float(chunks, "pin_ms", "chunks"),
        compact_ms=_float(compact, "ms", "compact"),
        before=_snapshot(sections, "before"),
        after=_snapshot(sections, "after"),
        hugepages_requested=_int(huge, "requested", "hugepages"),
        hugepages_obtained=_int(huge, "obtained", "hugepages"),
        hugepages_ms=_float(huge, "ms", "hugepages"),
        phase_pages=int(phase["phase_pages"]) if "phase_pages" in phase else None,
        phase_chunks=int(phase.get("phase_chunks", "0")),
        contiguous_chunks=int(phase.get("contiguous_chunks", "0")),
    )


@dataclass
class ScenarioOutput:
    """One scenario's raw output: its sections (name → text), exit status, error lines and the
    guest's uptime when it started and stopped."""

    sections: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    errors: list[str] = field(default_factory=list)
    start: float | None = None
    stop: float | None = None


def split_output(text: str) -> dict[str, ScenarioOutput]:
    """Split the results channel into scenarios and their ``@@GEMFS-BEGIN x`` … ``END x`` sections.

    Marker lines: ``SCENARIO name uptime``, ``BEGIN section``, ``END section``, ``ERROR name: msg``,
    ``EXIT name rc uptime``. Anything else outside a section is ignored."""
    out: dict[str, ScenarioOutput] = {}
    current: ScenarioOutput | None = None
    section: str | None = None
    body: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip("\r\n").replace("\r", "")
        if not line.startswith(MARK):
            if section is not None:
                body.append(line)
            continue
        word, _, rest = line[len(MARK) :].partition(" ")
        args = rest.split()
        if word == "SCENARIO" and args:
            current = out.setdefault(args[0], ScenarioOutput())
            current.start = _uptime(args[1:])
            section = None
        elif word == "BEGIN" and args and current is not None:
            section, body = args[0], []
        elif word == "END" and current is not None and section is not None:
            current.sections[section] = "\n".join(body) + "\n"
            section = None
        elif word == "ERROR" and current is not None:
            current.errors.append(rest.strip())
        elif word == "EXIT" and len(args) >= 2 and args[0] in out:
            done = out[args[0]]
            done.exit_code = int(args[1]) if args[1].lstrip("-").isdigit() else -1
            done.stop = _uptime(args[2:])
            current, section = None, None
    return out


def _uptime(args: Sequence[str]) -> float | None:
    try:
        return float(args[0])
    except (IndexError, ValueError):
        return None


def parse_guest_output(
    text: str, scenarios: Iterable[Scenario], results_log: Path | str = "the results log"
) -> dict[str, KernelResult]:
    """Parse the results channel of a boot that ran ``scenarios``; GuestError if one is missing
    or failed."""
    outputs = split_output(text)
    results: dict[str, KernelResult] = {}
    for scenario in scenarios:
        got = outputs.get(scenario.name)
        if got is None or got.exit_code is None:
            raise GuestError(f"scenario {scenario.name} did not finish; see {results_log}")
        if got.exit_code != 0:
            why = got.errors[0] if got.errors else f"exit status {got.exit_code}"
            raise GuestError(
                f"scenario {scenario.name} failed in the guest: {why}; see {results_log}"
            )
        results[scenario.name] = build_result(scenario, got.sections)
    return results


# --------------------------------------------------------------------------------------------
# Building the initramfs


def _newc_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One entry of a ``newc`` (SVR4, no CRC) cpio archive, as the kernel's initramfs unpacker
    reads it: a 110-byte ASCII header, the NUL-terminated name and the data, each padded to 4."""
    fields = (
        0,  # inode: the kernel only uses it to find hard links (nlink > 1)
        mode,
        0,  # uid
        0,  # gid
        1,  # nlink
        0,  # mtime
        len(data),
        0,  # devmajor
        0,  # devminor
        rdev[0],
        rdev[1],
        len(name) + 1,
        0,  # check
    )
    header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
    encoded = header + name.encode() + b"\0"
    encoded += b"\0" * (-len(encoded) % 4)
    return encoded + data + b"\0" * (-len(data) % 4)


def make_initramfs(
    busybox: bytes,
    fragment: bytes,
    init: str,
) -> bytes:
    """A newc archive holding /bin/busybox, /bin/fragment, /init and the few device nodes the
    console needs before devtmpfs is mounted."""
    out = bytearray()
    for name in ("bin", "dev", "proc", "sys", "tmp"):
        out += _newc_entry(name, 0o040755)
    for name, major, minor in (
        ("dev/console", 5, 1),
        ("dev/null", 1, 3),
        ("dev/ttyS0", 4, 64),
        ("dev/ttyS1", 4, 65),
    ):
        out += _newc_entry(name, 0o020600, rdev=(major, minor))
    out += _newc_entry("bin/busybox", 0o100755, busybox)
    out += _newc_entry("bin/fragment", 0o100755, fragment)
    out += _newc_entry("init", 0o100755, init.encode())
    out += _newc_entry("TRAILER!!!", 0)
    return bytes(out)


def init_script(scenarios: Sequence[Scenario]) -> str:
    """The guest's /init: mount, run each scenario in its own process from a freshly compacted
    state, report on both serial ports, power off."""
    runs = "\n".join(
        "run " + " ".join(_sh_quote(arg) for arg in scenario.argv()) for scenario in scenarios
    )
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
out=/dev/ttyS1
[ -c $out ] || out=/dev/console
say() {{ echo "$*"; echo "$*" > $out; }}
say "{MARK}INIT $(cat /proc/uptime)"
run() {{
    name=$2
    sync
    echo 3 > /proc/sys/vm/drop_caches
    echo 1 > /proc/sys/vm/compact_memory
    say "{MARK}SCENARIO $name $(cat /proc/uptime)"
    /bin/fragment "$@" > $out 2> /tmp/err
    rc=$?
    cat /tmp/err
    cat /tmp/err > $out
    say "{MARK}EXIT $name $rc $(cat /proc/uptime)"
}}
{runs}
say "{MARK}ALLDONE $(cat /proc/uptime)"
poweroff -f
"""


def _sh_quote(arg: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.,:/=+-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------
# Finding what the guest needs on the host


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name))


def find_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest /boot/vmlinuz-*; GuestUnavailable when there is none or it is unreadable."""
    kernels = sorted(boot.glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise GuestUnavailable(
            f"no kernel in {boot} (install linux-image-amd64 for /boot/vmlinuz-*)"
        )
    kernel = kernels[-1]
    if not os.access(kernel, os.R_OK):
        raise GuestUnavailable(f"kernel {kernel} is not readable by this user")
    return kernel


def check_kernel_config(kernel: Path) -> list[str]:
    """Options from REQUIRED_KERNEL_CONFIG the kernel's /boot/config-<version> lacks ([] when the
    config file is absent: nothing to check against, the guest will tell)."""
    config = kernel.with_name("config-" + kernel.name.removeprefix("vmlinuz-"))
    try:
        text = config.read_text(errors="replace")
    except OSError:
        return []
    enabled = set(re.findall(r"^(CONFIG_\w+)=[ym]$", text, flags=re.MULTILINE))
    return [option for option in REQUIRED_KERNEL_CONFIG if option not in enabled]


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP header (no dynamic loader needed)."""
    try:
        with path.open("rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
                return False
            endian = "<" if ident[5] == 1 else ">"
            (phoff,) = struct.unpack_from(endian + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    return all(
        struct.unpack_from(endian + "I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def find_busybox() -> Path:
    candidates = [Path("/bin/busybox"), Path("/usr/bin/busybox")]
    found = shutil.which("busybox")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and _is_static_elf(path):
            return path
    raise GuestUnavailable("no static busybox (install busybox-static)")


def find_tool(name: str, package: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise GuestUnavailable(f"{name} not found (install {package})")
    return Path(found)


def build_fragment(workdir: Path, log_dir: Path) -> Path:
    """Compile fragment.c with ``gcc -static -O2``; the compiler's output goes to gcc.log."""
    gcc = find_tool("gcc", "gcc")
    binary = workdir / "fragment"
    log = log_dir / "guest-gcc.log"
    proc = subprocess.run(
        [str(gcc), "-static", "-O2", "-Wall", "-o", str(binary), str(FRAGMENT_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise GuestUnavailable(
            f"gcc -static could not build {FRAGMENT_SOURCE.name} "
            f"(is libc6-dev installed?); see {log}"
        )
    return binary


_KVM_GET_API_VERSION = 0xAE00
_kvm_verdict: str | None = None
"""Why KVM is not used in this process, once known."""


def kvm_problem(device: Path = Path("/dev/kvm")) -> str | None:
    """None if /dev/kvm looks usable, else why not (it may still fail to boot: see module doc)."""
    if _kvm_verdict is not None:
        return _kvm_verdict
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{device}: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    return None if version == 12 else f"{device}: KVM API version {version}, not 12"


def _accel_plan(accel: str) -> tuple[list[Accel], str | None]:
    forced = os.environ.get("GEMFS_QEMU_ACCEL", "").strip().lower() or accel
    if forced == "tcg":
        return ["tcg"], "TCG requested"
    if forced == "kvm":
        return ["kvm"], None
    if forced != "auto":
        raise ValueError(f"accel must be auto, kvm or tcg, not {forced!r}")
    problem = kvm_problem()
    return (["tcg"], problem) if problem else (["kvm", "tcg"], None)


# --------------------------------------------------------------------------------------------
# Booting


@dataclass
class _Boot:
    accel: Accel
    returncode: int | None
    boot_s: float | None
    guest_boot_s: float | None
    total_s: float
    timed_out: str | None


def _chardev_path(path: Path) -> str:
    return str(path).replace(",", ",,")


def _qemu_argv(
    qemu: Path, accel: Accel, kernel: Path, initrd: Path, memory_mib: int, console: Path, data: Path
) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    return [
        str(qemu),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *cpu,
        "-m",
        str(memory_mib),
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-chardev",
        f"file,id=con,path={_chardev_path(console)}",
        "-serial",
        "chardev:con",
        "-chardev",
        f"file,id=data,path={_chardev_path(data)}",
        "-serial",
        "chardev:data",
    ]


_INIT_LINE = re.compile(MARK + r"INIT (\d+\.\d+)")
_SCENARIO_LINE = re.compile(MARK + r"SCENARIO (\S+)")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _boot(
    argv: list[str],
    accel: Accel,
    console: Path,
    qemu_log: Path,
    liveness_s: float,
    timeout_s: float,
) -> _Boot:
    console.unlink(missing_ok=True)
    start = time.monotonic()
    boot_s: float | None = None
    guest_boot_s: float | None = None
    timed_out: str | None = None
    with qemu_log.open("w") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
        )
        try:
            while True:
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
                elapsed = time.monotonic() - start
                if boot_s is None and (match := _INIT_LINE.search(_read(console))):
                    boot_s, guest_boot_s = elapsed, float(match.group(1))
                if proc.returncode is not None:
                    if boot_s is None and (match := _INIT_LINE.search(_read(console))):
                        boot_s, guest_boot_s = elapsed, float(match.group(1))
                    break
                if boot_s is None and elapsed > liveness_s:
                    timed_out = f"no sign of /init after {liveness_s:.0f} s"
                elif elapsed > timeout_s:
                    running = _SCENARIO_LINE.findall(_read(console))
                    where = f" in scenario {running[-1]}" if running else ""
                    timed_out = f"guest still running after {timeout_s:.0f} s{where}"
                if timed_out:
                    proc.kill()
                    proc.wait()
                    break
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    return _Boot(accel, proc.returncode, boot_s, guest_boot_s, time.monotonic() - start, timed_out)


def _first_line(path: Path) -> str:
    for line in _read(path).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _panic_line(console: Path) -> str | None:
    for line in _read(console).splitlines():
        if "Kernel panic" in line:
            return line.split("]", 1)[-1].strip()
    return None


def resolve(names: Iterable[str | Scenario]) -> list[Scenario]:
    """Scenarios by name (or given whole), in the given order; ValueError naming unknown ones."""
    items = list(names)
    unknown = [n for n in items if isinstance(n, str) and n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if not items:
        raise ValueError("no scenarios given")
    out = [SCENARIOS[n] if isinstance(n, str) else n for n in items]
    return list({s.name: s for s in out}.values())


def default_timeout(n_scenarios: int, memory_mib: int) -> float:
    return BOOT_TIMEOUT_S + SCENARIO_BUDGET_S * n_scenarios * max(1.0, memory_mib / 512)


def run_guest(
    names: Iterable[str | Scenario],
    log_dir: Path,
    memory_mib: int = 512,
    *,
    accel: Literal["auto", "kvm", "tcg"] = "auto",
    kernel: Path | None = None,
    timeout_s: float | None = None,
) -> GuestRun:
    """Boot once and run the named scenarios (see SCENARIOS) in order; return the whole run.

    Raises GuestUnavailable when a tool, the kernel or any usable accelerator is missing, and
    GuestError (one line naming the log to read) when the guest fails, hangs or says nothing
    parseable. Logs are written to ``log_dir`` and kept."""
    global _kvm_verdict
    scenarios = resolve(names)
    if memory_mib < 128:
        raise ValueError("the guest needs at least 128 MiB")
    log_dir.mkdir(parents=True, exist_ok=True)
    console = log_dir / "guest-console.log"
    data = log_dir / "guest-results.log"
    qemu_log = log_dir / "guest-qemu.log"
    kernel = kernel or find_kernel()
    if not kernel.is_file():
        raise GuestUnavailable(f"no kernel at {kernel}")
    if not os.access(kernel, os.R_OK):
        raise GuestUnavailable(f"kernel {kernel} is not readable by this user")
    missing = check_kernel_config(kernel)
    if missing:
        raise GuestUnavailable(f"kernel {kernel.name} lacks {', '.join(missing)}")
    qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")
    busybox = find_busybox()
    plan, fallback = _accel_plan(accel)
    timeout = timeout_s if timeout_s is not None else default_timeout(len(scenarios), memory_mib)

    with tempfile.TemporaryDirectory(prefix="gemfs-guest-") as tmp:
        work = Path(tmp)
        fragment = build_fragment(work, log_dir)
        initrd = work / "initrd.cpio"
        initrd.write_bytes(
            make_initramfs(busybox.read_bytes(), fragment.read_bytes(), init_script(scenarios))
        )
        boot: _Boot | None = None
        for attempt in plan:
            data.unlink(missing_ok=True)
            argv = _qemu_argv(qemu, attempt, kernel, initrd, memory_mib, console, data)
            liveness = KVM_LIVENESS_S if attempt == "kvm" and len(plan) > 1 else BOOT_TIMEOUT_S
            boot = _boot(argv, attempt, console, qemu_log, liveness, timeout)
            if attempt == "kvm" and len(plan) > 1 and boot.boot_s is None:
                why = boot.timed_out or (
                    f"QEMU exited with status {boot.returncode}: {_first_line(qemu_log)}"
                )
                fallback = _kvm_verdict = f"KVM guest did not boot ({why})"
                shutil.copyfile(console, log_dir / "guest-console-kvm.log")
                shutil.copyfile(qemu_log, log_dir / "guest-qemu-kvm.log")
                continue
            break
    assert boot is not None
    if boot.boot_s is None:
        detail = (
            _panic_line(console)
            or boot.timed_out
            or (f"QEMU exited with status {boot.returncode}: {_first_line(qemu_log)}")
        )
        raise GuestUnavailable(
            f"guest did not boot with {boot.accel.upper()}: {detail}; console log: {console}"
        )
    if boot.timed_out:
        raise GuestError(f"{boot.timed_out} ({boot.accel.upper()}); console log: {console}")
    text = _read(data)
    if f"{MARK}ALLDONE" not in text:
        detail = _panic_line(console) or f"QEMU exited with status {boot.returncode}"
        raise GuestError(
            f"guest stopped before finishing its scenarios: {detail}; console log: {console}"
        )
    results = parse_guest_output(text, scenarios, data)
    outputs = split_output(text)
    durations = {
        name: out.stop - out.start
        for name, out in outputs.items()
        if out.start is not None and out.stop is not None
    }
    return GuestRun(
        results=results,
        accel=boot.accel,
        boot_s=boot.boot_s,
        guest_boot_s=boot.guest_boot_s or 0.0,
        total_s=boot.total_s,
        console_log=console,
        results_log=data,
        kvm_fallback=fallback,
        scenario_s=durations,
    )


def run_scenarios(
    names: Iterable[str],
    memory_mib: int = 512,
    log_dir: Path | None = None,
    *,
    accel: Literal["auto", "kvm", "tcg"] = "auto",
    timeout_s: float | None = None,
) -> dict[str, KernelResult]:
    """Run the named scenarios in one boot and return their results by name (see run_guest).

    Without ``log_dir`` the logs go to a new ``gemfs-calibrate-*`` directory in the temp dir,
    which is kept so that error messages can point at it."""
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="gemfs-calibrate-"))
    run = run_guest(names, log_dir, memory_mib, accel=accel, timeout_s=timeout_s)
    return run.results
