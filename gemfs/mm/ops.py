"""Owners of a mapping's pages: the contract between the migration core and a driver.

In the kernel, a driver that owns pages registers address-space operations (``migratepage``,
the 2016 patch; ``struct movable_operations`` today) or an mmu notifier. In gemfs the owner is
asked, one batch at a time, by the single migration mechanism (:mod:`gemfs.mm.migrate`):

- ``migrate`` (the hook and mount-wide designs): "stop using these pages" -- the owner waits
  for its GPU as the migration mode allows, drops its use, and answers per page 0 (they may
  move; the core carries its pin to the new frame and then tells it where each page went) or
  -EAGAIN (busy, retry later) or another -errno (never). This is the driver's ``migratepage``
  split at the library call: the core runs ``migrate_folio``, the owner its own part.
- ``invalidate`` (the notifier design): "this range is about to change" -- the owner waits
  idle as the mode allows, drops its GTT entries and its pins in the range, answers 0 (or
  -EAGAIN: busy), and re-faults and re-pins the range on its next use.

An owner is any object with a ``name``: the in-process driver answers synchronously, the
control server's proxy for a driver connection answers over the socket.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

Results = npt.NDArray[np.int32]  # per page: 0, -EAGAIN, or another -errno


class Owner(Protocol):
    """A driver that registered itself for some objects' pages (per object, per mount, or as
    a notifier)."""

    name: str


# The kernel's names for the two registration shapes; the same kind of owner behind both.
AddressSpaceOps = Owner
Notifier = Owner
