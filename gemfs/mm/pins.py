"""Who holds which pins: the core's record of each owner's pins, per object and page index.

A pin is a count on the frame (``pool.pin``); this registry says which owner took it, so the
migration mechanism can carry an owner's pin from the old frame to the new one, a notifier
invalidation can drop exactly the owner's pins in a range, and a departed owner's pins can all
be released. Both backends (the in-process driver and the control server's peers) pin through
it. It also remembers pages an invalidation took from an owner: pinning them again is a
re-fault, which the ledger counts and charges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gemfs.mm.pool import I64, Bools


@dataclass(eq=False)
class Holds:
    """One owner's pins on one object: held[i] is True when the owner pinned page i."""

    held: Bools = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    invalidated: Bools = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))

    def grow(self, n: int) -> None:
        if len(self.held) < n:
            size = max(n, 2 * len(self.held))
            for name in ("held", "invalidated"):
                old = getattr(self, name)
                new = np.zeros(size, dtype=np.bool_)
                new[: len(old)] = old
                setattr(self, name, new)


@dataclass(eq=False)
class PinRegistry:
    by_owner: dict[object, dict[int, Holds]] = field(default_factory=dict)

    def holds(self, owner: object, obj_id: int, n: int = 0) -> Holds:
        h = self.by_owner.setdefault(owner, {}).setdefault(obj_id, Holds())
        h.grow(n)
        return h

    def held_mask(self, owner: object, obj_id: int, idx: I64) -> Bools:
        h = self.by_owner.get(owner, {}).get(obj_id)
        if h is None or len(idx) == 0:
            return np.zeros(len(idx), dtype=np.bool_)
        inside = idx < len(h.held)
        out = np.zeros(len(idx), dtype=np.bool_)
        out[inside] = h.held[idx[inside]]
        return out

    def objects_of(self, owner: object) -> dict[int, Holds]:
        return self.by_owner.get(owner, {})

    def drop_object(self, obj_id: int) -> None:
        for objs in self.by_owner.values():
            objs.pop(obj_id, None)

    def drop_owner(self, owner: object) -> dict[int, Holds]:
        return self.by_owner.pop(owner, {})
