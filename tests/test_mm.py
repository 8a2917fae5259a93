"""The memory model: allocator invariants, migration, compaction, vmstat formats."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gemfs.mm import (
    MAX_ORDER,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    Design,
    GemObject,
    MemoryManager,
    MigrateMode,
    MigrateType,
    OutOfMemory,
    parse_size,
)
from gemfs.mm.compaction import CompactionPolicy, CompactResult
from gemfs.mm.pool import check_pool_size
from gemfs.mm.vmstat import (
    fragmentation_index,
    fragmentation_score,
    parse_buddyinfo,
    parse_index,
    parse_pagetypeinfo,
    parse_vmstat,
    proactive_watermarks,
    unusable_index,
)

POOL = "16MiB"  # 4096 frames, 8 pageblocks


@pytest.fixture
def mm() -> Iterator[MemoryManager]:
    m = MemoryManager(POOL, design=Design.SHMEM_HOOK)
    yield m
    m.close()


def test_parse_size() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("64K") == 64 << 10
    assert parse_size("4096") == 4096
    for bad in ("1XB", "", "-1", "abc"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="multiple of 4MiB"):
        check_pool_size("6MiB")


def test_metadata_is_small() -> None:
    m = MemoryManager("64MiB")
    assert m.pool.metadata_bytes / m.pool.nr_pages <= 16
    m.close()


def test_fresh_pool_is_all_max_order_blocks(mm: MemoryManager) -> None:
    free = mm.free_blocks_per_order()
    assert free[MAX_ORDER] == mm.pool.nr_pages >> MAX_ORDER
    assert sum(free[:MAX_ORDER]) == 0
    mm.check()


def test_split_and_coalesce(mm: MemoryManager) -> None:
    pfns = [mm.alloc_kernel(0, MigrateType.MOVABLE) for _ in range(100)]
    assert mm.buddy.free_pages == mm.pool.nr_pages - 100
    assert len(set(pfns)) == 100
    mm.check()
    for p in pfns:
        mm.free_kernel(p)
    free = mm.free_blocks_per_order()
    assert free[MAX_ORDER] == mm.pool.nr_pages >> MAX_ORDER
    assert sum(free[:MAX_ORDER]) == 0


def test_out_of_memory_leaves_nothing_allocated(mm: MemoryManager) -> None:
    obj = mm.create_object()
    with pytest.raises(OutOfMemory):
        mm.write(obj, 0, b"x" * (mm.pool.size + PAGE_SIZE))
    assert mm.buddy.free_pages == mm.pool.nr_pages
    assert obj.size == 0
    mm.check()


def test_unmovable_noise_steals_and_mixes_pageblocks(mm: MemoryManager) -> None:
    """Small unmovable requests fall back into MOVABLE blocks and claim them (Linux's rules)."""
    n = mm.pool.nr_pages // 64
    objs = [mm.create_object(64 * PAGE_SIZE, migratetype=MigrateType.MOVABLE) for _ in range(n)]
    for o in objs[::3]:  # a third free in every block: less than half, so no block is claimed
        mm.destroy_object(o)
    for _ in range(200):
        mm.alloc_kernel(0, MigrateType.UNMOVABLE)
    assert mm.pageblocks_per_type()[MigrateType.UNMOVABLE] == 0
    assert mm.mixed_pageblocks() >= 1
    # With most of a block free, the same requests claim it.
    for o in objs[1::3]:
        mm.destroy_object(o)
    for _ in range(400):
        mm.alloc_kernel(0, MigrateType.UNMOVABLE)
    assert mm.pageblocks_per_type()[MigrateType.UNMOVABLE] >= 1
    assert mm.buddy.fallbacks >= 1
    mm.check()


def test_reclaimable_request_claims_whole_free_block(mm: MemoryManager) -> None:
    mm.alloc_kernel(0, MigrateType.RECLAIMABLE)
    assert mm.pageblocks_per_type()[MigrateType.RECLAIMABLE] == 2  # an order-10 block: 2 pageblocks


def test_object_read_write_sparse_truncate(mm: MemoryManager) -> None:
    obj = mm.create_object()
    mm.write(obj, 3 * PAGE_SIZE + 100, b"hello")
    assert obj.size == 3 * PAGE_SIZE + 105
    assert obj.nr_resident == 1  # sparse: only the written page has a frame
    assert mm.read(obj, 0, 10) == b"\0" * 10
    assert mm.read(obj, 3 * PAGE_SIZE + 100, 100) == b"hello"
    mm.write(obj, 0, b"a" * (2 * PAGE_SIZE))
    before = mm.buddy.free_pages
    mm.truncate(obj, PAGE_SIZE + 1)
    assert mm.buddy.free_pages == before + 1  # page 3 freed; page 2 was a hole
    mm.truncate(obj, 3 * PAGE_SIZE)
    assert mm.read(obj, PAGE_SIZE, 2) == b"a\0"
    mm.check()


def test_truncate_of_pinned_pages_is_ebusy(mm: MemoryManager) -> None:
    obj = mm.create_object(4 * PAGE_SIZE)
    mm.pin(obj, 0, 4)
    with pytest.raises(Exception, match="pinned"):
        mm.truncate(obj, 0)


def test_migration_keeps_content_and_refuses_pinned(mm: MemoryManager) -> None:
    obj = mm.create_object()
    data = bytes(range(256)) * (8 * PAGE_SIZE // 256)
    mm.write(obj, 0, data)
    src = obj.pages.copy()
    mm.pin(obj, 0, 2)
    dst = np.arange(mm.pool.nr_pages - 8, mm.pool.nr_pages, dtype=np.int64)
    out = mm.migrate_pages(src, dst, MigrateMode.SYNC)
    assert out.success == 6
    assert out.eagain == 2
    assert list(out.results[:2]) == [-11, -11]
    assert np.array_equal(obj.pages[2:], dst[2:])
    assert np.array_equal(obj.pages[:2], src[:2])
    assert mm.read(obj, 0, len(data)) == data
    assert mm.vmstat["pgmigrate_success"] == 6
    mm.check()


def test_migration_rejects_bad_targets(mm: MemoryManager) -> None:
    a = mm.create_object(2 * PAGE_SIZE)
    b = mm.create_object(2 * PAGE_SIZE)
    out = mm.migrate_pages(a.pages.copy(), b.pages.copy())  # targets in use: nothing moves
    assert out.success == 0
    assert all(r == -16 for r in out.results)
    mm.check()


def _fragment(mm: MemoryManager, chunk: int = 64, spare: float = 0.2) -> list[GemObject]:
    objs: list[GemObject] = []
    while mm.buddy.free_pages >= int(mm.pool.nr_pages * spare) + chunk:
        objs.append(mm.create_object(chunk * PAGE_SIZE))
    for o in objs[::2]:
        mm.destroy_object(o)
    return objs


def test_compaction_recovers_high_order_blocks(mm: MemoryManager) -> None:
    objs = _fragment(mm)
    kept = {o.id: mm.read(o, 0, o.size) for o in objs[1::2]}
    ideal = mm.buddy.free_pages // PAGEBLOCK_NR_PAGES
    before = mm.order_free_units(9)
    result = mm.compact()
    assert result is CompactResult.COMPLETE
    after = mm.order_free_units(9)
    assert after > before
    assert after >= 0.9 * ideal
    for oid, data in kept.items():
        assert mm.read(mm.get(oid), 0, len(data)) == data
    mm.check()


def test_compaction_for_an_order_stops_at_success(mm: MemoryManager) -> None:
    _fragment(mm)
    mm.alloc_kernel(MAX_ORDER, MigrateType.MOVABLE) if mm.buddy.has_free_block(MAX_ORDER) else None
    while mm.buddy.has_free_block(9):
        mm.alloc_kernel(9, MigrateType.MOVABLE)
    assert mm.compact(9) is CompactResult.SUCCESS
    assert mm.buddy.has_free_block(9)


def test_pinned_pages_block_compaction() -> None:
    mm = MemoryManager(POOL, design=Design.PINNED)
    objs = _fragment(mm)
    for o in objs[1::2]:
        mm.pin(o, 0, o.nr_pages)
    before = mm.order_free_units(9)
    mm.compact()
    assert mm.order_free_units(9) == before
    mm.check()
    mm.close()


def test_proactive_watermarks_and_policy(mm: MemoryManager) -> None:
    assert proactive_watermarks(20) == (80, 90)
    assert proactive_watermarks(0) == (100, 100)
    _fragment(mm, chunk=32, spare=0.0)
    score = mm.fragmentation_score()
    assert score > 90
    assert mm.should_proactive_compact(20)
    assert not mm.should_proactive_compact(0)
    policy = mm.proactive_policy(20)
    assert mm.run_policy(policy) in (CompactResult.SUCCESS, CompactResult.COMPLETE)
    assert mm.fragmentation_score() <= 80


def test_policy_rejects_bad_order() -> None:
    with pytest.raises(ValueError, match="order"):
        CompactionPolicy(8, order=11)


def test_indices_match_kernel_formulas() -> None:
    free = [4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # 4 single pages
    assert unusable_index(free, 0) == 0.0
    assert unusable_index(free, 2) == 1.0
    assert fragmentation_index(free, 0) == -1.0
    assert fragmentation_index(free, 2) == pytest.approx(1 - (1 + 4 / 4) / 4)
    assert fragmentation_index([0] * 11, 3) == 0.0
    assert fragmentation_score([0] * 9 + [1, 0]) == 0
    assert fragmentation_score([512] + [0] * 10) == 100


def test_vmstat_text_parses_back(mm: MemoryManager) -> None:
    _fragment(mm)
    mm.alloc_kernel(0, MigrateType.UNMOVABLE)
    mm.compact()
    assert parse_buddyinfo(mm.buddyinfo()) == mm.free_blocks_per_order()
    free, blocks = parse_pagetypeinfo(mm.pagetypeinfo())
    per_type = mm.free_per_type_order()
    for mt in MigrateType:
        assert free[mt.title] == per_type[mt]
        assert blocks[mt.title] == mm.pageblocks_per_type()[mt]
    fi = parse_index(mm.extfrag_index())
    assert len(fi) == MAX_ORDER + 1
    ui = parse_index(mm.unusable_index())
    assert ui[0] == pytest.approx(unusable_index(mm.free_blocks_per_order(), 0), abs=1e-3)
    counters = parse_vmstat(mm.vmstat_text())
    assert counters["pgmigrate_success"] == mm.vmstat["pgmigrate_success"] > 0
    assert counters["nr_free_pages"] == mm.buddy.free_pages


def test_layering_mm_and_codec_import_no_trio_or_pyfuse3() -> None:
    code = (
        "import sys, gemfs.mm, gemfs.mm.core, driver.gem, driver.inproc\n"
        "try:\n    import gemfs.control.protocol\nexcept ModuleNotFoundError:\n    pass\n"
        "bad = [m for m in ('trio', 'pyfuse3') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- properties ------------------------------------------------------------------------------
class MemoryMachine(RuleBasedStateMachine):
    """Random allocations, frees, pins, writes, migrations and compactions keep every object."""

    @initialize()
    def setup(self) -> None:
        self.mm = MemoryManager("8MiB", design=Design.SHMEM_HOOK)
        self.contents: dict[int, bytes] = {}
        self.pinned: dict[int, int] = {}  # object -> pages pinned from its start
        self.kernel: list[int] = []

    def teardown(self) -> None:
        self.mm.close()

    @rule(pages=st.integers(1, 40), byte=st.integers(0, 255))
    def create(self, pages: int, byte: int) -> None:
        data = bytes([byte]) * (pages * PAGE_SIZE - byte)
        try:
            obj = self.mm.create_object()
            self.mm.write(obj, 0, data)
        except OutOfMemory:
            self.mm.destroy_object(obj)
            return
        self.contents[obj.id] = data

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        oid = data.draw(st.sampled_from(sorted(self.contents)))
        self.mm.destroy_object(self.mm.get(oid))
        del self.contents[oid]
        self.pinned.pop(oid, None)

    @precondition(lambda self: self.contents)
    @rule(data=st.data(), off=st.integers(0, 50_000), chunk=st.binary(min_size=1, max_size=9000))
    def write(self, data: st.DataObject, off: int, chunk: bytes) -> None:
        oid = data.draw(st.sampled_from(sorted(self.contents)))
        obj = self.mm.get(oid)
        try:
            self.mm.write(obj, off, chunk)
        except OutOfMemory:
            return
        old = self.contents[oid]
        buf = bytearray(old.ljust(max(len(old), off + len(chunk)), b"\0"))
        buf[off : off + len(chunk)] = chunk
        self.contents[oid] = bytes(buf)

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def pin_toggle(self, data: st.DataObject) -> None:
        obj = self.mm.get(data.draw(st.sampled_from(sorted(self.contents))))
        pinned = self.pinned.pop(obj.id, 0)  # unpin what was pinned (the file may have grown)
        if pinned:
            self.mm.unpin(obj, 0, pinned)
        elif obj.nr_pages:
            self.mm.pin(obj, 0, obj.nr_pages)
            self.pinned[obj.id] = obj.nr_pages

    @rule(order=st.integers(0, 3), mt=st.sampled_from(list(MigrateType)))
    def kernel_alloc(self, order: int, mt: MigrateType) -> None:
        try:
            self.kernel.append(self.mm.alloc_kernel(order, mt))
        except OutOfMemory:
            pass

    @precondition(lambda self: self.kernel)
    @rule()
    def kernel_free(self) -> None:
        self.mm.free_kernel(self.kernel.pop(0))

    @rule(data=st.data())
    def migrate_random(self, data: st.DataObject) -> None:
        p = self.mm.pool
        used = np.flatnonzero(p.owner > 0)
        free = np.flatnonzero(p.flags & 1)
        n = min(len(used), len(free), 16)
        if n == 0:
            return
        seed = data.draw(st.integers(0, 2**31))
        rng = np.random.default_rng(seed)
        src = rng.choice(used, n, replace=False).astype(np.int64)
        dst = rng.choice(free, n, replace=False).astype(np.int64)
        self.mm.migrate_pages(src, dst, MigrateMode.SYNC)

    @rule()
    def compact(self) -> None:
        self.mm.compact()

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "mm"):
            return
        self.mm.check()
        assert self.mm.buddy.free_pages + int(np.count_nonzero(self.mm.pool.flags & 4)) == (
            self.mm.pool.nr_pages
        )
        for oid, data in self.contents.items():
            assert self.mm.read(self.mm.get(oid), 0, len(data) + 10) == data


TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
