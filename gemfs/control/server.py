"""The core's side of the control socket (trio): peers, ownership, pins, remote callbacks.

Drivers, compactors and clients connect here. A driver owns the objects it created or opened,
pins their pages through the core, and registers address-space operations whose callbacks the
core sends back over the same connection. Migration with remote owners runs the model's
mechanism in phases (:meth:`MemoryManager.migrate_begin` ... ``migrate_end``) around the awaited
callbacks, so the event loop (and the FUSE mount) keeps serving while a driver waits for its GPU.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import trio

from gemfs.control import arrays
from gemfs.control.arrays import pack_i32, pack_i64
from gemfs.control.peer import CallError, Credentials, Peer, server_handshake
from gemfs.control.protocol import Call, Error, Hello, Notify, ProtocolError, errno_name
from gemfs.mm import CompactionPolicy, CompactResult, GemObject, MemoryManager, MigrateMode
from gemfs.mm.core import MigrateOutcome, MigrationBatch, MigrationRequest
from gemfs.mm.ops import SHMEM_OPS, MigrationCore, Results
from gemfs.mm.page_alloc import alloc_pages_slowpath
from gemfs.mm.pool import I64, Bools
from gemfs.mm.types import MAX_ORDER, Design, MigrateType, OutOfMemory
from gemfs.mm.vmstat import VMSTAT_COUNTERS

log = logging.getLogger("gemfs.control")
# What a compactor process may add to the pool's vmstat (its own scanning and wake-ups).
COMPACTOR_COUNTERS = frozenset(
    k for k in VMSTAT_COUNTERS if k.startswith(("compact_", "proactive_compact"))
)
EAGAIN = errno.EAGAIN


class KernelLike(Protocol):
    """What the control server needs from the mount (gemfs.daemon.Kernel provides it)."""

    mm: MemoryManager

    def create_file(self, path: str, size: int, uid: int, gid: int, mode: int) -> GemObject: ...

    def resolve(self, path: str) -> GemObject: ...

    def may_write(self, path: str, uid: int, gid: int) -> bool: ...

    def path_of(self, obj: GemObject) -> str: ...

    def unlink(self, path: str) -> None: ...

    async def invalidate(self, obj: GemObject, first_page: int, count: int) -> None: ...


def _err(code: int, message: str) -> CallError:
    return CallError(errno_name(code), message)


def _int(args: dict[str, Any], key: str, lo: int = 0, hi: int = 2**62) -> int:
    v = args.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _err(errno.EINVAL, f"argument {key!r} must be an integer in {lo}..{hi}")
    return v


def _str(args: dict[str, Any], key: str) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not v or len(v) > 4096:
        raise _err(errno.EINVAL, f"argument {key!r} must be a non-empty string")
    return v


def _pfns(args: dict[str, Any], key: str, limit: int) -> I64:
    v = args.get(key)
    if isinstance(v, bytes):
        if len(v) % 8:
            raise _err(errno.EINVAL, f"argument {key!r}: int64 array bytes expected")
        a = np.frombuffer(v, dtype="<i8").astype(np.int64)
    elif isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        a = np.asarray(v, dtype=np.int64)
    else:
        raise _err(errno.EINVAL, f"argument {key!r} must be a list of integers")
    if len(a) > limit:
        raise _err(errno.E2BIG, f"argument {key!r}: at most {limit} entries")
    return a


def _mode(args: dict[str, Any]) -> MigrateMode:
    try:
        return MigrateMode.parse(str(args.get("mode", "sync")))
    except ValueError as e:
        raise _err(errno.EINVAL, str(e)) from None


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a dead server is removed; anything else at the path is an error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    os.unlink(path)


class RemoteOps:
    """Address-space ops whose callbacks go to a driver over its connection.

    Called synchronously (the model's own in-process path, e.g. a direct compaction inside an
    allocation) it cannot reach the driver, so it answers -EAGAIN: the page stays where it is.
    """

    def __init__(self, state: PeerState) -> None:
        self.state = state
        self.name = f"remote:{state.peer.name}"

    def isolate(self, core: MigrationCore, obj: GemObject, idx: I64) -> Bools:
        return np.ones(len(idx), dtype=np.bool_)

    def migrate(
        self, core: MigrationCore, obj: GemObject, idx: I64, src: I64, dst: I64, mode: MigrateMode
    ) -> Results:
        return np.full(len(idx), -EAGAIN, dtype=np.int32)

    def putback(self, core: MigrationCore, obj: GemObject, idx: I64) -> None:
        return None


class RemoteNotifier:
    def __init__(self, state: PeerState) -> None:
        self.state = state

    def invalidate(self, core: MigrationCore, obj: GemObject, start: int, count: int) -> int:
        return -EAGAIN


@dataclass(eq=False)
class PeerState:
    peer: Peer
    creds: Credentials
    owned: set[int] = field(default_factory=set)
    pins: dict[int, np.ndarray] = field(default_factory=dict)  # obj id -> bool per page index
    kernel_allocs: set[int] = field(default_factory=set)
    ops: RemoteOps | None = None
    notifier: RemoteNotifier | None = None

    def __post_init__(self) -> None:
        self.ops = RemoteOps(self)
        self.notifier = RemoteNotifier(self)


class ControlServer:
    def __init__(
        self,
        kernel: KernelLike,
        path: str,
        *,
        allow_uids: Iterable[int] = (),
        callback_timeout: float = 2.0,
    ) -> None:
        self.kernel = kernel
        self.mm = kernel.mm
        self.path = path
        self.allow_uids = set(allow_uids)
        self.callback_timeout = callback_timeout
        self.peers: dict[int, PeerState] = {}
        self.migrate_lock = trio.Lock()
        self.stats = {"connections": 0, "refused": 0, "protocol_errors": 0, "callbacks": 0}
        self._listener: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None

    # -- listening ----------------------------------------------------------------------------
    async def serve(
        self, *, task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(self.path)
            old = os.umask(0o177)
            try:
                await sock.bind(self.path)
            finally:
                os.umask(old)
            mode = 0o666 if self.allow_uids else 0o600
            os.chmod(self.path, mode)
            sock.listen(64)
            self._listener = sock
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._handle, conn)
        finally:
            sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _welcome(self, hello: Hello, creds: Credentials) -> dict[str, Any] | Error:
        if creds.uid not in (0, os.getuid()) and creds.uid not in self.allow_uids:
            self.stats["refused"] += 1
            return Error(id=0, errno="EACCES", message=f"uid {creds.uid} may not connect")
        pool = self.mm.pool
        return {
            "design": self.mm.design.value,
            "nr_pages": pool.nr_pages,
            "page_size": 4096,
            "memfd": hello.role == "driver",
        }

    def _fds(self, hello: Hello) -> list[int]:
        return [self.mm.pool.fd] if hello.role == "driver" else []

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        try:
            conn, _hello, creds = await server_handshake(sock, self._welcome, self._fds)
        except (ProtocolError, CallError, trio.TooSlowError, OSError) as e:
            log.info("handshake failed: %s", e)
            if isinstance(e, ProtocolError):
                self.stats["protocol_errors"] += 1
            sock.close()
            return
        self.stats["connections"] += 1
        peer = Peer(trio.SocketStream(sock), conn, on_call=self._on_call, creds=creds)
        peer.on_notify = self._on_notify
        state = PeerState(peer, creds)
        self.peers[id(peer)] = state
        log.info("connected: %r", peer)
        try:
            await peer.serve()
        finally:
            if peer.close_reason.startswith("protocol error"):
                self.stats["protocol_errors"] += 1
            self._disconnect(state)
            log.info("disconnected: %r (%s)", peer, peer.close_reason)

    def _disconnect(self, state: PeerState) -> None:
        """A peer left (or died): release its pins and ops; its objects stay as plain files."""
        self.peers.pop(id(state.peer), None)
        mm = self.mm
        for oid, held in state.pins.items():
            obj = mm.objects.get(oid)  # type: ignore[call-overload]
            if obj is None:
                continue
            idx = np.flatnonzero(held[: len(obj.pages)])
            pfns = obj.pages[idx]
            pfns = pfns[pfns >= 0]
            if len(pfns):
                mm.unpin_pages(pfns)
        state.pins.clear()
        for oid in state.owned:
            obj = mm.objects.get(oid)  # type: ignore[call-overload]
            if obj is None:
                continue
            if obj.ops is state.ops:
                obj.ops = None
            if obj.notifier is state.notifier:
                obj.notifier = None
            obj.owner_tag = ""
        if mm.mount_ops is state.ops:
            mm.mount_ops = None
        for pfn in state.kernel_allocs:
            if pfn in mm.kernel_pages:
                mm.free_kernel(pfn)
        state.kernel_allocs.clear()

    async def _on_notify(self, peer: Peer, note: Notify) -> None:
        log.debug("%r: notify %s ignored", peer, note.op)

    # -- ownership ------------------------------------------------------------------------------
    def _state(self, peer: Peer) -> PeerState:
        return self.peers[id(peer)]

    def _owned(self, state: PeerState, args: dict[str, Any]) -> GemObject:
        oid = _int(args, "obj", 1)
        obj: GemObject | None = self.mm.objects.get(oid)  # type: ignore[call-overload]
        if obj is None:
            raise _err(errno.ENOENT, f"no object {oid}")
        if oid not in state.owned:
            raise _err(errno.EPERM, f"object {oid} is not yours")
        return obj

    def _any(self, args: dict[str, Any]) -> GemObject:
        oid = _int(args, "obj", 1)
        obj: GemObject | None = self.mm.objects.get(oid)  # type: ignore[call-overload]
        if obj is None:
            raise _err(errno.ENOENT, f"no object {oid}")
        return obj

    def _range(self, obj: GemObject, args: dict[str, Any]) -> tuple[int, int]:
        start = _int(args, "start", 0, obj.nr_pages)
        count = _int(args, "count", 0, obj.nr_pages - start)
        return start, count

    def _pins_of(self, state: PeerState, obj: GemObject) -> np.ndarray:
        held = state.pins.get(obj.id)
        n = max(obj.nr_pages, len(obj.pages))
        if held is None or len(held) < n:
            grown = np.zeros(n, dtype=np.bool_)
            if held is not None:
                grown[: len(held)] = held
            held = state.pins[obj.id] = grown
        return held

    # -- calls ----------------------------------------------------------------------------------
    async def _on_call(self, peer: Peer, call: Call) -> Any:
        state = self._state(peer)
        args = call.args
        mm = self.mm
        role = peer.role
        match call.op:
            case "create" if role in ("driver", "client"):
                path, size = _str(args, "path"), _int(args, "size", 0, mm.pool.size)
                c = state.creds
                mt: MigrateType | None = None
                if "mt" in args:
                    try:
                        mt = MigrateType.parse(str(args["mt"]))
                    except ValueError as e:
                        raise _err(errno.EINVAL, str(e)) from None
                try:
                    obj = self.kernel.create_file(path, 0 if mt else size, c.uid, c.gid, 0o644)
                    if mt is not None:  # e.g. a page-cache file that is not GEM memory
                        obj.migratetype = mt
                        mm.truncate(obj, size)
                        mm.populate(obj, 0, obj.nr_pages)
                except OutOfMemory as e:
                    raise _err(errno.ENOSPC, str(e)) from None
                except OSError as e:
                    raise _err(e.errno or errno.EIO, str(e)) from None
                state.owned.add(obj.id)
                obj.owner_tag = peer.name
                return {"obj": obj.id, "path": self.kernel.path_of(obj), "pages": obj.nr_pages}
            case "open" if role in ("driver", "client"):
                path = _str(args, "path")
                try:
                    obj = self.kernel.resolve(path)
                except OSError as e:
                    raise _err(e.errno or errno.ENOENT, str(e)) from None
                c = state.creds
                if not self.kernel.may_write(path, c.uid, c.gid):
                    raise _err(errno.EPERM, f"{path}: no write permission")
                state.owned.add(obj.id)
                obj.owner_tag = peer.name
                return {"obj": obj.id, "pages": obj.nr_pages, "size": obj.size}
            case "close":
                obj = self._owned(state, args)
                self._release_object(state, obj)
                if args.get("unlink"):
                    try:
                        self.kernel.unlink(self.kernel.path_of(obj))
                    except OSError as e:
                        raise _err(e.errno or errno.EIO, str(e)) from None
                return 0
            case "pin":
                obj = self._owned(state, args)
                start, count = self._range(obj, args)
                if np.any(mm.pool.flags[obj.pages[obj.pages >= 0]] & 0x08):
                    # A page of this object is mid-migration; pinning now would race it.
                    raise _err(errno.EAGAIN, "object is being migrated")
                try:
                    pfns = mm.populate(obj, start, count)
                except OutOfMemory as e:
                    raise _err(errno.ENOSPC, str(e)) from None
                held = self._pins_of(state, obj)
                new = ~held[start : start + count]
                mm.pin_pages(pfns[new])
                held[start : start + count] = True
                return {"frames": pfns.astype("<i8").tobytes()}
            case "unpin":
                obj = self._owned(state, args)
                start, count = self._range(obj, args)
                held = self._pins_of(state, obj)
                seg = held[start : start + count]
                pfns = obj.pages[start : start + count][seg]
                mm.unpin_pages(pfns[pfns >= 0])
                seg[:] = False
                return 0
            case "register_ops" if role == "driver":
                obj = self._owned(state, args)
                self._require(Design.SHMEM_HOOK, "per-object ops")
                obj.ops = state.ops
                return 0
            case "claim_mount" if role == "driver":
                self._require(Design.GEMFS, "claiming the mount")
                if mm.mount_ops is not None and mm.mount_ops is not state.ops:
                    raise _err(errno.EBUSY, "another driver has claimed the mount")
                mm.mount_ops = state.ops
                return 0
            case "register_notifier" if role == "driver":
                obj = self._owned(state, args)
                self._require(Design.NOTIFIER, "notifiers")
                obj.notifier = state.notifier
                return 0
            case "content_changed":
                obj = self._owned(state, args)
                start, count = self._range(obj, args)
                await self.kernel.invalidate(obj, start, count)
                return 0
            case "snapshot":
                pool = mm.pool
                return {
                    "nr_pages": pool.nr_pages,
                    "flags": pool.flags.tobytes(),
                    "pageblock_mt": pool.pageblock_mt.tobytes(),
                    "free": mm.free_blocks_per_order(),
                }
            case "migrate" if role in ("compactor", "client"):
                src = _pfns(args, "src", 1 << 16)
                dst = _pfns(args, "dst", 1 << 16)
                if len(src) != len(dst):
                    raise _err(errno.EINVAL, "src and dst differ in length")
                out = await self.migrate_pages(src, dst, _mode(args))
                return {"results": pack_i32(out.results), "free": mm.free_blocks_per_order()}
            case "compact" if role in ("compactor", "client"):
                order = _int(args, "order", 0, MAX_ORDER) if args.get("order", -1) != -1 else -1
                result = await self.compact(order, _mode(args))
                return {"result": result.value, "free": mm.free_blocks_per_order()}
            case "stats":
                return self.stats_dict()
            case "fragmentation":  # cheap: what kcompactd looks at on every wake-up
                return {
                    "free": mm.free_blocks_per_order(),
                    "score": mm.fragmentation_score(),
                    "proactiveness": mm.compaction_proactiveness,
                }
            case "frames":
                obj = self._owned(state, args) if role != "client" else self._any(args)
                return obj.pages.tolist()
            case "check":
                try:
                    async with self.migrate_lock:  # invariants hold between batches
                        mm.check()
                except AssertionError as e:
                    return {"ok": False, "error": str(e)}
                return {"ok": True, "error": ""}
            case "report" if role == "compactor":
                counters = args.get("counters")
                if not isinstance(counters, dict):
                    raise _err(errno.EINVAL, "counters must be a map")
                for k, v in counters.items():
                    if k in COMPACTOR_COUNTERS and isinstance(v, int):
                        mm.vmstat.inc(k, max(0, v))
                return 0
            case "alloc" if role == "client":
                order = _int(args, "order", 0, MAX_ORDER)
                try:
                    mt = MigrateType.parse(str(args.get("mt", "unmovable")))
                except ValueError as e:
                    raise _err(errno.EINVAL, str(e)) from None
                if args.get("compact"):
                    pfn = await self.alloc_high_order(order, mt)
                else:
                    try:
                        pfn = mm.alloc_kernel(order, mt)
                    except OutOfMemory:
                        pfn = None
                if pfn is None:
                    raise _err(errno.ENOMEM, f"no free block of order {order}")
                state.kernel_allocs.add(pfn)
                return {"pfn": pfn}
            case "free" if role == "client":
                pfn = _int(args, "pfn", 0, mm.pool.nr_pages)
                if pfn not in state.kernel_allocs:
                    raise _err(errno.EPERM, f"block {pfn} is not yours")
                state.kernel_allocs.discard(pfn)
                mm.free_kernel(pfn)
                return 0
            case _:
                raise _err(errno.EOPNOTSUPP, f"op {call.op!r} not supported for role {role}")

    def _require(self, design: Design, what: str) -> None:
        if self.mm.design is not design:
            raise _err(
                errno.EOPNOTSUPP, f"{what} needs design {design.value}, mount has {self.mm.design}"
            )

    def _release_object(self, state: PeerState, obj: GemObject) -> None:
        held = state.pins.pop(obj.id, None)
        if held is not None:
            idx = np.flatnonzero(held[: len(obj.pages)])
            pfns = obj.pages[idx]
            pfns = pfns[pfns >= 0]
            if len(pfns):
                self.mm.unpin_pages(pfns)
        if obj.ops is state.ops:
            obj.ops = None
        if obj.notifier is state.notifier:
            obj.notifier = None
        state.owned.discard(obj.id)

    def stats_dict(self) -> dict[str, Any]:
        mm = self.mm
        return {
            "design": mm.design.value,
            "pid": os.getpid(),
            "server": dict(self.stats),
            "nr_pages": mm.pool.nr_pages,
            "free": mm.free_blocks_per_order(),
            "free_pages": mm.buddy.free_pages,
            "score": mm.fragmentation_score(),
            "vmstat": dict(mm.refresh_gauges()),
            "pageblocks": mm.pageblocks_per_type(),
            "mixed_pageblocks": mm.mixed_pageblocks(),
            "pageblock_states": mm.pageblock_states().tobytes(),
            "pageblock_mt": mm.pool.pageblock_mt.tobytes(),
            "callback_latency_us": mm.callback_latency_us[-10000:],
            "peers": [
                {"role": s.peer.role, "name": s.peer.name, "pid": s.creds.pid}
                for s in self.peers.values()
            ],
        }

    # -- migration with remote owners ------------------------------------------------------------
    async def migrate_pages(self, src: I64, dst: I64, mode: MigrateMode) -> MigrateOutcome:
        """One batch, run to its end even if the caller goes away (a killed compactor must not
        leave pages isolated or targets taken); every callback in it is time-boxed."""
        async with self.migrate_lock:
            with trio.CancelScope(shield=True):
                batch = self.mm.migrate_begin(src, dst, mode)
                # Each object's share goes to its owner at the same time (they are disjoint),
                # so a batch costs about one callback round trip, not one per object.
                groups: dict[int, list[MigrationRequest]] = {}
                async with trio.open_nursery() as nursery:
                    for req in batch.requests:
                        ops = self.mm.ops_for(req.obj)
                        if isinstance(ops, RemoteOps) and req.obj.notifier is None:
                            groups.setdefault(id(ops.state), []).append(req)
                        else:
                            nursery.start_soon(self._run_one, batch, req, mode)
                    for reqs in groups.values():  # one call per driver for all its objects
                        nursery.start_soon(self._run_group_safely, batch, reqs, mode)
                return self.mm.migrate_end(batch)
        raise AssertionError("unreachable")  # pragma: no cover - a shielded scope returns

    async def _run_one(
        self, batch: MigrationBatch, req: MigrationRequest, mode: MigrateMode
    ) -> None:
        try:
            res = await self._run_request(batch, req, mode)
        except Exception:
            log.exception("migration of object %d failed", req.obj.id)
            res = self._abort_request(req)
        self.mm.migrate_finish_request(batch, req, res)

    async def _run_group_safely(
        self, batch: MigrationBatch, reqs: list[MigrationRequest], mode: MigrateMode
    ) -> None:
        try:
            results = await self._run_group(reqs, mode)
        except Exception:
            log.exception("migration of objects %s failed", [r.obj.id for r in reqs])
            results = [self._abort_request(r) for r in reqs]
        for req, res in zip(reqs, results, strict=True):
            self.mm.migrate_finish_request(batch, req, res)

    def _abort_request(self, req: MigrationRequest) -> Results:
        """Something broke mid-request: every page that did not reach its target goes back."""
        mm = self.mm
        isolated = (mm.pool.flags[req.src] & 0x08) != 0
        out = np.full(int(np.count_nonzero(isolated)), -errno.EIO, dtype=np.int32)
        mm.vmstat.inc("pgmigrate_aborted", len(out))
        return mm.settle_request(req, isolated, out, None)

    async def _run_request(
        self, batch: MigrationBatch, req: MigrationRequest, mode: MigrateMode
    ) -> Results:
        mm = self.mm
        part, live = mm.narrow_request(req)  # earlier requests may have awaited: look again
        if part is not req:
            res = np.full(len(req.src), -errno.EBUSY, dtype=np.int32)
            if len(part.src):
                res[live] = await self._run_request(batch, part, mode)
            return res
        obj = req.obj
        if isinstance(obj.notifier, RemoteNotifier):
            return await self._run_notifier(req, obj.notifier.state)
        ops = mm.ops_for(obj)
        if not isinstance(ops, RemoteOps):
            return mm.migrate_request_local(req, mode)
        return (await self._run_group([req], mode))[0]

    async def _run_group(self, reqs: list[MigrationRequest], mode: MigrateMode) -> list[Results]:
        """One driver's share of a batch: one ``migrate`` call for all its objects, then the
        moves it consented to, then one ``migrated`` notice. Results per request."""
        mm = self.mm
        ops = mm.ops_for(reqs[0].obj)
        assert isinstance(ops, RemoteOps)
        state = ops.state
        entries = []  # (request, live part, live mask, isolated mask of the part)
        for req in reqs:
            part, live = mm.narrow_request(req)
            isolated = mm.isolate_request(part, ops) if len(part.src) else live[:0]
            entries.append((req, part, live, isolated))
        sent = [(e, np.flatnonzero(e[3])) for e in entries if np.any(e[3])]
        answers: list[Results] = [np.full(len(ii), -EAGAIN, dtype=np.int32) for _e, ii in sent]
        npages = sum(len(ii) for _e, ii in sent)
        if sent:
            t0 = time.perf_counter()
            mm.vmstat.inc("gem_migrate_callbacks")
            mm.vmstat.inc("gem_migrate_callback_pages", npages)
            try:
                answer = await state.peer.call(
                    "migrate",
                    {
                        "objs": [
                            {
                                "obj": e[1].obj.id,
                                "idx": pack_i64(e[1].idx[ii]),
                                "src": pack_i64(e[1].src[ii]),
                                "dst": pack_i64(e[1].dst[ii]),
                            }
                            for e, ii in sent
                        ],
                        "mode": mode.name.lower(),
                    },
                    answer_within=self.callback_timeout,
                )
                got = answer.get("results") if isinstance(answer, dict) else None
                if not isinstance(got, list) or len(got) != len(sent):
                    raise CallError("EPROTO", "migrate answer has the wrong shape")
                parsed = [arrays.results(g) for g in got]
                if any(len(a) != len(ii) for a, (_e, ii) in zip(parsed, sent, strict=True)):
                    raise CallError("EPROTO", "migrate answer has the wrong shape")
                answers = parsed
            except CallError as e:
                if e.errno == "ETIMEDOUT":
                    mm.vmstat.inc("gem_callback_timeouts")
                elif e.errno in ("ENOTCONN", "EPROTO"):
                    mm.vmstat.inc("pgmigrate_aborted", npages)
                if e.errno == "EPROTO":
                    await state.peer.aclose()
            except ValueError:  # results that are not int32 bytes or ints
                await state.peer.aclose()
            us = (time.perf_counter() - t0) * 1e6
            mm.callback_latency_us.append(us)
            mm.vmstat.inc("gem_migrate_callback_us_total", int(us))
            self.stats["callbacks"] += 1
        outs = {id(e[0]): a for (e, _ii), a in zip(sent, answers, strict=True)}
        results: list[Results] = []
        notices = []
        for req, part, live, isolated in entries:
            ii = np.flatnonzero(isolated)
            out = outs.get(id(req), np.full(len(ii), -EAGAIN, dtype=np.int32))
            res_part = self._consent(state, part, isolated, ii, out) if len(part.src) else out
            res = np.full(len(req.src), -errno.EBUSY, dtype=np.int32)
            res[live] = res_part
            results.append(res)
            if len(ii):
                notices.append(
                    {
                        "obj": part.obj.id,
                        "idx": pack_i64(part.idx[ii]),
                        "dst": pack_i64(part.dst[ii]),
                        "ok": (res_part[ii] == 0).astype(np.uint8).tobytes(),
                    }
                )
        if notices and id(state.peer) in self.peers:  # always release the driver's objects
            try:
                await state.peer.notify("migrated", {"objs": notices})
            except CallError:
                pass
        return results

    def _consent(
        self,
        state: PeerState,
        req: MigrationRequest,
        isolated: Bools,
        ii: I64,
        out: Results,
    ) -> Results:
        """The driver consented where out == 0: it stopped using those pages. Move them now,
        carrying its pin from the old frame to the new one; put back the rest."""
        mm = self.mm
        obj = req.obj
        idx, src, dst = req.idx[ii], req.src[ii], req.dst[ii]
        out = out.copy()
        alive = mm.objects.get(obj.id) is obj and id(state.peer) in self.peers
        consent = (out == 0) & alive
        if alive:
            # A page truncated or moved while we waited for the answer does not move.
            inside = idx < len(obj.pages)
            still = np.zeros(len(idx), dtype=np.bool_)
            still[inside] = obj.pages[idx[inside]] == src[inside]
            out[consent & ~still] = -errno.EBUSY
            consent &= still
        if np.any(consent):
            held = self._pins_of(state, obj)[idx] & consent
            mm.unpin_pages(src[held])
            moved = mm.migrate_folio(obj, idx[consent], src[consent], dst[consent])
            out[consent] = moved
            ok = out == 0
            mm.pin_pages(np.where(ok, dst, src)[held])
        res = mm.settle_request(req, isolated, out, SHMEM_OPS)
        mm.vmstat.inc("gem_migrate_callback_eagain", int(np.count_nonzero(res == -EAGAIN)))
        mm.vmstat.inc("gem_migrate_callback_ebusy", int(np.count_nonzero(res == -errno.EBUSY)))
        return res

    async def _run_notifier(self, req: MigrationRequest, state: PeerState) -> Results:
        mm = self.mm
        obj = req.obj
        lo, hi = int(req.idx.min()), int(req.idx.max()) + 1
        t0 = time.perf_counter()
        rc = -EAGAIN
        try:
            answer = await state.peer.call(
                "invalidate",
                {"obj": obj.id, "start": lo, "count": hi - lo},
                answer_within=self.callback_timeout,
            )
            rc = answer if isinstance(answer, int) else -errno.EPROTO
        except CallError as e:
            if e.errno == "ETIMEDOUT":
                mm.vmstat.inc("gem_callback_timeouts")
        mm.vmstat.inc("gem_invalidate_callbacks")
        mm.callback_latency_us.append((time.perf_counter() - t0) * 1e6)
        self.stats["callbacks"] += 1
        if rc != 0 or mm.objects.get(obj.id) is not obj:
            return np.full(len(req.src), -EAGAIN if rc == 0 else -abs(rc), dtype=np.int32)
        # The driver dropped its GTT for the range: its pins there are gone.
        held = self._pins_of(state, obj)
        seg = held[lo:hi]
        pfns = obj.pages[lo:hi][seg[: len(obj.pages[lo:hi])]]
        mm.unpin_pages(pfns[pfns >= 0])
        seg[:] = False
        isolated = mm.isolate_request(req, SHMEM_OPS)
        ii = np.flatnonzero(isolated)
        out = mm.migrate_folio(obj, req.idx[ii], req.src[ii], req.dst[ii])
        return mm.settle_request(req, isolated, out, SHMEM_OPS)

    async def compact(self, order: int = -1, mode: MigrateMode = MigrateMode.SYNC) -> CompactResult:
        """compact_zone() with the core's own policy, callbacks awaited."""
        policy = CompactionPolicy(self.mm.pool.nr_pageblocks, order=order, mode=mode)
        return await self.run_policy(policy)

    async def run_policy(self, policy: CompactionPolicy) -> CompactResult:
        mm = self.mm
        while (batch := policy.next_batch(mm)) is not None:
            out = await self.migrate_pages(batch.src, batch.dst, policy.mode)
            policy.batch_done(batch, out.results)
            await trio.lowlevel.checkpoint()
        mm.vmstat.inc("compact_migrate_scanned", policy.stats.migrate_scanned)
        mm.vmstat.inc("compact_free_scanned", policy.stats.free_scanned)
        return policy.result

    async def alloc_high_order(
        self, order: int, mt: MigrateType, *, kind: str = "thp"
    ) -> int | None:
        """The allocator's slow path (gemfs.mm.page_alloc), its compactions run through the
        owners' callbacks."""
        slow = alloc_pages_slowpath(self.mm, order, mt, kind)
        try:
            policy = next(slow)
            while True:
                policy = slow.send(await self.run_policy(policy))
        except StopIteration as done:
            pfn: int | None = done.value
            return pfn

    async def aclose_peers(self) -> None:
        """Shutdown: disconnect every peer cleanly (they see EOF)."""
        for state in list(self.peers.values()):
            await state.peer.aclose()


async def control_service(
    kernel: KernelLike,
    path: str,
    *,
    allow_uids: Iterable[int] = (),
    callback_timeout: float = 2.0,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the control server for a mount; reports the server once it listens."""
    server = ControlServer(kernel, path, allow_uids=allow_uids, callback_timeout=callback_timeout)
    kernel.control = server  # type: ignore[attr-defined]
    fs = getattr(kernel, "fs", None)
    if fs is not None and hasattr(fs, "compact_memory"):
        # Writing 1 to .gemfs/compact_memory must reach the drivers' callbacks too.
        async def compact_memory() -> CompactResult:
            return await server.compact()

        fs.compact_memory = compact_memory
    await server.serve(task_status=task_status)
