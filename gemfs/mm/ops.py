"""Address-space operations: the contract between the migration core and a mapping's owner.

Modelled on ``struct address_space_operations`` / ``struct movable_operations``. Calls are
batched: each call carries the arrays of one object's pages, so an owner over a socket pays one
round trip for many pages (like ``migrate_pages_batch``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from gemfs.mm.types import MigrateMode

if TYPE_CHECKING:
    from gemfs.mm.objects import GemObject
    from gemfs.mm.pool import I64, Bools

Results = npt.NDArray[np.int32]  # per page: 0, -EAGAIN, or another -errno

EAGAIN = errno.EAGAIN
EBUSY = errno.EBUSY


class MigrationCore(Protocol):
    """What an owner may call back into while it handles ``migrate``."""

    def migrate_folio(self, obj: GemObject, idx: I64, src: I64, dst: I64) -> Results:
        """Copy src frames to dst and remap the object's pages; -EAGAIN for pinned pages."""
        ...

    def pin_pages(self, pfns: I64) -> None: ...

    def unpin_pages(self, pfns: I64) -> None: ...


class AddressSpaceOps(Protocol):
    """Registered per object (shmem-hook) or per mount (gemfs)."""

    name: str

    def isolate(self, core: MigrationCore, obj: GemObject, idx: I64) -> Bools:
        """May these pages be taken off for migration? (isolate_page)"""
        ...

    def migrate(
        self, core: MigrationCore, obj: GemObject, idx: I64, src: I64, dst: I64, mode: MigrateMode
    ) -> Results:
        """Move each page src[i] -> dst[i]; 0, -EAGAIN (retry later) or -errno (permanent)."""
        ...

    def putback(self, core: MigrationCore, obj: GemObject, idx: I64) -> None:
        """Pages that were isolated but not moved go back to their owner (putback_page)."""
        ...


class Notifier(Protocol):
    """The notifier design: the core announces that a range will change under the owner."""

    def invalidate(self, core: MigrationCore, obj: GemObject, start: int, count: int) -> int:
        """Stop using [start, start+count): wait idle, drop GTT entries, unpin; 0 or -errno."""
        ...


class ShmemOps:
    """Plain shmem: unpinned pages move, pinned ones are refused with -EAGAIN."""

    name = "shmem"

    def isolate(self, core: MigrationCore, obj: GemObject, idx: I64) -> Bools:
        return np.ones(len(idx), dtype=np.bool_)

    def migrate(
        self, core: MigrationCore, obj: GemObject, idx: I64, src: I64, dst: I64, mode: MigrateMode
    ) -> Results:
        return core.migrate_folio(obj, idx, src, dst)

    def putback(self, core: MigrationCore, obj: GemObject, idx: I64) -> None:
        return None


SHMEM_OPS = ShmemOps()
