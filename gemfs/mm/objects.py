"""GEM objects: shmem-file mappings with a page table from page index to frame.

The page table is sparse, like a mapping's ``i_pages`` xarray: 64-slot leaves (``XA_CHUNK_SIZE``)
exist only where a page has (or had) a frame, so a file's table costs memory in proportion to
the pages it holds, never to its size or to the offset of its last page. A byte written at the
end of the largest file a mount allows costs one leaf (512 bytes), not an entry per page before
it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from gemfs.mm.ops import AddressSpaceOps, Notifier
from gemfs.mm.pool import I64, Bools
from gemfs.mm.types import PAGE_SIZE, MigrateType, ObjId

XA_CHUNK_SHIFT = 6
XA_CHUNK_SIZE = 1 << XA_CHUNK_SHIFT  # slots per leaf
_MASK = XA_CHUNK_SIZE - 1
HOLE = -1


class PageTable:
    """Page index -> frame number (-1: a hole), stored sparsely, read like a 1-D int64 array.

    ``len(t)`` is the number of slots (page indices the table covers; a hole needs no leaf).
    Indexing follows numpy for the cases the model uses: ``t[i]`` (an int), ``t[a:b]``,
    ``t[index_array]`` and ``t[bool_mask]`` (new arrays, never views: assign through the
    table), ``t[...] = values``; comparisons and ``np.asarray(t)`` give dense arrays of
    ``len(t)`` entries (bounded by the mount's largest file). Index arrays may reach past the
    end: those slots read as holes.
    """

    __slots__ = ("_free", "_leaves", "_len", "_nrows", "_store")
    __hash__ = None  # type: ignore[assignment]  # compares like an array

    def __init__(self, pages: npt.ArrayLike = ()) -> None:
        self._leaves: dict[int, int] = {}  # leaf number -> row of _store
        self._store: I64 = np.empty((0, XA_CHUNK_SIZE), dtype=np.int64)
        self._free: list[int] = []  # rows below _nrows that no leaf uses
        self._nrows = 0  # rows of _store handed out so far (the rest is spare capacity)
        self._len = 0
        a = np.asarray(pages, dtype=np.int64).reshape(-1)
        if len(a):
            self.resize(len(a))
            idx = np.flatnonzero(a >= 0)
            if len(idx):
                self[idx] = a[idx]

    # -- size ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def shape(self) -> tuple[int]:
        return (self._len,)

    @property
    def dtype(self) -> np.dtype[np.int64]:
        return np.dtype(np.int64)

    @property
    def nbytes(self) -> int:
        """Memory the table holds (leaves, whether in use or free for reuse)."""
        return int(self._store.nbytes)

    def resize(self, n: int) -> None:
        """Cover n slots: growing adds holes; shrinking drops the slots past n (their frames
        must have been released by the caller)."""
        if n < 0:
            raise ValueError("negative page table size")
        if n < self._len:
            cut = n >> XA_CHUNK_SHIFT
            for leaf in [k for k in self._leaves if k >= cut]:
                row = self._leaves[leaf]
                if leaf == cut and n & _MASK:
                    self._store[row, n & _MASK :] = HOLE
                else:
                    del self._leaves[leaf]
                    self._free.append(row)
            if len(self._free) > len(self._leaves):  # give memory back after a big cut
                self._compact()
        self._len = n

    def _compact(self) -> None:
        rows = list(self._leaves.values())
        self._store = self._store[rows].copy()
        self._leaves = {leaf: i for i, leaf in enumerate(self._leaves)}
        self._free = []
        self._nrows = len(rows)

    # -- resident pages -----------------------------------------------------------------------
    def resident(self) -> tuple[I64, I64]:
        """(page indices, frames) of slots that hold a frame, in page order."""
        if not self._leaves:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty.copy()
        leaves = np.fromiter(sorted(self._leaves), dtype=np.int64, count=len(self._leaves))
        rows = np.fromiter((self._leaves[int(k)] for k in leaves), dtype=np.int64)
        block = self._store[rows]
        r, c = np.nonzero(block >= 0)
        idx = (leaves[r] << XA_CHUNK_SHIFT) + c
        return idx.astype(np.int64), block[r, c]

    def count_resident(self) -> int:
        if not self._leaves:
            return 0
        rows = np.fromiter(self._leaves.values(), dtype=np.int64, count=len(self._leaves))
        return int(np.count_nonzero(self._store[rows] >= 0))

    # -- reading ------------------------------------------------------------------------------
    def _range(self, start: int, stop: int) -> I64:
        first, last = start >> XA_CHUNK_SHIFT, (stop - 1) >> XA_CHUNK_SHIFT
        if first == last and stop > start:  # within one leaf: the common case, one copy
            row = self._leaves.get(first)
            if row is not None:
                lo = start & _MASK
                return self._store[row, lo : lo + stop - start].copy()
        elif stop > start:
            # Leaves made in page order sit in consecutive rows (a file written front to
            # back): the range is then one slice of the store, one copy, no per-leaf loop.
            rows = self._leaves
            row = rows.get(first)
            if row is not None and row + last - first < self._nrows:
                k = first + 1
                while k <= last and rows.get(k) == row + k - first:
                    k += 1
                if k > last:
                    block = self._store[row : row + last - first + 1].reshape(-1)
                    lo = start & _MASK
                    return block[lo : lo + stop - start].copy()
        out = np.full(max(0, stop - start), HOLE, dtype=np.int64)
        if stop <= start or not self._leaves:
            return out
        if last - first + 1 > len(self._leaves):  # a wide range over few leaves
            leaves = sorted(k for k in self._leaves if first <= k <= last)
        else:
            leaves = [k for k in range(first, last + 1) if k in self._leaves]
        for leaf in leaves:
            row = self._store[self._leaves[leaf]]
            lo = max(start, leaf << XA_CHUNK_SHIFT)
            hi = min(stop, (leaf + 1) << XA_CHUNK_SHIFT)
            out[lo - start : hi - start] = row[lo & _MASK : ((hi - 1) & _MASK) + 1]
        return out

    def _gather(self, idx: I64) -> I64:
        out = np.full(len(idx), HOLE, dtype=np.int64)
        if not len(idx) or not self._leaves:
            return out
        ok = (idx >= 0) & (idx < self._len)
        leaf = idx >> XA_CHUNK_SHIFT
        lo, hi = int(leaf.min()), int(leaf.max())
        if lo == hi:  # one leaf: no grouping needed
            row = self._leaves.get(lo)
            if row is not None:
                out[ok] = self._store[row, idx[ok] & _MASK]
            return out
        uniq, inv = np.unique(leaf, return_inverse=True)
        row_of = np.fromiter(
            (self._leaves.get(int(k), -1) for k in uniq), dtype=np.int64, count=len(uniq)
        )
        rows = row_of[inv.reshape(-1)]
        ok &= rows >= 0
        out[ok] = self._store[rows[ok], idx[ok] & _MASK]
        return out

    def _indices(self, key: Any) -> I64:
        """Page indices a slice, an index array or a bool mask selects (numpy's rules)."""
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            return np.arange(start, stop, step, dtype=np.int64)
        a = np.asarray(key)
        if a.dtype == np.bool_:
            if a.shape != (self._len,):
                raise IndexError(f"boolean index of shape {a.shape} for a table of {self._len}")
            return np.flatnonzero(a).astype(np.int64)
        if not np.issubdtype(a.dtype, np.integer):
            raise IndexError(f"cannot index a page table with {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        return np.where(a < 0, a + self._len, a)

    def _scalar(self, key: int | np.integer[Any]) -> int:
        i = int(key)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"page {int(key)} out of range for a table of {self._len}")
        return i

    @overload
    def __getitem__(self, key: int | np.integer[Any]) -> int: ...
    @overload
    def __getitem__(self, key: slice | I64 | Bools | list[int]) -> I64: ...
    def __getitem__(self, key: Any) -> int | I64:
        if isinstance(key, int | np.integer):
            i = self._scalar(key)
            row = self._leaves.get(i >> XA_CHUNK_SHIFT)
            return HOLE if row is None else int(self._store[row, i & _MASK])
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self._len)
            return self._range(start, stop)
        return self._gather(self._indices(key))

    # -- writing ------------------------------------------------------------------------------
    def _row(self, leaf: int) -> int:
        row = self._leaves.get(leaf)
        if row is not None:
            return row
        if self._free:
            row = self._free.pop()
        else:
            row = self._nrows
            if row == len(self._store):
                grown = np.empty((max(4, 2 * row), XA_CHUNK_SIZE), dtype=np.int64)
                grown[:row] = self._store[:row]
                self._store = grown
            self._nrows += 1
        self._store[row] = HOLE
        self._leaves[leaf] = row
        return row

    def __setitem__(self, key: Any, value: npt.ArrayLike) -> None:
        if isinstance(key, int | np.integer):
            i = self._scalar(key)
            v = int(np.asarray(value, dtype=np.int64))
            if v < 0 and (i >> XA_CHUNK_SHIFT) not in self._leaves:
                return
            row = self._row(i >> XA_CHUNK_SHIFT)  # may grow _store: look it up after
            self._store[row, i & _MASK] = v
            return
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self._len)
            if stop > start:
                self._set_range(start, stop, value)
            return
        idx = self._indices(key)
        if not len(idx):
            return
        if idx.min() < 0 or idx.max() >= self._len:
            raise IndexError(f"page index out of range for a table of {self._len}")
        vals = np.broadcast_to(np.asarray(value, dtype=np.int64), idx.shape)
        leaf = idx >> XA_CHUNK_SHIFT
        lo, hi = int(leaf.min()), int(leaf.max())
        if lo == hi:  # one leaf: no grouping needed
            got = self._leaves.get(lo)
            if got is None and not np.any(vals >= 0):
                return
            row = self._row(lo) if got is None else got
            self._store[row, idx & _MASK] = vals
            return
        uniq, inv = np.unique(leaf, return_inverse=True)
        inv = inv.reshape(-1)
        # A leaf is made only where a frame is stored; holes in absent leaves are already holes.
        need = np.zeros(len(uniq), dtype=np.bool_)
        np.logical_or.at(need, inv, vals >= 0)
        row_of = np.fromiter(
            (
                self._row(int(k)) if n else self._leaves.get(int(k), -1)
                for k, n in zip(uniq.tolist(), need.tolist(), strict=True)
            ),
            dtype=np.int64,
            count=len(uniq),
        )
        rows = row_of[inv]
        ok = rows >= 0
        self._store[rows[ok], idx[ok] & _MASK] = vals[ok]

    def _set_range(self, start: int, stop: int, value: npt.ArrayLike) -> None:
        vals = np.broadcast_to(np.asarray(value, dtype=np.int64), (stop - start,))
        for leaf in range(start >> XA_CHUNK_SHIFT, ((stop - 1) >> XA_CHUNK_SHIFT) + 1):
            lo = max(start, leaf << XA_CHUNK_SHIFT)
            hi = min(stop, (leaf + 1) << XA_CHUNK_SHIFT)
            v = vals[lo - start : hi - start]
            got = self._leaves.get(leaf)
            if got is None and not np.any(v >= 0):
                continue  # holes where there is no leaf are holes already
            row = self._row(leaf) if got is None else got
            self._store[row, lo & _MASK : ((hi - 1) & _MASK) + 1] = v

    # -- dense views (bounded by the table's length) ------------------------------------------
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> I64:
        a = self._range(0, self._len)
        return a if dtype is None else a.astype(dtype)

    def copy(self) -> I64:
        return self._range(0, self._len)

    def tolist(self) -> list[int]:
        return self.copy().tolist()  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[int]:
        return iter(self.tolist())

    def __eq__(self, other: object) -> Bools:  # type: ignore[override]
        return np.asarray(self.copy() == other, dtype=np.bool_)

    def __ne__(self, other: object) -> Bools:  # type: ignore[override]
        return np.asarray(self.copy() != other, dtype=np.bool_)

    def __lt__(self, other: Any) -> Bools:
        return np.asarray(self.copy() < other, dtype=np.bool_)

    def __le__(self, other: Any) -> Bools:
        return np.asarray(self.copy() <= other, dtype=np.bool_)

    def __gt__(self, other: Any) -> Bools:
        return np.asarray(self.copy() > other, dtype=np.bool_)

    def __ge__(self, other: Any) -> Bools:
        return np.asarray(self.copy() >= other, dtype=np.bool_)

    def __repr__(self) -> str:
        return f"PageTable(len={self._len}, resident={self.count_resident()})"


@dataclass(eq=False)
class GemObject:
    id: ObjId
    migratetype: MigrateType
    path: str = ""
    size: int = 0  # bytes (the file size)
    table: PageTable = field(default_factory=PageTable)  # page index -> frame, -1 = hole
    ops: AddressSpaceOps | None = None  # per-object ops (shmem-hook); None: the mount's
    notifier: Notifier | None = None  # notifier design
    owner_tag: str = ""  # who registered ops / owns it (a peer name), for display
    private: bool = False  # a driver's object: the gemfs design's mount-wide ops apply to it

    @property
    def pages(self) -> PageTable:
        """The page table (sparse; reads like an int64 array of page index -> frame)."""
        return self.table

    @pages.setter
    def pages(self, value: PageTable | I64) -> None:
        self.table = value if isinstance(value, PageTable) else PageTable(value)

    @property
    def nr_pages(self) -> int:
        """Pages covered by the file size."""
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE

    @property
    def nr_resident(self) -> int:
        return self.table.count_resident()

    def resident(self) -> tuple[I64, I64]:
        """(page indices, frames) of pages that have a frame."""
        return self.table.resident()
