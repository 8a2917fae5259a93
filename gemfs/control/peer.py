"""trio around the sans-IO protocol: one reader task per connection, calls both ways.

Short on purpose: framing, validation and the state machine live in
:mod:`gemfs.control.protocol`; this module only moves bytes and dispatches events.
"""

from __future__ import annotations

import array
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from gemfs.control.errors import CallError as CallError
from gemfs.control.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Call,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    LocalProtocolError,
    Message,
    Notify,
    ProtocolError,
    RemoteProtocolError,
    Reply,
    Welcome,
    encode_frame,
)

log = logging.getLogger("gemfs.control")
RECV = 1 << 20


CallHandler = Callable[["Peer", Call], Awaitable[Any]]
NotifyHandler = Callable[["Peer", Notify], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Credentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: trio.socket.SocketType) -> Credentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Credentials(pid, uid, gid)


@dataclass(eq=False)
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: CallError | None = None


class Peer:
    """One connection after the handshake. Run :meth:`serve` in a nursery."""

    def __init__(
        self,
        stream: trio.SocketStream,
        conn: Connection,
        *,
        on_call: CallHandler | None = None,
        on_notify: NotifyHandler | None = None,
        creds: Credentials | None = None,
        fds: list[int] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.on_call = on_call
        self.on_notify = on_notify
        self.creds = creds
        self.fds = fds or []
        self.info = info or {}
        self.closed = trio.Event()
        self.close_reason = ""
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}

    @property
    def role(self) -> str:
        return self.conn.peer_role or "server"

    @property
    def name(self) -> str:
        return self.conn.peer_name or "core"

    def __repr__(self) -> str:
        pid = self.creds.pid if self.creds else "?"
        return f"<Peer {self.role} {self.name!r} pid={pid}>"

    async def _send(self, event: Message) -> None:
        async with self._send_lock:
            data = self.conn.send(event)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.conn.send_failed()
                raise

    async def call(self, op: str, args: dict[str, Any], answer_within: float = math.inf) -> Any:
        """Make a call and wait for its answer; CallError on an error answer or a dead peer."""
        if self.closed.is_set():
            raise CallError("ENOTCONN", f"{self!r} is closed")
        cid = self.conn.new_call_id()
        pending = self._pending[cid] = _Pending()
        try:
            try:
                await self._send(Call(id=cid, op=op, args=args))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise CallError("ENOTCONN", f"send failed: {e}") from None
            except LocalProtocolError as e:
                raise CallError("ENOTCONN", f"cannot call: {e}") from None
            with trio.move_on_after(answer_within) as scope:
                await pending.event.wait()
            if scope.cancelled_caught:
                raise CallError("ETIMEDOUT", f"{op}: no answer within {answer_within:g} s")
        finally:
            self._pending.pop(cid, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def notify(self, op: str, args: dict[str, Any]) -> None:
        try:
            await self._send(Notify(op=op, args=args))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise CallError("ENOTCONN", f"send failed: {e}") from None
        except LocalProtocolError as e:
            raise CallError("ENOTCONN", f"cannot notify: {e}") from None

    async def _answer(self, call: Call) -> None:
        assert self.on_call is not None
        try:
            result = await self.on_call(self, call)
            answer: Message = Reply(id=call.id, result=result)
        except CallError as e:
            answer = Error(id=call.id, errno=e.errno, message=e.message[:1000])
        except LocalProtocolError as e:
            answer = Error(id=call.id, errno="EINVAL", message=str(e)[:1000])
        except Exception as e:
            log.exception("%r: handler for %s failed", self, call.op)
            answer = Error(id=call.id, errno="EIO", message=f"{type(e).__name__}: {e}"[:1000])
        try:
            await self._send(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError):
            pass

    async def serve(self) -> None:
        """Read and dispatch until EOF or a protocol error; then fail every pending call."""
        try:
            async with trio.open_nursery() as nursery:
                await self._read_loop(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown()
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as e:
                self.close_reason = f"protocol error: {e}"
                log.warning("%r: %s", self, self.close_reason)
                with trio.move_on_after(1):
                    try:
                        await self.stream.send_all(self.conn.send(e.notice()))
                    except Exception:
                        pass
                return
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive_some(RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    self.close_reason = f"read failed: {e}"
                    return
                self.conn.receive_data(data)
                continue
            match event:
                case ConnectionClosed():
                    self.close_reason = self.close_reason or "closed by peer"
                    return
                case Reply(id=cid, result=result):
                    p = self._pending.get(cid)
                    if p is not None:
                        p.result = result
                        p.event.set()
                case Error(id=0, errno=err, message=msg):
                    self.close_reason = f"peer error {err}: {msg}"
                    return
                case Error(id=cid, errno=err, message=msg):
                    p = self._pending.get(cid)
                    if p is not None:
                        p.error = CallError(err, msg)
                        p.event.set()
                case Call():
                    if self.on_call is None:
                        await self._send(Error(id=event.id, errno="EOPNOTSUPP", message="no calls"))
                    else:
                        nursery.start_soon(self._answer, event)
                case Notify():
                    if self.on_notify is not None:
                        await self.on_notify(self, event)
                case _:
                    self.close_reason = f"unexpected {type(event).__name__}"
                    return

    def _shutdown(self) -> None:
        self.closed.set()
        for p in self._pending.values():
            p.error = CallError("ENOTCONN", f"connection closed ({self.close_reason})")
            p.event.set()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


# -- handshakes ------------------------------------------------------------------------------------
async def server_handshake(
    sock: trio.socket.SocketType,
    info_for: Callable[[Hello, Credentials], dict[str, Any] | Error],
    fds_for: Callable[[Hello], list[int]],
    handshake_within: float = 5.0,
) -> tuple[Connection, Hello, Credentials]:
    """Wait for Hello, answer Welcome (with fds by SCM_RIGHTS) or an Error; ProtocolError else."""
    creds = peer_credentials(sock)
    conn = Connection("server")
    with trio.fail_after(handshake_within):
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(await sock.recv(RECV))
                    continue
                if not isinstance(event, Hello):
                    raise RemoteProtocolError(f"expected Hello, got {type(event).__name__}")
                hello = event
                break
        except RemoteProtocolError as e:
            try:  # tell the peer why, best effort, then let the caller close
                await sock.send(
                    encode_frame({"k": "error", "id": 0, "e": "EPROTO", "m": e.message})
                )
            except OSError:
                pass
            raise
        answer = info_for(hello, creds)
        if isinstance(answer, Error):
            await sock.send(conn.send(answer))
            raise CallError(answer.errno, answer.message)
        data = conn.send(Welcome(version=PROTOCOL_VERSION, info=answer))
        fds = fds_for(hello)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await sock.sendmsg([data], anc)
            data = data[sent:]
        while data:
            n = await sock.send(data)
            data = data[n:]
    return conn, hello, creds


async def connect(
    path: str,
    role: Literal["driver", "compactor", "client"],
    name: str,
    *,
    on_call: CallHandler | None = None,
    on_notify: NotifyHandler | None = None,
    handshake_within: float = 5.0,
) -> Peer:
    """Connect to a control socket and do the handshake; fds passed with Welcome are kept."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(handshake_within):
            await sock.connect(path)
            conn = Connection("peer")
            await sock.send(conn.send(Hello(version=PROTOCOL_VERSION, role=role, name=name)))
            fds: list[int] = []
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    msg, anc, _flags, _addr = await sock.recvmsg(
                        RECV, socket.CMSG_SPACE(16 * array.array("i").itemsize)
                    )
                    for level, kind, payload in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            a = array.array("i")
                            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                            fds.extend(a)
                    conn.receive_data(msg)
                    continue
                if isinstance(event, Error):
                    raise CallError(event.errno, event.message)
                if not isinstance(event, Welcome):
                    raise RemoteProtocolError(f"expected Welcome, got {type(event).__name__}")
                break
    except BaseException:
        sock.close()
        raise
    return Peer(
        trio.SocketStream(sock),
        conn,
        on_call=on_call,
        on_notify=on_notify,
        fds=fds,
        info=dict(event.info),
    )
