"""gemfs record: trace a real kernel's page allocator with tracefs."""

from __future__ import annotations

EVENTS = (
    "kmem:mm_page_alloc",
    "kmem:mm_page_free",
    "kmem:mm_page_alloc_extfrag",
    "compaction:mm_compaction_begin",
    "compaction:mm_compaction_end",
    "compaction:mm_compaction_try_to_compact_pages",
    "compaction:mm_compaction_finished",
    "compaction:mm_compaction_suitable",
    "compaction:mm_compaction_deferred",
    "compaction:mm_compaction_defer_compaction",
    "compaction:mm_compaction_defer_reset",
    "compaction:mm_compaction_migratepages",
    "compaction:mm_compaction_isolate_migratepages",
    "compaction:mm_compaction_isolate_freepages",
    "compaction:mm_compaction_fast_isolate_freepages",
    "compaction:mm_compaction_kcompactd_wake",
    "compaction:mm_compaction_kcompactd_sleep",
    "compaction:mm_compaction_wakeup_kcompactd",
    "migrate:mm_migrate_pages",
    "i915:i915_gem_object_create",
    "i915:i915_gem_object_destroy",
    "xe:xe_bo_create",
    "amdgpu:amdgpu_bo_create",
)
