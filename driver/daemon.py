"""`gemfs driver`: i915 as its own process, talking to the core over the control socket.

It maps the pool's memfd (received with the handshake) so its simulated GPU reads and writes the
very frames the mount serves, pins objects through the core while they are bound, and answers
the core's migrate / invalidate callbacks. Clients (Mesa's part) talk to it on ``--listen``.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import socket
import zlib
from typing import Any

import numpy as np
import trio
import trio.lowlevel

from driver.gem import DriverObject, DriverPolicy, GemDriver
from gemfs.control.arrays import pack_i32
from gemfs.control.peer import CallError, Peer, connect, server_handshake
from gemfs.control.protocol import Call, Error, Hello, Notify, ProtocolError, errno_name
from gemfs.mm.pool import map_frames
from gemfs.mm.types import PAGE_SIZE, Design, MigrateMode

log = logging.getLogger("gemfs.driver")
# How long binding waits for pages the core is migrating (callbacks may wait for other GPUs).
BIND_PATIENCE_S = 20.0


def _err(code: int, message: str) -> CallError:
    return CallError(errno_name(code), message)


def _arr(v: object) -> np.ndarray:
    if isinstance(v, bytes) and len(v) % 8 == 0:
        return np.frombuffer(v, dtype="<i8").astype(np.int64)
    if isinstance(v, list):
        return np.asarray(v, dtype=np.int64)
    raise _err(errno.EINVAL, "int64 array expected")


class DriverDaemon:
    def __init__(
        self,
        control: str,
        listen: str | None,
        name: str = "i915",
        migratetype: str | None = None,
        policy: DriverPolicy = DriverPolicy.WAIT_IDLE,
        display_on: bool = True,
    ) -> None:
        self.control = control
        self.policy = policy
        self.display_on = display_on
        self.migratetype = migratetype  # None: the design's (the core decides)
        self.listen = listen
        self.name = name
        self.core: Peer | None = None
        self.gem: GemDriver | None = None
        self.design = Design.PINNED
        self._map: mmap.mmap | None = None
        # Objects the core is moving: no batch until the "migrated" notice of that ask (token).
        self.migrating: dict[int, tuple[int, trio.Event]] = {}
        self._noticed: collections.deque[int] = collections.deque(maxlen=4096)
        # Fault injection for tests only: hold every answer to the core this long (wall clock),
        # so a test can kill the driver or time a callback out while the core waits for it.
        self.answer_delay_s = float(os.environ.get("GEMFS_DRIVER_ANSWER_DELAY_MS", "0")) / 1000
        self._counter = 0

    # -- start -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        core = await connect(
            self.control,
            "driver",
            self.name,
            on_call=self._on_core_call,
            on_notify=self._on_core_notify,
        )
        self.core = core
        if not core.fds:
            raise RuntimeError("the core did not pass the pool memfd")
        self.design = Design.parse(str(core.info["design"]))
        self._map, frames = map_frames(core.fds[0], int(core.info["nr_pages"]))
        self.gem = GemDriver(frames, policy=self.policy, display_on=self.display_on)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_core, nursery)
            if self.design is Design.GEMFS:
                await core.call("claim_mount", {})
            if self.listen:
                await nursery.start(self._serve_clients)
            task_status.started()

    async def _serve_core(self, nursery: trio.Nursery) -> None:
        assert self.core is not None
        await self.core.serve()
        log.warning("core connection closed: %s", self.core.close_reason)
        nursery.cancel_scope.cancel()

    async def _serve_clients(self, *, task_status: trio.TaskStatus[None]) -> None:
        assert self.listen is not None
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.listen):  # noqa: ASYNC240 - a stale socket, once at start
            os.unlink(self.listen)
        old = os.umask(0o177)
        try:
            await sock.bind(self.listen)
        finally:
            os.umask(old)
        sock.listen(16)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._client, conn)
        finally:
            sock.close()

    async def _client(self, sock: trio.socket.SocketType) -> None:
        def info(hello: Hello, creds: object) -> dict[str, Any] | Error:
            return {"design": self.design.value, "driver": self.name}

        try:
            conn, _hello, creds = await server_handshake(sock, info, lambda h: [])
        except (ProtocolError, CallError, trio.TooSlowError, OSError):
            sock.close()
            return
        peer = Peer(trio.SocketStream(sock), conn, on_call=self._on_client_call, creds=creds)
        await peer.serve()

    # -- client ioctls -------------------------------------------------------------------------
    def _obj(self, args: dict[str, Any]) -> DriverObject:
        assert self.gem is not None
        oid = args.get("obj")
        o = self.gem.objects.get(oid) if isinstance(oid, int) else None
        if o is None:
            raise _err(errno.ENOENT, f"no GEM object {oid!r}")
        return o

    async def _bind(self, o: DriverObject) -> None:
        assert self.core is not None
        assert self.gem is not None
        hold = self.migrating.get(o.id)
        while hold is not None:
            await hold[1].wait()
            hold = self.migrating.get(o.id)
        if self.gem.needs_bind(o):
            r = None
            with trio.move_on_after(BIND_PATIENCE_S):
                while r is None:
                    seen = o.invalidations
                    try:
                        r = await self.core.call(
                            "pin", {"obj": o.id, "start": 0, "count": o.nr_pages}
                        )
                    except CallError as e:
                        if e.errno != "EAGAIN":
                            raise
                        await trio.sleep(0.01)  # a page is mid-migration: let it land
                        continue
                    if o.invalidations != seen or o.id in self.migrating:
                        # An invalidation (or a migration) overtook this reply: its frames may
                        # be moving. Never apply it; pin again once the range has settled.
                        r = None
                        await trio.lowlevel.checkpoint()
            if r is None:
                raise _err(errno.EAGAIN, f"object {o.id} stays busy migrating")
            frames = np.frombuffer(r["frames"], dtype="<i8").astype(np.int64)
            self.gem.bind(o, frames)

    async def _ready(self, objs: list[DriverObject], *, clock: bool = False) -> float:
        """Bind every object and return only when none is mid-migration; with ``clock``, the
        modelled time once they are bound (a batch is submitted after its objects are bound,
        which may have cost time: re-faults), else 0.

        The caller must touch the GTT with no await in between: a migrate callback that starts
        later finds the batch already submitted (busy) and waits for it.
        """
        assert self.gem is not None
        assert self.core is not None
        while True:
            for o in objs:
                await self._bind(o)
            now = float((await self.core.call("clock", {}))["now"]) if clock else 0.0
            if all(o.id not in self.migrating and not self.gem.needs_bind(o) for o in objs):
                return now

    async def _changed(self, o: DriverObject) -> None:
        """The GPU wrote the object: the core drops the file's page cache for it."""
        assert self.core is not None
        await self.core.call("content_changed", {"obj": o.id, "start": 0, "count": o.nr_pages})

    async def _register(self, obj_id: int) -> None:
        assert self.core is not None
        if self.design is Design.SHMEM_HOOK:
            await self.core.call("register_ops", {"obj": obj_id})
        elif self.design is Design.NOTIFIER:
            await self.core.call("register_notifier", {"obj": obj_id})

    async def _on_client_call(self, peer: Peer, call: Call) -> Any:
        assert self.core is not None
        assert self.gem is not None
        gem, core, a = self.gem, self.core, call.args
        match call.op:
            case "create":
                size = a.get("size")
                if not isinstance(size, int) or size <= 0:
                    raise _err(errno.EINVAL, "size must be a positive integer")
                self._counter += 1
                path = (
                    a.get("path")
                    or f"gem-{self.name}-{peer.creds.pid if peer.creds else 0}-{self._counter}"
                )
                args: dict[str, Any] = {"path": path, "size": size}
                if self.migratetype:
                    args["mt"] = self.migratetype
                r = await core.call("create", args)
                n = int(r["pages"])
                o = gem.add_object(int(r["obj"]), n, zlib.crc32(bytes(n * PAGE_SIZE)))
                await self._register(o.id)
                return {"obj": o.id, "path": r["path"], "pages": n}
            case "open":
                r = await core.call("open", {"path": a.get("path")})
                o = gem.add_object(int(r["obj"]), int(r["pages"]), 0)
                await self._register(o.id)
                await self._bind(o)
                o.checksum = zlib.crc32(gem.frames[o.gtt].tobytes())
                return {"obj": o.id, "pages": o.nr_pages}
            case "exec":
                ids = a.get("objs")
                if not isinstance(ids, list) or not ids:
                    raise _err(errno.EINVAL, "objs must be a non-empty list")
                objs = [self._obj({"obj": i}) for i in ids]
                ms = a.get("duration_ms", 0)
                if not isinstance(ms, int | float) or ms < 0:
                    raise _err(errno.EINVAL, "duration_ms must be >= 0")
                write = bool(a.get("write", False))
                gen = a.get("generation")
                if gen is not None and (not isinstance(gen, int) or gen < 0):
                    raise _err(errno.EINVAL, "generation must be a non-negative integer")
                keep, every = a.get("keep_ms", 0), a.get("interval_ms", 0)
                if not all(isinstance(v, int | float) and 0 <= v < 3.6e9 for v in (keep, every)):
                    raise _err(errno.EINVAL, "keep_ms and interval_ms must be >= 0")
                if (keep > 0) != (every > 0):
                    raise _err(errno.EINVAL, "a frame loop needs keep_ms and interval_ms > 0")
                now = await self._ready(objs, clock=True)  # the modelled clock, once bound
                gem.execute(  # no await since _ready
                    objs, now, ms / 1000, write, gen, keep=keep / 1000, interval=every / 1000
                )
                if write:  # the core drops the files' page cache for them, in one call
                    await core.call("content_changed", {"objs": [o.id for o in objs]})
                return {
                    "data_errors": gem.stats.data_errors,
                    "checksums": {str(o.id): o.checksum for o in objs},
                }
            case "loop_tick":  # the frame loop's submissions so far re-fault what it lost
                now = float((await core.call("clock", {}))["now"])
                due = gem.loop_due(now)
                for o in due:
                    await self._bind(o)
                return {"refaulted": len(due)}
            case "wait":
                o = self._obj(a)
                await self._idle(o)
                return 0
            case "write":
                o = self._obj(a)
                data, off = a.get("data"), a.get("offset", 0)
                if not isinstance(data, bytes) or not isinstance(off, int) or off < 0:
                    raise _err(errno.EINVAL, "data (bytes) and offset (int) expected")
                if off + len(data) > o.nr_pages * PAGE_SIZE:
                    raise _err(errno.EFBIG, "write past the end of the object")
                await self._idle(o)
                await self._ready([o])
                gem.write_object(o, off, data)
                await self._changed(o)
                return len(data)
            case "read":
                o = self._obj(a)
                await self._idle(o)
                await self._ready([o])
                return gem.read_object(o)
            case "verify":
                bad = 0
                for o in list(gem.objects.values()):
                    await self._ready([o])
                    bad += 0 if gem.verify(o) else 1
                return {"bad_objects": bad, "data_errors": gem.stats.data_errors}
            case "close":  # at once: the model frees the frames without waiting for the GPU
                o = self._obj(a)
                gem.remove_object(o.id)
                await core.call("close", {"obj": o.id, "unlink": bool(a.get("unlink", True))})
                return 0
            case "stats":
                s = gem.stats
                return {
                    "design": self.design.value,
                    "objects": len(gem.objects),
                    "batches": s.batches,
                    "data_errors": s.data_errors,
                    "stall_ms": s.stall_s * 1000,
                    "migrate_calls": s.migrate_calls,
                    "migrate_pages": s.migrate_pages,
                    "migrate_eagain": s.migrate_eagain,
                    "invalidations": s.invalidations,
                    "refaults": s.refaults,
                }
            case _:
                raise _err(errno.EOPNOTSUPP, f"unknown op {call.op!r}")

    async def _idle(self, o: DriverObject) -> None:
        """The CPU waits for the object's batches: modelled time passes up to their end."""
        assert self.core is not None
        await self.core.call("advance", {"to": o.busy_until})

    # -- core callbacks: the migration mechanism's asks ----------------------------------------
    async def _on_core_call(self, peer: Peer, call: Call) -> Any:
        assert self.gem is not None
        a = call.args
        if self.answer_delay_s:  # fault injection (tests): a slow driver, on the wall clock
            await trio.sleep(self.answer_delay_s)
        try:
            mode = MigrateMode.parse(str(a.get("mode", "sync")))
        except ValueError as e:
            raise _err(errno.EINVAL, str(e)) from None
        now = a.get("now", 0.0)
        if not isinstance(now, int | float) or isinstance(now, bool):
            raise _err(errno.EINVAL, "now must be a number of seconds")
        match call.op:
            case "migrate":
                entries = a.get("objs")
                if not isinstance(entries, list):
                    raise _err(errno.EINVAL, "objs must be a list")
                token = a.get("token", 0)
                if not isinstance(token, int):
                    raise _err(errno.EINVAL, "token must be an integer")
                results, dropped, waited, lock = self._migrate_objects(
                    entries, mode, float(now), token
                )
                return {
                    "results": [pack_i32(r) for r in results],
                    "waited_s": waited,
                    "lock_s": lock,
                    "dropped": dropped,
                }
            case "invalidate":
                o = self.gem.objects.get(a.get("obj"))  # type: ignore[arg-type]
                if o is None:
                    return {"rc": 0, "waited_s": 0.0}
                wait = self.gem.migrate_wait(o, mode, float(now))
                if wait is None:  # a non-blocking invalidation of a busy range
                    return {"rc": -errno.EAGAIN, "waited_s": 0.0}
                start, count = a.get("start", 0), a.get("count", 0)
                if not isinstance(start, int) or not isinstance(count, int):
                    raise _err(errno.EINVAL, "start and count must be integers")
                self.gem.stats.stall_s += wait
                self.gem.invalidate(o, start, count, at=float(now) + wait)  # the core drops
                # our pins in the range
                return {"rc": 0, "waited_s": wait}
            case _:
                raise _err(errno.EOPNOTSUPP, f"unknown callback {call.op!r}")

    def _migrate_objects(
        self, entries: list[Any], mode: MigrateMode, now: float, token: int
    ) -> tuple[list[np.ndarray], list[bool], float, float]:
        """The migrate callback: per object the policy's decision (GemDriver.migrate_decide):
        0 (stop using it until the "migrated" notice; the pin passes to the core, or with the
        whole backing store dropped, goes), -EAGAIN or -EBUSY per page; objects that are not
        ours may move. The GPUs are waited for together: the answer says how long (modelled),
        and how long the callback spent on the driver's lock."""
        assert self.gem is not None
        st = self.gem.stats
        results: list[np.ndarray] = []
        dropped: list[bool] = []
        waited = lock = 0.0
        for e in entries:
            if not isinstance(e, dict):
                raise _err(errno.EINVAL, "each entry must be a map")
            n = len(_arr(e.get("idx")))
            o = self.gem.objects.get(e.get("obj"))  # type: ignore[arg-type]
            if o is None:
                results.append(np.zeros(n, dtype=np.int32))
                dropped.append(False)
                continue
            d = self.gem.migrate_decide(o, n, mode, now + lock)
            lock += d.lock_s
            results.append(np.full(n, d.rc, dtype=np.int32))
            dropped.append(d.drop)
            if d.rc != 0:
                continue
            waited = max(waited, d.wait_s)
            # No batches on it until this ask's "migrated" notice (unless it came already:
            # the core gave up waiting for this answer and has settled the pages).
            if token not in self._noticed:
                self.migrating[o.id] = (token, trio.Event())
        st.stall_s += waited
        return results, dropped, waited, lock

    async def _on_core_notify(self, peer: Peer, note: Notify) -> None:
        if note.op != "migrated" or self.gem is None:
            return
        token = note.args.get("token", 0)
        if isinstance(token, int):
            self._noticed.append(token)
        entries = note.args.get("objs")
        for a in entries if isinstance(entries, list) else []:
            if isinstance(a, dict):
                self._migrated(a, token if isinstance(token, int) else 0)

    def _migrated(self, a: dict[str, Any], token: int) -> None:
        assert self.gem is not None
        o = self.gem.objects.get(a.get("obj"))  # type: ignore[arg-type]
        if o is not None:
            idx, dst = _arr(a.get("idx")), _arr(a.get("dst"))
            raw = a.get("ok", b"")
            ok = (
                np.frombuffer(raw, dtype=np.uint8).astype(np.bool_)
                if isinstance(raw, bytes)
                else np.asarray(raw, dtype=np.bool_)
            )
            if len(ok) == len(idx) == len(dst):
                self.gem.migrate_commit(o, idx[ok], dst[ok])
        oid = a.get("obj", 0)
        hold = self.migrating.get(oid) if isinstance(oid, int) else None
        if hold is not None and hold[0] == token:  # only this ask's hold: never a newer one
            del self.migrating[oid]
            hold[1].set()


async def run_driver(
    control: str,
    listen: str | None,
    name: str = "i915",
    migratetype: str | None = None,
    policy: DriverPolicy = DriverPolicy.WAIT_IDLE,
    display_on: bool = True,
) -> None:
    d = DriverDaemon(control, listen, name, migratetype, policy, display_on)
    await d.run()
