"""`gemfs calibrate`, kernel side: run the model's fragmentation scenarios on real Linux in QEMU."""

from tools.calibrate.guest import (
    DEFAULT_SCENARIOS,
    SCENARIOS,
    GuestError,
    GuestRun,
    GuestUnavailable,
    KernelResult,
    KernelSnapshot,
    Scenario,
    parse_guest_output,
    run_guest,
    run_scenarios,
)
from tools.calibrate.procfs import (
    BuddyInfo,
    PageTypeInfo,
    ProcParseError,
    parse_buddyinfo,
    parse_pagetypeinfo,
    parse_vmstat,
)

__all__ = [
    "DEFAULT_SCENARIOS",
    "SCENARIOS",
    "BuddyInfo",
    "GuestError",
    "GuestRun",
    "GuestUnavailable",
    "KernelResult",
    "KernelSnapshot",
    "PageTypeInfo",
    "ProcParseError",
    "Scenario",
    "parse_buddyinfo",
    "parse_guest_output",
    "parse_pagetypeinfo",
    "parse_vmstat",
    "run_guest",
    "run_scenarios",
]
