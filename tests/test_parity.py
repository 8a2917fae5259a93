"""Both backends are one model: the same workload, with GPU batches overlapping direct and
proactive compaction, gives the same record in process and on the real stack (a FUSE mount, a
driver process, a compactor process on the modelled clock).

Tolerance: none. Both backends run the same mechanism, policy and kcompactd code on the same
inputs in the same order on the same modelled clock, so every deterministic figure -- counts
and modelled times alike -- must be equal; times are compared to 1e-9 relative only because
they cross the socket as floats. The wall-clock harness figures (elapsed, callback wall
latency) and the backend's name are the only fields left out.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from gemfs.mm.types import Design
from tests.workloads import BUSY, EXAMPLES
from tools.inproc_backend import InprocBackend
from tools.player import NONDETERMINISTIC, play
from tools.stack_backend import StackBackend
from tools.workload import load_workload, parse_workload

pytestmark = [pytest.mark.e2e, pytest.mark.mount]


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key in (*NONDETERMINISTIC, "backend"):
        out.pop(key)
    out["vmstat"] = {k: v for k, v in out["vmstat"].items() if not k.startswith("nr_")}
    return out


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in sorted(keys) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, path)]
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, int | float) and isinstance(b, int | float):
            if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9):
                return []
    elif a == b:
        return []
    return [f"{path}: inproc {a!r} stack {b!r}"]


def test_explicit_compaction_is_the_same_on_both() -> None:
    """compact_memory (the selftest replica's compact phase) and the probes after it: the
    core's own compaction with its zone state, in process and over the socket."""
    w = load_workload(EXAMPLES / "compaction-test.toml")
    a = play(w, InprocBackend(w, Design.NOTIFIER), Design.NOTIFIER).record
    b = play(w, StackBackend(w, Design.NOTIFIER), Design.NOTIFIER).record
    assert _diff(_comparable(a.to_json()), _comparable(b.to_json())) == []
    assert a.order9_after > 0.9 * a.order9_ideal


@pytest.mark.parametrize("design", list(Design))
def test_same_record_in_process_and_on_the_stack(design: Design) -> None:
    w = parse_workload(BUSY, "busy.toml")
    inproc = play(w, InprocBackend(w, design), design)
    stack = play(w, StackBackend(w, design), design)
    a, b = inproc.record, stack.record
    assert (a.backend, b.backend) == ("inproc", "stack")
    assert _diff(_comparable(a.to_json()), _comparable(b.to_json())) == []
    # The figures compared are not trivially equal: the GPU was busy, compaction ran.
    assert a.alloc["attempts"] == 11
    assert a.costs["scanned_pages"] > 0
    if design.asks_owner:
        assert a.costs["callbacks"] > 0
        assert a.costs["gpu_stall_ms"] > 0
    if design is Design.LONGTERM_PIN:  # pages moved out of the movable region at pin time
        assert a.costs["pin_migrated_pages"] > 100
        assert a.costs["gpu_stall_ms"] > 0
    if design is Design.CONFINE:  # the region grew over page cache and evacuated it
        assert a.costs["region_grows"] > 0
        assert a.costs["evacuated_pages"] > 100
    assert [p.time_s for p in inproc.timeline] == pytest.approx([p.time_s for p in stack.timeline])


def test_a_design_knob_is_the_same_in_process_and_on_the_stack() -> None:
    """pinned-ttm without page pools (``[design] ttm_pool = "0"``: the stack's mount gets
    ``--ttm-pool=0``, and not longterm-pin's movablecore, which it would refuse): the same
    record, and nothing came from a pool."""
    knobs = '[design]\nttm_pool = "0"\nmovablecore = "25%"\n\n[compactor]'
    text = BUSY.replace("[compactor]", knobs)
    w = parse_workload(text, "busy.toml")
    d = Design.PINNED_TTM
    a = play(w, InprocBackend(w, d), d).record
    b = play(w, StackBackend(w, d), d).record
    assert _diff(_comparable(a.to_json()), _comparable(b.to_json())) == []
    assert a.vmstat["ttm_alloc_pages"] > 0
    assert a.vmstat.get("ttm_pool_hit_pages", 0) == b.vmstat.get("ttm_pool_hit_pages", 0) == 0
    assert b.provenance["design_options"] == {
        "movablecore": "25%",
        "confine_granule": None,
        "ttm_pool": "0",
    }
