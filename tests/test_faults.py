"""Faults, for real: killed drivers and compactors, silent or lying drivers, bad frames,
strangers on the socket. Nothing may be lost and the mount must keep serving."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from driver.gem import DriverPolicy
from gemfs.control import arrays
from gemfs.control.client import SyncClient
from gemfs.control.peer import CallError, Peer, connect
from gemfs.control.protocol import Call, Reply
from gemfs.mm.types import PAGE_SIZE, Design
from tools.stack_backend import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.mount]


@pytest.fixture
def hook_stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("GEMFS_CALLBACK_TIMEOUT", "0.3")
    s = Stack("64MiB", Design.SHMEM_HOOK)
    try:
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.teardown()


def _fragment(stack: Stack, n: int = 40) -> list[dict[str, Any]]:
    """n GPU-bound 1 MiB objects; every other one freed; returns the kept ones."""
    objs = []
    for _ in range(n):
        r = stack.drv.call("create", {"size": 1 << 20})
        stack.drv.call("exec", {"objs": [r["obj"]], "duration_ms": 0, "write": True})
        objs.append(r)
    for r in objs[::2]:
        stack.drv.call("close", {"obj": r["obj"]})
    return objs[1::2]


def _contents(stack: Stack, objs: list[dict[str, Any]]) -> dict[str, bytes]:
    return {r["path"]: (stack.mountpoint / r["path"].lstrip("/")).read_bytes() for r in objs}


def _check(stack: Stack) -> None:
    r = stack.core.call("check")
    assert r["ok"], r["error"]


def _busy(stack: Stack, objs: list[dict[str, Any]], ms: float) -> None:
    stack.drv.call("exec", {"objs": [r["obj"] for r in objs], "duration_ms": ms})


def _compactor(stack: Stack) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gemfs_cli", "compactor", "--control", str(stack.control), "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _asks(stack: Stack) -> int:
    return int(stack.core.call("stats")["server"]["asks"])


def _wait_for_callbacks(stack: Stack, before: int) -> None:
    deadline = time.monotonic() + 20
    while _asks(stack) <= before:
        assert time.monotonic() < deadline, "the compactor never called back"
        time.sleep(0.01)


@pytest.mark.parametrize("policy", [DriverPolicy.WAIT_IDLE, DriverPolicy.I915_2016])
def test_driver_killed_mid_migration_again_and_again(
    monkeypatch: pytest.MonkeyPatch, policy: DriverPolicy
) -> None:
    """Under either driver policy: the kill lands while the driver holds its answer; the
    restarted one takes its objects back by path (under i915-2016 objects are dropped in the
    later compactions and re-faulted by the next batch)."""
    monkeypatch.setenv("GEMFS_CALLBACK_TIMEOUT", "10")
    # Each driver holds its answers 3 s (wall clock) so the kill lands while the core waits.
    monkeypatch.setenv("GEMFS_DRIVER_ANSWER_DELAY_MS", "3000")
    with Stack("64MiB", Design.SHMEM_HOOK, driver_policy=policy) as stack:
        kept = _killed_mid_migration(stack)
        # A driver that answers at once: compaction works again and still loses nothing.
        monkeypatch.delenv("GEMFS_DRIVER_ANSWER_DELAY_MS")
        expected = _contents(stack, kept)
        stack.restart_driver()
        kept = [{**r, **stack.drv.call("open", {"path": r["path"]})} for r in kept]
        stack.compact_once()
        _check(stack)
        assert _contents(stack, kept) == expected
        dropped = stack.core.call("stats")["vmstat"].get("gem_objects_dropped", 0)
        assert (dropped > 0) == (policy is DriverPolicy.I915_2016)


def _killed_mid_migration(stack: Stack) -> list[dict[str, Any]]:
    kept = _fragment(stack)
    expected = _contents(stack, kept)
    aborted_or_retried = 0
    for _round in range(3):
        _busy(stack, kept, 3000)  # SYNC migration now waits in the driver's callback
        before = _asks(stack)
        comp = _compactor(stack)
        _wait_for_callbacks(stack, before)
        time.sleep(0.05)
        stack.driver_proc().send_signal(signal.SIGKILL)
        out, _ = comp.communicate(timeout=60)
        assert comp.returncode == 0, out.decode()
        _check(stack)
        assert _contents(stack, kept) == expected  # every object reads back intact
        vm = stack.core.call("stats")["vmstat"]
        aborted_or_retried = vm["pgmigrate_aborted"]
        # A restarted driver reconnects and takes its objects back by path.
        stack.restart_driver()
        kept = [{**r, **stack.drv.call("open", {"path": r["path"]})} for r in kept]
        _busy(stack, kept, 0)
        assert stack.drv.call("verify") == {"bad_objects": 0, "data_errors": 0}
    assert aborted_or_retried > 0
    return kept


def test_compactor_killed_mid_batch(hook_stack: Stack) -> None:
    stack = hook_stack
    kept = _fragment(stack)
    expected = _contents(stack, kept)
    for _ in range(3):
        _busy(stack, kept, 300)
        comp = _compactor(stack)
        time.sleep(0.15)
        comp.kill()
        comp.communicate()
        time.sleep(0.5)  # the core finishes (or abandons) the batch it was running
        _check(stack)  # nothing left isolated, no frame owned twice
        assert _contents(stack, kept) == expected
    assert stack.drv.call("verify") == {"bad_objects": 0, "data_errors": 0}


async def _fake_driver(
    stack: Stack, on_call: Any, nursery: trio.Nursery
) -> tuple[Peer, dict[str, Any]]:
    peer = await connect(str(stack.control), "driver", "fake", on_call=on_call)
    nursery.start_soon(peer.serve)
    r = await peer.call("create", {"path": f"fake-{id(peer)}", "size": 8 * PAGE_SIZE})
    await peer.call("pin", {"obj": r["obj"], "start": 0, "count": 8})
    await peer.call("register_ops", {"obj": r["obj"]})
    return peer, r


def _migrate_object(stack: Stack, obj: int) -> list[int]:
    snap = stack.core.call("snapshot")
    text = (stack.mountpoint / ".gemfs" / "objects").read_text()
    assert str(obj) in text
    import numpy as np

    flags = np.frombuffer(snap["flags"], dtype=np.uint8)
    free = np.flatnonzero(flags & 1)[-8:].astype(np.int64)
    frames = stack.core.call("frames", {"obj": obj})
    src = np.asarray(frames, dtype=np.int64)
    out = stack.core.call(
        "migrate", {"src": src.astype("<i8").tobytes(), "dst": free.astype("<i8").tobytes()}
    )
    return list(arrays.results(out["results"]).tolist())


async def test_silent_and_lying_drivers_are_cut_off(hook_stack: Stack) -> None:
    stack = hook_stack

    async def silent(peer: Peer, call: Call) -> Any:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        peer, r = await _fake_driver(stack, silent, nursery)
        t = time.monotonic()
        res = await trio.to_thread.run_sync(_migrate_object, stack, r["obj"])
        assert all(x == -11 for x in res)  # timed out: -EAGAIN, put back unmoved
        assert time.monotonic() - t < 5
        vm = (await trio.to_thread.run_sync(stack.core.call, "stats"))["vmstat"]
        assert vm["gem_callback_timeouts"] >= 1
        await trio.to_thread.run_sync(_check, stack)

        # A driver that answers with a request id nobody asked for is disconnected.
        async def liar(peer: Peer, call: Call) -> Any:
            data = peer.conn.send(Reply(id=call.id, result={"results": [0] * 8}))
            bogus = data[:4] + msgpack.packb({"k": "reply", "id": 987654, "r": 0})[0:0] + data[4:]
            raw = msgpack.packb({"k": "reply", "id": 987654, "r": 0})
            await peer.stream.send_all(struct.pack(">I", len(raw)) + raw)
            del bogus
            await trio.sleep_forever()

        peer2, r2 = await _fake_driver(stack, liar, nursery)
        res = await trio.to_thread.run_sync(_migrate_object, stack, r2["obj"])
        assert all(x != 0 for x in res)
        with trio.fail_after(5):
            await peer2.closed.wait()  # cut off with a protocol error
        await trio.to_thread.run_sync(_check, stack)
        # Everyone else carries on.
        r3 = await trio.to_thread.run_sync(stack.drv.call, "create", {"size": 1 << 16})
        await trio.to_thread.run_sync(
            stack.drv.call, "exec", {"objs": [r3["obj"]], "duration_ms": 0, "write": True}
        )
        nursery.cancel_scope.cancel()
    del peer


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _bad_frames(path: str, n: int) -> dict[str, int]:
    """Send n bad frames of every kind; returns how each connection ended."""
    hello = msgpack.packb({"k": "hello", "v": 1, "role": "client", "name": "fuzz"})
    good_hello = struct.pack(">I", len(hello)) + hello
    kinds = [
        b"\x00\x00\x01",  # truncated header, then EOF
        b"\x00\x00\x00\x10abc",  # truncated body, then EOF
        b"\xff\xff\xff\xff",  # oversized length
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        struct.pack(">I", 2) + msgpack.packb([1]),  # not a map
        struct.pack(">I", 9) + msgpack.packb({"k": "call", "id": "x"}),  # wrong types
        good_hello + struct.pack(">I", 6) + msgpack.packb({"k": 5}),  # unknown kind
        (lambda c: struct.pack(">I", len(c)) + c)(
            msgpack.packb({"k": "call", "id": 1, "op": "frobnicate", "a": {}})
        ),  # handshake skipped
        good_hello + good_hello,  # handshake repeated
    ]
    ends: dict[str, int] = {}
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        s.sendall(kinds[i % len(kinds)])
        s.shutdown(socket.SHUT_WR)
        try:
            got = s.recv(65536)
            key = "answered" if got else "closed"
        except OSError:
            key = "reset"
        ends[key] = ends.get(key, 0) + 1
        s.close()
    return ends


def test_bad_frames_leak_nothing(hook_stack: Stack) -> None:
    stack = hook_stack
    pid = stack.core.call("stats")["pid"]
    _bad_frames(str(stack.control), 200)  # warm up allocator caches
    time.sleep(0.3)  # let the server finish closing the warm-up connections
    fds0, rss0 = _proc_fds(pid), _rss_kib(pid)
    n = int(os.environ.get("GEMFS_BAD_FRAMES", "3000"))
    ends = _bad_frames(str(stack.control), n)
    time.sleep(0.3)
    fds1, rss1 = _proc_fds(pid), _rss_kib(pid)
    print(f"bad frames: {n}, ends {ends}, fds {fds0} -> {fds1}, rss {rss0} -> {rss1} KiB")
    assert fds1 <= fds0
    assert rss1 - rss0 < 8 * 1024
    stats = stack.core.call("stats")
    assert stats["server"]["protocol_errors"] >= n * 0.7
    # Unknown ops on a good connection are an error answer, not a disconnect.
    with pytest.raises(CallError) as e:
        stack.core.call("frobnicate")
    assert e.value.errno == "EOPNOTSUPP"
    assert stack.core.call("check")["ok"]


def _connect_as(uid: int, path: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import os, sys\n"
        "from gemfs.control.client import SyncClient\n"
        "from gemfs.control.peer import CallError\n"
        f"os.setgid({uid}); os.setuid({uid})\n"
        "try:\n"
        f"    SyncClient({path!r}).call('stats')\n"
        "    print('CONNECTED')\n"
        "except CallError as e:\n"
        "    print('REFUSED', e.errno)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_other_uids_are_refused() -> None:
    with Stack("16MiB", Design.SHMEM_HOOK) as stack:
        assert stack.control.stat().st_mode & 0o777 == 0o600
        r = _connect_as(65534, str(stack.control))
        assert "REFUSED ECONNREFUSED" in r.stdout, r.stdout + r.stderr
    with Stack("16MiB", Design.SHMEM_HOOK, allow_uids=[65534]) as stack:
        assert stack.control.stat().st_mode & 0o777 == 0o666
        os.chmod(stack.workdir, 0o755)
        assert _connect_as(65534, str(stack.control)).stdout.strip() == "CONNECTED"
        r = _connect_as(65533, str(stack.control))
        assert "REFUSED EACCES" in r.stdout, r.stdout + r.stderr


def test_sigterm_with_peers_and_io_in_flight(tmp_path: Path) -> None:
    mnt, ctl = tmp_path / "mnt", tmp_path / "ctl"
    mnt.mkdir()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gemfs_cli",
            "mount",
            str(mnt),
            "--foreground",
            "--pool",
            "64MiB",
            "--control",
            str(ctl),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not (os.path.ismount(mnt) and ctl.exists()):
            assert server.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        drv = subprocess.Popen(
            [sys.executable, "-m", "gemfs_cli", "driver", "--control", str(ctl)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        writer = subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={mnt / 'big'}", "bs=1M", "count=48"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with SyncClient(str(ctl)) as c:
            assert len(c.call("stats")["peers"]) >= 1
            time.sleep(0.2)
            t = time.monotonic()
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=15)
        assert server.returncode == 0, out.decode()
        assert time.monotonic() - t < 10
        assert not os.path.ismount(mnt)
        drv.communicate(timeout=10)
        assert drv.returncode == 0  # the driver saw a clean disconnect and exited
        writer.wait(10)
    finally:
        for p in (server,):
            if p.poll() is None:
                p.kill()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


async def test_malformed_compactor_state_and_kcompactd_args_are_refused(hook_stack: Stack) -> None:
    """The compactor's new arguments: a bad compact_state, kcompactd_work order or alloc kind
    is EINVAL with one line; the zone's state is untouched and the core keeps serving."""
    stack = hook_stack
    _fragment(stack, 20)
    core = await connect(str(stack.control), "compactor", "bad-kcompactd")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.serve)
        snap = await core.call("snapshot", {})
        state = snap["compact_state"]
        n = len(snap["pageblock_mt"])
        assert len(state["skip"]) == (n + 7) // 8
        for bad in ({"skip": b"\xff"}, {**state, "skip": b"\xff" * (len(state["skip"]) + 1)},
                    {**state, "cached_free_block": "top"}, "not a map"):  # fmt: skip
            with pytest.raises(CallError) as e:
                await core.call("report", {"counters": {}, "compact_state": bad})
            assert e.value.errno == "EINVAL", bad
        for order in (11, "9", -5):
            with pytest.raises(CallError) as e:
                await core.call("kcompactd_work", {"order": order})
            assert e.value.errno == "EINVAL", order
        r = await core.call("kcompactd_work", {})  # nothing pending: no order work
        assert r == {"worked": False, "result": None}
        assert (await core.call("snapshot", {}))["compact_state"] == state  # untouched
        nursery.cancel_scope.cancel()
    with pytest.raises(CallError) as e:
        await trio.to_thread.run_sync(
            stack.core.call, "alloc", {"order": 9, "mt": "movable", "compact": True, "kind": "x"}
        )
    assert e.value.errno == "EINVAL"
    assert "unknown allocation kind" in str(e.value)
    # kswapd's sleep after a reclaim: nothing to flush (no direct compaction met its scanner)
    r = await trio.to_thread.run_sync(stack.core.call, "kswapd", {})
    assert r == {"flushed": False}
    await trio.to_thread.run_sync(_check, stack)


def test_malformed_frame_loop_args_are_refused(hook_stack: Stack) -> None:
    """exec's frame-loop arguments: a negative or non-number keep_ms/interval_ms, or one
    without the other, is EINVAL with one line; no batch runs, the driver keeps serving."""
    stack = hook_stack
    r = stack.drv.call("create", {"size": 1 << 20})
    before = stack.drv.call("stats")["batches"]
    for bad in ({"keep_ms": -1, "interval_ms": 16}, {"keep_ms": 100}, {"interval_ms": 16},
                {"keep_ms": "1s", "interval_ms": 16}, {"keep_ms": 100, "interval_ms": [1]},
                {"keep_ms": 1e12, "interval_ms": 16}):  # fmt: skip
        with pytest.raises(CallError) as e:
            stack.drv.call("exec", {"objs": [r["obj"]], "duration_ms": 40, **bad})
        assert e.value.errno == "EINVAL", bad
    assert stack.drv.call("stats")["batches"] == before
    ok = {"objs": [r["obj"]], "duration_ms": 40, "keep_ms": 100, "interval_ms": 16.7}
    assert stack.drv.call("exec", ok)["data_errors"] == 0
    assert stack.drv.call("stats")["batches"] == before + 1
    _check(stack)
