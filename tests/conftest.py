"""Fixtures shared by test files: one real Linux guest boot per test run (marked ``qemu``)."""

from __future__ import annotations

import pytest

from tools.calibrate.guest import GuestRun, GuestUnavailable, run_guest

GUEST_SCENARIOS = ("movable", "pinned", "movable-nocompact")
"""What the one boot runs (TCG: ~6 s to /init, ~4 s for movable, ~3 s for pinned at 512 MiB)."""


@pytest.fixture(scope="session")
def booted_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """Boot the host's kernel once for the whole run and play GUEST_SCENARIOS in it.

    Skips (with the reason) where no guest can run at all: no kernel, QEMU, busybox or gcc, or
    neither KVM nor TCG boots. A guest that boots and then fails is an error, not a skip."""
    log_dir = tmp_path_factory.mktemp("guest")
    try:
        return run_guest(GUEST_SCENARIOS, log_dir, memory_mib=512, timeout_s=140)
    except GuestUnavailable as exc:
        pytest.skip(f"cannot boot a Linux guest here (neither KVM nor TCG usable): {exc}")
