"""`gemfs stress`, short: concurrent I/O, GPU batches, compaction and faults lose nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gemfs.mm.types import Design
from gemfs_cli.main import main

pytestmark = [pytest.mark.e2e, pytest.mark.mount]


@pytest.mark.parametrize(
    ("design", "policy"),
    [(d.value, "wait-idle") for d in Design]
    + [("shmem-hook", "i915-2016"), ("gemfs", "i915-2016")],
)
def test_short_stress_run_is_clean(
    monkeypatch: pytest.MonkeyPatch, design: str, policy: str
) -> None:
    """Every design, and the hook designs under the 2016 driver too (whose callbacks drop idle
    objects whole, re-faulted by the next batch, across driver kills)."""
    monkeypatch.setenv("GEMFS_CALLBACK_TIMEOUT", "0.5")
    args = ["stress", "--minutes", "0.15", "--workers", "2", "--seed", "7", "--design", design]
    r = CliRunner().invoke(main, [*args, "--driver-policy", policy])
    assert r.exit_code == 0, r.output
    assert "clean: 0 bytes lost" in r.output
    lines = dict(line.rsplit(None, 1) for line in r.output.splitlines() if line.strip())
    assert int(lines["file operations"]) > 0
    assert int(lines["bytes lost"]) == 0
