"""The sparse page table reads and writes like the dense array it replaced, and its memory
follows the pages it holds, not the file size or the offset of the last page."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemfs.mm import MemoryManager, ObjectError
from gemfs.mm.objects import XA_CHUNK_SIZE, PageTable
from gemfs.mm.types import PAGE_SIZE

N = 4 * XA_CHUNK_SIZE + 5  # a table over several leaves and a partial one

indices = st.integers(0, N - 1)
frames = st.integers(-1, 1000)
ops = st.one_of(
    st.tuples(st.just("set1"), indices, frames),
    st.tuples(st.just("setmany"), st.lists(indices, max_size=20, unique=True), frames),
    st.tuples(st.just("slice"), indices, indices, frames),
    st.tuples(st.just("resize"), st.integers(0, N), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40))
def test_page_table_agrees_with_a_dense_array(steps: list[tuple[object, ...]]) -> None:
    dense = np.full(N, -1, dtype=np.int64)
    table = PageTable(dense)
    for step in steps:
        match step:
            case ("set1", int(i), int(v)) if i < len(dense):
                dense[i] = v
                table[i] = v
            case ("setmany", list(idx), int(v)):
                ix = np.array([i for i in idx if i < len(dense)], dtype=np.int64)
                dense[ix] = v
                table[ix] = v
            case ("slice", int(a), int(b), int(v)):
                lo, hi = sorted((a, b))
                dense[lo:hi] = v
                table[lo:hi] = v
            case ("resize", int(n), _):
                grown = np.full(n, -1, dtype=np.int64)
                keep = min(n, len(dense))
                grown[:keep] = dense[:keep]
                dense = grown
                table.resize(n)
        assert len(table) == len(dense)
        assert np.array_equal(np.asarray(table), dense)
    where, pfns = table.resident()
    assert np.array_equal(where, np.flatnonzero(dense >= 0))
    assert np.array_equal(pfns, dense[dense >= 0])
    assert table.count_resident() == int(np.count_nonzero(dense >= 0))
    probe = np.array([0, N // 2, max(0, len(dense) - 1), len(dense) + 7], dtype=np.int64)
    padded = np.concatenate((dense, np.full(N + 8, -1, dtype=np.int64)))
    assert np.array_equal(table[probe], padded[probe])  # past the end: holes
    if len(dense):
        assert np.array_equal(table[dense >= 0], dense[dense >= 0])
        assert np.array_equal(table[2:-1], dense[2:-1])
    for lo, hi in ((0, N), (3, 2 * XA_CHUNK_SIZE + 9), (XA_CHUNK_SIZE - 1, N - 2)):
        assert np.array_equal(table[lo:hi], dense[lo:hi])  # slices over several leaves


@pytest.mark.parametrize("order", ["front_to_back", "back_to_front", "gap"])
def test_slices_over_leaves_in_any_row_order(order: str) -> None:
    """A range over leaves made in page order is read as one slice of the store (the read
    path's fast case); leaves in any other order read the same."""
    n = 4 * XA_CHUNK_SIZE
    table = PageTable()
    table.resize(n)
    dense = np.full(n, -1, dtype=np.int64)
    leaves = {"front_to_back": [0, 1, 2, 3], "back_to_front": [3, 2, 1, 0], "gap": [0, 2, 3]}
    for leaf in leaves[order]:
        lo = leaf * XA_CHUNK_SIZE
        vals = np.arange(lo, lo + XA_CHUNK_SIZE, dtype=np.int64) + 1000
        vals[5] = -1  # a hole inside a leaf
        table[lo : lo + XA_CHUNK_SIZE] = vals
        dense[lo : lo + XA_CHUNK_SIZE] = vals
    for lo, hi in ((0, n), (7, n - 3), (XA_CHUNK_SIZE, 3 * XA_CHUNK_SIZE), (60, 70)):
        assert np.array_equal(table[lo:hi], dense[lo:hi])


def test_a_byte_at_the_largest_offset_costs_one_leaf() -> None:
    mm = MemoryManager("16MiB")
    try:
        obj = mm.create_object()
        limit = mm.pool.s_maxbytes
        assert mm.write(obj, limit - 1, b"z") == 1
        assert obj.size == limit
        assert obj.nr_resident == 1
        assert obj.pages.nbytes <= 4 * XA_CHUNK_SIZE * 8  # a few leaves, not limit / 512 bytes
        assert mm.read(obj, limit - 2, 10) == b"\0z"
        with pytest.raises(ObjectError) as e:
            mm.write(obj, limit, b"z")
        assert e.value.errno == errno.EFBIG
        assert mm.write(obj, limit - PAGE_SIZE, b"y" * (2 * PAGE_SIZE)) == PAGE_SIZE  # short
        with pytest.raises(ObjectError) as e:
            mm.truncate(obj, limit + 1)
        assert e.value.errno == errno.EFBIG
        mm.truncate(obj, 0)
        assert obj.pages.nbytes == 0  # the leaves went back
        mm.check()
    finally:
        mm.close()
