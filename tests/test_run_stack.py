"""`gemfs run` on the real stack: a small workload under all four designs, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemfs.mm.types import Design
from gemfs_cli.main import main
from tests.test_report import EXPECTED, PNG_MAGIC, md_tables, nums
from tests.workloads import BUSY

pytestmark = [pytest.mark.e2e, pytest.mark.mount]


def test_run_small_workload_on_the_stack_under_all_designs(tmp_path: Path) -> None:
    wl = tmp_path / "small.toml"
    wl.write_text(BUSY)
    out, js = tmp_path / "report", tmp_path / "records.json"
    r = CliRunner().invoke(main, ["run", str(wl), "--out", str(out), "--json", str(js)])
    assert r.exit_code == 0, r.output
    records = json.loads(js.read_text())
    assert [x["design"] for x in records] == [d.value for d in Design]
    for rec in records:
        assert rec["data_errors"] == 0, rec
        for key in ("callbacks", "callback_p50_us", "callback_p99_us", "gpu_stall_ms"):
            assert key in rec
    assert all(x["callbacks"] > 0 for x in records if Design(x["design"]).asks_owner)
    assert all(x["backend"] == "stack" for x in records)
    assert all(x["costs"]["gpu_stall_ms"] > 0 for x in records if Design(x["design"]).asks_owner)
    # The report's numbers are runs.json's numbers.
    runs = json.loads((out / "runs.json").read_text())
    table = next(t for t in md_tables((out / "report.md").read_text()) if t[0][0] == "metric")
    for label, *cells in table[1:]:
        for cell, record in zip(cells, runs, strict=True):
            assert nums(cell) == [float(x) for x in EXPECTED[label](record)], label
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000
    assert (out / "timeline.csv").stat().st_size > 100
