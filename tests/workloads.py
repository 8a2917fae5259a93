"""Small workload files shared by the workload, player, report and CLI tests."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Every phase kind and size distribution, on a pool small enough to play in well under a second.
SMALL = """\
name = "small"
description = "every phase kind on a small pool"
pool = "32MiB"
seed = 5

[compactor]
proactiveness = 50
interval_ms = 100
order = 9

[[phase]]
kind = "page-cache"
tag = "cache"
fill = 0.5
size = { dist = "uniform", min = "16KiB", max = "512KiB" }

[[phase]]
kind = "noise"
tag = "slab"
type = "unmovable"
pages = 64

[[phase]]
kind = "noise"
tag = "dcache"
type = "reclaimable"
order = 1
count = 8

[[phase]]
name = "churn"
kind = "repeat"
times = 3

  [[phase.do]]
  kind = "create"
  tag = "buf"
  count = 40
  size = { dist = "mesa", median = "32KiB", sigma = 1.2, max = "1MiB" }
  bind = true

  [[phase.do]]
  kind = "gpu"
  tag = "buf"
  fraction = 0.3
  duration_ms = 30
  access = "write"
  repeat = 3
  interval_ms = 20

  [[phase.do]]
  kind = "probe"
  order = 9
  count = 1

  [[phase.do]]
  kind = "free"
  tag = "buf"
  fraction = 0.5

  [[phase.do]]
  kind = "free"
  tag = "slab"
  every = 3
  offset = 1

[[phase]]
kind = "create"
tag = "big"
fill = 0.5
size = { dist = "choice", sizes = ["256KiB", "1MiB"], weights = [3, 1] }

[[phase]]
kind = "create"
tag = "log"
count = 5
size = { dist = "lognormal", median = "64KiB", sigma = 0.5 }

[[phase]]
kind = "free"
tag = "big"
every = 2

[[phase]]
kind = "compact"

[[phase]]
kind = "wait"
ms = 500

[[phase]]
kind = "probe"
order = 9
count = "all"
hold = true

[[phase]]
kind = "free"
tag = "cache"
count = 5

[[phase]]
kind = "free"
tag = "dcache"
all = true
"""


def write_small(directory: Path, text: str = SMALL, name: str = "small.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# GEM objects that the GPU keeps busy while huge pages are asked for and kcompactd runs: every
# design pays something here (the parity test and the measurement tests play it).
BUSY = """\
name = "busy"
description = "GPU batches overlapping direct and proactive compaction"
pool = "32MiB"
seed = 11

[compactor]
proactiveness = 60
interval_ms = 50
order = 9

[[phase]]
kind = "page-cache"
tag = "cache"
fill = 0.6
size = { dist = "uniform", min = "16KiB", max = "256KiB" }

[[phase]]
kind = "noise"
tag = "slab"
type = "unmovable"
count = 24

[[phase]]
kind = "repeat"
times = 4

  [[phase.do]]
  kind = "create"
  tag = "buf"
  count = 140
  size = { dist = "mesa", median = "48KiB", sigma = 1.0, max = "1MiB" }

  [[phase.do]]
  kind = "gpu"
  tag = "buf"
  fraction = 0.4
  duration_ms = 40
  access = "write"
  repeat = 4
  interval_ms = 16

  # The last batches still run: compact_memory waits for them (and kcompactd's passes and
  # the probes' direct compaction meet them).
  [[phase.do]]
  kind = "compact"

  [[phase.do]]
  kind = "probe"
  order = 9
  count = 2

  [[phase.do]]
  kind = "free"
  tag = "buf"
  fraction = 0.5

  [[phase.do]]
  kind = "page-cache"
  tag = "cache"
  count = 6
  size = "128KiB"

[[phase]]
kind = "gpu"
tag = "buf"
fraction = 1.0
duration_ms = 5
access = "write"
repeat = 2
interval_ms = 4

[[phase]]
kind = "probe"
order = 9
count = 3

[[phase]]
kind = "wait"
ms = 300

[[phase]]
kind = "probe"
order = 9
count = "all"
"""
