"""Which page allocations in a kernel trace back GPU buffers (pure, no I/O).

The kernel's page-allocator events (``mm_page_alloc``) do not say who a page is for. Three GPU
drivers trace the creation of their buffer objects:

========================== ===================================== ============================
event                      printed as (TP_printk)                size
========================== ===================================== ============================
i915_gem_object_create     ``obj=%p, size=0x%llx``               ``size`` bytes
i915_gem_object_destroy    ``obj=%p``                            (the object is gone)
xe_bo_create               ``dev=%s, size=%zu, flags=0x%02x,     ``size`` bytes
                           vm=%p``
amdgpu_bo_create           ``bo=%p, pages=%u, type=%d,           ``pages`` pages; only
                           preferred=%d, allowed=%d, visible=%d`` ``type`` 0 (SYSTEM) or 1 (TT)
                                                                 use host pages (2 is VRAM)
========================== ===================================== ============================

The rule (``GpuAttribution``): a bo-create event of task ``pid`` opens a quota of the object's
pages. Later ``mm_page_alloc`` events *of the same pid* whose flags carry the driver's own
signature are the object's pages, oldest open object of that pid first, until its quota is
used up (an allocation larger than the rest of the quota is counted whole: TTM allocates
highest order first). The signatures come from the drivers' code:

- i915 (``i915_gem_shmem.c``: ``shmem_object_init`` sets the mapping's mask to
  ``GFP_HIGHUSER | __GFP_RECLAIMABLE``; ``shmem_sg_alloc_table`` reads pages with that mask
  less ``__GFP_RECLAIM`` plus ``__GFP_NORETRY | __GFP_NOWARN``): ``migratetype=2``
  (RECLAIMABLE) with ``__GFP_HIGHMEM`` or ``GFP_HIGHUSER`` among the printed flags. Slab's
  reclaimable pages are ``GFP_KERNEL``-based and never carry ``__GFP_HIGHMEM``.
- TTM (xe, amdgpu; ``ttm_pool.c``: ``__ttm_pool_alloc`` asks ``GFP_USER`` plus
  ``GFP_HIGHUSER``, or ``GFP_DMA32``, orders from the highest down): ``migratetype=0``
  (UNMOVABLE) with ``__GFP_HIGHMEM``, ``GFP_HIGHUSER`` or ``GFP_DMA32``.

A trace without ``gfp_flags`` (some ``perf script`` setups) is matched on the migrate type
alone. ``i915_gem_object_destroy`` closes the object: its pins go (its pages stay until their
own ``mm_page_free`` events, as shmem frees them). xe and amdgpu trace no destroy: an object
ends when its last page is freed.

Limits, stated: i915 allocates an object's pages lazily (first bind, pwrite or fault); when
that happens in another task (a kworker) than the one that created the object, those pages
are not found. TTM takes pages from its own per-order pools first, which the trace does not
show; pages recycled through those pools are not re-attributed (they stay with the object that
first allocated them, which is also what the buddy allocator sees: they were never freed). A
pipe buffer (``GFP_HIGHUSER | __GFP_ACCOUNT``, UNMOVABLE) of the same task while a TTM object's
quota is open is taken for the object's. drm_gem_shmem drivers (``GFP_HIGHUSER``, "kept
pinned") trace no object creation and cannot be found.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gemfs.mm.types import PAGE_SIZE
from tools.tracefile import Event

GPU_CREATE = {
    "i915_gem_object_create": "i915",
    "xe_bo_create": "xe",
    "amdgpu_bo_create": "amdgpu",
}
GPU_DESTROY = {"i915_gem_object_destroy": "i915"}
GPU_EVENTS = frozenset(GPU_CREATE) | frozenset(GPU_DESTROY)

_HIGH = ("__GFP_HIGHMEM", "GFP_HIGHUSER")  # GFP_HIGHUSER_MOVABLE contains GFP_HIGHUSER too
_TTM = (*_HIGH, "GFP_DMA32")
AMDGPU_HOST_TYPES = (0, 1)  # TTM_PL_SYSTEM, TTM_PL_TT


def _flags(e: Event) -> list[str] | None:
    raw = e.fields.get("gfp_flags")
    return None if raw is None else str(raw).split("|")


def signature(driver: str, e: Event) -> bool:
    """Does this ``mm_page_alloc`` carry the flags ``driver`` allocates its pages with?"""
    mt = e.fields.get("migratetype")
    flags = _flags(e)
    if driver == "i915":
        return mt == 2 and (flags is None or any(f in _HIGH for f in flags))
    return mt == 0 and (flags is None or any(f in _TTM for f in flags))


@dataclass
class GpuBo:
    """One GPU buffer object seen in the trace."""

    index: int  # 0, 1, ... in order of creation
    driver: str
    key: str  # the object's pointer (i915, amdgpu) or "line N" (xe prints none)
    pid: int
    comm: str
    line: int
    pages: int  # the object's size in pages: its quota
    backed: int = 0  # pages attributed so far
    destroyed: bool = False

    @property
    def open(self) -> bool:
        return not self.destroyed and self.backed < self.pages


def _pointer(raw: int | str | None) -> str:
    return str(raw).rstrip(",")


@dataclass
class GpuAttribution:
    """Applies the rule above to a trace's events, in order."""

    objects: list[GpuBo] = field(default_factory=list)
    by_key: dict[str, GpuBo] = field(default_factory=dict)
    pending: dict[int, deque[GpuBo]] = field(default_factory=dict)  # pid -> open objects
    ignored_vram: int = 0  # amdgpu objects placed in VRAM (no host pages)
    unknown_destroys: int = 0

    def create(self, e: Event) -> GpuBo | None:
        driver = GPU_CREATE[e.name]
        if driver == "amdgpu":
            if e.fields.get("type") not in AMDGPU_HOST_TYPES:
                self.ignored_vram += 1
                return None
            pages = e.int("pages")
            key = _pointer(e.fields.get("bo"))
        else:
            pages = -(-e.int("size") // PAGE_SIZE)
            key = _pointer(e.fields.get("obj")) if driver == "i915" else f"line {e.line}"
        bo = GpuBo(len(self.objects), driver, key, e.pid, e.comm, e.line, pages)
        self.objects.append(bo)
        self.by_key[f"{driver}:{key}"] = bo
        if pages > 0:
            self.pending.setdefault(e.pid, deque()).append(bo)
        return bo

    def destroy(self, e: Event) -> GpuBo | None:
        bo = self.by_key.pop(f"{GPU_DESTROY[e.name]}:{_pointer(e.fields.get('obj'))}", None)
        if bo is None:
            self.unknown_destroys += 1  # created before the trace began
            return None
        bo.destroyed = True
        return bo

    def claim(self, e: Event) -> GpuBo | None:
        """The object an ``mm_page_alloc`` belongs to (its quota is charged), or None."""
        queue = self.pending.get(e.pid)
        while queue and not queue[0].open:
            queue.popleft()
        if not queue:
            return None
        for bo in queue:
            if bo.open and signature(bo.driver, e):
                bo.backed += 1 << e.int("order")
                return bo
        return None


__all__ = ["GPU_CREATE", "GPU_DESTROY", "GPU_EVENTS", "GpuAttribution", "GpuBo", "signature"]
