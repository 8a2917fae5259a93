"""GPU write batches racing migrations, under every design, on the real stack.

One thread keeps submitting GPU write batches through the driver (each batch writes a known
pattern); another, a separate client of the core, keeps asking the core to migrate pages of
those very objects to free frames in every mode, while modelled time moves on. Nothing may be
lost: the driver's GPU never reads a frame that does not hold what it last wrote, and every
object reads back through the mount as the last batch wrote it. (Under the notifier design this
used to lose data: a pin granted between the invalidation and the move, and a pin reply applied
after an invalidation overtook it.)
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

from driver.gem import gpu_pattern
from gemfs.control.client import SyncClient
from gemfs.control.peer import CallError
from gemfs.mm.pool import PG_FREE, PG_TARGET
from gemfs.mm.types import Design
from tools.stack_backend import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.mount]

SECONDS = 6.0


@pytest.fixture(params=[d.value for d in Design])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with Stack("64MiB", Design(request.param)) as s:
        yield s


def _migrator(stack: Stack, objs: list[int], stop: threading.Event, out: dict[str, int]) -> None:
    rng = random.Random(3)
    client = SyncClient(str(stack.control), name="migrator")
    try:
        while not stop.is_set():
            oid = rng.choice(objs)
            frames = np.asarray(client.call("frames", {"obj": oid}), dtype=np.int64)
            snap = client.call("snapshot", {})
            flags = np.frombuffer(snap["flags"], dtype=np.uint8)
            free = np.flatnonzero((flags & (PG_FREE | PG_TARGET)) == PG_FREE)
            src = frames[frames >= 0]
            n = min(len(src), len(free), 64)
            if n == 0:
                continue
            dst = rng.sample(free.tolist(), n)
            mode = rng.choice(["async", "sync_light", "sync"])
            try:
                r = client.call(
                    "migrate",
                    {"src": src[:n].tolist(), "dst": dst, "mode": mode},
                )
            except CallError:
                continue
            res = np.frombuffer(r["results"], dtype="<i4")
            out["moved"] += int(np.count_nonzero(res == 0))
            out["calls"] += 1
            client.call("advance", {"seconds": 0.002})
    finally:
        client.close()


def test_gpu_writes_racing_migrations_lose_nothing(stack: Stack) -> None:
    drv = stack.drv
    objs = [int(drv.call("create", {"size": (64 + 32 * i) << 10})["obj"]) for i in range(12)]
    sizes = {o: (64 + 32 * i) << 10 for i, o in enumerate(objs)}
    expected: dict[int, int] = {}
    stop = threading.Event()
    counts = {"moved": 0, "calls": 0}
    t = threading.Thread(target=_migrator, args=(stack, objs, stop, counts), daemon=True)
    t.start()
    rng = random.Random(5)
    batches = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            pick = rng.sample(objs, rng.randrange(1, 4))
            gen = rng.randrange(1, 1 << 30)
            ms = rng.choice([0.5, 5.0, 20.0])  # some longer than SYNC_LIGHT waits for
            r = drv.call(
                "exec", {"objs": pick, "duration_ms": ms, "write": True, "generation": gen}
            )
            assert r["data_errors"] == 0
            for o in pick:
                expected[o] = r["checksums"][str(o)]
                assert expected[o] == zlib.crc32(gpu_pattern(o, gen, sizes[o] >> 12).data)
            batches += 1
    finally:
        stop.set()
        t.join(60)
    assert batches > 20
    assert counts["calls"] > 20
    if stack.design.asks_owner:
        assert counts["moved"] > 0  # the race really ran: pages moved under the GPU's feet
    v = drv.call("verify")
    assert v == {"bad_objects": 0, "data_errors": 0}
    paths = {o: p for p, o in _paths(stack).items()}
    for o, crc in expected.items():
        data = (stack.mountpoint / paths[o]).read_bytes()
        assert zlib.crc32(data) == crc, f"object {o} lost data"
    assert stack.core.call("check")["ok"]


def _paths(stack: Stack) -> dict[str, int]:
    text = (stack.mountpoint / ".gemfs" / "objects").read_text()
    out: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) > 1 and cols[0].isdigit():
            out[cols[1].lstrip("/")] = int(cols[0])
    return out
