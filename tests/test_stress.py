"""`gemfs stress`, short: concurrent I/O, GPU batches, compaction and faults lose nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gemfs.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.mount]


def test_short_stress_run_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMFS_CALLBACK_TIMEOUT", "0.5")
    r = CliRunner().invoke(main, ["stress", "--minutes", "0.2", "--workers", "2", "--seed", "7"])
    assert r.exit_code == 0, r.output
    assert "clean: 0 bytes lost" in r.output
    lines = dict(line.rsplit(None, 1) for line in r.output.splitlines() if line.strip())
    assert int(lines["file operations"]) > 0
    assert int(lines["bytes lost"]) == 0
