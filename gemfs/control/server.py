"""The core's side of the control socket (trio): peers, ownership, pins, remote callbacks.

Drivers, compactors and clients connect here. A driver owns the objects it created or opened,
pins their pages through the core, and registers itself as their owner (per object, for the
mount, or as a notifier); the core sends its asks back over the same connection. Migration runs
the model's one mechanism (:class:`gemfs.mm.migrate.Migration`), delivering its asks to all
owners at once and awaiting them, so the event loop (and the FUSE mount) keeps serving while a
driver decides. All times are modelled: the pool's clock moves only by ``advance`` (which wakes
a driven compactor at its instants) and by what allocating tasks wait.
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
from gemfs.mm import CompactResult, GemObject, MemoryManager, MigrateMode
from gemfs.mm.compaction import ZoneCompactState
from gemfs.mm.contig import MAX_CONTIG_ORDER, ContigPolicy
from gemfs.mm.core import MigrateOutcome, ObjectError, Policy
from gemfs.mm.costs import CostTable, Task
from gemfs.mm.kcompactd import WakeSchedule
from gemfs.mm.migrate import Answer, Ask, AskInvalidate, Migration
from gemfs.mm.page_alloc import AllocKind, alloc_pages_slowpath, kcompactd_wake
from gemfs.mm.pool import I64
from gemfs.mm.trace import PassPoint
from gemfs.mm.types import MAX_ORDER, Design, MigrateType, OutOfMemory
from gemfs.mm.vmstat import VMSTAT_COUNTERS
from gemfs.mountproc import control_socket_in_use

log = logging.getLogger("gemfs.control")
# What a compactor process may add to the pool's vmstat (its own scanning and wake-ups).
COMPACTOR_COUNTERS = frozenset(
    k for k in VMSTAT_COUNTERS if k.startswith(("compact_", "proactive_compact"))
)
EAGAIN = errno.EAGAIN
MAX_TRACE_LINES = 1 << 26  # the largest trace buffer a client may ask for (lines)


class KernelLike(Protocol):
    """What the control server needs from the mount (gemfs.daemon.Kernel provides it)."""

    mm: MemoryManager

    def create_file(self, path: str, size: int, uid: int, gid: int, mode: int) -> GemObject: ...

    def resolve(self, path: str) -> GemObject: ...

    def may_write(self, path: str, uid: int, gid: int) -> bool: ...

    def path_of(self, obj: GemObject) -> str: ...

    def unlink(self, path: str) -> None: ...

    def trace(self, seed: int | None, buffer_lines: int | None = None) -> None: ...

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


def _time(args: dict[str, Any], key: str, default: float) -> float:
    v = args.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1e12:
        raise _err(errno.EINVAL, f"argument {key!r} must be a time in seconds >= 0")
    return float(v)


def _waited(r: dict[str, Any], key: str = "waited_s") -> float:
    w = r.get(key, 0.0)
    if not isinstance(w, int | float) or isinstance(w, bool) or not 0 <= w < 1e9:
        raise CallError("EPROTO", f"{key} must be a number of seconds >= 0")
    return float(w)


def _dropped(r: dict[str, Any], n: int) -> tuple[bool, ...]:
    d = r.get("dropped", [])
    if not isinstance(d, list) or (d and len(d) != n) or not all(isinstance(x, bool) for x in d):
        raise CallError("EPROTO", "dropped must be a list of booleans, one per object")
    return tuple(d)


def _mode(args: dict[str, Any]) -> MigrateMode:
    try:
        return MigrateMode.parse(str(args.get("mode", "sync")))
    except ValueError as e:
        raise _err(errno.EINVAL, str(e)) from None


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a dead server is removed; a live server's socket (one that
    accepts a connection) or anything else at the path is an error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    if control_socket_in_use(path):
        raise OSError(errno.EADDRINUSE, f"{path}: a live server answers on this socket")
    os.unlink(path)


class RemoteOwner:
    """A driver connection as an owner of pages: the mechanism's asks go to it as calls."""

    def __init__(self, state: PeerState) -> None:
        self.state = state
        self.name = f"remote:{state.peer.name}"


