"""The stress run's check of GPU objects across a driver kill: what a batch cut by the kill
may leave (old, new, or torn in the GTT's page order) and what it may not."""

from __future__ import annotations

import numpy as np

from driver.gem import gpu_pattern
from gemfs.mm.types import PAGE_SIZE
from tools.stress import torn_batch

PAGES = 8
OLD = gpu_pattern(1, 5, PAGES).tobytes()
NEW = gpu_pattern(1, 6, PAGES).tobytes()


def _mix(pages: str, cut: int = PAGE_SIZE // 2) -> bytes:
    """Pages by letter: n new, o old, t torn (new up to byte ``cut``, old after), z zeros."""
    out = bytearray()
    for i, c in enumerate(pages):
        o, n = OLD[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], NEW[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        out += {"n": n, "o": o, "t": n[:cut] + o[cut:], "z": bytes(PAGE_SIZE)}[c]
    return bytes(out)


def test_whole_old_or_new_content() -> None:
    assert torn_batch(OLD, OLD, NEW) == "old"
    assert torn_batch(NEW, OLD, NEW) == "new"
    assert torn_batch(OLD, OLD, OLD) == "old"  # no batch in flight: only the old content
    assert torn_batch(NEW, OLD, OLD) is None


def test_a_cut_batch_leaves_new_pages_then_old_ones() -> None:
    for shape in ("nnnooooo", "nnnnnnno", "noooooo" + "o", "nnntoooo", "toooooooo"[:PAGES]):
        assert torn_batch(_mix(shape), OLD, NEW) == "torn", shape
    assert torn_batch(_mix("nnntoooo", cut=8), OLD, NEW) == "torn"  # one word in


def test_content_no_cut_batch_can_leave_is_refused() -> None:
    # new after old (not the GTT's order), two torn pages, a foreign page, a short object
    for shape in ("oonnoooo", "nnttoooo", "nnnzoooo", "onoooooo", "nnnnnnnz"):
        assert torn_batch(_mix(shape), OLD, NEW) is None, shape
    assert torn_batch(_mix("nnnnoooo")[:-PAGE_SIZE], OLD, NEW) is None
    # one word of a page neither old nor new
    bad = bytearray(_mix("nnnooooo"))
    bad[3 * PAGE_SIZE + 16 : 3 * PAGE_SIZE + 24] = bytes(8)
    assert torn_batch(bytes(bad), OLD, NEW) is None
    # a torn page whose new words are not a prefix is still word-by-word old-or-new: allowed
    words = np.frombuffer(_mix("nnnooooo"), np.uint64).copy()
    newer = np.frombuffer(NEW, np.uint64)
    words[3 * PAGE_SIZE // 8 + 100] = newer[3 * PAGE_SIZE // 8 + 100]
    assert torn_batch(words.tobytes(), OLD, NEW) == "torn"
