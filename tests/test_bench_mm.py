"""`gemfs bench mm`'s new pieces: the scaled workload and the direct-compaction figure."""

from __future__ import annotations

from gemfs.mm.types import Design
from tests.workloads import EXAMPLES
from tools.bench_mm import bench_direct_compaction, scale_workload
from tools.workload import Create, Noise, Probe, Repeat, load_workload, walk


def test_scale_workload_multiplies_pool_and_counts_only() -> None:
    w = load_workload(EXAMPLES / "desktop.toml")
    big = scale_workload(w, 4)
    assert big.pool == 4 * w.pool
    assert len(list(walk(big.phases))) == len(list(walk(w.phases)))
    for a, b in zip(walk(w.phases), walk(big.phases), strict=True):
        match a, b:
            case Create(), Create():
                assert a.size == b.size
                if a.amount.count is not None:
                    assert b.amount.count == 4 * a.amount.count
                else:
                    assert b.amount.fill == a.amount.fill
            case Noise(), Noise():
                assert b.count == 4 * a.count
            case Probe(count=int(n)), Probe():
                assert b.count == 4 * n
            case Repeat(), Repeat():
                assert b.times == a.times


def test_direct_compaction_figure_counts_what_it_did() -> None:
    pinned = bench_direct_compaction("64MiB", Design.PINNED, 8)
    movable = bench_direct_compaction("64MiB", Design.SHMEM_HOOK, 8)
    assert pinned.attempts == movable.attempts == 8
    assert pinned.succeeded == 0  # GEM pages pinned in RECLAIMABLE blocks: nothing to gain
    assert pinned.migrated == 0
    assert movable.succeeded == 8  # each THP fault gets its block by moving pages
    assert movable.migrated > 8 * 128
    assert movable.migrate_scanned > 0
    assert movable.rate > 0