@dataclass(eq=False)
class PeerState:
    peer: Peer
    creds: Credentials
    owned: set[int] = field(default_factory=set)
    kernel_allocs: set[int] = field(default_factory=set)
    owner: RemoteOwner = field(init=False)
    schedule: WakeSchedule | None = None  # a compactor driven on the modelled clock

    def __post_init__(self) -> None:
        self.owner = RemoteOwner(self)


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
        self.advance_lock = trio.Lock()
        self.stats = {
            "connections": 0,
            "refused": 0,
            "protocol_errors": 0,
            "callbacks": 0,
            "asks": 0,  # asks sent to owners (counted when sent, before any answer)
        }
        # Harness figure (wall clock, not modelled): how long owners took to answer over the
        # socket. Never part of a design's metrics.
        self.callback_wall_us: list[float] = []
        self._token = 0  # names a migrate ask and its "migrated" notice
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
        trusted = creds.uid in (0, os.getuid())
        if not trusted and creds.uid not in self.allow_uids:
            self.stats["refused"] += 1
            return Error(id=0, errno="EACCES", message=f"uid {creds.uid} may not connect")
        if hello.role == "driver" and not trusted:
            # A driver gets the pool's memfd read-write: every frame of every file, whoever
            # owns it. Only root and the mount's own uid may have that; --allow-uid grants the
            # client and compactor roles, which see frame numbers but never frame contents.
            self.stats["refused"] += 1
            return Error(
                id=0,
                errno="EACCES",
                message=f"uid {creds.uid} may not attach as a driver (it would map the whole "
                "pool); only root and the mount's owner may",
            )
        pool = self.mm.pool
        return {
            "design": self.mm.design.value,
            "nr_pages": pool.nr_pages,
            "page_size": 4096,
            "memfd": hello.role == "driver",
        }

    def _fds(self, hello: Hello) -> list[int]:
        # Called only after _welcome accepted the peer: a driver here is root or our own uid.
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
            written = self._disconnect(state)
            log.info("disconnected: %r (%s)", peer, peer.close_reason)
            if written:
                # A driver that died may have had the GPU write its objects without telling
                # the core (killed between the batch and content_changed): the kernel's cached
                # pages of those files may be stale. Drop them, as content_changed would have.
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    for obj in written:
                        await self.kernel.invalidate(obj, 0, obj.nr_pages)

    def _disconnect(self, state: PeerState) -> list[GemObject]:
        """A peer left (or died): release its pins and ops; its objects stay as plain files.
        Returns a driver's objects (the GPU may have written them)."""
        self.peers.pop(id(state.peer), None)
        mm = self.mm
        mm.release_owner(state.owner)
        written: list[GemObject] = []
        for oid in state.owned:
            obj = mm.objects.get(oid)  # type: ignore[call-overload]
            if obj is None:
                continue
            if state.peer.role == "driver":
                written.append(obj)
            if obj.ops is state.owner:
                obj.ops = None
            if obj.notifier is state.owner:
                obj.notifier = None
            obj.owner_tag = ""
        if mm.mount_ops is state.owner:
            mm.mount_ops = None
        for pfn in state.kernel_allocs:
            if pfn in mm.kernel_pages:
                mm.free_kernel(pfn)
        state.kernel_allocs.clear()
        return written

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
                # A driver's object is private before it gets pages (TTM allocates those).
                later = mt is not None or role == "driver"
                try:
                    obj = self.kernel.create_file(path, 0 if later else size, c.uid, c.gid, 0o644)
                    obj.private = role == "driver"
                    if mt is not None:  # e.g. a page-cache file that is not GEM memory
                        obj.migratetype = mt
                    if later:
                        try:
                            mm.truncate(obj, size)
                            mm.populate(obj, 0, obj.nr_pages)
                        except OutOfMemory:  # as create_object: no file is left behind
                            mm.truncate(obj, 0)
                            self.kernel.unlink(path)
                            raise
                except OutOfMemory as e:
                    raise _err(errno.ENOSPC, str(e)) from None
                except ObjectError as e:  # EEXIST, ENOENT, ENOTDIR, ENAMETOOLONG, EACCES, ...
                    raise _err(e.errno, str(e)) from None
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
                obj.private = obj.private or role == "driver"
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
                try:  # no pin on pages mid-migration (EAGAIN): the range is being moved
                    pfns = mm.hold(state.owner, obj, start, count)
                except OutOfMemory as e:
                    raise _err(errno.ENOSPC, str(e)) from None
                except ObjectError as e:
                    raise _err(e.errno, str(e)) from None
                return {"frames": pfns.astype("<i8").tobytes(), "now": mm.clock.now}
            case "unpin":
                obj = self._owned(state, args)
                start, count = self._range(obj, args)
                mm.release(state.owner, obj, start, count)
                return 0
            case "register_ops" if role == "driver":
                obj = self._owned(state, args)
                self._require(Design.SHMEM_HOOK, "per-object ops")
                obj.ops = state.owner
                return 0
            case "claim_mount" if role == "driver":
                self._require(Design.GEMFS, "claiming the mount")
                if mm.mount_ops is not None and mm.mount_ops is not state.owner:
                    raise _err(errno.EBUSY, "another driver has claimed the mount")
                mm.mount_ops = state.owner
                return 0
            case "register_notifier" if role == "driver":
                obj = self._owned(state, args)
                self._require(Design.NOTIFIER, "notifiers")
                obj.notifier = state.owner
                return 0
            case "content_changed":
                if "objs" in args:  # whole objects, many at once (a GPU batch's writes)
                    ids = args["objs"]
                    if not isinstance(ids, list) or len(ids) > 1 << 16:
                        raise _err(errno.EINVAL, "objs must be a list of object ids")
                    objs = [self._owned(state, {"obj": i}) for i in ids]
                    for obj in objs:
                        await self.kernel.invalidate(obj, 0, obj.nr_pages)
                    return 0
                obj = self._owned(state, args)
                start, count = self._range(obj, args)
                await self.kernel.invalidate(obj, start, count)
                return 0
            case "snapshot":
                pool = mm.pool
                snap: dict[str, Any] = {
                    "nr_pages": pool.nr_pages,
                    "flags": pool.flags.tobytes(),
                    "pageblock_mt": pool.pageblock_mt.tobytes(),
                    "free": mm.free_blocks_per_order(),
                }
                hopeless = mm.hopeless_pageblocks()
                if hopeless is not None:  # illuminator: blocks compaction passes over
                    snap["hopeless"] = hopeless.astype(np.uint8).tobytes()
                snap["compact_state"] = mm.compact_state.export()  # a pass's skip bits, scanners
                snap["tracing"] = mm.tracer is not None  # then tell me of passes (trace_pass)
                return snap
            case "migrate" if role in ("compactor", "client"):
                src = _pfns(args, "src", 1 << 16)
                dst = _pfns(args, "dst", 1 << 16)
                if len(src) != len(dst):
                    raise _err(errno.EINVAL, "src and dst differ in length")
                task = Task(_time(args, "now", mm.clock.now))
                scanned = args.get("scanned", 0)  # the caller's scanners ran first
                if isinstance(scanned, int) and 0 < scanned <= 1 << 40:
                    mm.charge_scan_pages(scanned, task)
                out = await self.migrate_pages(src, dst, _mode(args), task)
                return {
                    "results": pack_i32(out.results),
                    "free": mm.free_blocks_per_order(),
                    "t": task.t,
                }
            case "kswapd" if role == "client":  # page cache was reclaimed: kswapd sleeps
                return {"flushed": mm.kswapd_sleep()}
            case "compact" if role in ("compactor", "client"):
                order = _int(args, "order", 0, MAX_ORDER) if args.get("order", -1) != -1 else -1
                result = await self.compact(order, _mode(args))
                return {"result": result.value, "free": mm.free_blocks_per_order()}
            case "stats":
                return self.stats_dict(light=bool(args.get("light", False)))
            case "fragmentation":  # cheap: what kcompactd looks at on every wake-up
                return {
                    "free": mm.free_blocks_per_order(),
                    "score": mm.fragmentation_score(),
                    "proactiveness": mm.compaction_proactiveness,
                    "nr_pageblocks": mm.pool.nr_pageblocks,
                    "defrag_reserve": mm.defrag_reserve,  # kcompactd's pageblock reserve
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
                scanned = args.get("scanned", 0)  # the compactor's scanners: charged as scanning
                if isinstance(scanned, int) and scanned > 0:
                    mm.charge_scan_pages(scanned)
                if (left := args.get("compact_state")) is not None:  # what its pass left
                    if not isinstance(left, dict):
                        raise _err(errno.EINVAL, "compact_state must be a map")
                    try:
                        st = ZoneCompactState.imported(mm.pool.nr_pageblocks, left)
                    except ValueError as e:
                        raise _err(errno.EINVAL, str(e)) from None
                    mm.compact_state.absorb(st)
                return 0
            case "trace_pass" if role == "compactor":
                self._trace_pass(args)
                return 0
            case "kcompactd_work" if role == "compactor":
                # kcompactd's order work at a wake-up, in the zone's own compaction state.
                order = _int(args, "order", -1, MAX_ORDER) if "order" in args else -1
                now = args.get("now")
                if now is not None and not isinstance(now, int | float):
                    raise _err(errno.EINVAL, "now must be a number")
                task = Task(mm.clock.now if now is None else float(now))
                work = kcompactd_wake(mm, order)
                status: CompactResult | None
                try:
                    policy = next(work)
                    while True:
                        policy = work.send(await self.run_policy(policy, task))
                except StopIteration as done:
                    status = done.value
                return {"worked": status is not None, "result": status and status.value}
            case "clock":
                return {"now": mm.clock.now}
            case "costs" if role == "client":  # a workload's [costs] table
                table = args.get("table")
                if not isinstance(table, dict):
                    raise _err(errno.EINVAL, "table must be a map of cost names to µs")
                try:
                    mm.costs = CostTable.from_mapping(table)
                except ValueError as e:
                    raise _err(errno.EINVAL, str(e)) from None
                return mm.costs.to_json()
            case "advance" if role in ("client", "driver"):
                if "to" in args:
                    to = _time(args, "to", mm.clock.now)
                else:
                    to = mm.clock.now + _time(args, "seconds", 0.0)
                await self.advance_to(to)
                return {"now": mm.clock.now}
            case "kcompactd" if role == "compactor":
                # The compactor asks to be woken on the modelled clock every interval_s.
                interval = args.get("interval_s")
                if not isinstance(interval, int | float) or not 0 < interval <= 3600:
                    raise _err(errno.EINVAL, "interval_s must be in (0, 3600]")
                state.schedule = WakeSchedule(float(interval), mm.clock.now + float(interval))
                return {"now": mm.clock.now}
            case "alloc" if role == "client":
                compact = bool(args.get("compact"))
                order = _int(args, "order", 0, MAX_CONTIG_ORDER if compact else MAX_ORDER)
                try:
                    mt = MigrateType.parse(str(args.get("mt", "unmovable")))
                except ValueError as e:
                    raise _err(errno.EINVAL, str(e)) from None
                latency = 0.0
                compacted = False
                try:
                    kind = AllocKind.parse(str(args.get("kind", "thp")))
                except ValueError as e:
                    raise _err(errno.EINVAL, str(e)) from None
                if args.get("compact"):
                    pfn, latency, compacted = await self.allocate_huge(order, mt, kind)
                else:
                    try:
                        pfn = mm.alloc_kernel(order, mt)
                    except OutOfMemory:
                        pfn = None
                if pfn is None:
                    if args.get("compact"):  # the attempt and its latency are part of the answer
                        return {"pfn": -1, "latency_us": latency, "compacted": False}
                    raise _err(errno.ENOMEM, f"no free block of order {order}")
                state.kernel_allocs.add(pfn)
                return {"pfn": pfn, "latency_us": latency, "compacted": compacted}
            case "trace" if role == "client":
                return self._trace(args)
            case "free" if role == "client":
                pfn = _int(args, "pfn", 0, mm.pool.nr_pages)
                if pfn not in state.kernel_allocs:
                    raise _err(errno.EPERM, f"block {pfn} is not yours")
                state.kernel_allocs.discard(pfn)
                mm.free_kernel(pfn)
                return 0
            case _:
                raise _err(errno.EOPNOTSUPP, f"op {call.op!r} not supported for role {role}")

    def _trace(self, args: dict[str, Any]) -> dict[str, int]:
        """The ``trace`` op: tracing on for the run of ``seed`` (the lines are read at the
        mount's .gemfs/trace_pipe), or off; the counts of the tracer that was on."""
        on = args.get("on")
        if not isinstance(on, bool):
            raise _err(errno.EINVAL, "argument 'on' must be true or false")
        tracer = self.mm.tracer
        counts = {"written": 0, "lost": 0}
        if tracer is not None:
            counts = {"written": tracer.written, "lost": tracer.lost}
        if not on:
            self.kernel.trace(None)
            return counts
        if tracer is not None:
            raise _err(errno.EBUSY, "tracing is already on (tracing_on): turn it off first")
        seed = _int(args, "seed", 0, 2**62) if "seed" in args else 0
        lines = _int(args, "buffer_lines", 1, MAX_TRACE_LINES) if "buffer_lines" in args else None
        self.kernel.trace(seed, lines)
        return counts

    def _trace_pass(self, args: dict[str, Any]) -> None:
        """A compactor process's pass begins or ends: its tracepoint, as a pass run here
        prints it (MemoryManager.policy_started/policy_finished)."""
        mm = self.mm
        at = args.get("at")
        if at not in ("begin", "end"):
            raise _err(errno.EINVAL, "argument 'at' must be 'begin' or 'end'")
        try:
            result = CompactResult(args.get("result", CompactResult.CONTINUE.value))
        except ValueError:
            raise _err(errno.EINVAL, f"not a compaction result: {args.get('result')!r}") from None
        n = mm.pool.nr_pageblocks  # (a scanner may stand one past its end)
        blocks = _int(args, "migrate_block", -1, n), _int(args, "free_block", -1, n)
        point = PassPoint(*blocks, _mode(args), result)
        if mm.tracer is None:
            return
        if at == "begin":
            mm.tracer.compaction_begin(point, mm.pool.nr_pages)
        else:
            mm.tracer.compaction_end(point, mm.pool.nr_pages)

    def _require(self, design: Design, what: str) -> None:
        if self.mm.design is not design:
            raise _err(
                errno.EOPNOTSUPP, f"{what} needs design {design.value}, mount has {self.mm.design}"
            )

    def _release_object(self, state: PeerState, obj: GemObject) -> None:
        self.mm.release(state.owner, obj, 0, max(obj.nr_pages, len(obj.pages)))
        if obj.ops is state.owner:
            obj.ops = None
        if obj.notifier is state.owner:
            obj.notifier = None
        state.owned.discard(obj.id)

    def stats_dict(self, *, light: bool = False) -> dict[str, Any]:
        """The pool's state; ``light`` leaves out the per-pageblock maps (O(pool) to send)."""
        mm = self.mm
        maps = not light
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
            "pageblock_mixed": pack_i64(mm.mixed_pageblock_indices()) if maps else b"",
            "pageblock_states": mm.pageblock_states().tobytes() if maps else b"",
            "pageblock_mt": mm.pool.pageblock_mt.tobytes() if maps else b"",
            "callback_wall_us": self.callback_wall_us[-10000:],  # harness, not modelled
            "clock": mm.clock.now,
            "costs": mm.ledger.to_json(),
            "cost_table": mm.costs.to_json(),
            "allocs": {
                "attempts": mm.allocs.attempts,
                "successes": mm.allocs.successes,
                "compacted": mm.allocs.compacted,
            },
            "peers": [
                {
                    "role": s.peer.role,
                    "name": s.peer.name,
                    "pid": s.creds.pid,
                    "driven": s.schedule is not None,
                }
                for s in self.peers.values()
            ],
        }

    # -- migration with remote owners ------------------------------------------------------------
    async def migrate_pages(
        self, src: I64, dst: I64, mode: MigrateMode, task: Task | None = None
    ) -> MigrateOutcome:
        """One batch through the mechanism, its asks delivered to every owner at once.

        It runs to its end even if the caller goes away (a killed compactor must not leave
        pages isolated or targets taken); every ask is time-boxed (wall clock: a silent
        driver is a fault, not a modelled cost)."""
        async with self.migrate_lock:
            with trio.CancelScope(shield=True):
                m = Migration(self.mm, src, dst, mode, task or Task(self.mm.clock.now))
                asks = m.start()
                async with trio.open_nursery() as nursery:
                    for ask in asks:
                        nursery.start_soon(self._deliver, m, ask)
                return m.finish()
        raise AssertionError("unreachable")  # pragma: no cover - a shielded scope returns

    async def _deliver(self, m: Migration, ask: Ask) -> None:
        """Put one ask to its owner, hand the answer to the machine, send back the notice."""
        owner = ask.owner
        if not isinstance(owner, RemoteOwner):  # an in-process owner (not on a mount today)
            answer = getattr(owner, "answer", None)
            m.answer(ask, answer(ask) if answer else Answer.failure("unreachable"))
            return
        state = owner.state
        self._token += 1
        token = self._token
        self.stats["asks"] += 1
        t0 = time.perf_counter()
        try:
            ans = await self._ask(state, ask, token)
        except Exception:  # never leave the batch half-done
            log.exception("ask to %s failed", owner.name)
            ans = Answer.failure("protocol")
        self.callback_wall_us.append((time.perf_counter() - t0) * 1e6)
        self.stats["callbacks"] += 1
        notice = m.answer(ask, ans)
        if notice is not None and id(state.peer) in self.peers:  # always release its objects
            notes = [
                {
                    "obj": obj.id,
                    "idx": pack_i64(idx),
                    "dst": pack_i64(dst),
                    "ok": ok.astype(np.uint8).tobytes(),
                }
                for obj, idx, dst, ok in notice.parts
            ]
            try:
                await state.peer.notify("migrated", {"objs": notes, "token": token})
            except CallError:
                pass

    async def _ask(self, state: PeerState, ask: Ask, token: int) -> Answer:
        mode = ask.mode.name.lower()
        try:
            if isinstance(ask, AskInvalidate):
                r = await state.peer.call(
                    "invalidate",
                    {
                        "obj": ask.part.obj.id,
                        "start": ask.start,
                        "count": ask.count,
                        "mode": mode,
                        "now": ask.now,
                    },
                    answer_within=self.callback_timeout,
                )
                if not isinstance(r, dict) or not isinstance(r.get("rc"), int):
                    raise CallError("EPROTO", "invalidate answer has the wrong shape")
                return Answer(rc=int(r["rc"]), waited_s=_waited(r))
            r = await state.peer.call(
                "migrate",
                {
                    "objs": [
                        {
                            "obj": p.obj.id,
                            "idx": pack_i64(p.idx),
                            "src": pack_i64(p.src),
                            "dst": pack_i64(p.dst),
                        }
                        for p in ask.parts
                    ],
                    "mode": mode,
                    "now": ask.now,
                    "token": token,
                },
                answer_within=self.callback_timeout,
            )
            got = r.get("results") if isinstance(r, dict) else None
            if not isinstance(got, list) or len(got) != len(ask.parts):
                raise CallError("EPROTO", "migrate answer has the wrong shape")
            parsed = tuple(arrays.results(g) for g in got)
            if any(len(a) != len(p.idx) for a, p in zip(parsed, ask.parts, strict=True)):
                raise CallError("EPROTO", "migrate answer has the wrong shape")
            return Answer(
                results=parsed,
                waited_s=_waited(r),
                lock_s=_waited(r, "lock_s"),
                dropped=_dropped(r, len(ask.parts)),
            )
        except CallError as e:
            if e.errno == "ETIMEDOUT":
                return Answer.failure("timeout")
            if e.errno == "EPROTO":
                await state.peer.aclose()
            return Answer.failure("gone" if e.errno == "ENOTCONN" else "protocol")
        except ValueError:  # results that are not int32 bytes or ints
            await state.peer.aclose()
            return Answer.failure("protocol")

    async def compact(self, order: int = -1, mode: MigrateMode = MigrateMode.SYNC) -> CompactResult:
        """compact_zone() with the core's own policy (as in process), callbacks awaited."""
        return await self.run_policy(self.mm.compact_policy(order, mode))

    async def run_policy(self, policy: Policy, task: Task | None = None) -> CompactResult:
        mm = self.mm
        task = task or Task(mm.clock.now)
        scanned = 0
        mm.policy_started(policy)
        while (batch := policy.next_batch(mm)) is not None:
            scanned = mm.charge_scan(policy.stats, scanned, task)
            out = await self.migrate_pages(batch.src, batch.dst, policy.mode, task)
            policy.batch_done(batch, out.results)
            await trio.lowlevel.checkpoint()
        mm.policy_finished(policy, scanned, task)
        return policy.result

    async def alloc_high_order(
        self, order: int, mt: MigrateType, task: Task | None = None, *, kind: str = "thp"
    ) -> int | None:
        """The allocator's slow path (gemfs.mm.page_alloc), its compactions run through the
        owners' callbacks and charged to ``task``."""
        slow = alloc_pages_slowpath(self.mm, order, mt, kind)
        try:
            policy = next(slow)
            while True:
                policy = slow.send(await self.run_policy(policy, task))
        except StopIteration as done:
            pfn: int | None = done.value
            return pfn

    async def allocate_huge(
        self, order: int, mt: MigrateType, kind: AllocKind = AllocKind.THP
    ) -> tuple[int | None, float, bool]:
        """A high-order allocation as a task sees it: (pfn or None, modelled µs, compacted)."""
        mm = self.mm
        task = Task(mm.clock.now)
        stalls = mm.vmstat["compact_stall"]
        compacted = mm.allocs.compacted
        pfn: int | None = None
        moved: bool | None = None
        try:
            if order > MAX_ORDER:  # larger than a buddy block: alloc_contig_pages
                policy = ContigPolicy(mm.pool.nr_pages, order, unaskable=mm.unaskable_pins())
                pfn = mm.alloc_contig(policy, await self.run_policy(policy, task))
                moved = policy.stats.migrated > 0
            else:
                pfn = await self.alloc_high_order(order, mt, task, kind=kind)
        finally:
            latency = mm.end_alloc(task, pfn, stalls, moved)
        return pfn, latency, mm.allocs.compacted > compacted

    async def advance_to(self, to: float) -> None:
        """Let modelled time pass to ``to``, waking each driven compactor at its instants."""
        mm = self.mm
        async with self.advance_lock:
            while True:
                due = [
                    (s.schedule.next_wake, id(s), s)
                    for s in self.peers.values()
                    if s.schedule is not None and s.schedule.next_wake <= to
                ]
                if not due:
                    break
                at, _, state = min(due, key=lambda d: (d[0], d[1]))
                assert state.schedule is not None
                for wake in state.schedule.due(mm.clock.now, at):
                    mm.clock.advance_to(wake)
                    try:
                        await state.peer.call("wake", {"now": wake}, answer_within=600)
                    except CallError as e:
                        log.warning("compactor %s did not wake: %s", state.peer.name, e)
                        state.schedule = None
                        break
            mm.clock.advance_to(to)

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
